"""`onerec-launch sweep`: a grid of training jobs (Hydra multirun syntax), one Ray job per point, one scaling table.

  onerec-launch sweep ray ray.address=http://HEAD:8265 -- onerec align stage=warmup output_dir=/shared/sweeps/s1 \\
      trainer.num_workers=8,16,32 deepspeed.zero_stage=2,3 trainer.micro_batch_size=4,8 trainer.max_steps=30

Every job override holding a sweep (``a,b,c``, ``range(1,4)``, ``choice(...)``: Hydra's override grammar) is a grid
axis; the grid is their Cartesian product. Each point is submitted through the same path as a single job
(launcher.launch: Ray Jobs, or the SLURM / KubeRay backends) into ``<output_dir>/points/<point>``. After each point
``<output_dir>/sweep.json`` records its status, so a re-run skips finished points (SUCCEEDED, or DOES_NOT_FIT:
the cluster has too few CPUs/GPUs for it, or it ran out of memory) and retries the others.

The result (``scaling.csv``, ``scaling.json``, ``scaling.png`` in output_dir), one row per point:
  tokens/s (median over steps after ``sweep.warmup_steps``), tokens/s per worker, scaling efficiency (tokens/s per
  worker / that of the point with the fewest workers and otherwise the same settings), MFU (the engine's:
  6 x params x tokens/s per worker / peak FLOP/s per worker), peak memory per worker (when the run records it), and
  communication: the wire bytes per rank and per step predicted by the ZeRO model of benchmarks/SCALING.md beside
  the measured communication time, estimated as step time - step time of the smallest point (same settings; every
  worker computes the same micro-batch, so the extra time is communication and waiting). The prediction line of
  the plot is the smallest point's step time plus the model's communication time at ``sweep.link_gb_per_s``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from onerec_launch.request import LaunchRequest

STATE_FILE = "sweep.json"
FINISHED = ("SUCCEEDED", "DOES_NOT_FIT")
# A point that cannot run on this cluster: the engine's resource check (onerec_dist.training.config.check_resources)
# or an out-of-memory error. Recorded as DOES_NOT_FIT, not retried on resume.
_DOES_NOT_FIT = re.compile(r"workers need \d+ GPUs but only|need \d+ CPUs but only|out of memory|OutOfMemoryError|"
                           r"OOM|insufficient resources|Cannot schedule", re.IGNORECASE)
WORKERS_KEY = "trainer.num_workers"
ZERO_KEY = "deepspeed.zero_stage"


@dataclass(frozen=True)
class Grid:
    """The fixed overrides (output_dir excluded) and the points: each an ordered {key: value} of the swept keys."""

    fixed: tuple[str, ...]
    axes: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def points(self) -> list[dict[str, str]]:
        keys = [k for k, _ in self.axes]
        return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in self.axes))]


def expand_grid(job_overrides: list[str]) -> Grid:
    """Split Hydra overrides into fixed ones and sweep axes (Hydra's own parser, so `a,b`, `range()`, `choice()`
    and quoting mean what they mean to `hydra --multirun`); raises ValueError on a malformed override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(job_overrides)
    except HydraException as err:
        raise ValueError(f"sweep: cannot parse the job overrides: {err}") from None
    fixed, axes = [], []
    for text, override in zip(job_overrides, parsed):
        if override.is_sweep_override():
            values = tuple(str(v) for v in override.sweep_string_iterator())
            if not values:
                raise ValueError(f"sweep: {text!r} sweeps over no value")
            axes.append((override.get_key_element(), values))
        else:
            fixed.append(text)
    if not axes:
        raise ValueError("sweep: no override sweeps over several values; give e.g. trainer.num_workers=1,2 "
                         "deepspeed.zero_stage=0,2 (Hydra multirun syntax)")
    return Grid(tuple(fixed), tuple(axes))


