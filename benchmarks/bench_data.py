"""Training data on the way to the workers: today's path (the dataset pickled into the Ray loop config) against
Arrow shards written once by the driver and memory-mapped by every rank (onerec_dist.training.shards).

For each dataset size and path, a fresh driver process (so peak RSS is that run's own) builds the alignment data,
starts Ray and trains a tiny Qwen3 for a few steps on ``--workers`` Ray Train workers, then reports:

  driver_peak_rss      the driver's peak resident set (ru_maxrss): data building + pickling for Ray
  worker_peak_rss      each rank's peak resident set (VmHWM) at the end of training, with its RssAnon (private
                       memory: what grows with a pickled dataset) and RssFile (mapped file pages, shared by the
                       ranks through the page cache) at the first step
  time_to_first_step   driver start -> first micro-batch's loss on rank 0 (data building, Ray start, loop config
                       transfer, model build)
  data_build_s         the driver's data building alone (shards path: parallel writing with ``--processes``)

Data: synthetic tokenized alignment examples, not the synthetic catalogue through the tokenizer (1,000,000 examples
through the real task builders take far longer than the data path being measured): token ids uniform in
[3, vocab), lengths uniform in [--min-length, --max-length] (default 32..320, mean 176 tokens: the range of the
alignment tasks' prompts + answers at max_length 512), the first third of each sequence without loss, four task
names. Both paths hold exactly the same examples; the pickled path keeps them as Python lists, like the recipes'
examples today.

A pickled run whose memory, extrapolated from the previous (smaller) size (its excess over the shards run there
grows linearly, the rest stays), would exceed --max-memory-frac of this machine's RAM is skipped and the
extrapolation recorded instead (a 1M-example pickled run needs tens of GB: the driver's lists plus one unpickled
copy per worker).

    python benchmarks/bench_data.py --quick                  # 10k and 1M examples, both paths, 2 workers
    python benchmarks/bench_data.py                          # 100k and 1M, 5 repeats
    python benchmarks/bench_data.py --quick --sizes 2000 20000 --allow-dirty   # a smoke run
Output: benchmarks/results/bench_data_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # _common sits beside this script
    sys.path.insert(0, str(BENCH_DIR))

TASKS = ("captioning", "general_text", "persona", "sequential")
PATHS = ("pickled", "shards")


# ------------------------------------------------------------------------------------------------- data
def synthetic_shard(spec: tuple) -> list[dict[str, Any]]:
    """Examples of one shard: spec = (seed, shard, count, vocab, min_length, max_length); int32 arrays."""
    seed, shard, count, vocab, lo, hi = spec
    rng = np.random.default_rng([seed, shard])
    lengths = rng.integers(lo, hi + 1, size=count)
    tasks = rng.integers(0, len(TASKS), size=count)
    out = []
    for length, task in zip(lengths.tolist(), tasks.tolist()):
        ids = rng.integers(3, vocab, size=length, dtype=np.int32)
        labels = ids.copy()
        labels[:length // 3] = -100
        out.append({"input_ids": ids, "labels": labels, "task": TASKS[task]})
    return out


def shard_specs(args, size: int) -> list[tuple]:
    per = args.examples_per_shard
    return [(args.seed, k, min(per, size - start), args.vocab, args.min_length, args.max_length)
            for k, start in enumerate(range(0, size, per))]


def proc_status() -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process in bytes (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------------------------- the job
@dataclass
class DataBenchJob:
    """A TrainJob: tiny Qwen3; examples pickled in (``examples``) or memory-mapped (``data_dir``); each rank writes
    its memory figures and the time of its first loss to ``report_dir/rank<r>.json``."""

    report_dir: str
    vocab: int
    data_dir: str = ""
    examples: list | None = None

    def build_model(self):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=self.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        return Qwen3ForCausalLM(config), None

    def step_source(self, ctx):
        from onerec_dist.training.engine_api import sampler_step_source
        from onerec_dist.training.shards import ShardedExamples

        self.rank, self.first = ctx.rank, None
        return sampler_step_source(ShardedExamples(self.data_dir) if self.data_dir else self.examples, ctx)

    def configure_trainable(self, model, weight_decay):
        from onerec_dist.training.engine_api import default_param_groups

        return default_param_groups(model, weight_decay)

    def loss_units(self, batch):
        from onerec_dist.training.engine_api import count_loss_tokens

        return count_loss_tokens(batch["labels"])

    def loss(self, model, batch):
        from onerec_dist.training.engine_api import causal_lm_loss

        out = causal_lm_loss(model, batch)
        if self.first is None:
            self.first = {"first_loss_unix": time.time(), "at_first_step": proc_status()}
        return out

    def final_metrics(self, model):
        report = {**self.first, "at_end": proc_status()}
        Path(self.report_dir, f"rank{self.rank}.json").write_text(json.dumps(report))
        return {}

    def save_model_extras(self, model_dir):
        pass


# ------------------------------------------------------------------------------------------------- one run
def run_once(args) -> dict[str, Any]:
    """One driver process: build the data for (args.one, args.size), train, return the figures."""
    from onerec_dist.distributed.ray_job import run_training
    from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig
    from onerec_dist.training.shards import write_shards

    started = time.time()
    work = Path(args.workdir)
    reports = work / "reports"
    reports.mkdir(parents=True)
    specs = shard_specs(args, args.size)
    if args.one == "pickled":  # today: the recipe's examples (Python lists) travel inside the job
        examples = [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist(), "task": e["task"]}
                    for spec in specs for e in synthetic_shard(spec)]
        job = DataBenchJob(str(reports), args.vocab, examples=examples)
    else:
        write_shards(synthetic_shard, specs, work / "data", processes=args.processes, desc="tokenize")
        job = DataBenchJob(str(reports), args.vocab, data_dir=str(work / "data"))
    data_build_s = time.time() - started
    trainer = TrainerConfig(num_workers=args.workers, max_steps=args.steps, micro_batch_size=4, lr=1e-3,
                            lr_schedule="constant", warmup_steps=0, checkpoint_every=0, log_every=args.steps,
                            resume="never", seed=args.seed, wandb={"mode": "disabled"}, run_name="bench-data",
                            ray_temp_dir=args.ray_temp_dir, peak_tflops=1.0)
    run_training(job, trainer, DeepSpeedConfig(zero_stage=0), work / "run")
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(args.workers)]
    disk = sum(p.stat().st_size for p in (work / "data").glob("*")) if args.one == "shards" else None
    return {"path": args.one, "size": args.size, "data_build_s": data_build_s,
            "time_to_first_step_s": ranks[0]["first_loss_unix"] - started,
            "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "worker_peak_rss": [r["at_end"]["VmHWM"] for r in ranks],
            "worker_rss_anon_first_step": [r["at_first_step"]["RssAnon"] for r in ranks],
            "worker_rss_file_first_step": [r["at_first_step"]["RssFile"] for r in ranks],
            "shard_bytes_on_disk": disk}


def run_in_subprocess(args, path: str, size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as work:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", path, "--size", str(size),
               "--workdir", str(Path(work) / "w"), *args.passthrough]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        for attempt in range(3):
            shutil.rmtree(Path(work) / "w", ignore_errors=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode == 0:
                return json.loads(done.stdout.strip().splitlines()[-1])
            if "timed out during startup" not in done.stderr:  # only a Ray start on a busy machine is retried
                break
            print(f"{path} x {size}: Ray did not start in time (attempt {attempt + 1}); retrying", flush=True)
        raise RuntimeError(f"{path} x {size} failed:\n{done.stderr[-4000:]}")


# ------------------------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    from _common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="examples (default 100000 1000000; --quick: 10000 1000000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="shard-writing processes")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--min-length", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--examples-per-shard", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-memory-frac", type=float, default=0.6)
    parser.add_argument("--ray-temp-dir", default="/tmp/ray_bdata")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)   # internal: one run in this process
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # --quick keeps the 1M-example shards run the issue asks for and measures today's (pickled) path at 10k only:
    # every run pays a fresh driver + Ray start (~40 s on 2 cores), so a smaller first size is what saves time.
    args.sizes = sorted(args.sizes or ([10_000, 1_000_000] if args.quick else [100_000, 1_000_000]))
    args.passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                        ("workers", "processes", "steps", "vocab", "min-length", "max-length", "examples-per-shard",
                         "seed", "ray-temp-dir")]
    return args


def extrapolated_bytes(pickled: dict[str, Any], shards: dict[str, Any] | None, size: int, workers: int) -> float:
    """Driver + all workers' peak RSS of a pickled run at ``size``, from the runs at the previous (smaller) size.

    Only the data-dependent part grows with the examples: the pickled run's memory above the shards run's at the
    same size (Python lists in the driver and one unpickled copy per worker). The rest (interpreter, torch, Ray,
    the model) is the same at every size, so it is added once, not scaled. Without a shards run at that size the
    whole pickled total is scaled (an upper bound)."""
    def total(row):
        return row["driver_peak_rss"]["median"] + workers * max(row["worker_peak_rss_max"]["median"], 0)

    fixed = min(total(shards), total(pickled)) if shards is not None else 0.0
    return fixed + (total(pickled) - fixed) * size / pickled["size"]


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_once(args)))
        return {}
    from _common import device_suffix, format_table, ram_bytes, repeats, start_run, summarize

    run = start_run("bench_data", args)
    n, rows, previous = repeats(args), [], {}
    for size in args.sizes:
        for path in PATHS:
            if path == "pickled" and path in previous:
                need = extrapolated_bytes(previous[path], previous.get("shards"), size, args.workers)
                if need > args.max_memory_frac * (ram_bytes() or 0):
                    rows.append({"path": path, "size": size, "skipped": f"extrapolated driver + {args.workers} "
                                 f"workers peak RSS {need / 2**30:.1f} GiB > {args.max_memory_frac} x RAM"})
                    print(rows[-1])
                    continue
            samples = [run_in_subprocess(args, path, size) for _ in range(n)]
            row = {"path": path, "size": size, "runs": samples}
            for key in ("data_build_s", "time_to_first_step_s", "driver_peak_rss"):
                row[key] = summarize([s[key] for s in samples])
            row["worker_peak_rss_max"] = summarize([max(s["worker_peak_rss"]) for s in samples])
            row["worker_rss_anon_first_step_max"] = summarize([max(s["worker_rss_anon_first_step"]) for s in samples])
            row["worker_rss_file_first_step_max"] = summarize([max(s["worker_rss_file_first_step"]) for s in samples])
            rows.append(row)
            previous[path] = row
            print(f"{path} x {size}: first step {row['time_to_first_step_s']['median']:.1f} s, driver "
                  f"{row['driver_peak_rss']['median'] / 2**20:.0f} MiB, worker peak "
                  f"{row['worker_peak_rss_max']['median'] / 2**20:.0f} MiB", flush=True)
    table = [{"path": r["path"], "size": r["size"], **({"skipped": "yes"} if "skipped" in r else {
        "first_step_s": r["time_to_first_step_s"]["median"], "build_s": r["data_build_s"]["median"],
        "driver_MiB": r["driver_peak_rss"]["median"] / 2**20, "worker_MiB": r["worker_peak_rss_max"]["median"] / 2**20,
        "anon_MiB": r["worker_rss_anon_first_step_max"]["median"] / 2**20,
        "file_MiB": r["worker_rss_file_first_step_max"]["median"] / 2**20})} for r in rows]
    print(format_table(table, [("path", "path"), ("size", "examples"), ("first_step_s", "first step s"),
                               ("build_s", "build s"), ("driver_MiB", "driver MiB"), ("worker_MiB", "worker MiB"),
                               ("anon_MiB", "worker anon MiB"), ("file_MiB", "worker file MiB"),
                               ("skipped", "skipped")]))
    growth = {}
    for path in PATHS:
        done = [r for r in rows if r["path"] == path and "skipped" not in r]
        if len(done) >= 2:  # worker memory growth between the smallest and the largest size measured
            growth[path] = {"sizes": [done[0]["size"], done[-1]["size"]],
                            "worker_peak_rss_growth_bytes": done[-1]["worker_peak_rss_max"]["median"]
                            - done[0]["worker_peak_rss_max"]["median"],
                            "worker_rss_anon_growth_bytes": done[-1]["worker_rss_anon_first_step_max"]["median"]
                            - done[0]["worker_rss_anon_first_step_max"]["median"]}
    report = {"results": rows, "worker_memory_growth": growth}
    out = run.finish(report, stem=f"bench_data_{device_suffix(args.device)}", out_dir=args.out_dir)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
