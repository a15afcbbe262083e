"""Benchmark the tensor PrefixIndex against a Python dict-of-sets trie, both built and queried in the same run.

  .venv/bin/python benchmarks/bench_prefix_index.py --quick                 # 1e4, 1e5 items
  .venv/bin/python benchmarks/bench_prefix_index.py --sizes 1e4,1e5,1e6,1e7
  python benchmarks/bench_prefix_index.py --device cuda                     # index on the GPU (baseline stays CPU)

Catalogue: N random unique semantic IDs, --levels x --codebook (default 4 x 256), rows shuffled.
Workload (one decoding step per level l): a batch of --batch prefixes of length l taken from random items, and a
next code that is the item's own code for even rows and a uniform random code (mostly invalid deep down) for odd
rows; one lookup = the [K] allowed-code mask row + the advance to the child (or -1).

Baseline: a dict mapping each prefix tuple to the set of its next codes (what a HF ``prefix_allowed_tokens_fn``
usually wraps), built from ``codes.tolist()``. Its step does the per-row work in Python (set lookup, membership,
tuple append) and writes the batch's [B, K] mask with ONE scatter, so both sides produce the same outputs.
A second baseline figure, ``sets_only``, times the Python loop without building the mask: a lower bound on any
per-row trie step, reported with its own ratio.
Above --baseline-max-items the trie is built on the first rows only (a random subsample: rows are shuffled) and its
build time and memory are scaled linearly to N (marked ``baseline_extrapolated``); its lookups are timed on that
trie. Baseline memory is the process RSS growth while building it (approximate). Before timing, every batch is
checked against the baseline when the baseline holds the whole catalogue, and every batch item's full path is
walked back to that item.
Timing: an index step is the median of --reps runs after --warmup; a baseline step the median of 5; each build runs
once. On a shared machine the numbers move from run to run, so the JSON records the 1-minute load average at the
start. --threads defaults to 1: single-threaded torch against single-threaded Python, and immune to the OpenMP
oversubscription that multi-threaded torch suffers on a busy machine (0 keeps torch's own thread count).
Results: benchmarks/results/prefix_index_<device>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

from onerec_dist.sid.prefix_index import PrefixIndex

if str(Path(__file__).resolve().parent) not in sys.path:  # _common sits beside this script (also when loaded by path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_suffix, start_run, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL_SIZES = "1e4,1e5,1e6,1e7"
QUICK_SIZES = "1e4,1e5"


# ------------------------------------------------------------------------------------------- workload


def random_unique_codes(num_items: int, levels: int, codebook: int, seed: int) -> torch.Tensor:
    """[N, L] int64 random distinct IDs in shuffled order (uniform over the K**L possible IDs)."""
    space = codebook**levels
    if num_items > space:
        raise ValueError(f"--sizes entry {num_items} exceeds the {space} possible IDs ({levels} x {codebook})")
    gen = torch.Generator().manual_seed(seed)
    if space <= 4 * num_items:
        flat = torch.randperm(space, generator=gen)[:num_items]
    else:  # draw with replacement, drop repeats, retry on the rare short draw
        flat = torch.empty(0, dtype=torch.long)
        while flat.numel() < num_items:
            flat = torch.randint(0, space, (int(num_items * 1.1) + 64,), generator=gen).unique()
        flat = flat[torch.randperm(flat.numel(), generator=gen)[:num_items]]
    digits = [(flat // codebook ** (levels - 1 - level)) % codebook for level in range(levels)]
    return torch.stack(digits, 1)  # [N, L]


def make_batches(codes: torch.Tensor, codebook: int, batch: int, num_items: int, seed: int):
    """Per level: (items [B], prefix [B, l], next code [B]); items drawn from the first ``num_items`` rows."""
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for level in range(codes.shape[1]):
        items = torch.randint(0, num_items, (batch,), generator=gen)
        random_code = torch.randint(0, codebook, (batch,), generator=gen)
        own_code = codes[items, level]
        code = torch.where(torch.arange(batch) % 2 == 0, own_code, random_code)  # [B]
        batches.append((items, codes[items, :level], code))
    return batches


# ------------------------------------------------------------------------------------------- baseline


def build_dict_trie(codes: torch.Tensor) -> dict:
    """prefix tuple -> set of next codes, for every proper prefix of every row; full IDs map to their row."""
    children: dict = {}
    leaves: dict = {}
    num_levels = codes.shape[1]
    for row, item in enumerate(map(tuple, codes.tolist())):
        for level in range(num_levels):
            children.setdefault(item[:level], set()).add(item[level])
        leaves[item] = row
    return {"children": children, "leaves": leaves}


def dict_trie_step(trie: dict, prefixes: list[tuple], codes: list[int], codebook: int):
    """Baseline step: mask [B, K] bool (one scatter) and the advanced prefixes (None where invalid)."""
    children = trie["children"]
    empty: frozenset = frozenset()
    mask_rows: list[int] = []
    mask_cols: list[int] = []
    advanced = []
    for row, (prefix, code) in enumerate(zip(prefixes, codes)):
        allowed = children.get(prefix, empty) if prefix is not None else empty
        mask_rows.extend([row] * len(allowed))
        mask_cols.extend(allowed)
        advanced.append(prefix + (code,) if code in allowed else None)
    mask = torch.zeros(len(prefixes), codebook, dtype=torch.bool)
    mask[mask_rows, mask_cols] = True
    return mask, advanced


def dict_trie_sets_step(trie: dict, prefixes: list[tuple], codes: list[int]):
    """The Python part of the baseline step alone (sets, no mask): a lower bound on any per-row trie step."""
    children = trie["children"]
    empty: frozenset = frozenset()
    allowed_sets, advanced = [], []
    for prefix, code in zip(prefixes, codes):
        allowed = children.get(prefix, empty) if prefix is not None else empty
        allowed_sets.append(allowed)
        advanced.append(prefix + (code,) if code in allowed else None)
    return allowed_sets, advanced


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- timing


def time_s(fn, device: torch.device, warmup: int, reps: int, spread: list | None = None) -> float:
    """Median wall time of fn() in seconds (CUDA-synchronised); appends [q1, q3] to ``spread`` when given."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    stats = summarize(samples)
    if spread is not None:
        spread.append([stats["q1"], stats["q3"]])
    return stats["median"]


