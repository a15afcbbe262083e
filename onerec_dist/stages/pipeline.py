"""`onerec pipeline`: run ``pipeline.stages`` in order, each into ``output_dir/<stage>``.

All stages share the one composed config, so an override given to `pipeline` applies to every stage that reads
that key. The pipeline's own summary.json holds each stage's summary under the stage's name, and is rewritten after
every stage so a crash keeps what finished.
"""

from __future__ import annotations

from pathlib import Path

from onerec_dist.stages import STAGES


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.cli import run_stage, write_outputs

    stages = list(cfg.pipeline.stages)
    unknown = [s for s in stages if s not in STAGES or s == "pipeline"]
    if unknown:
        valid = [s for s in STAGES if s != "pipeline"]
        raise ValueError(f"pipeline.stages: unknown stage(s) {unknown}; valid stages: {', '.join(valid)}")
    summary: dict = {"stages": stages}
    for stage in stages:
        print(f"=== pipeline: {stage} ===")
        summary[stage] = run_stage(stage, cfg, output_dir / stage)
        write_outputs(output_dir, cfg, {"stage": "pipeline", **summary})
    return summary
