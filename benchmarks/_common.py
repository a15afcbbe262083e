"""Helpers shared by the benchmark scripts: provenance, interleaved repeats with median / IQR, result writers, plots.

API (stable; other benchmark scripts rely on it)
------------------------------------------------
    parser = argparse.ArgumentParser(...)
    add_common_args(parser)              # --quick --device --repeats --allow-dirty --out-dir
    args = parser.parse_args(argv)
    run = start_run("my_bench", args)    # provenance at start; raises DirtyTreeError on a dirty tree unless
                                         # args.allow_dirty (then recorded as allow_dirty: true)
    times = interleaved({"a": fn_a, "b": fn_b}, repeats=repeats(args), warmup=1)   # {name: [seconds, ...]}
    stats = summarize(times["a"])        # {"median", "q1", "q3", "iqr", "min", "max", "n", "samples"}
    speedup = ratio_of_medians(times["b"], times["a"])   # median(b) / median(a), never best-of
    run.finish({"results": rows, ...}, stem="my_bench_cpu")  # -> RESULTS_DIR/my_bench_cpu.json with "provenance"
    errorbar(ax, xs, [stats, ...], label="a")            # plots median with q1..q3 whiskers

Provenance (``run.finish`` writes it under the key "provenance", checked by tests/test_benchmarks.py):
    git_commit, dirty, dirty_paths, allow_dirty, packages {torch, deepspeed, ray, transformers, triton, ...},
    cpu_model, cpu_threads, torch_threads, gpu_name (None without a GPU), load_average_start / _end
    ([1, 5, 15] minutes), started_utc / finished_utc, python, platform, argv, benchmark, config.
"dirty" looks at tracked changes and untracked files outside benchmarks/results/ and benchmarks/SCALING.md (outputs
written earlier in the same ``run_benchmarks.py all`` run do not make the tree dirty). Package versions come from package metadata, so
recording deepspeed's version does not import deepspeed. matplotlib is imported inside the plot helpers only.
Every figure is a median over ``repeats`` interleaved repeats (>= 5 full, >= 3 quick: ``repeats(args)``), given
with its inter-quartile range; best-of (``min``) may be printed beside, never alone.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_RELATIVE = "benchmarks/results"
GENERATED_PATHS = (RESULTS_RELATIVE, "benchmarks/SCALING.md")  # outputs of the benchmarks: not "dirty" source
LIBRARIES = ("torch", "deepspeed", "ray", "transformers", "triton", "peft", "numpy", "flash-attn")
REQUIRED_PACKAGES = ("torch", "deepspeed", "ray", "transformers", "triton")
PROVENANCE_KEYS = ("benchmark", "git_commit", "dirty", "dirty_paths", "allow_dirty", "packages", "cpu_model",
                   "cpu_threads", "torch_threads", "gpu_name", "load_average_start", "load_average_end",
                   "started_utc", "finished_utc", "python", "platform", "argv", "config")
STAT_KEYS = ("median", "q1", "q3", "iqr", "min", "max", "n", "samples")
MIN_REPEATS_FULL, MIN_REPEATS_QUICK = 5, 3
# kept for older callers: environment_record()'s keys
ENVIRONMENT_KEYS = ("timestamp_utc", "hardware", "libraries", "git", "python", "platform", "torch_threads",
                    "load_average_1min", "config")
HARDWARE_KEYS = ("cpu_model", "cpu_cores", "ram_bytes", "gpu_count", "gpu_names", "cuda")


class DirtyTreeError(RuntimeError):
    """The working tree differs from the commit: results would not be reproducible from ``git_commit``."""


# ---------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else platform.processor(), else 'unknown'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_name() -> str | None:
    """Name of CUDA device 0, None without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def load_average() -> list[float] | None:
    """[1, 5, 15]-minute load averages (None where the OS has none): other work on the machine skews timings."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def hardware() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "ram_bytes": ram_bytes(), "gpu_count": len(gpus),
            "gpu_names": gpus, "cuda": torch.version.cuda}


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions from package metadata (None when absent); no package is imported."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str, repo: Path = REPO) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                              timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None, "dirty_paths": [...]}.

    Dirty: a tracked file differs from the commit, or an untracked (not ignored) file exists, anywhere except
    GENERATED_PATHS (benchmarks/results/ and SCALING.md, which the benchmarks themselves write)."""
    commit = _git("rev-parse", "HEAD", repo=repo)
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".",
                  *(f":(exclude){path}" for path in GENERATED_PATHS), repo=repo)
    paths = [line[3:] for line in status.splitlines() if line.strip()] if status is not None else None
    return {"commit": commit.strip() if commit else None, "dirty": None if paths is None else bool(paths),
            "dirty_paths": (paths or [])[:50]}


