"""`onerec rl`: Reasoning Enhancement, GRPO with the Rollout-Beam reward (OneRec-Think, arXiv:2510.11639, Sec. 4.3).

Thin: the recipe is onerec_dist/recipes/grpo.py (``run_rl``), its per-worker loop
onerec_dist/distributed/rl_worker.py. Starts from ``model.name_or_path`` (the reason_sft export); the pipeline stage
``rl`` runs after ``reason_sft`` and hands its export on.
"""

from __future__ import annotations

from pathlib import Path


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.recipes.grpo import run_rl

    return run_rl(cfg, output_dir)
