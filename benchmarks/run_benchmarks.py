"""One entry point for the benchmarks: each name runs that script's ``main(argv)`` with the options given here.

  .venv/bin/python benchmarks/run_benchmarks.py all --quick          # every CPU result, < 20 min on 2 quiet cores
  .venv/bin/python benchmarks/run_benchmarks.py training --quick
  python benchmarks/run_benchmarks.py decoding --device cuda

Results land in benchmarks/results/ with provenance (benchmarks/_common.py); each script documents its files.
``all`` runs every entry of BENCHMARKS in order and stops at the first failure. A dirty working tree is refused by
every benchmark unless --allow-dirty (then recorded). To register a benchmark: one line in BENCHMARKS,
name -> (module in benchmarks/, extra argv); its main(argv) must accept --quick, --device and --allow-dirty
(``_common.add_common_args``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = {  # name: (module in benchmarks/, extra argv)
    "prefix_index": ("bench_prefix_index", []),
    "constrained_step": ("bench_constrained_step", []),
    "decoding": ("bench_constrained_decoding", []),
    "training": ("bench_training", []),
    "training_small": ("bench_training", ["--preset", "small", "--tag", "small"]),
    "data": ("bench_data", []),
    "loss_memory": ("bench_loss_memory", []),
    "rl_step": ("bench_rl_step", []),
}


def forwarded_argv(quick: bool, device: str | None, extra: list[str], allow_dirty: bool = False,
                   name: str | None = None) -> list[str]:
    """The argv each benchmark's main receives: the shared options, the registry's own, then anything after ``--``."""
    argv = ["--quick"] if quick else []
    if device is not None:
        argv += ["--device", device]
    if allow_dirty:
        argv += ["--allow-dirty"]
    return argv + (list(BENCHMARKS[name][1]) if name else []) + list(extra)


def load_main(name: str):
    """The ``main`` of benchmark ``name``, imported as a module of benchmarks/ (Ray workers of the training
    benchmark unpickle its job class by that module name)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join([*BENCHMARKS, 'all'])}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    module = importlib.import_module(BENCHMARKS[name][0])
    return module.main


def parse_args(argv=None):
    """``NAME [--quick] [--device cpu|cuda] [-- options of that benchmark]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s NAME [--quick] [--device cpu|cuda] [-- BENCHMARK OPTIONS]")
    parser.add_argument("name", help=f"one of: {', '.join([*BENCHMARKS, 'all'])}")
    parser.add_argument("--quick", action="store_true", help="the benchmark's small configuration")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the benchmark's own")
    parser.add_argument("--allow-dirty", action="store_true", help="pass --allow-dirty to every benchmark (recorded)")
    args = parser.parse_args(argv)
    if args.name != "all" and args.name not in BENCHMARKS:
        parser.error(f"unknown benchmark {args.name!r}; choose one of: {', '.join([*BENCHMARKS, 'all'])}")
    if extra and args.name == "all":
        parser.error("options after -- go to one benchmark; name it instead of 'all'")
    args.extra = extra
    return args


def main(argv=None) -> dict[str, object]:
    args = parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    reports = {}
    for name in names:
        print(f"=== {name} ===", flush=True)
        started = time.perf_counter()
        reports[name] = load_main(name)(forwarded_argv(args.quick, args.device, args.extra, args.allow_dirty, name))
        print(f"=== {name}: {time.perf_counter() - started:.0f} s ===", flush=True)
    return reports


if __name__ == "__main__":
    main()