def point_name(point: dict[str, str]) -> str:
    """A directory name for a point: `trainer.num_workers=2,deepspeed.zero_stage=3` -> `num_workers-2_zero_stage-3`."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(parts))


# ------------------------------------------------------------------------------------------------ state, running
def load_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"points": {}}


def save_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(sweep_dir / STATE_FILE)  # atomic: an interrupted sweep never leaves half a state file


def classify(status: str, message: str | None) -> str:
    if status == "SUCCEEDED":
        return status
    if status == "FAILED" and message and _DOES_NOT_FIT.search(message):
        return "DOES_NOT_FIT"
    return status


def run_sweep(request: LaunchRequest, sweep_dir: Path, *, warmup_steps: int, link_gb_per_s: float | None,
              resume: bool = True, out: TextIO | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run every point not yet finished (one job each, through launcher.launch), then write the table and plot.

    ``request`` holds the backend, the launcher overrides and the job with its sweep overrides; output_dir is
    ``sweep_dir``. Returns {"rows": [...], "state": ...}."""
    import sys

    from onerec_launch.launcher import launch

    out = out or sys.stdout
    sweep_dir = sweep_dir.resolve()
    grid = expand_grid([o for o in request.job_overrides if not o.startswith("output_dir=")])
    state = load_state(sweep_dir) if resume else {"points": {}}
    state.update(stage=request.stage, axes={k: list(v) for k, v in grid.axes}, fixed=list(grid.fixed))
    for point in grid.points:
        name = point_name(point)
        point_dir = sweep_dir / "points" / name
        known = state["points"].get(name, {})
        if known.get("status") == "SUBMITTED":  # batch backends (slurm, k8s): finished once its summary exists
            if (point_dir / "summary.json").is_file():
                known["status"] = "SUCCEEDED"
            elif resume:
                print(f"onerec-launch sweep: {name} submitted earlier, no summary yet; skipped", file=out, flush=True)
                continue
        if resume and known.get("status") in FINISHED:
            print(f"onerec-launch sweep: {name} {known['status']} already; skipped", file=out, flush=True)
            continue
        overrides = [*grid.fixed, *(f"{k}={v}" for k, v in point.items()), f"output_dir={point_dir}"]
        sub = replace(request, job_overrides=tuple(overrides))
        print(f"onerec-launch sweep: point {name}", file=out, flush=True)
        started = time.time()
        try:
            result = launch(sub, out=out, cwd=cwd)
            status, message, submission = classify(result.status, result.message), result.message, result.submission_id
        except ValueError as err:  # refused before submission (e.g. a bad value of this point)
            status, message, submission = "INVALID", str(err), None
        state["points"][name] = {
            "point": point, "status": status, "message": (message or "")[-2000:], "submission_id": submission,
            "output_dir": str(point_dir), "started": started, "seconds": round(time.time() - started, 1),
            "relaunch": str(point_dir / "relaunch.sh"),
            "command": " ".join(["onerec-launch", *sub.argv()])}
        save_state(sweep_dir, state)
    rows = table_rows(state, warmup_steps, link_gb_per_s)
    write_outputs(sweep_dir, rows, state)
    return {"rows": rows, "state": state}


