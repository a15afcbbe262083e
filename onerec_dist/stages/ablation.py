"""`onerec ablation row=<row>`: one row of the ablation table (OneRec-Think, arXiv:2510.11639, Table 2), run into
``output_dir/<row>/``, then the table re-rendered from every row in ``output_dir`` (``row=null``: render only).
Rows, their parents and overrides: onerec_dist/ablation/rows.py; the table: onerec_dist/ablation/table.py."""

from __future__ import annotations

from pathlib import Path


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.ablation.config import ablation_config, row_choice
    from onerec_dist.ablation.run_row import StageHooks, run_row
    from onerec_dist.ablation.table import render_table
    from onerec_dist.stages import STAGES
    from onerec_dist.stages.pipeline import HANDOFFS
    from onerec_dist.stages.runner import run_stage

    settings, row = ablation_config(cfg), row_choice(cfg)
    summary = {"row": row}
    if row is not None:
        summary["row_summary"] = str(Path(output_dir) / row / "summary.json")
        run_row(cfg, Path(output_dir), row, StageHooks(run_stage, HANDOFFS, [s for s in STAGES if s != "ablation"]))
    summary["table"] = render_table(output_dir, settings.num_resamples, settings.bootstrap_seed, settings.published,
                                    settings.plot)
    return summary
