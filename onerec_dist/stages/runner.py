"""Run one stage into its directory: shared by the `onerec` CLI and `onerec pipeline` (so the pipeline, a stage
itself, never imports the CLI)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from onerec_dist.stages import STAGES


def write_outputs(output_dir: Path, cfg, summary: dict) -> None:
    """The resolved config (config.yaml) and summary.json of a stage."""
    from omegaconf import OmegaConf

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp = output_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(output_dir / "summary.json")  # atomic: a crash never leaves half a summary


def run_stage(stage: str, cfg, output_dir: Path) -> dict:
    """Run one stage into output_dir and write its config and summary; returns the summary."""
    spec = STAGES[stage]
    stage_fn = getattr(importlib.import_module(spec.module), spec.function)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = stage_fn(cfg, output_dir)
    summary.setdefault("seconds", round(time.perf_counter() - start, 3))
    summary = {"stage": stage, **summary}
    write_outputs(output_dir, cfg, summary)
    return summary
