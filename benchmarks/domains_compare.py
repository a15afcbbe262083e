"""OneReason's specialise-then-unify on the 2-domain synthetic task, end to end, as one resumable command (issue 14,
part 1): the shared CoT SFT export, one GRPO specialist per domain, the joint GRPO baseline, the unified students
(RFT and on-policy distillation), and a per-domain table of think-mode Recall@10 with the gap between each student and
the best of the specialists and joint RL in that domain.

    python benchmarks/domains_compare.py D                         # experiment=domains, 2 workers
    python benchmarks/domains_compare.py D --set rl.max_steps=4 --set unify.rft.samples_per_user=1   # a smoke run

Each step is the README's command ("Specialise, then unify") run as a subprocess into ``D/<step>``; a step whose
``summary.json`` exists is not run again, so a crash loses at most the step it hit. ``--set`` overrides go to every
command. Writes ``benchmarks/results/domains_compare_<cpu|gpu>.{json,md,png}`` with provenance. One run per model (the
chain takes over an hour on CPU): the spread shown is each Recall@10's 95 % binomial interval over the domain's test
users, not a spread over repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scipy.stats import binomtest

from _common import (RESULTS_DIR, device_suffix, format_table, new_figure, onerec_command, run_unless_done,
                     save_figure, start_run)

PIPELINE_STAGES = "[prepare,sid,align_warmup,align_multitask,reason_bootstrap,reason_sft]"
STUDENTS = ("unify_rft", "unify_distill")


def run_step(out: Path, name: str, args: list[str], overrides: list[str]) -> dict:
    """``onerec <args> output_dir=out/name`` unless out/name/summary.json exists; returns that summary."""
    command = [*onerec_command(), *args, f"output_dir={out / name}", *overrides]
    return run_unless_done(f"domains_compare {name}", command, out / name / "summary.json")[0]


def interval95(recall: float, users: int) -> list[float]:
    """Wilson 95 % interval of a hit rate over ``users`` (Recall@10 with one target per user is a hit rate)."""
    if users <= 0:
        return [math.nan, math.nan]
    interval = binomtest(round(recall * users), users).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def per_domain_recall(eval_summary: dict, mode: str = "think") -> dict[str, dict]:
    """{domain: {"recall@10", "users", "ci95"}} of one eval summary (think or nothink block)."""
    block = eval_summary[mode]["per_domain"]
    return {domain: {"recall@10": m["recall@10"], "users": m["users"],
                     "ci95": interval95(m["recall@10"], m["users"])} for domain, m in block.items()}


def comparison(recalls: dict[str, dict[str, dict]], domains: list[str]) -> dict:
    """Per domain: the best of its specialist and joint RL, and each student's gap to it (student - best)."""
    out = {}
    for domain in domains:
        missing = [model for model, r in recalls.items() if domain not in r]
        if missing:
            raise ValueError(f"domain {domain!r} has no test users in the evaluation of {missing}: evaluate users of "
                             "every domain (eval.user_sample=random with eval.max_users, or eval.max_users=null)")
        candidates = {f"spec_{domain}": recalls[f"spec_{domain}"][domain]["recall@10"],
                      "joint": recalls["joint"][domain]["recall@10"]}
        best_name = max(candidates, key=candidates.get)
        out[domain] = {"best": best_name, "best_recall@10": candidates[best_name],
                       **{f"gap_{s}": recalls[s][domain]["recall@10"] - candidates[best_name]
                          for s in STUDENTS if s in recalls}}
    return out


def table_rows(recalls: dict[str, dict[str, dict]], domains: list[str]) -> list[dict]:
    return [{"model": model, **{d: f"{r[d]['recall@10']:.4f} [{r[d]['ci95'][0]:.3f}, {r[d]['ci95'][1]:.3f}]"
                                for d in domains}} for model, r in recalls.items()]


def plot(recalls: dict[str, dict[str, dict]], domains: list[str], path: Path) -> Path:
    fig, axes = new_figure(len(domains))
    for ax, domain in zip(axes, domains):
        models = list(recalls)
        values = [recalls[m][domain]["recall@10"] for m in models]
        low = [v - recalls[m][domain]["ci95"][0] for m, v in zip(models, values)]
        high = [recalls[m][domain]["ci95"][1] - v for m, v in zip(models, values)]
        ax.bar(range(len(models)), values, yerr=[low, high], capsize=3)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_title(f"{domain}: think-mode Recall@10 (95 % interval)")
    return save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder of every step's output (resumable)")
    parser.add_argument("--domains", nargs="+", default=["Electronics", "Lifestyle"], help="rl.domain values")
    parser.add_argument("--workers", type=int, default=2, help="trainer.num_workers of every training step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Hydra override, repeatable")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: names the result files")
    parser.add_argument("--allow-dirty", action="store_true", help="run although the tree has local changes")
    args = parser.parse_args()
    run = start_run("domains_compare", args)
    common = ["experiment=domains", f"trainer.num_workers={args.workers}"]
    out, overrides = args.out.resolve(), args.overrides
    pipe = run_step(out, "pipe", ["pipeline", *common, f"pipeline.stages={PIPELINE_STAGES}"], overrides)
    sft = pipe["reason_sft"]["export_dir"]
    exports = {"sft": sft}
    for domain in args.domains:
        spec = run_step(out, f"spec_{domain}", ["rl", *common, f"model.name_or_path={sft}", f"rl.domain={domain}"],
                        overrides)
        exports[f"spec_{domain}"] = spec["export_dir"]
    exports["joint"] = run_step(out, "joint", ["rl", *common, f"model.name_or_path={sft}"], overrides)["export_dir"]
    teachers = "unify.teachers={" + ", ".join(f"{d}: {exports[f'spec_{d}']}" for d in args.domains) + "}"
    for student in STUDENTS:
        method = student.split("_", 1)[1]
        exports[student] = run_step(out, student, ["unify", *common, f"model.name_or_path={sft}",
                                                   f"unify.method={method}", teachers], overrides)["export_dir"]
    recalls, nothink = {}, {}
    for model, export in exports.items():
        summary = run_step(out, f"eval_{model}", ["eval", "experiment=domains", f"model.name_or_path={export}",
                                                  "eval.reasoning.mode=both"], overrides)
        recalls[model], nothink[model] = per_domain_recall(summary, "think"), per_domain_recall(summary, "nothink")
    gaps = comparison(recalls, args.domains)
    stem = f"domains_compare_{device_suffix(args.device)}"
    rows = table_rows(recalls, args.domains)
    markdown = format_table(rows, [("model", "model")] + [(d, f"{d} R@10 [95 %]") for d in args.domains])
    (RESULTS_DIR / f"{stem}.md").write_text(markdown + "\n")
    plot(recalls, args.domains, RESULTS_DIR / f"{stem}.png")
    path = run.finish({"exports": exports, "think": recalls, "nothink": nothink, "comparison": gaps,
                       "repeats": 1, "spread": "95 % Wilson interval over each domain's test users"}, stem)
    print(markdown)
    for domain, row in gaps.items():
        print(f"{domain}: best {row['best']} {row['best_recall@10']:.4f}; "
              + ", ".join(f"{s} {row[f'gap_{s}']:+.4f}" for s in STUDENTS if f"gap_{s}" in row))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
