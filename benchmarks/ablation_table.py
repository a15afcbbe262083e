"""The ablation table (OneRec-Think Table 2 rows, controls and baselines) as one resumable, timed command (issue 14,
part 2): every row is the README's one command, ``onerec ablation experiment=<E> row=<row> output_dir=<OUT>``, run as
a subprocess in the order their parents need, each timed alone on the machine.

    python benchmarks/ablation_table.py OUT                                  # experiment=scientific_ablation
    python benchmarks/ablation_table.py OUT --set align.multitask.max_steps=3 --set eval.max_users=40   # a smoke run
    python benchmarks/ablation_table.py OUT2 --rows ia ia_r --tag llm --set reasoning/teacher=llm   # another teacher
    python benchmarks/ablation_table.py OUT --experiment beauty_ablation --device cuda --rows popular sasrec base ia \
        ia_r ia_r_rl                                     # Beauty on one GPU (benchmarks/gpu_check.sh --quality)

A row whose ``OUT/<row>/summary.json`` exists is not run again (a crash loses at most the row it hit; its wall time
then comes from that summary; ``ln -s OUT/ia OUT2/ia`` reuses a row of another run). Copies the table the last row
rendered (``OUT/table.{md,csv,png}``) to ``benchmarks/results/ablation_<experiment>[_<tag>]_<cpu|gpu>.*`` and writes
the JSON with every row's record, each row's wall time and the total, and provenance. One run per row (the table takes
over an hour on CPU): the spread shown is each row's 95 % bootstrap interval over the evaluated users, and Δ's paired
interval, not a spread over repeats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import REPO, RESULTS_DIR, device_suffix, onerec_command, run_unless_done, start_run

# Parents before children: ia_more takes ia_r's CoT SFT step count, ia_r_rl starts from ia_r.
ROW_ORDER = ("popular", "sasrec", "base", "tiger", "ia", "ia_r", "ia_r_shuffled", "ia_more", "ia_r_rl")


def run_row(out: Path, experiment: str, row: str, overrides: list[str]) -> tuple[dict, float, bool]:
    """(row summary, wall seconds, ran now) of ``onerec ablation`` for ``row``; an existing summary is reused."""
    command = [*onerec_command(), "ablation", f"experiment={experiment}", f"row={row}", f"output_dir={out}", *overrides]
    # data.dir paths are relative to the checkout
    record, seconds = run_unless_done(f"ablation_table {row}", command, out / row / "summary.json", cwd=REPO)
    return record, seconds if seconds is not None else float(record["wall_seconds"]), seconds is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder of every row and the table (resumable)")
    parser.add_argument("--experiment", default="scientific_ablation", help="conf/experiment/<name>.yaml")
    parser.add_argument("--rows", nargs="+", default=list(ROW_ORDER), choices=ROW_ORDER, help="rows to run, in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Hydra override, repeatable")
    parser.add_argument("--tag", default="", help="names a variant's results: ablation_<experiment>_<tag>_<device>")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: names the result files")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the result files go")
    parser.add_argument("--allow-dirty", action="store_true", help="run although the tree has local changes")
    args = parser.parse_args()
    run = start_run("ablation_table", args)
    out = args.out.resolve()
    walls, reused = {}, []
    for row in args.rows:
        _, walls[row], ran = run_row(out, args.experiment, row, args.overrides)
        if not ran:
            reused.append(row)
        print(f"[ablation_table] {row}: {walls[row]:.0f} s", flush=True)
    stem = "_".join(filter(None, ("ablation", args.experiment, args.tag, device_suffix(args.device))))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("md", "csv", "png"):
        if (out / f"table.{suffix}").is_file():
            shutil.copyfile(out / f"table.{suffix}", args.out_dir / f"{stem}.{suffix}")
    table = json.loads((out / "table.json").read_text())
    total = sum(walls.values())
    path = run.finish({"experiment": args.experiment, "overrides": args.overrides, "table": table,
                       "row_wall_seconds": {k: round(v, 1) for k, v in walls.items()},
                       "rows_reused_from_earlier_runs": reused, "total_row_minutes": round(total / 60, 2),
                       "repeats": 1, "spread": "95 % bootstrap interval over users per row; Δ: paired bootstrap"},
                      stem, args.out_dir)
    print((out / "table.md").read_text())
    print(f"rows: {', '.join(f'{k} {v:.0f} s' for k, v in walls.items())}; total {total / 60:.1f} min -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