def check_against_baseline(index, trie, level, node, prefixes, code, codebook):
    """The index's mask and advance agree with the dict trie on every row of the batch."""
    mask, advanced = dict_trie_step(trie, prefixes, code.tolist(), codebook)
    if not torch.equal(index.allowed_codes(level, node).cpu(), mask):
        raise AssertionError(f"level {level}: allowed_codes differs from the dict trie")
    child = index.advance(level, node, code.to(node.device)).cpu()
    if ((child >= 0).tolist()) != [a is not None for a in advanced]:
        raise AssertionError(f"level {level}: advance validity differs from the dict trie")


def check_paths(index, codes: torch.Tensor, items: torch.Tensor, device: torch.device):
    """Walking each item's full ID from the root ends at that item."""
    found = index.item_of(index.nodes_of_prefix(codes[items].to(device))).cpu()
    if not torch.equal(found, items):
        raise AssertionError("walking an item's full ID did not return the item")


# ------------------------------------------------------------------------------------------- one size


def bench_index(codes, args, device, batches):
    """Build + lookups of the tensor index; returns (index, result fields)."""
    index = PrefixIndex.build(codes.to(device), args.codebook, args.dense_levels, args.window_max_fanout)
    result = {
        "index_build_s": index.build_seconds,
        "index_bytes": index.nbytes(),
        "index_bytes_per_item": index.nbytes() / codes.shape[0],
        "max_fanout": index.stats()["max_fanout"],
        "layout": index.stats()["layout"],
    }
    level_s, level_iqr = [], []
    for level, (items, prefix, code) in enumerate(batches):
        node, code = index.nodes_of_prefix(prefix.to(device)), code.to(device)

        def step(level=level, node=node, code=code):
            index.allowed_codes(level, node)
            index.advance(level, node, code)

        level_s.append(time_s(step, device, args.warmup, args.reps, level_iqr))
    result["index_step_ms_per_level"] = [s * 1e3 for s in level_s]
    result["index_step_ms_q1_q3_per_level"] = [[q * 1e3 for q in pair] for pair in level_iqr]
    result["index_lookups_per_s"] = args.batch * len(batches) / sum(level_s)
    return index, result


