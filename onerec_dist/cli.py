"""The `onerec` command: `onerec <stage> [key=value ...]`.

The first argument picks a stage; the rest are Hydra overrides composed onto conf/config.yaml. Every stage writes
the resolved config (config.yaml) and a summary.json into ``output_dir``. ``--cfg job`` prints the resolved config
instead of running. Stage modules are imported lazily so that `onerec --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

from onerec_dist.conf_dir import find_conf_dir
from onerec_dist.stages import STAGES
from onerec_dist.stages.runner import run_stage

# $ONEREC_CONF_DIR, else conf/ of this source tree, else the installed package data (onerec_dist/conf_dir.py).
CONF_DIR = find_conf_dir()


class UsageError(ValueError):
    """Bad command line: exit code 2 with the message."""


def compose(overrides: list[str]):
    """Compose conf/config.yaml with Hydra overrides; errors name the valid choices."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not CONF_DIR.is_dir():
        raise UsageError(f"config directory {CONF_DIR} not found (set ONEREC_CONF_DIR)")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise UsageError(_explain_override_error(str(err), overrides)) from None


def _explain_override_error(message: str, overrides: list[str]) -> str:
    """Hydra says 'Key x is not in struct' without the valid keys; add them."""
    if "not in struct" not in message and "Could not override" not in message:
        return message
    from omegaconf import OmegaConf

    from hydra import compose as hydra_compose

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    base = hydra_compose(config_name="config", overrides=[o for o in overrides if o.split("=")[0] in groups])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_path) if parent_path else base
        if parent is not None and hasattr(parent, "keys") and leaf not in parent:
            where = parent_path or "the root config"
            return (f"unknown config key {key!r}: {where} has no key {leaf!r}; valid keys there: "
                    f"{', '.join(sorted(str(k) for k in parent.keys()))}. (Hydra: {message.splitlines()[0]})")
    return message


def _is_sid_override(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "sid" or key.startswith("sid.")


def mark_explicit_sid(cfg, overrides: list[str]):
    """Fill ``explicit_sid_keys``: the sid.* keys the command line sets, by name or through a ``sid=<preset>``
    choice (keys whose value differs from the composition without the sid overrides). A stage that starts from a
    model carrying its own IDs only checks these against the model's table (onerec_dist.sid.model_ids)."""
    from omegaconf import open_dict

    sid_overrides = [o for o in overrides if _is_sid_override(o)]
    if not sid_overrides:
        return cfg
    named = {o.split("=", 1)[0].lstrip("+~").split(".", 1)[1] for o in sid_overrides if "." in o.split("=", 1)[0]}
    base = compose([o for o in overrides if not _is_sid_override(o)]).sid
    changed = {k for k in cfg.sid if k not in base or cfg.sid[k] != base[k]}
    with open_dict(cfg):
        cfg.explicit_sid_keys = sorted(set(cfg.get("explicit_sid_keys") or []) | named | changed)
    return cfg


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: onerec <stage> [key=value ...] [--cfg job]", "", "stages:"]
    lines += [f"  {name:<{width}}  {spec.help}" for name, spec in STAGES.items()]
    lines += ["", "Overrides are Hydra syntax, e.g. `onerec prepare data=letter data.dir=DIR data.name=NAME "
              "output_dir=OUT`.", f"Configs: {CONF_DIR}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; valid stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    print_cfg = False
    if "--cfg" in rest:
        i = rest.index("--cfg")
        if rest[i + 1:i + 2] != ["job"]:
            print("error: only `--cfg job` is supported", file=sys.stderr)
            return 2
        print_cfg, rest = True, rest[:i] + rest[i + 2:]
    if "--help" in rest or "-h" in rest:
        print(f"onerec {stage}: {STAGES[stage].help}\n\n{usage()}")
        return 0
    from onerec_dist.env import apply_offline_defaults

    apply_offline_defaults()
    try:
        cfg = mark_explicit_sid(compose(rest), rest)
        if print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        # Absolute: Ray workers run in their own working directory.
        summary = run_stage(stage, cfg, Path(cfg.output_dir).resolve())
    except ValueError as err:  # UsageError, DataError and schema errors all derive from ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"onerec {stage}: done in {summary['seconds']:.1f}s; summary: {Path(cfg.output_dir) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
