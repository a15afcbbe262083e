"""`onerec-launch sweep`: grid expansion (Hydra multirun syntax), resume, the scaling table's arithmetic, the plot.

The end-to-end sweep on a real Ray head (1, 2 workers x ZeRO 0/2 through Ray Jobs) is in test_cluster.py, which
owns the module's one head.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from onerec_launch import sweep
from onerec_launch.launcher import LaunchResult
from onerec_launch.request import parse_argv


def test_grid_is_the_product_of_the_swept_overrides():
    grid = sweep.expand_grid(["trainer.num_workers=1,2", "deepspeed.zero_stage=0,2", "trainer.max_steps=5",
                              "pipeline.stages=[prepare,sid]", "trainer.micro_batch_size=range(4,12,4)"])
    assert grid.fixed == ("trainer.max_steps=5", "pipeline.stages=[prepare,sid]")  # a list is one value, not a sweep
    assert [k for k, _ in grid.axes] == ["trainer.num_workers", "deepspeed.zero_stage", "trainer.micro_batch_size"]
    points = grid.points
    assert len(points) == 2 * 2 * 2  # range(4,12,4) = 4, 8
    assert points[0] == {"trainer.num_workers": "1", "deepspeed.zero_stage": "0", "trainer.micro_batch_size": "4"}
    assert points[-1] == {"trainer.num_workers": "2", "deepspeed.zero_stage": "2", "trainer.micro_batch_size": "8"}
    assert sweep.point_name(points[-1]) == "num_workers-2_zero_stage-2_micro_batch_size-8"


def test_grid_without_a_sweep_is_refused():
    with pytest.raises(ValueError, match="no override sweeps"):
        sweep.expand_grid(["trainer.num_workers=2"])


def test_points_that_do_not_fit_are_told_apart_from_failures():
    assert sweep.classify("SUCCEEDED", None) == "SUCCEEDED"
    # The engine's resource check (check_resources) and an OOM: the point cannot run on this cluster.
    assert sweep.classify("FAILED", "error: trainer.num_workers: 4 workers x trainer.cpus_per_worker=1 need 4 "
                                    "CPUs but only 2 are available") == "DOES_NOT_FIT"
    assert sweep.classify("FAILED", "torch.OutOfMemoryError: CUDA out of memory.") == "DOES_NOT_FIT"
    assert sweep.classify("FAILED", "Traceback ... KeyError") == "FAILED"
    assert sweep.classify("STOPPED", "timeout") == "STOPPED"


def _fake_summary(point_dir: Path, workers: int, step_s: list[float], tokens_per_step: float, params: int) -> None:
    point_dir.mkdir(parents=True, exist_ok=True)
    timings = [{"total": s, "tokens": tokens_per_step} for s in step_s]
    (point_dir / "summary.json").write_text(json.dumps({
        "stage": "align", "world_size": workers, "num_params": params, "steps": len(step_s),
        "step_timings": timings, "peak_flops_per_worker": 1e11, "loss_first": 2.0, "loss_last": 1.0,
        "final_metrics": {"peak_memory_bytes_per_rank": [100 * 2**20, 120 * 2**20][:workers]}}))
    (point_dir / "config.yaml").write_text("trainer:\n  precision: fp32\n")


def test_table_arithmetic(tmp_path):
    # W=1: steps of 9 s (warm-up, dropped), 1 s, 1 s, 1.2 s -> median 1 s; 1,000 tokens per step -> 1,000 tok/s.
    # W=2: 2,000 tokens per step (same micro-batch per worker), median step 1.25 s -> 1,600 tok/s, 800 per worker;
    #      efficiency 800 / 1,000 = 0.8; measured communication = 1.25 - 1 = 0.25 s per step.
    # MFU at W=2: 6 x 1e6 params x 800 tok/s / 1e11 FLOP/s = 0.048.
    # Model, ZeRO-0 fp32: all-reduce of Psi = 4e6 bytes; ring wire bytes per rank = 2 (W-1)/W x Psi = 4e6 at W=2,
    # 0 at W=1; at 1 GB/s (sweep.link_gb_per_s) that is 4 ms -> predicted step 1.004 s, efficiency 1 / 1.004.
    state = {"stage": "align", "axes": {"trainer.num_workers": ["1", "2"], "deepspeed.zero_stage": ["0"]},
             "points": {}}
    for workers, steps, tokens in ((1, [9.0, 1.0, 1.0, 1.2], 1000.0), (2, [9.0, 1.25, 1.2, 1.3], 2000.0)):
        point = {"trainer.num_workers": str(workers), "deepspeed.zero_stage": "0"}
        point_dir = tmp_path / sweep.point_name(point)
        _fake_summary(point_dir, workers, steps, tokens, params=1_000_000)
        state["points"][sweep.point_name(point)] = {"point": point, "status": "SUCCEEDED", "output_dir": str(point_dir),
                                                    "relaunch": str(point_dir / "relaunch.sh")}
    one, two = sweep.table_rows(state, warmup_steps=1, link_gb_per_s=1.0)
    assert one["tokens_per_s"] == pytest.approx(1000.0) and one["scaling_efficiency"] == pytest.approx(1.0)
    assert two["tokens_per_s"] == pytest.approx(1600.0) and two["tokens_per_s_per_worker"] == pytest.approx(800.0)
    assert two["scaling_efficiency"] == pytest.approx(0.8)
    assert two["comm_measured_s"] == pytest.approx(0.25)
    assert two["mfu"] == pytest.approx(0.048)
    assert two["peak_mem_mib_per_worker"] == pytest.approx(120.0)
    assert two["comm_predicted_wire_bytes"] == pytest.approx(4e6)
    assert two["comm_predicted_s"] == pytest.approx(0.004)
    assert two["scaling_efficiency_predicted"] == pytest.approx(1 / 1.004)
    assert two["tokens_per_s_predicted"] == pytest.approx(2 * 1000 / 1.004)

    sweep.write_outputs(tmp_path, [one, two], state)
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [r["trainer.num_workers"] for r in rows] == ["1", "2"]
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["provenance"]["git"] is not None and len(report["rows"]) == 2
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_resume_skips_finished_points(tmp_path, monkeypatch):
    """A sweep interrupted after some points runs only the others again; DOES_NOT_FIT is final, FAILED is retried."""
    submitted = []

    def fake_launch(request, out=None, cwd=None):
        overrides = dict(o.split("=", 1) for o in request.job_overrides)
        submitted.append((overrides["trainer.num_workers"], overrides["deepspeed.zero_stage"]))
        if overrides["trainer.num_workers"] == "4":
            return LaunchResult("ray", "FAILED", Path(overrides["output_dir"]), "sid",
                                "4 workers x trainer.cpus_per_worker=1 need 4 CPUs but only 2 are available")
        if overrides["deepspeed.zero_stage"] == "3" and len(submitted) < 5:
            return LaunchResult("ray", "FAILED", Path(overrides["output_dir"]), "sid", "KeyError")
        _fake_summary(Path(overrides["output_dir"]), int(overrides["trainer.num_workers"]), [1.0, 1.0], 100.0, 10)
        return LaunchResult("ray", "SUCCEEDED", Path(overrides["output_dir"]), "sid", None)

    monkeypatch.setattr("onerec_launch.launcher.launch", fake_launch)
    request = parse_argv(["ray", "ray.address=http://127.0.0.1:1", "--", "onerec", "align",
                          "trainer.num_workers=1,4", "deepspeed.zero_stage=0,3"])
    first = sweep.run_sweep(request, tmp_path, warmup_steps=0, link_gb_per_s=None, out=open("/dev/null", "w"))
    statuses = {k: v["status"] for k, v in first["state"]["points"].items()}
    assert statuses == {"num_workers-1_zero_stage-0": "SUCCEEDED", "num_workers-1_zero_stage-3": "FAILED",
                        "num_workers-4_zero_stage-0": "DOES_NOT_FIT", "num_workers-4_zero_stage-3": "DOES_NOT_FIT"}
    assert len(submitted) == 4
    second = sweep.run_sweep(request, tmp_path, warmup_steps=0, link_gb_per_s=None, out=open("/dev/null", "w"))
    assert submitted[4:] == [("1", "3")]  # only the failed point ran again
    assert second["state"]["points"]["num_workers-1_zero_stage-3"]["status"] == "SUCCEEDED"
    assert "onerec-launch ray" in second["state"]["points"]["num_workers-1_zero_stage-3"]["command"]