def bench_baseline(codes, args, batches, index, device):
    """Build + lookups of the dict trie (on at most --baseline-max-items rows), checking the index against it."""
    num_items = codes.shape[0]
    built_items = min(num_items, args.baseline_max_items)
    gc.collect()
    rss_before = rss_bytes()
    start = time.perf_counter()
    trie = build_dict_trie(codes[:built_items])
    build_s = time.perf_counter() - start
    gc.collect()
    rss_after = rss_bytes()
    scale = num_items / built_items
    result = {"baseline_items": built_items, "baseline_extrapolated": built_items < num_items}
    result["baseline_build_s"] = build_s * scale
    result["baseline_bytes"] = None if rss_before is None else (rss_after - rss_before) * scale
    level_s, sets_s, level_iqr = [], [], []
    cpu = torch.device("cpu")
    for level, (items, prefix, code) in enumerate(batches):
        prefixes, code_list = list(map(tuple, prefix.tolist())), code.tolist()
        if not result["baseline_extrapolated"]:
            node = index.nodes_of_prefix(prefix.to(device))
            check_against_baseline(index, trie, level, node, prefixes, code, args.codebook)
        level_s.append(time_s(lambda: dict_trie_step(trie, prefixes, code_list, args.codebook), cpu, 1, 5, level_iqr))
        sets_s.append(time_s(lambda: dict_trie_sets_step(trie, prefixes, code_list), cpu, 1, 5))
    result["baseline_step_ms_per_level"] = [s * 1e3 for s in level_s]
    result["baseline_step_ms_q1_q3_per_level"] = [[q * 1e3 for q in pair] for pair in level_iqr]
    result["baseline_lookups_per_s"] = args.batch * len(batches) / sum(level_s)
    result["baseline_sets_only_lookups_per_s"] = args.batch * len(batches) / sum(sets_s)
    del trie
    gc.collect()
    return result


def bench_size(num_items: int, args, device: torch.device) -> dict:
    codes = random_unique_codes(num_items, args.levels, args.codebook, args.seed)  # [N, L] on CPU
    baseline_items = min(num_items, args.baseline_max_items)
    # Batches come from the rows the baseline holds, so both sides answer the same (answerable) queries.
    batches = make_batches(codes, args.codebook, args.batch, baseline_items, args.seed)
    index, result = bench_index(codes, args, device, batches)
    for items, _, _ in batches:
        check_paths(index, codes, items, device)
    result.update(bench_baseline(codes, args, batches, index, device))
    result = {"num_items": num_items, **result}
    result["build_speedup"] = result["baseline_build_s"] / result["index_build_s"]
    result["lookup_speedup"] = result["index_lookups_per_s"] / result["baseline_lookups_per_s"]
    result["lookup_speedup_vs_sets_only"] = result["index_lookups_per_s"] / result["baseline_sets_only_lookups_per_s"]
    base_bytes = result["baseline_bytes"]
    result["memory_ratio_baseline_over_index"] = base_bytes / result["index_bytes"] if base_bytes else None
    return result


# ------------------------------------------------------------------------------------------- output

TABLE = [  # (column, header, format)
    ("num_items", "items", "{:>10.0e}"),
    ("index_build_s", "build_s", "{:>9.3f}"),
    ("baseline_build_s", "dict_build_s", "{:>12.2f}"),
    ("build_speedup", "build_x", "{:>8.1f}"),
    ("index_bytes_per_item", "B/item", "{:>8.2f}"),
    ("memory_ratio_baseline_over_index", "dict_mem_x", "{:>10.1f}"),
    ("index_lookups_per_s", "lookups/s", "{:>11.3e}"),
    ("baseline_lookups_per_s", "dict_lookups/s", "{:>14.3e}"),
    ("lookup_speedup", "lookup_x", "{:>9.1f}"),
    ("baseline_sets_only_lookups_per_s", "sets_lookups/s", "{:>14.3e}"),
    ("lookup_speedup_vs_sets_only", "sets_x", "{:>7.2f}"),
    ("baseline_extrapolated", "dict_extrap", "{!s:>11}"),
]


