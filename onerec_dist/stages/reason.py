"""`onerec reason stage=bootstrap|sft`: Reasoning Activation (OneRec-Think, arXiv:2510.11639, Sec. 4.2).

``stage=bootstrap`` writes the teacher's rationales of the training windows (pruned context, leak lint);
``stage=sft`` trains the aligned model on them (CoT SFT) and exports a model with think tokens that carries its item
IDs. The recipe is onerec_dist/recipes/reason_sft.py; each step writes into ``output_dir/<step>`` (so both steps can
share one output_dir, and SFT finds the rationales in ``output_dir/bootstrap``). The pipeline runs them as the stages
``reason_bootstrap`` and ``reason_sft``.
"""

from __future__ import annotations

from pathlib import Path


def run(cfg, output_dir: Path, stage: str | None = None) -> dict:
    from onerec_dist.recipes.reason_sft import reasoning_section, run_bootstrap, run_sft

    stage = stage or reasoning_section(cfg).stage
    stage_dir = output_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    summary = run_bootstrap(cfg, stage_dir) if stage == "bootstrap" else run_sft(cfg, stage_dir)
    return {"reason_stage": stage, **summary}


def run_bootstrap(cfg, output_dir: Path) -> dict:
    return run(cfg, output_dir, "bootstrap")


def run_sft(cfg, output_dir: Path) -> dict:
    return run(cfg, output_dir, "sft")
