"""`onerec unify method=rft|distill`: OneReason's unify step, one student from the domain specialists
(`onerec rl rl.domain=<name>`). Thin: the recipe is onerec_dist/recipes/unify.py (``run_unify``), the settings
conf/unify/default.yaml. Writes summary.json and export/ (the student, carrying its item IDs) into output_dir."""

from __future__ import annotations

from pathlib import Path


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.recipes.unify import run_unify

    return run_unify(cfg, output_dir)
