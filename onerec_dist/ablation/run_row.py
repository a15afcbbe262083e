"""Run one row of the ablation table into ``<output_dir>/<row>/<step>/`` and write ``<output_dir>/<row>/summary.json``.

The steps of a row run like a pipeline (one composed config, each step's hand-off updating it for the next: the
pipeline's HANDOFFS, a trained export always becoming ``model.name_or_path``). A row with a parent starts from the
parent row's export, read from the parent's summary.json. Library code never imports the stages: the stage
(onerec_dist/stages/ablation.py) hands in how to run one (``StageHooks``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import NamedTuple

from onerec_dist.ablation.rows import LOCAL_STEPS, ROWS, Row

SUMMARY = "summary.json"


class StageHooks(NamedTuple):
    """How to run a stage, from the stage layer: runner.run_stage, pipeline.HANDOFFS and the stage names."""

    run_stage: Callable  # (stage, cfg, output_dir) -> summary
    handoffs: Mapping[str, Callable]  # stage -> (summary -> config updates)
    names: Collection[str]


def read_row_summary(output_dir: Path, name: str) -> dict | None:
    path = Path(output_dir) / name / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("ablation_row") == name else None


def require_row(output_dir: Path, name: str, needed_by: str, why: str) -> dict:
    """The summary of row ``name``, or a ValueError naming it and the command that makes it."""
    summary = read_row_summary(output_dir, name)
    if summary is None:
        raise ValueError(f"row {needed_by} {why} row {name!r}, but {Path(output_dir) / name / SUMMARY} does not "
                         f"exist: run `onerec ablation row={name} output_dir={output_dir}` (with the same data / "
                         f"model overrides) first")
    return summary


def check_steps_exist(row: Row, stage_names: Collection[str]) -> None:
    """Rows whose stages are not in this installation (yet) stop here with the stage's name, before any work."""
    missing = [s for s in row.steps if s not in stage_names and s not in LOCAL_STEPS]
    if missing:
        raise ValueError(f"row {row.name} needs the stage(s) {missing}, which this installation of onerec does not "
                         f"have (stages: {', '.join(stage_names)}); the row can run once `onerec {missing[0]}` exists")


def row_overrides(output_dir: Path, row: Row) -> dict:
    """The config updates of the row: its own overrides, the parent's export, the matched step count."""
    updates = dict(row.overrides)
    if row.parent:
        parent = require_row(output_dir, row.parent, row.name, "starts from the export of")
        if not parent.get("export_dir"):
            raise ValueError(f"row {row.name} starts from row {row.parent}'s export, but row {row.parent} has none")
        updates["model.name_or_path"] = parent["export_dir"]
    if row.match_steps:
        source, step, key = row.match_steps
        summary = require_row(output_dir, source, row.name, "takes its step count from")
        updates[key] = int(summary["step_summaries"][step]["steps"])
    return updates


def init_model(cfg, output_dir: Path) -> dict:
    """Local step: the starting model (model.* with item tokens for the run's IDs), saved with its IDs, untrained
    (the "raw model" of base / tiger: alignment would otherwise be the warm-up's job)."""
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset
    from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
    from onerec_dist.sid.model_ids import save_model_ids

    data = load_dataset(data_config(cfg))
    model_cfg = model_config(cfg)
    codes, sizes, ids_source = semantic_ids_for_run(cfg, data, model_cfg.name_or_path)
    model, tokenizer, item_tok = build_recommender(model_cfg, data, sizes, codes, seed=cfg.seed)
    export = Path(output_dir).resolve() / "export"
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    save_model_ids(export, codes, data.catalogue.item_ids, sizes, item_tok)
    return {"export_dir": str(export), "semantic_ids": ids_source}


