"""Does GRPO learn from the reward? ``onerec rl`` against its shuffled-reward control (issue 12's "Done when"), as one
resumable command: for each seed, the run with the given overrides and the same run with
``rl.debug.shuffle_rewards=true`` (each step's rewards permuted across its samples, so they no longer follow the
rationale). Reports each run's reward rise (mean of the last 10 steps minus the first 10), the mean reward of every
10-step window, and held-out think-mode Recall@10 before -> after with its paired bootstrap interval; across the pair,
the real run's rise minus the control's and the held-out hits of the two trained models compared user by user.

    python benchmarks/rl_control.py D --sft S/reason_sft/sft/export            # experiment=reasoning's rl settings
    python benchmarks/rl_control.py D --seeds 0 1 2 --set rl.max_steps=40      # overrides go to every run
    python benchmarks/rl_control.py D                                          # no --sft: runs the pipeline first

Without ``--sft`` the reasoning pipeline up to ``reason_sft`` runs into ``D/pipe``. Each run's folder is
``D/<label>_seed<S>`` (control: ``D/<label>_shuffled_seed<S>``); a run whose ``summary.json`` exists is not run again,
so a crash loses at most the run it hit. Writes ``benchmarks/results/rl_control_<label>_<cpu|gpu>.{json,png}``.
The spread given is statistical (the held-out paired bootstrap over users) and across seeds when there are several;
every run is deterministic for its seed, so a repeat of the same seed adds nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from onerec_dist.reasoning.think_eval import paired_bootstrap

from _common import RESULTS_DIR, device_suffix, new_figure, onerec_command, run_unless_done, save_figure, start_run

PIPELINE_STAGES = "[prepare,sid,align_warmup,align_multitask,reason_bootstrap,reason_sft]"
WINDOW = 10  # steps per reward window: reward_first10 / reward_last10 are the first and last windows


def window_means(rewards: list[float], window: int = WINDOW) -> list[float]:
    """Mean step reward of each consecutive ``window`` steps (a last partial window is dropped)."""
    full = len(rewards) // window * window
    return np.asarray(rewards[:full], dtype=np.float64).reshape(-1, window).mean(1).tolist()


def run_record(summary: dict) -> dict:
    """What the report keeps of one ``onerec rl`` summary."""
    heldout, change = summary.get("heldout", {}), summary.get("heldout_change")
    record = {"reward_first10": summary["reward_first10"], "reward_last10": summary["reward_last10"],
              "rise": summary["reward_last10"] - summary["reward_first10"], "kl_max": summary["kl_max"],
              "window_means": window_means(summary["rewards"]), "steps": summary["steps"],
              "export_dir": summary.get("export_dir"), "heldout_change": change, "seconds": summary.get("seconds")}
    for when in ("before", "after"):
        if when in heldout:
            record[f"heldout_{when}"] = heldout[when]["recall@10"]
    return record


def pair_record(real: dict, control: dict) -> dict:
    """The real run against its shuffled control (same seed, prompts and held-out users): rise difference, and the
    held-out hits after training compared user by user (real - control, paired bootstrap 95 % interval)."""
    out = {"rise_real": real["reward_last10"] - real["reward_first10"],
           "rise_control": control["reward_last10"] - control["reward_first10"]}
    out["rise_real_minus_control"] = out["rise_real"] - out["rise_control"]
    hits = [s.get("heldout", {}).get("after", {}).get("user_hits") for s in (real, control)]
    if all(hits):
        out["heldout_after_real_minus_control"] = paired_bootstrap(np.asarray(hits[0]), np.asarray(hits[1]))
    return out


def plot(records: dict[str, dict], path: Path) -> Path:
    """Left: mean reward per 10-step window, real runs solid and controls dashed. Right: held-out change with its
    paired 95 % interval per run."""
    fig, (left, right) = new_figure(2)
    seeds = sorted({name.rsplit("_seed", 1)[1] for name in records})
    for name, record in records.items():   # one colour per seed: the real run solid, its control dashed
        means = record["window_means"]
        left.plot(range(1, len(means) + 1), means, marker="o", linestyle="--" if "_shuffled_" in name else "-",
                  color=f"C{seeds.index(name.rsplit('_seed', 1)[1]) % 10}", label=name)
    left.set_xticks(range(1, max(len(r["window_means"]) for r in records.values()) + 1))
    left.set_xlabel(f"{WINDOW}-step window")
    left.set_ylabel("mean step reward")
    left.set_title("step reward: real vs shuffled-reward control")
    left.legend(fontsize=7)
    names = [n for n, r in records.items() if r["heldout_change"]]
    means = [records[n]["heldout_change"]["mean"] for n in names]
    low = [m - records[n]["heldout_change"]["ci95"][0] for n, m in zip(names, means)]
    high = [records[n]["heldout_change"]["ci95"][1] - m for n, m in zip(names, means)]
    right.bar(range(len(names)), means, yerr=[low, high], capsize=3)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    right.set_title("held-out think R@10 after - before (95 % paired)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder of every run's output (resumable)")
    parser.add_argument("--sft", type=Path, default=None, help="the reason_sft export (default: run the pipeline)")
    parser.add_argument("--experiment", default="reasoning", help="experiment= of every command")
    parser.add_argument("--label", default="reasoning", help="names the runs and the result files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="rl.seed of each pair")
    parser.add_argument("--workers", type=int, default=2, help="trainer.num_workers")
    parser.add_argument("--zero-stage", type=int, default=2, help="deepspeed.zero_stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Hydra override, repeatable")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: names the result files")
    parser.add_argument("--allow-dirty", action="store_true", help="run although the tree has local changes")
    args = parser.parse_args(argv)
    run = start_run("rl_control", args)
    out = args.out.resolve()
    common = [f"experiment={args.experiment}", f"trainer.num_workers={args.workers}",
              f"deepspeed.zero_stage={args.zero_stage}"]
    sft = args.sft
    if sft is None:
        pipe = run_unless_done("rl_control pipe", [*onerec_command(), "pipeline", *common,
                                                   f"pipeline.stages={PIPELINE_STAGES}", f"output_dir={out / 'pipe'}"],
                               out / "pipe" / "summary.json")[0]
        sft = Path(pipe["reason_sft"]["export_dir"])
    summaries, records, pairs = {}, {}, {}
    for seed in args.seeds:
        for shuffled in (False, True):
            name = f"{args.label}{'_shuffled' if shuffled else ''}_seed{seed}"
            command = [*onerec_command(), "rl", *common, f"model.name_or_path={sft}", f"rl.seed={seed}",
                       f"rl.debug.shuffle_rewards={str(shuffled).lower()}", *args.overrides,
                       f"output_dir={out / name}"]
            summaries[name] = run_unless_done(f"rl_control {name}", command, out / name / "summary.json")[0]
            records[name] = run_record(summaries[name])
        pairs[f"seed{seed}"] = pair_record(summaries[f"{args.label}_seed{seed}"],
                                           summaries[f"{args.label}_shuffled_seed{seed}"])
    rises = {kind: [p[f"rise_{kind}"] for p in pairs.values()] for kind in ("real", "control")}
    overall = {f"rise_{kind}_mean": float(np.mean(v)) for kind, v in rises.items()}
    overall.update({f"rise_{kind}_sd": float(np.std(v, ddof=1)) if len(v) > 1 else None for kind, v in rises.items()})
    stem = f"rl_control_{args.label}_{device_suffix(args.device)}"
    plot(records, RESULTS_DIR / f"{stem}.png")
    path = run.finish({"sft": str(sft), "overrides": args.overrides, "seeds": args.seeds, "runs": records,
                       "pairs": pairs, "overall": overall, "repeats": len(args.seeds),
                       "spread": "held-out: 95 % paired bootstrap over users; rises: sd over seeds"}, stem,
                      RESULTS_DIR)
    for name, r in records.items():
        change = r["heldout_change"]
        print(f"{name:32s} reward {r['reward_first10']:.3f} -> {r['reward_last10']:.3f} ({r['rise']:+.3f}); windows "
              + " ".join(f"{m:.3f}" for m in r["window_means"])
              + (f"; held-out {r['heldout_before']:.3f} -> {r['heldout_after']:.3f} [{change['ci95'][0]:+.3f}, "
                 f"{change['ci95'][1]:+.3f}]" if change else ""))
    for seed, p in pairs.items():
        extra = p.get("heldout_after_real_minus_control")
        print(f"{seed}: rise real {p['rise_real']:+.3f}, control {p['rise_control']:+.3f}"
              + (f"; held-out after, real - control {extra['mean']:+.3f} [{extra['ci95'][0]:+.3f}, "
                 f"{extra['ci95'][1]:+.3f}]" if extra else ""))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
