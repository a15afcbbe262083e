"""The job being launched: `onerec <stage> [overrides]`, its entrypoint on the cluster and its runtime environment.

A ``JobSpec`` is the normal form of the part after ``--`` on the `onerec-launch` command line: overrides keyed by
their Hydra key with the last value winning (Hydra's own rule for repeated keys), and ``output_dir`` always explicit
so that a job, and its relaunch, never depends on the config's default or on the directory Ray unpacks the code to.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from onerec_dist.env import OFFLINE_DEFAULTS
from onerec_dist.stages import STAGES

from onerec_launch.config import LaunchConfig


@dataclass(frozen=True)
class JobSpec:
    """`onerec <stage> <overrides...>`; ``overrides`` is normalised (one per key, output_dir included)."""

    stage: str
    overrides: tuple[str, ...]

    @property
    def output_dir(self) -> str:
        return dict(_split(o) for o in self.overrides)["output_dir"]

    def argv(self) -> list[str]:
        """The job as a command line for `onerec` (the console script)."""
        return ["onerec", self.stage, *self.overrides]


def _split(override: str, what: str = "job override") -> tuple[str, str]:
    key, sep, value = override.partition("=")
    if not sep or not key.lstrip("+~"):
        raise ValueError(f"{what} {override!r} is not key=value (Hydra syntax, e.g. data.synthetic.num_users=60)")
    return key, value


def normalise_overrides(overrides: list[str], what: str = "job override") -> list[str]:
    """One override per key in first-seen order, the last value winning (what Hydra does with repeats)."""
    latest: dict[str, str] = {}
    for override in overrides:
        key, _ = _split(override, what)
        latest[key] = override
    return list(latest.values())


def parse_job_argv(argv: list[str]) -> tuple[str, list[str]]:
    """`onerec <stage> overrides...` (the leading `onerec` may be left out) -> (stage, overrides)."""
    if argv and (argv[0] == "onerec" or Path(argv[0]).name == "onerec"):
        argv = argv[1:]
    if not argv:
        raise ValueError(f"missing job: give `-- onerec <stage> [overrides]`; valid stages: {', '.join(STAGES)}")
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    for override in overrides:
        if override.startswith("-"):
            raise ValueError(f"job argument {override!r} is not supported by onerec-launch; give key=value overrides")
        _split(override)
    return stage, overrides


def build_job_spec(stage: str, overrides: list[str], *, resolve_output_dir: bool = True,
                   cwd: Path | None = None) -> JobSpec:
    """Validate the overrides against conf/config.yaml here (a typo fails before anything is submitted) and make
    output_dir explicit; relative output_dir is resolved against ``cwd`` when ``resolve_output_dir`` (shared
    filesystem backends), since the job itself runs in the directory Ray unpacked the code to."""
    from onerec_dist.cli import compose

    overrides = normalise_overrides(overrides)
    cfg = compose(overrides)  # raises UsageError (a ValueError) naming a bad key and the valid ones
    output_dir = str(cfg.output_dir)
    if resolve_output_dir and not os.path.isabs(output_dir):
        output_dir = str((cwd or Path.cwd()) / output_dir)
    overrides = normalise_overrides([*overrides, f"output_dir={output_dir}"])
    return JobSpec(stage=stage, overrides=tuple(overrides))


def python_command(cfg: LaunchConfig, backend: str) -> str:
    if cfg.python is not None:
        return cfg.python
    # A fresh local Ray inherits our environment, so this interpreter has onerec_dist; remote ones use their own.
    return shlex.quote(sys.executable) if backend == "local" else "python"


def entrypoint(job: JobSpec, python: str) -> str:
    """Shell command the cluster runs. `-m` puts the job's working directory first on sys.path, so the code Ray
    uploaded (not some installed copy) runs."""
    return " ".join([python, "-m", "onerec_dist.cli", job.stage, *(shlex.quote(o) for o in job.overrides)])


def job_env(cfg: LaunchConfig) -> dict[str, str]:
    """Offline defaults + PYTHONUNBUFFERED (logs stream live) + the user's env (which wins).

    DS_ACCELERATOR is left out: `onerec` sets it itself only where the node has no CUDA."""
    env = {k: v for k, v in OFFLINE_DEFAULTS.items() if k != "DS_ACCELERATOR"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(cfg.env)
    return env


def working_dir(cfg: LaunchConfig, cwd: Path | None = None) -> Path:
    path = Path(cfg.working_dir) if cfg.working_dir is not None else (cwd or Path.cwd())
    path = path if path.is_absolute() else (cwd or Path.cwd()) / path
    if not path.is_dir():
        raise ValueError(f"working_dir: {path} is not a directory")
    return path.resolve()


def runtime_env(cfg: LaunchConfig, backend: str, cwd: Path | None = None) -> dict:
    """Ray runtime_env of the job: env vars, plus the working directory to upload (k8s: a remote URI or none)."""
    env: dict = {"env_vars": job_env(cfg)}
    if backend == "k8s":
        if cfg.k8s.working_dir is not None:
            env["working_dir"] = cfg.k8s.working_dir
    else:
        env["working_dir"] = str(working_dir(cfg, cwd))
        if cfg.ray.excludes:
            env["excludes"] = list(cfg.ray.excludes)
    return env


def job_name(cfg: LaunchConfig, job: JobSpec) -> str:
    return cfg.job_name or f"onerec-{job.stage}"
