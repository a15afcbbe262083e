"""Benchmark the constrained beam-search step: naive per-row loop vs the vectorised reference vs the Triton kernel.

  .venv/bin/python benchmarks/bench_constrained_step.py --quick            # CPU: naive vs reference
  python benchmarks/bench_constrained_step.py --device cuda                # + Triton time and bandwidth

The baseline is the unfused textbook step: a Python loop over beam rows, each gathering its allowed codes,
log-softmaxing them and taking a top-k. Every variant is checked against the reference before it is timed.
Bytes the step must move: read logits + mask + beam scores, write top-k scores and codes and the row lse. Achieved
bandwidth = those bytes / median time, as a fraction of the copy bandwidth measured in the same run (``copy_bandwidth``:
a large device-to-device copy, read + write bytes / time) unless --peak-gbps is given.
Times are medians with IQR over --reps repetitions (>= 5). Results: benchmarks/results/constrained_step_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from onerec_kernels.constrained_step import constrained_step_reference

if str(Path(__file__).resolve().parent) not in sys.path:  # _common sits beside this script (also when loaded by path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, device_suffix, start_run, summarize  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK_SHAPES = [(256, 256, 8), (256, 2048, 8)]  # (R = batch*beams, C codes at the level, k)
FULL_SHAPES = [(512, 256, 16), (2048, 256, 32), (2048, 1024, 32), (2048, 8192, 32), (1024, 16384, 16)]


def naive_step(logits, allowed, beam_scores, k, norm_lse=None):
    """Unfused baseline: one small log-softmax + sort per row (stable, same tie rule as the reference)."""
    rows = logits.shape[0]
    scores = torch.full((rows, k), float("-inf"), device=logits.device)
    codes = torch.full((rows, k), -1, dtype=torch.int64, device=logits.device)
    row_lse = torch.full((rows,), float("-inf"), device=logits.device)
    for r in range(rows):
        valid = allowed[r].nonzero().squeeze(-1)  # [n] allowed code indices, ascending
        if valid.numel() == 0:
            continue
        vals = logits[r, valid].float()
        row_lse[r] = torch.logsumexp(vals, 0)
        norm = row_lse[r] if norm_lse is None else norm_lse[r]
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        n = order.numel()
        scores[r, :n] = beam_scores[r] + (vals[order] - norm)
        codes[r, :n] = valid[order]
    return scores, codes, row_lse


def make_inputs(rows, codes, dtype, device, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, codes, generator=gen).to(dtype)  # [R, C]
    allowed = torch.rand(rows, codes, generator=gen) < density  # [R, C] prefix-index mask
    beam_scores = -5 * torch.rand(rows, generator=gen)  # [R]
    return logits.to(device), allowed.to(device), beam_scores.to(device)


def copy_bandwidth(device: torch.device, megabytes: int | None = None, reps: int = 5) -> dict:
    """Bytes per second of a large copy (read + write = 2 x size per copy), summarized over ``reps`` copies:
    the memory bandwidth this device reaches now (default 1 GiB on CUDA, 256 MiB on CPU)."""
    device = torch.device(device)
    megabytes = megabytes or (1024 if device.type == "cuda" else 256)
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    samples = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        samples.append(2 * src.numel() / (time.perf_counter() - start))
    return summarize(samples)


def time_ms(fn, device, warmup, reps):
    """summarize() of fn()'s wall time in milliseconds (CUDA-synchronised): median, q1, q3, iqr, min."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def check_same(out, ref, name):
    if not torch.equal(out[1], ref[1]):
        raise AssertionError(f"{name} codes differ from the reference")
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5, msg=f"{name} scores differ from the reference")


def bench_shape(rows, codes, k, dtype_name, device, args):
    logits, allowed, beam_scores = make_inputs(rows, codes, DTYPES[dtype_name], device)
    call = (logits, allowed, beam_scores, k)
    ref = constrained_step_reference(*call)
    check_same(naive_step(*call), ref, "naive")
    naive_reps = max(3, args.reps // 4)  # the loop is slow; its median needs fewer samples
    result = {"rows": rows, "codes": codes, "k": k, "dtype": dtype_name}
    stats = {"naive": time_ms(lambda: naive_step(*call), device, 1, naive_reps),
             "reference": time_ms(lambda: constrained_step_reference(*call), device, args.warmup, args.reps)}
    bytes_moved = (logits.numel() * logits.element_size() + allowed.numel() + beam_scores.numel() * 4  # read
                   + rows * k * (4 + 8) + rows * 4)  # write: top-k scores fp32, codes int64, row lse fp32
    result["bytes_moved"] = bytes_moved
    if device.type == "cuda":
        from onerec_kernels.constrained_step.triton_kernel import constrained_step_triton

        check_same(constrained_step_triton(*call), ref, "triton")
        stats["triton"] = time_ms(lambda: constrained_step_triton(*call), device, args.warmup, args.reps)
    for name, st in stats.items():
        result.update({f"{name}_ms": st["median"], f"{name}_ms_q1": st["q1"], f"{name}_ms_q3": st["q3"],
                       f"{name}_ms_min": st["min"], f"{name}_gbps": bytes_moved / st["median"] / 1e6})
    result["reference_speedup_vs_naive"] = result["naive_ms"] / result["reference_ms"]
    if device.type == "cuda":
        result["triton_speedup_vs_reference"] = result["reference_ms"] / result["triton_ms"]
        result["triton_speedup_vs_naive"] = result["naive_ms"] / result["triton_ms"]
        result["triton_peak_fraction"] = result["triton_gbps"] / args.peak_gbps
    return result


def print_table(results):
    cols = ["rows", "codes", "k", "dtype", "naive_ms", "reference_ms", "reference_speedup_vs_naive"]
    triton_cols = ("triton_ms", "triton_speedup_vs_reference", "triton_gbps", "triton_peak_fraction")
    cols += [c for c in triton_cols if c in results[0]]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_device="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {sorted(DTYPES)}")
    parser.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth in GB/s (default: measured)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 quick, 20 full)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 20)
    if args.reps < 5:
        parser.error("--reps must be >= 5 (median and IQR)")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(f"--dtypes entries must be in {sorted(DTYPES)}, got {name!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = start_run("constrained_step", args)
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    args.peak_gbps = args.peak_gbps or bandwidth["median"] / 1e9
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    results = [bench_shape(*shape, dtype, device, args) for shape in shapes for dtype in args.dtypes.split(",")]
    print_table(results)
    report = {"device": args.device, "peak_gbps": args.peak_gbps, "copy_bandwidth_bytes_per_s": bandwidth,
              "baseline": "naive per-row Python loop (gather allowed codes, logsumexp, stable sort)",
              "results": results}
    out = run.finish(report, f"constrained_step_{device_suffix(args.device)}{'_' + args.tag if args.tag else ''}",
                     args.out_dir)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