def jsonable(value: Any) -> Any:
    """Paths and other objects as strings, containers recursively: configs (argparse namespaces) into JSON."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def onerec_command() -> list[str]:
    """argv of the ``onerec`` CLI: the entry point beside this interpreter (a venv run without its bin/ on PATH), else
    ``onerec`` on PATH, else ``python -m onerec_dist.cli`` (the GPU machine runs the checkout without installing it)."""
    beside_python = Path(sys.executable).parent / "onerec"
    if beside_python.exists():
        return [str(beside_python)]
    return ["onerec"] if shutil.which("onerec") else [sys.executable, "-m", "onerec_dist.cli"]


def run_unless_done(label: str, command: list[str], summary: Path,
                    cwd: Path | None = None) -> tuple[dict, float | None]:
    """Run ``command`` (an ``onerec`` step writing ``summary``) unless ``summary`` exists: the chained benchmarks
    (domains_compare, ablation_table) resume after a crash this way. Returns (the summary, seconds if it ran now,
    else None)."""
    seconds = None
    if not summary.is_file():
        print(f"[{label}] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=cwd)
        seconds = time.perf_counter() - start
    return json.loads(summary.read_text()), seconds


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment_record(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Older record of what a benchmark ran on (keys: ENVIRONMENT_KEYS); new code uses ``start_run``."""
    return {
        "timestamp_utc": _now(), "hardware": hardware(), "libraries": library_versions(), "git": git_state(),
        "python": platform.python_version(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": (load_average() or [None])[0], "config": jsonable(dict(config or {})),
    }


# ---------------------------------------------------------------------------------------------- a run
def add_common_args(parser: argparse.ArgumentParser, *, default_device: str = "cpu") -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --device, --repeats, --allow-dirty, --out-dir."""
    parser.add_argument("--quick", action="store_true", help="the benchmark's small configuration")
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved repeats per figure (default {MIN_REPEATS_FULL}, quick {MIN_REPEATS_QUICK})")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run on a working tree that differs from the commit (recorded in the results)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the result files go")
    return parser


def repeats(args: argparse.Namespace) -> int:
    """args.repeats, else 5 (full) / 3 (--quick); fewer than 3 is refused (no IQR from fewer)."""
    n = args.repeats if getattr(args, "repeats", None) is not None else (
        MIN_REPEATS_QUICK if getattr(args, "quick", False) else MIN_REPEATS_FULL)
    if n < MIN_REPEATS_QUICK:
        raise ValueError(f"--repeats={n}: at least {MIN_REPEATS_QUICK} are needed for a median and IQR")
    return n


def device_suffix(device: str) -> str:
    """'gpu' for cuda, else 'cpu': result files are <name>_cpu.* / <name>_gpu.*."""
    return "gpu" if str(device).startswith("cuda") else "cpu"


class Run:
    """One benchmark run: provenance taken at ``start_run``, completed and written by ``finish``."""

    def __init__(self, benchmark: str, config: Any = None, *, allow_dirty: bool = False):
        git = git_state()
        if git["dirty"] is not False and not allow_dirty:  # None: git unavailable, also refused
            raise DirtyTreeError(
                f"{benchmark}: the working tree differs from commit {git['commit']} ({', '.join(git['dirty_paths'][:8])}"
                f"{' ...' if len(git['dirty_paths']) > 8 else ''}); commit first, or pass --allow-dirty (recorded)")
        self.benchmark = benchmark
        self.started = time.perf_counter()
        self.provenance = {
            "benchmark": benchmark, "git_commit": git["commit"], "dirty": git["dirty"],
            "dirty_paths": git["dirty_paths"], "allow_dirty": bool(allow_dirty), "packages": library_versions(),
            "cpu_model": cpu_model(), "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu_name": gpu_name(), "load_average_start": load_average(), "load_average_end": None,
            "started_utc": _now(), "finished_utc": None, "python": platform.python_version(),
            "platform": platform.platform(), "argv": list(sys.argv), "config": jsonable(config or {}),
        }

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, report: Mapping[str, Any], stem: str, out_dir: Path = RESULTS_DIR) -> Path:
        """Write ``report`` + {"provenance": ..., "wall_s": ...} to out_dir/<stem>.json; returns the path."""
        self.provenance.update(load_average_end=load_average(), finished_utc=_now(),
                               torch_threads=torch.get_num_threads())
        body = {"benchmark": self.benchmark, **report, "wall_s": self.wall_s, "provenance": self.provenance}
        return write_json(body, Path(out_dir) / f"{stem}.json")


def start_run(benchmark: str, args: Any = None, *, allow_dirty: bool | None = None) -> Run:
    """A ``Run`` for ``benchmark`` with ``args`` (argparse namespace or mapping) as its config; allow_dirty defaults
    to args.allow_dirty. Raises DirtyTreeError on a dirty tree unless allowed."""
    if allow_dirty is None:
        allow_dirty = bool(getattr(args, "allow_dirty", False))
    return Run(benchmark, args, allow_dirty=allow_dirty)


# ---------------------------------------------------------------------------------------------- statistics
def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method: q1/q3 of [1, 2, 3, 4, 5] are 2 and 4), IQR, min, max, n, samples."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("summarize: no samples")
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": min(values),
            "max": max(values), "n": len(values), "samples": values}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float]) -> float | None:
    """median(numerator) / median(denominator): speed-ups and slow-downs are quoted this way, not from best-of."""
    return ratio(statistics.median(numerator), statistics.median(denominator))


def interleaved_results(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """Call every fn ``warmup`` times (discarded) then ``repeats`` times, interleaved round by round (the order
    rotates each round), so drifts of machine load hit all variants alike. Returns {name: [return values]}."""
    names = list(fns)
    out: dict[str, list] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            value = fns[name]()
            if round_index >= warmup:
                out[name].append(value)
    return out


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each fn over interleaved repeats (see ``interleaved_results``); ``sync`` (e.g.
    torch.cuda.synchronize) runs before the clock starts and before it stops."""
    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            if sync:
                sync()
            started = time.perf_counter()
            fn()
            if sync:
                sync()
            return time.perf_counter() - started
        return run

    return interleaved_results({name: timed(fn) for name, fn in fns.items()}, repeats, warmup)


def stat_columns(prefix: str, stats: Mapping[str, Any]) -> dict[str, Any]:
    """Flat CSV/table columns of a ``summarize`` result: <prefix>, <prefix>_q1, _q3, _iqr, _min."""
    return {prefix: stats["median"], f"{prefix}_q1": stats["q1"], f"{prefix}_q3": stats["q3"],
            f"{prefix}_iqr": stats["iqr"], f"{prefix}_min": stats["min"]}


# ---------------------------------------------------------------------------------------------- writers
def write_json(obj: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2) + "\n")
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    """One line per row; columns default to the scalar keys of all rows, in first-seen order (lists are left out)."""
    if not rows:
        raise ValueError(f"write_csv({path}): no rows to write")
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (list, dict, tuple))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_cell(value: Any, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.4g}"
    return f"{value!s:>{width}}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width text table of ``columns`` = [(key, header)], each as wide as its header (min 8)."""
    widths = [max(8, len(header)) for _, header in columns]
    lines = [" | ".join(f"{header:>{w}}" for (_, header), w in zip(columns, widths))]
    lines += [" | ".join(format_cell(row.get(key), w) for (key, _), w in zip(columns, widths)) for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def new_figure(panels: int, width_per_panel: float = 5.0, height: float = 4.0):
    """(figure, list of axes) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width_per_panel * panels, height), squeeze=False)
    return fig, list(axes[0])


def errorbar(ax, xs: Sequence[Any], stats: Sequence[Mapping[str, Any]], scale: float = 1.0, **kwargs):
    """Plot medians with whiskers from q1 to q3 (``summarize`` results), each value x ``scale``."""
    medians = [s["median"] * scale for s in stats]
    lower = [max(0.0, (s["median"] - s["q1"]) * scale) for s in stats]
    upper = [max(0.0, (s["q3"] - s["median"]) * scale) for s in stats]
    kwargs.setdefault("fmt", "o-")
    kwargs.setdefault("capsize", 3)
    return ax.errorbar(xs, medians, yerr=[lower, upper], **kwargs)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