def print_table(results: list[dict]) -> None:
    widths = [len(fmt.format(1.0 if "f" in fmt or "e" in fmt else True)) for _, _, fmt in TABLE]
    print(" | ".join(f"{header:>{w}}" for (_, header, _), w in zip(TABLE, widths)))
    for r in results:
        cells = [
            fmt.format(r[col]) if r[col] is not None else f"{'n/a':>{w}}" for (col, _, fmt), w in zip(TABLE, widths)
        ]
        print(" | ".join(cells))


def write_csv(results: list[dict], path: Path) -> None:
    fields = [k for k in results[0] if not isinstance(results[0][k], list)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def write_plot(results: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["num_items"] for r in results]
    panels = [
        ("lookups / s, both build the [B, K] mask", "index_lookups_per_s", "baseline_lookups_per_s"),
        ("lookups / s vs Python sets only (no mask)", "index_lookups_per_s", "baseline_sets_only_lookups_per_s"),
        ("build seconds", "index_build_s", "baseline_build_s"),
        ("bytes / item", "index_bytes_per_item", None),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (title, ours, theirs) in zip(axes, panels):
        ax.plot(sizes, [r[ours] for r in results], "o-", label=f"PrefixIndex ({device})")
        if theirs is not None:
            ax.plot(sizes, [r[theirs] for r in results], "s--", label="dict-of-sets trie (open: extrapolated)")
            extrapolated = [r for r in results if r["baseline_extrapolated"]]
            extrapolated_x = [r["num_items"] for r in extrapolated]
            ax.plot(extrapolated_x, [r[theirs] for r in extrapolated], "s", color="C1", mfc="white")
        elif results[0]["baseline_bytes"] is not None:
            ax.plot(sizes, [r["baseline_bytes"] / r["num_items"] for r in results], "s--", label="dict trie (RSS)")
        ax.set(xscale="log", yscale="log", xlabel="catalogue items", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help=f"comma list of catalogue sizes (default {FULL_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer repetitions")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--dense-levels", type=int, default=2)
    parser.add_argument("--window-max-fanout", type=int, default=32, help="CSR advance: binary search above this")
    parser.add_argument("--batch", type=int, default=4096, help="prefixes per lookup batch")
    parser.add_argument("--baseline-max-items", type=float, default=1e6, help="dict trie built on at most this many")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 quick, 20 full)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 0 = torch's choice (default 1, as the baseline)"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--allow-dirty", action="store_true", help="run on an uncommitted tree (recorded)")
    args = parser.parse_args(argv)
    try:
        sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
        args.sizes = [int(float(s)) for s in sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be a comma list of numbers such as 1e4,1e5, got {args.sizes!r}")
    if min(args.sizes) < 1 or args.batch < 1 or args.levels < 1 or args.codebook < 1:
        parser.error("--sizes entries, --batch, --levels and --codebook must be >= 1")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    args.baseline_max_items = int(args.baseline_max_items)
    args.reps = args.reps or (5 if args.quick else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = start_run("prefix_index", args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    PrefixIndex.build(random_unique_codes(64, args.levels, args.codebook, 0).to(device), args.codebook)  # warm-up
    results = []
    for num_items in args.sizes:
        results.append(bench_size(num_items, args, device))
        print(f"done {num_items:.0e} items", flush=True)
    print_table(results)
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "levels": args.levels,
        "codebook": args.codebook,
        "dense_levels": args.dense_levels,
        "window_max_fanout": args.window_max_fanout,
        "batch": args.batch,
        "baseline": "Python dict prefix-tuple -> set of next codes; per-row lookup, one scatter for the [B, K] mask",
        "results": results,
    }
    stem = run.finish(report, f"prefix_index_{device_suffix(args.device)}", args.out_dir).with_suffix("")
    write_csv(results, stem.with_suffix(".csv"))
    write_plot(results, stem.with_suffix(".png"), args.device)
    print(f"wrote {stem}.json, .csv, .png")
    return report


if __name__ == "__main__":
    main()
