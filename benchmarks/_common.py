"""Helpers shared by the benchmark scripts: the environment record, result writers (CSV / JSON / table), plots.

The environment record says what a number was measured on: hardware (CPU model, cores, RAM, GPU), library versions
(read from package metadata, so recording deepspeed's version does not import deepspeed), the git commit with a
dirty flag, the machine load when the run started, and the benchmark's own config.
Imports stay light: matplotlib is imported inside ``save_figure`` / ``new_figure``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
LIBRARIES = ("torch", "deepspeed", "ray", "transformers", "peft", "triton", "numpy")
ENVIRONMENT_KEYS = ("timestamp_utc", "hardware", "libraries", "git", "python", "platform", "torch_threads",
                    "load_average_1min", "config")
HARDWARE_KEYS = ("cpu_model", "cpu_cores", "ram_bytes", "gpu_count", "gpu_names", "cuda")


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


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None}: dirty when tracked files differ from the commit."""
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def jsonable(value: Any) -> Any:
    """Paths and other objects as strings, containers recursively: configs (argparse namespaces) into JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def environment_record(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a benchmark ran on (keys: ENVIRONMENT_KEYS; hardware keys: HARDWARE_KEYS)."""
    return {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "libraries": library_versions(),
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews timings: recorded, not corrected for.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "config": jsonable(dict(config or {})),
    }


# ---------------------------------------------------------------------------------------------- numbers
def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


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


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
