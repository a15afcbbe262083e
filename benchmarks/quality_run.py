"""Recommendation quality on a real dataset, end to end: ``onerec pipeline experiment=<name>`` timed as one run, then
its numbers recorded beside the benchmarks (issue 16: "the README shows the command and the numbers it produced,
with the machine and the time").

    python benchmarks/quality_run.py beauty OUT          # runs the pipeline into OUT (~80 min on 2 CPU cores)
    python benchmarks/quality_run.py scientific OUT
    python benchmarks/quality_run.py beauty OUT --record-only --run-commit SHA   # a finished OUT, run at SHA

Writes ``benchmarks/results/quality_<name>_<cpu|gpu>.json``: test Recall/NDCG@5/10/20 of the model, most-popular and
SASRec from the same run (the pipeline's eval stage), the ratio model / SASRec (the baseline measured in the same
run), each stage's seconds, the validation learning curve (Recall@10 against step and seconds) and the provenance;
and copies the learning-curve plot beside it (``quality_<name>_<cpu|gpu>.png``). One run per line: the
pipeline takes over an hour on CPU, so there are no repeats and no spread, which the JSON states.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, device_suffix, start_run

METRICS = ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "validity")


def metrics_of(block: dict) -> dict:
    return {name: block[name] for name in METRICS if name in block}


def report_of(out: Path) -> dict:
    """The numbers of a finished ``onerec pipeline`` output folder."""
    summary = json.loads((out / "summary.json").read_text())
    evaluation = summary["eval"]
    multitask = summary["align_multitask"]
    validation = multitask.get("validation") or {}
    model, sasrec = metrics_of(evaluation), metrics_of(evaluation.get("sasrec", {}))
    return {
        "dataset": evaluation.get("dataset"), "split": evaluation.get("split"),
        "num_users": evaluation.get("num_users"), "num_items": evaluation.get("num_items"),
        "beam_width": evaluation.get("beam_width"),
        "model": model, "popular": metrics_of(evaluation.get("popular", {})), "sasrec": sasrec,
        "sasrec_run": {k: evaluation.get("sasrec", {}).get(k) for k in ("best_epoch", "stopped", "train_seconds",
                                                                        "valid_recall@10")},
        "ratio_recall@10_model_over_sasrec": (model["recall@10"] / sasrec["recall@10"]
                                              if sasrec.get("recall@10") else None),
        "pipeline_seconds": summary.get("seconds"),
        "stage_seconds": {stage: summary[stage].get("seconds") for stage in summary.get("stages", [])
                          if isinstance(summary.get(stage), dict)},
        "multitask_steps": multitask.get("steps"),
        "validation": {k: validation.get(k) for k in ("metric", "best_step", "best_value", "exported_step",
                                                      "stopped_early", "curve")},
        "repeats": 1, "spread": "none: one run of the whole pipeline (over an hour on CPU)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="conf/experiment/<name>.yaml, e.g. beauty or scientific")
    parser.add_argument("out", type=Path, help="the pipeline's output_dir")
    parser.add_argument("--record-only", action="store_true", help="OUT holds a finished run; only record it")
    parser.add_argument("--run-commit", default=None, help="with --record-only: the commit the run was made at")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: names the result file")
    parser.add_argument("--allow-dirty", action="store_true", help="record although the tree has local changes")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the pipeline (recorded)")
    args = parser.parse_args()
    run = start_run(f"quality_{args.experiment}", args)
    beside_python = Path(sys.executable).parent / "onerec"   # the venv's entry point when PATH lacks it
    command = [str(beside_python) if beside_python.exists() else "onerec", "pipeline", f"experiment={args.experiment}", f"output_dir={args.out}", *args.overrides]
    wall = None
    if not args.record_only:
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
    # --record-only: the provenance (machine, load) is the recording's; run_commit says what the run was made at
    report = {"command": " ".join(command), "command_wall_s": wall, "recorded_from_finished_run": args.record_only,
              "run_commit": args.run_commit or run.provenance["git_commit"], **report_of(args.out)}
    stem = f"quality_{args.experiment}_{device_suffix(args.device)}"
    path = run.finish(report, stem)
    plot = args.out / "align_multitask" / "multitask" / "learning_curve.png"   # written when validation ran
    if plot.is_file():
        shutil.copyfile(plot, RESULTS_DIR / f"{stem}.png")
    model, popular, sasrec = report["model"], report["popular"], report["sasrec"]
    print(f"{report['dataset']}: {report['num_users']} test users, pipeline {report['pipeline_seconds'] / 60:.1f} min")
    for name, block in (("model", model), ("most-popular", popular), ("SASRec", sasrec)):
        recall, ndcg = block.get("recall@10", float("nan")), block.get("ndcg@10", float("nan"))
        print(f"  {name:13s} R@10 {recall:.4f}  N@10 {ndcg:.4f}")
    print(f"  model / SASRec R@10: {report['ratio_recall@10_model_over_sasrec']:.3f}   -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