def run_steps(cfg, row: Row, row_dir: Path, hooks: StageHooks) -> dict:
    """{step: summary} of the row's steps, run in order with the pipeline's hand-offs."""
    from omegaconf import OmegaConf, open_dict

    summaries = {}
    for step in row.steps:
        print(f"=== ablation {row.name}: {step} ===", flush=True)
        if step == "init_model":
            start = time.perf_counter()
            summaries[step] = {**init_model(cfg, row_dir / step), "seconds": round(time.perf_counter() - start, 3)}
            (row_dir / step / SUMMARY).write_text(json.dumps({"stage": step, **summaries[step]}, indent=2) + "\n")
        else:
            summaries[step] = hooks.run_stage(step, cfg, row_dir / step)
        handoff = hooks.handoffs.get(step, lambda s: {"model.name_or_path": s["export_dir"]} if s.get("export_dir") else {})
        updates = handoff(summaries[step])
        with open_dict(cfg):
            for key, value in updates.items():
                OmegaConf.update(cfg, key, value, merge=False)
            given = [k.split(".", 1)[1] for k in updates if k.startswith("sid.")]
            cfg.explicit_sid_keys = sorted(set(cfg.get("explicit_sid_keys") or []) | set(given))
    return summaries


def run_row(cfg, output_dir: Path, name: str, hooks: StageHooks) -> dict:
    """Run row ``name`` and write its summary (metrics of its eval, cost, where its predictions are)."""
    from omegaconf import OmegaConf, open_dict

    row = ROWS[name]
    check_steps_exist(row, hooks.names)
    updates = row_overrides(output_dir, row)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # a private copy the steps may update
    updates.update({target: OmegaConf.select(cfg, source) for source, target in row.copy_keys})
    with open_dict(cfg):
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, merge=False)
        cfg.eval.save_predictions = True  # the paired intervals need per-user hits
    row_dir = Path(output_dir) / name
    start = time.perf_counter()
    steps = run_steps(cfg, row, row_dir, hooks)
    summary = row_summary(row, steps, updates, output_dir, time.perf_counter() - start)
    tmp = row_dir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(row_dir / SUMMARY)
    return summary


def row_summary(row: Row, steps: dict, updates: dict, output_dir: Path, seconds: float) -> dict:
    """What the table reads: the eval's metrics of the row's main column, think / nothink where both exist."""
    evaluation = steps["eval"]
    column = next(c for c in ("think", "model", *row.overrides.get("eval.baseline", []), "popular")
                  if c in evaluation)
    trained = [s for s in steps.values() if isinstance(s.get("tokens"), (int, float))]
    own_tokens = int(sum(s["tokens"] for s in trained))
    parent = read_row_summary(output_dir, row.parent) if row.parent else None
    export = next((s["export_dir"] for s in reversed(list(steps.values())) if s.get("export_dir")), None)
    metrics = {k: v for k, v in evaluation[column].items() if k.startswith(("recall@", "ndcg@", "validity"))}
    return {
        "ablation_row": row.name, "what": row.what, "kind": row.kind, "parent": row.parent,
        "compare_to": row.compare_to, "overrides": updates, "dataset": evaluation.get("dataset"),
        "split": evaluation.get("split"), "num_users": evaluation.get("num_users"), "column": column,
        "metrics": metrics, "users_per_s": evaluation[column].get("users_per_s"),
        "think": evaluation.get("think"), "nothink": evaluation.get("nothink"),
        "rationale_tokens": (evaluation.get("think") or {}).get("mean_think_tokens"),
        "predictions_path": evaluation.get("predictions_path"), "export_dir": export,
        "training_steps": int(sum(s.get("steps", 0) for s in trained)),
        "training_tokens": own_tokens,
        # With the ancestors' training: what the row's model has seen in all.
        "training_tokens_total": own_tokens + (parent or {}).get("training_tokens_total", 0),
        "wall_seconds": round(seconds, 3),
        "step_summaries": {k: {f: v for f, v in s.items() if f in ("steps", "tokens", "seconds", "export_dir",
                                                                     "loss_first", "loss_last")}
                           for k, s in steps.items()},
    }