# ------------------------------------------------------------------------------------------------ the table
def _comm_model():
    """benchmarks/bench_training.py's ZeRO communication model (SCALING.md), or None outside a source tree."""
    import sys

    if "bench_training" in sys.modules:
        return sys.modules["bench_training"]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
    if not path.is_file():
        return None
    added = str(path.parent) not in sys.path
    if added:
        sys.path.insert(0, str(path.parent))  # bench_training imports _common beside it
    try:
        import bench_training

        return bench_training
    except ImportError:
        return None
    finally:
        if added:
            sys.path.remove(str(path.parent))


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def point_row(entry: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    """One row from a point's state entry and its summary.json (None where the run has no such measurement)."""
    point = entry["point"]
    row: dict[str, Any] = {**point, "status": entry["status"], "submission_id": entry.get("submission_id"),
                           "output_dir": entry["output_dir"], "relaunch": entry["relaunch"]}
    summary_path = Path(entry["output_dir"]) / "summary.json"
    if entry["status"] != "SUCCEEDED" or not summary_path.is_file():
        row["message"] = entry.get("message", "")[-300:]
        return row
    summary = json.loads(summary_path.read_text())
    workers = int(summary.get("world_size") or point.get(WORKERS_KEY, 1))
    timings = summary.get("step_timings") or []
    measured = timings[warmup_steps:] or timings
    step_s = _median([t["total"] for t in measured])
    tokens = _median([t["tokens"] for t in measured])
    row.update(workers=workers, params=summary.get("num_params"), steps=summary.get("steps"), step_s=step_s,
               tokens_per_step=tokens, loss_first=summary.get("loss_first"), loss_last=summary.get("loss_last"))
    if step_s and tokens:
        row["tokens_per_s"] = tokens / step_s
        row["tokens_per_s_per_worker"] = row["tokens_per_s"] / workers
        peak = summary.get("peak_flops_per_worker")
        row["mfu"] = 6 * summary["num_params"] * row["tokens_per_s_per_worker"] / peak if peak else summary.get("mfu")
    peaks = (summary.get("final_metrics") or {}).get("peak_memory_bytes_per_rank")
    row["peak_mem_mib_per_worker"] = max(peaks) / 2**20 if peaks else summary.get("peak_memory_mib")
    config = Path(entry["output_dir"]) / "config.yaml"  # the resolved config every stage writes
    if config.is_file():
        import yaml

        row["precision"] = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("precision")
    return row


def _group_key(row: dict[str, Any], axes: list[str]) -> tuple:
    return tuple(row.get(k) for k in axes if k != WORKERS_KEY)


def add_scaling(rows: list[dict[str, Any]], axes: list[str], link_gb_per_s: float | None, model,
                bytes_per_element: int) -> None:
    """Efficiency and communication against the smallest point of the same settings (all axes but the workers)."""
    done = [r for r in rows if r.get("tokens_per_s")]
    for row in done:
        group = [r for r in done if _group_key(r, axes) == _group_key(row, axes)]
        base = min(group, key=lambda r: r["workers"])
        row["baseline_workers"] = base["workers"]
        row["scaling_efficiency"] = row["tokens_per_s_per_worker"] / base["tokens_per_s_per_worker"]
        row["comm_measured_s"] = row["step_s"] - base["step_s"] if row["workers"] > base["workers"] else 0.0
        if model is None or row.get("params") is None:
            continue
        stage = int(row.get(ZERO_KEY, 0))
        payload = model.predicted_collective_bytes(int(row["params"]), stage, bytes_per_element, grad_all_reduce=True)
        wire = model.ring_bytes_per_rank(payload, row["workers"])
        base_wire = model.ring_bytes_per_rank(payload, base["workers"])
        row["comm_predicted_wire_bytes"] = wire
        seconds = (lambda b, w: b / (link_gb_per_s * 1e9)) if link_gb_per_s else model.comm_seconds
        row["comm_predicted_s"] = seconds(wire, row["workers"]) - seconds(base_wire, base["workers"])
        predicted_step = base["step_s"] + row["comm_predicted_s"]
        # Per-worker compute stays the smallest point's (same micro-batch per worker): the model's throughput.
        row["tokens_per_s_predicted"] = row["workers"] * base["tokens_per_s_per_worker"] * base["step_s"] / predicted_step
        row["scaling_efficiency_predicted"] = base["step_s"] / predicted_step


def table_rows(state: dict[str, Any], warmup_steps: int, link_gb_per_s: float | None) -> list[dict[str, Any]]:
    axes = list(state.get("axes", {}))
    rows = [point_row(entry, warmup_steps) for entry in state["points"].values()]
    precision = next((r["precision"] for r in rows if r.get("precision")), None)
    add_scaling(rows, axes, link_gb_per_s, _comm_model(), 2 if precision in ("bf16", "fp16") else 4)
    return rows


COLUMNS = ["status", WORKERS_KEY, ZERO_KEY, "trainer.micro_batch_size", "workers", "params", "steps", "step_s",
           "tokens_per_s", "tokens_per_s_per_worker", "scaling_efficiency", "scaling_efficiency_predicted",
           "tokens_per_s_predicted", "mfu", "peak_mem_mib_per_worker", "comm_measured_s", "comm_predicted_s",
           "comm_predicted_wire_bytes", "loss_first", "loss_last", "submission_id", "output_dir", "relaunch",
           "message"]


def write_outputs(sweep_dir: Path, rows: list[dict[str, Any]], state: dict[str, Any]) -> None:
    """scaling.csv (one row per point), scaling.json (rows + provenance + relaunch commands), scaling.png."""
    from onerec_launch import record

    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r} - set(columns))
    with open(sweep_dir / "scaling.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    provenance = {"version": record.package_version(), "git": record.git_info(Path(__file__).resolve().parents[1]),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = {"stage": state.get("stage"), "axes": state.get("axes"), "fixed": state.get("fixed"),
              "provenance": provenance, "points": state["points"], "rows": rows}
    (sweep_dir / "scaling.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_plot(rows, sweep_dir / "scaling.png")


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput and efficiency against workers, one line per ZeRO stage (other axes: one line each too), the
    communication model's prediction dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("tokens_per_s")]
    if not done:
        return None
    fig, (ax_tput, ax_eff) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({_line_label(r) for r in done})
    for i, label in enumerate(labels):
        sel = sorted((r for r in done if _line_label(r) == label), key=lambda r: r["workers"])
        ws = [r["workers"] for r in sel]
        color = f"C{i}"
        ax_tput.plot(ws, [r["tokens_per_s"] for r in sel], "o-", color=color, label=label)
        ax_eff.plot(ws, [r["scaling_efficiency"] for r in sel], "o-", color=color, label=label)
        if all(r.get("tokens_per_s_predicted") for r in sel):
            ax_tput.plot(ws, [r["tokens_per_s_predicted"] for r in sel], "--", color=color, label=f"{label} model")
            ax_eff.plot(ws, [r["scaling_efficiency_predicted"] for r in sel], "--", color=color,
                        label=f"{label} model")
    workers = sorted({r["workers"] for r in done})
    for ax in (ax_tput, ax_eff):
        ax.set_xticks(workers)
        ax.set_xlabel("workers (GPUs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_tput.set(ylabel="tokens / s (all workers)", title="throughput")
    ax_eff.set(ylabel="tokens/s per worker / smallest point's", title="scaling efficiency")
    ax_eff.axhline(1.0, color="k", ls=":")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line_label(row: dict[str, Any]) -> str:
    others = [f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in row if "." in k and k not in (WORKERS_KEY, ZERO_KEY)]
    return " ".join([f"ZeRO-{row.get(ZERO_KEY, '?')}", *others])
