"""Peak memory and time of the next-token loss: today's full logits against the chunked loss (and Liger on CUDA).

  .venv/bin/python benchmarks/bench_loss_memory.py --quick                  # length 512, hidden 128, 3 repeats
  .venv/bin/python benchmarks/bench_loss_memory.py                          # V 151,936, H 1,024 (Qwen3-0.6B), L 2,048
  python benchmarks/bench_loss_memory.py --device cuda                      # + liger when installed

Workload: a one-layer Qwen3 with the real vocabulary (151,936, tied embeddings like Qwen3-0.6B) and --hidden, fp32 on
CPU (bf16 on CUDA), a batch of --batch random sequences of --length tokens whose first --prompt tokens carry no loss.
One measured call = ``causal_lm_loss_sums(model, batch, LossConfig(impl))`` + ``backward()`` (onerec_dist/training/
loss.py), the whole training-step path of the loss: forward through the model, head, cross-entropy, gradients.

Memory, honestly: every (variant, repeat) runs in a FRESH subprocess (tracemalloc does not see torch's allocations,
and a process that already ran one variant keeps its allocator's pages). The child builds the model and the batch,
reads its resident set size (RSS, /proc/self/statm), runs the loss twice (a warm-up and the timed call), and
reports ``peak_bytes`` = ru_maxrss (the kernel's high-water mark of RSS) - RSS before the warm-up: the extra memory
the loss needed at its peak (logits, log-softmax, gradients including the weight gradients, which both variants
allocate alike). On CUDA the same figure comes from torch.cuda.max_memory_allocated. Time = wall seconds of the timed
call. Variants are interleaved over --repeats rounds (order rotating); median + IQR per figure, and ratios of
medians full / chunked (memory) and chunked / full (time: the recomputation's price).
Results: benchmarks/results/loss_memory_<cpu|gpu>.json with provenance (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # _common sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_args,
    device_suffix,
    format_table,
    interleaved_results,
    ratio_of_medians,
    repeats,
    start_run,
    summarize,
)

QWEN3_VOCAB = 151_936
# chunk_size None = trainer.loss.chunk_size's default; quick uses 128 so that its 496 loss tokens make 4 chunks.
FULL = dict(length=2048, hidden=1024, batch=1, prompt=64, chunk_size=None)
QUICK = dict(length=512, hidden=128, batch=1, prompt=16, chunk_size=128)


# ------------------------------------------------------------------------------------------------ the child
def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(args: argparse.Namespace, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=64 if args.hidden >= 64 else args.hidden, tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    labels = input_ids.clone()
    labels[:, :args.prompt] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "task_ids": torch.zeros(args.batch, dtype=torch.long, device=device), "task_names": ["sft"]}
    return model, batch


def child(args: argparse.Namespace) -> None:
    """One variant in this fresh process: prints one JSON line {peak_bytes, seconds, loss}."""
    from onerec_dist.training.config import LossConfig
    from onerec_dist.training.loss import causal_lm_loss_sums

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    model, batch = build(args, device)
    config = LossConfig(impl=args.child, chunk_size=args.chunk_size)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss_sums(model, batch, config).loss_sum
        loss.backward()
        return float(loss)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    step()                                                              # warm-up (same peak as the timed call)
    sync()
    started = time.perf_counter()
    loss = step()
    sync()
    seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base   # ru_maxrss is in KiB on Linux
    print(json.dumps({"peak_bytes": peak, "seconds": seconds, "loss": loss}))


# ------------------------------------------------------------------------------------------------ the driver
def run_child(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--device", args.device,
               "--vocab", str(args.vocab), "--length", str(args.length), "--hidden", str(args.hidden),
               "--batch", str(args.batch), "--prompt", str(args.prompt), "--chunk-size", str(args.chunk_size),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def variants(device: str) -> list[str]:
    names = ["full", "chunked"]
    if device == "cuda":
        from onerec_dist.training.loss import liger_available

        names += ["liger"] if liger_available() else []
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default 2048, quick 512)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 1024 = Qwen3-0.6B, quick 128)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default 1)")
    parser.add_argument("--prompt", type=int, default=None, help="leading tokens without loss")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="trainer.loss.chunk_size of the chunked loss (default: its config default; quick 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0 = torch's default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.chunk_size is None:
        from onerec_dist.training.config import LossConfig

        args.chunk_size = LossConfig().chunk_size
    if args.child:
        child(args)
        return

    n = repeats(args)
    run = start_run("loss_memory", args)
    names = variants(args.device)
    results = interleaved_results({name: (lambda name=name: run_child(args, name)) for name in names}, n, warmup=0)
    report: dict = {"method": "fresh subprocess per (variant, repeat); peak = ru_maxrss - RSS before the loss "
                              "(CUDA: max_memory_allocated - allocated); time = one loss forward+backward after a "
                              "warm-up", "variants": {}}
    for name in names:
        report["variants"][name] = {"peak_bytes": summarize([r["peak_bytes"] for r in results[name]]),
                                    "seconds": summarize([r["seconds"] for r in results[name]]),
                                    "loss": results[name][0]["loss"]}
    full_mem = [r["peak_bytes"] for r in results["full"]]
    full_time = [r["seconds"] for r in results["full"]]
    report["full_logits_bytes"] = args.batch * args.length * args.vocab * (2 if args.device == "cuda" else 4)
    for name in names[1:]:
        report[f"peak_memory_ratio_full_over_{name}"] = ratio_of_medians(full_mem,
                                                                         [r["peak_bytes"] for r in results[name]])
        report[f"time_ratio_{name}_over_full"] = ratio_of_medians([r["seconds"] for r in results[name]], full_time)
    path = run.finish(report, f"loss_memory_{device_suffix(args.device)}", args.out_dir)
    rows = [{"variant": name, "peak_mib": report["variants"][name]["peak_bytes"]["median"] / 2**20,
             "peak_iqr_mib": report["variants"][name]["peak_bytes"]["iqr"] / 2**20,
             "seconds": report["variants"][name]["seconds"]["median"],
             "seconds_iqr": report["variants"][name]["seconds"]["iqr"], "loss": report["variants"][name]["loss"]}
            for name in names]
    print(format_table(rows, [("variant", "variant"), ("peak_mib", "peak MiB"), ("peak_iqr_mib", "IQR MiB"),
                              ("seconds", "seconds"), ("seconds_iqr", "IQR s"), ("loss", "loss")]))
    print({k: v for k, v in report.items() if k.startswith(("peak_memory_ratio", "time_ratio"))}, "->", path)


if __name__ == "__main__":
    main()
