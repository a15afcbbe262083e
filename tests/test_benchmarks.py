"""The benchmark harness without Ray: the communication model of SCALING.md on hand-worked cases, the comms-logger
bookkeeping, the ratio arithmetic of the training benchmark, the engine's PhaseTimer, the environment record, the
writers and the run_benchmarks entry point. The training benchmark's Ray runs are exercised by running it
(`python benchmarks/run_benchmarks.py training --quick`), not here: a worker group costs ~15 s per start."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import _common  # noqa: E402
import bench_training as bt  # noqa: E402
import run_benchmarks  # noqa: E402

from onerec_dist.distributed.worker import PhaseTimer  # noqa: E402


# ---- communication model ----------------------------------------------------------------------------------------------
def test_collective_payloads_worked_by_hand():
    # Psi = 1000 parameters in bf16 (2 bytes): 2000 bytes per full copy of the model or of its gradients.
    assert bt.predicted_collective_bytes(1000, 0, 2) == {"all_reduce": 2000, "reduce_scatter": 0, "all_gather": 0}
    for stage in (1, 2):  # reduce-scatter gradients, all-gather the updated parameters
        assert bt.predicted_collective_bytes(1000, stage, 2) == {"all_reduce": 0, "reduce_scatter": 2000,
                                                                 "all_gather": 2000}
    # DeepSpeed's default all-reduces the gradient buckets instead
    assert bt.predicted_collective_bytes(1000, 2, 2, grad_all_reduce=True) == {
        "all_reduce": 2000, "reduce_scatter": 0, "all_gather": 2000}
    # ZeRO-3: gather in forward and in backward (2 x 2000), reduce-scatter gradients (2000)
    assert bt.predicted_collective_bytes(1000, 3, 2) == {"all_reduce": 0, "reduce_scatter": 2000, "all_gather": 4000}
    # a tied embedding of E = 100 parameters is gathered twice per pass: all_gather = 2 x (1000 + 100) x 2 = 4400
    assert bt.predicted_collective_bytes(1000, 3, 2, tied_embedding_params=100)["all_gather"] == 4400
    with pytest.raises(ValueError, match="zero_stage=4"):
        bt.predicted_collective_bytes(1000, 4, 2)


def test_ring_bytes_and_time_worked_by_hand():
    # W = 4: each rank sends 3/4 of an all-gather / reduce-scatter payload and 2 x 3/4 of an all-reduce payload.
    zero0 = bt.predicted_collective_bytes(1000, 0, 2)
    zero2 = bt.predicted_collective_bytes(1000, 2, 2)
    zero2_ds = bt.predicted_collective_bytes(1000, 2, 2, grad_all_reduce=True)
    zero3 = bt.predicted_collective_bytes(1000, 3, 2)
    assert bt.ring_bytes_per_rank(zero0, 4) == pytest.approx(2 * 0.75 * 2000)        # 3000: DDP ...
    assert bt.ring_bytes_per_rank(zero2, 4) == pytest.approx(0.75 * (2000 + 2000))   # 3000: ... = ZeRO-1/2
    assert bt.ring_bytes_per_rank(zero2_ds, 4) == pytest.approx(0.75 * (4000 + 2000))  # 4500
    assert bt.ring_bytes_per_rank(zero3, 4) == pytest.approx(0.75 * 6000)            # 4500 = 1.5 x ZeRO-2
    assert bt.ring_bytes_per_rank(zero3, 1) == 0.0
    # 4500 bytes: 4500 / 450e9 s over NVLink inside a node of 8, 4500 / 50e9 s over InfiniBand beyond it
    assert bt.comm_seconds(4500, 8) == pytest.approx(1e-8)
    assert bt.comm_seconds(4500, 16) == pytest.approx(9e-8)


def test_qwen3_param_counts_match_the_models_and_the_model_cards():
    from onerec_dist.models import build_tiny_model

    # the formula against transformers' own modules (meta device: no memory): the 0.6B preset cut to 2 of its 28
    # layers (the count is linear in layers), and the tiny preset
    with torch.device("meta"):
        model = build_tiny_model(bt._VocabOnly(151_936), "qwen3-0.6b", num_hidden_layers=2)
    shape = {**bt.QWEN3_SHAPES["Qwen3-0.6B"], "layers": 2}
    assert sum(p.numel() for p in model.parameters()) == bt.qwen3_param_count(**shape)
    tiny = build_tiny_model(bt._VocabOnly(1024), "tiny")
    assert sum(p.numel() for p in tiny.parameters()) == bt.qwen3_param_count(
        hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1024, tied=True)  # 139,648
    # model cards: 0.6B (0.44B non-embedding), 1.7B (1.4B), 8.2B (6.95B); embedding = vocab x hidden (x2 untied)
    for name, total, non_embedding in (("Qwen3-0.6B", 0.60e9, 0.44e9), ("Qwen3-1.7B", 1.72e9, 1.41e9),
                                       ("Qwen3-8B", 8.19e9, 6.95e9)):
        shape = bt.QWEN3_SHAPES[name]
        count = bt.qwen3_param_count(**shape)
        embedding = shape["vocab"] * shape["hidden"] * (1 if shape["tied"] else 2)
        assert count == pytest.approx(total, rel=0.01) and count - embedding == pytest.approx(non_embedding, rel=0.01)


def test_scaling_table_row_worked_by_hand():
    # Qwen3-8B, 256 GPUs, ZeRO-3, bf16: 3 x 2 x 8,190,735,360 bytes x 255/256 = 48.95 GB per GPU, over IB at 50 GB/s
    rows = {(r["model"], r["gpus"]): r for r in bt.scaling_table()}
    row = rows[("Qwen3-8B", 256)]
    assert row["zero3_gb"] == pytest.approx(6 * 8_190_735_360 * 255 / 256 / 1e9)
    assert row["zero3_s"] == pytest.approx(row["zero3_gb"] / 50)
    assert row["zero12_gb"] == pytest.approx(row["zero3_gb"] * 2 / 3)
    assert rows[("Qwen3-0.6B", 8)]["link"] == "NVLink" and row["link"] == "IB"
    # compute: 6 x 8.19e9 x 16384 tokens / (989e12 x 0.4) = 2.035 s
    assert row["compute_s"] == pytest.approx(6 * 8_190_735_360 * 16384 / (989e12 * 0.4))
    assert bt.scaling_table_markdown(list(rows.values())).count("\n") == len(rows) + 1


# ---- comms-logger bookkeeping ------------------------------------------------------------------------------------------
def test_comm_totals_reads_cumulative_latencies(monkeypatch):
    # DeepSpeed appends the op timer's running total (ms), so an op's seconds is its largest entry: 4.5 ms here.
    logger = SimpleNamespace(enabled=True, comms_dict={
        "all_reduce": {4: [2, [1.0, 3.0], [], []], 8: [1, [4.5], [], []]},
        "broadcast": {0: [1, [0.5], [], []]}})
    monkeypatch.setitem(sys.modules, "deepspeed.comm.comm", SimpleNamespace(comms_logger=logger))
    assert bt.comm_totals() == {"all_reduce": [3.0, 2 * 4 + 8, 4.5e-3], "broadcast": [1.0, 0.0, 0.5e-3]}
    logger.enabled = False
    assert bt.comm_totals() == {}


def test_comm_deltas_and_measured_payload():
    snaps = [{"all_reduce": [1, 10, 0.1]},
             {"all_reduce": [3, 30, 0.4], "all_gather_into_tensor": [2, 500, 0.2]},
             {"all_reduce": [3, 30, 0.4], "all_gather_into_tensor": [4, 1000, 0.3]}]
    deltas = bt.comm_deltas(snaps)
    assert deltas[0] == {"all_reduce": [2, 20, pytest.approx(0.3)], "all_gather_into_tensor": [2, 500, 0.2]}
    assert deltas[1] == {"all_gather_into_tensor": [2, 500, pytest.approx(0.1)]}  # all_reduce did not run
    # all-gathers log this rank's shard: x W (=2) for the payload; reduce-scatter / all-reduce log the full tensor
    interval = {"all_reduce": [3, 1000, 0.1], "all_gather_into_tensor": [2, 500, 0.2],
                "reduce_scatter_tensor": [1, 1000, 0.1], "broadcast": [1, 8, 0.0]}
    assert bt.measured_payload(interval, 2) == {"all_reduce": 1000, "reduce_scatter": 1000, "all_gather": 1000,
                                                "other": 8}


# ---- ratios of the training benchmark -----------------------------------------------------------------------------------
def fake_summary(step_s: float | list[float], tokens: float, steps: int = 3, params: int = 1000):
    times = step_s if isinstance(step_s, list) else [step_s] * steps
    timings = [{"tokens": tokens, "data": 0.1 * t, "forward": 0.3 * t, "backward": 0.5 * t, "optimizer": 0.1 * t,
                "total": t} for t in times]
    return {"step_timings": timings, "num_params": params, "trainable_params": params, "peak_flops_per_worker": 1e11,
            "loss_first": 7.0,
            "loss_last": 6.9, "final_metrics": {"comm_per_step": [], "peak_memory_bytes_per_rank": [2**20, 2**21]}}


def test_scaling_efficiency_and_zero_ratios_worked_by_hand():
    # one warm-up step (9 s, discarded), then 3 measured steps; medians 0.10 s and 0.16 s, fastest 0.10 s and 0.12 s
    args = bt.parse_args(["--quick", "--warmup-steps", "1", "--steps", "3"])
    args.flops_per_token, args.peak_flops_per_worker = 6000.0, 1e11  # as model_flops() would set them
    rows = [bt.summarise((1, 0, "-", 4), fake_summary([9.0, 0.100, 0.100, 0.200], 512), args),
            bt.summarise((2, 0, "-", 4), fake_summary([9.0, 0.160, 0.160, 0.120], 1024), args),
            bt.summarise((2, 3, "regather", 4), fake_summary(0.240, 1024, steps=4), args)]
    bt.add_ratios(rows)
    one, two, two_z3 = rows
    # 1 worker: 512 tokens / 0.1 s = 5120 tok/s; 2 workers: 1024 / 0.16 = 6400 tok/s = 3200 per worker
    assert one["tokens_per_s"] == pytest.approx(5120) and two["tokens_per_s_per_worker"] == pytest.approx(3200)
    assert two["scaling_efficiency"] == pytest.approx(6400 / (2 * 5120))  # 0.625
    assert one["scaling_efficiency"] == pytest.approx(1.0)
    assert two["comm_est_s"] == pytest.approx(0.06)  # 0.16 - 0.10
    assert two["scaling_efficiency_best"] == pytest.approx(0.100 * 1024 / (2 * 0.120 * 512))  # 0.833
    assert two_z3["step_vs_zero0"] == pytest.approx(1.5) and two_z3["scaling_efficiency"] is None  # no W=1 ZeRO-3
    # MFU = 6000 FLOPs/token x 3200 tok/s / 1e11 FLOP/s
    assert two["mfu"] == pytest.approx(6000 * 3200 / 1e11)
    assert two["forward_s"] == pytest.approx(0.3 * 0.160) and two["peak_mem_mib"] == pytest.approx(2.0)
    assert len(two["_timings"]) == 3 and two["step_s_min"] == pytest.approx(0.120)


def test_latency_bandwidth_fit_recovers_a_known_model():
    # alpha = 3 ms per collective, beta = 500 MB/s: (5 + 2 engine) calls + 1e6 bytes -> 21 ms + 2 ms = 23 ms, ...
    rows = [{"workers": 2, "zero_stage": z, "zero3_mode": "-", "micro_batch": 4, "comm_calls": n,
             "comm_wire_bytes": b, "comm_est_s": (n + 2) * 3e-3 + b / 500e6}
            for z, n, b in ((0, 2, 5e5), (2, 5, 1e6), (3, 53, 3e6))]
    rows.append({"workers": 1, "zero_stage": 0, "zero3_mode": "-", "micro_batch": 4, "comm_calls": 2,
                 "comm_wire_bytes": 0.0, "comm_est_s": 0.0})  # a 1-worker run is the baseline, not a point of the fit
    fit = bt.fit_latency_bandwidth(rows)
    assert fit["alpha_s"] == pytest.approx(3e-3) and fit["beta_bytes_per_s"] == pytest.approx(500e6)
    assert fit["points"] == [[2, 0, "-", 4], [2, 2, "-", 4], [2, 3, "-", 4]] and fit["predicted_s"][1] == pytest.approx(0.023)
    assert bt.fit_latency_bandwidth(rows[:1]) is None


def test_training_cli_defaults_and_errors(capsys):
    quick = bt.parse_args(["--quick"])
    assert (quick.workers, quick.zero_stages, quick.micro_batches) == ([1, 2], [0, 2, 3], [4])
    assert quick.precision == "fp32" and quick.vocab == 1024 and quick.threads_per_worker == 1
    assert quick.zero3 == ["regather", "deepspeed"] and quick.repeats == 3  # ZeRO-3 both ways; >= 3 repeats quick
    assert bt.parse_args([]).repeats == 5
    with pytest.raises(SystemExit):
        bt.parse_args(["--workers", "1,4096"])
    assert "needs 4096 CPU cores" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.parse_args(["--zero-stages", "0,4"])
    assert "0..3" in capsys.readouterr().err


# ---- the engine's step timer --------------------------------------------------------------------------------------------
def test_phase_timer_sums_phases_over_micro_batches(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 10.5, 11.0, 12.0, 13.0, 13.5])
    monkeypatch.setattr("onerec_dist.distributed.worker.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer(cuda=False)
    timer.start()                                            # 0
    for _ in range(2):                                       # two micro-batches
        for phase in ("data", "forward", "backward", "optimizer"):
            timer.mark(phase)
    timer.mark("data")                                       # the logging all-reduce after the last micro-batch
    # data: (1-0) + (10.5-10) + (13.5-13) = 2; forward: 2 + 0.5; backward: 3 + 1; optimizer: 4 + 1
    assert timer.read() == pytest.approx({"data": 2.0, "forward": 2.5, "backward": 4.0, "optimizer": 5.0,
                                          "total": 13.5})
    with pytest.raises(ValueError, match="phase='comm'"):
        timer.mark("comm")


def test_peak_memory_sees_a_64_mib_allocation_and_resets():
    bt.reset_peak_memory(cuda=False)
    before = bt.peak_memory_bytes(cuda=False)
    block = bytearray(64 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    high = bt.peak_memory_bytes(cuda=False)
    del block
    assert high - before >= 60 * 2**20
    bt.reset_peak_memory(cuda=False)
    if Path("/proc/self/clear_refs").exists():
        assert bt.peak_memory_bytes(cuda=False) < high


# ---- environment record and writers ------------------------------------------------------------------------------------
def test_environment_record_has_the_required_keys():
    env = _common.environment_record(config={"out_dir": Path("/tmp/x"), "workers": [1, 2]})
    assert set(env) == set(_common.ENVIRONMENT_KEYS)
    assert set(env["hardware"]) == set(_common.HARDWARE_KEYS) and env["hardware"]["cpu_cores"] >= 1
    assert {"torch", "deepspeed", "ray", "transformers", "peft", "triton"} <= set(env["libraries"])
    assert env["libraries"]["torch"] == torch.__version__
    assert env["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])
    assert env["git"]["dirty"] in (True, False, None)
    assert env["config"] == {"out_dir": "/tmp/x", "workers": [1, 2]}
    json.dumps(env)  # JSON-able as is


def test_library_versions_do_not_import_the_packages():
    import subprocess

    code = ("import sys; sys.path.insert(0, %r); import _common; _common.library_versions(); "
            "bad = [m for m in ('deepspeed', 'ray', 'triton', 'peft') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code % str(BENCH_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_writers_produce_readable_files(tmp_path):
    rows = [{"workers": 1, "step_s": 0.5, "series": [1, 2]}, {"workers": 2, "step_s": 0.25, "extra": "x"}]
    csv_path = _common.write_csv(rows, tmp_path / "sub" / "r.csv")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert [r["workers"] for r in read] == ["1", "2"] and read[1]["extra"] == "x" and "series" not in read[0]
    with pytest.raises(ValueError, match="no rows"):
        _common.write_csv([], tmp_path / "empty.csv")
    json_path = _common.write_json({"p": tmp_path, "rows": rows}, tmp_path / "r.json")
    assert json.loads(json_path.read_text())["p"] == str(tmp_path)
    fig, (ax,) = _common.new_figure(1)
    ax.plot([1, 2], [3, 4])
    png = _common.save_figure(fig, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _common.format_table(rows, [("workers", "W"), ("step_s", "step_s"), ("extra", "extra")])
    assert table.splitlines()[2].split("|")[-1].strip() == "x" and "-" in table.splitlines()[1]
    assert _common.ratio(1.0, 0) is None and _common.ratio(3.0, 2.0) == 1.5


def test_training_plot_writes_a_png(tmp_path):
    args = bt.parse_args(["--quick", "--warmup-steps", "0", "--steps", "3"])
    args.flops_per_token, args.peak_flops_per_worker = 6000.0, 1e11
    runs = [bt.summarise((w, z, "-" if z == 0 else "regather", 4), fake_summary(0.1 * w * (1 + z) * (1 + r / 10),
                                                                               512 * w), args)
            for r in range(3) for w in (1, 2) for z in (0, 3)]
    rows = bt.aggregate(runs)
    bt.add_ratios(rows)
    # three repeats of the 1-worker ZeRO-0 run: 0.10, 0.11, 0.12 s -> median 0.11, q1 0.105, q3 0.115
    one = rows[0]
    assert (one["step_s"], one["step_s_q1"], one["step_s_q3"]) == pytest.approx((0.11, 0.105, 0.115))
    assert one["repeats"] == 3 and one["step_s_min"] == pytest.approx(0.10)
    assert bt.write_plot(rows, tmp_path / "t.png", "test").read_bytes()[:4] == b"\x89PNG"


# ---- run_benchmarks entry point -----------------------------------------------------------------------------------------
def test_run_benchmarks_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exc:
        run_benchmarks.main(["trianing"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'trianing'" in err and "training" in err and "all" in err
    with pytest.raises(ValueError, match="unknown benchmark 'x'"):
        run_benchmarks.load_main("x")
    with pytest.raises(SystemExit):
        run_benchmarks.main(["all", "--", "--workers", "1"])
    assert "name it instead of 'all'" in capsys.readouterr().err


def test_run_benchmarks_dispatches_with_the_shared_options(monkeypatch):
    calls = []
    monkeypatch.setattr(run_benchmarks, "load_main", lambda name: lambda argv: calls.append((name, argv)) or name)
    assert run_benchmarks.main(["training", "--quick", "--device", "cpu", "--", "--workers", "1"]) == {
        "training": "training"}
    assert calls == [("training", ["--quick", "--device", "cpu", "--workers", "1"])]
    calls.clear()
    run_benchmarks.main(["all", "--allow-dirty"])
    assert calls == [(name, ["--allow-dirty", *extra]) for name, (_, extra) in run_benchmarks.BENCHMARKS.items()]
    assert {"training", "decoding", "prefix_index", "constrained_step"} <= set(run_benchmarks.BENCHMARKS)
    for module, _ in run_benchmarks.BENCHMARKS.values():  # every registered module exists beside the runner
        assert (BENCH_DIR / f"{module}.py").is_file(), module


def test_run_benchmarks_reaches_the_real_training_main(capsys):
    # the real module's main, with the option that prints SCALING.md's table (no Ray)
    report = run_benchmarks.main(["training", "--", "--comm-model"])
    assert len(report["training"]["comm_model"]) == 3 * 4
    assert "| Qwen3-8B | 8.191 B | 256 | IB |" in capsys.readouterr().out


# ---- provenance of every committed result ------------------------------------------------------------------------------
RESULT_FILES = sorted((BENCH_DIR / "results").glob("*.json"))


def check_provenance(report: dict, name: str) -> None:
    prov = report.get("provenance")
    assert isinstance(prov, dict), f"{name}: no provenance record"
    assert set(_common.PROVENANCE_KEYS) <= set(prov), f"{name}: missing {set(_common.PROVENANCE_KEYS) - set(prov)}"
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"] or ""), f"{name}: git_commit {prov['git_commit']!r}"
    assert prov["dirty"] is False and prov["allow_dirty"] is False, f"{name}: written from a dirty tree"
    for package in _common.REQUIRED_PACKAGES:
        assert prov["packages"].get(package), f"{name}: no version of {package}"
    assert prov["cpu_model"] and prov["cpu_threads"] >= 1 and prov["torch_threads"] >= 1
    for key in ("load_average_start", "load_average_end"):
        assert len(prov[key]) == 3 and all(v >= 0 for v in prov[key]), f"{name}: {key} {prov[key]!r}"
    if name.endswith("_gpu.json"):
        assert prov["gpu_name"], f"{name}: a GPU result without gpu_name"
    assert prov["started_utc"] <= prov["finished_utc"]


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_result_file_records_its_provenance(path):
    check_provenance(json.loads(path.read_text()), path.name)


def test_every_result_file_belongs_to_a_json_with_provenance():
    # CSV / PNG files sit beside the JSON of the same run; a file without one is stale (no script regenerates it)
    stems = {p.stem for p in RESULT_FILES}
    orphans = [p.name for p in (BENCH_DIR / "results").iterdir() if p.stem not in stems]
    assert not orphans, f"result files without a JSON of their run: {orphans}"


def test_start_run_refuses_a_dirty_tree_and_records_allow_dirty(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "git_state", lambda repo=None: {"commit": "a" * 40, "dirty": True,
                                                                   "dirty_paths": ["x.py"]})
    with pytest.raises(_common.DirtyTreeError, match="x.py"):
        _common.start_run("t", {"quick": True})
    run = _common.start_run("t", {"quick": True}, allow_dirty=True)
    path = run.finish({"results": [1]}, "t_cpu", tmp_path)
    report = json.loads(path.read_text())
    prov = report["provenance"]
    assert prov["dirty"] is True and prov["allow_dirty"] is True and prov["git_commit"] == "a" * 40
    assert prov["load_average_end"] is not None and report["results"] == [1] and report["wall_s"] >= 0
    with pytest.raises(AssertionError, match="dirty"):
        check_provenance(report, "t_cpu.json")  # the strict check rejects it


def test_median_iqr_and_interleaving_worked_by_hand():
    # [1, 2, 3, 4, 100]: median 3, inclusive quartiles 2 and 4 (the outlier moves neither)
    st = _common.summarize([1, 2, 3, 4, 100])
    assert (st["median"], st["q1"], st["q3"], st["iqr"], st["min"], st["n"]) == (3, 2, 4, 2, 1, 5)
    assert _common.ratio_of_medians([2, 4, 6], [1, 2, 30]) == 2.0  # 4 / 2, not best-of 2 / 1
    order = []
    _common.interleaved_results({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotates each round
    with pytest.raises(ValueError, match="at least 3"):
        _common.repeats(SimpleNamespace(repeats=2, quick=True))
    assert _common.repeats(SimpleNamespace(repeats=None, quick=True)) == 3
    assert _common.repeats(SimpleNamespace(repeats=None, quick=False)) == 5


def test_scaling_md_section_is_generated_between_markers(tmp_path):
    report = {"results": [{"params": 1000, "workers": 1, "zero_stage": 0, "zero3_mode": "-", "step_s": 0.0123,
                           "mfu": 0.0456}],
              "provenance": {"config": {"preset": "tiny"}, "git_commit": "b" * 40, "dirty": False, "cpu_model": "cpu",
                             "cpu_threads": 2, "load_average_start": [1, 1, 1], "load_average_end": [1, 1, 1]},
              "mfu": {"flops_per_token": 6000.0, "peak_flops_per_worker": 1e10, "peak_source": "measured GEMM"}}
    (tmp_path / "training_cpu.json").write_text(json.dumps(report))
    md = tmp_path / "SCALING.md"
    md.write_text(f"# x\n{bt.MEASURED_BEGIN}\nold\n{bt.MEASURED_END}\ntail\n")
    bt.update_scaling_md(tmp_path, md)
    text = md.read_text()
    assert "old" not in text and "| 1 | 0 | - | 12.3 |" in text and "4.56%" in text and text.endswith("tail\n")
    assert "MEASURED_SECTION" not in (BENCH_DIR / "SCALING.md").read_text()
    assert bt.MEASURED_BEGIN in (BENCH_DIR / "SCALING.md").read_text()


# ---- decoding through the Triton step (interpreter) ---------------------------------------------------------------------
def test_decoding_through_the_triton_step_matches_the_reference():
    # conftest sets TRITON_INTERPRET=1 before triton is imported; tiny model, 300 items of 3 x 16 codes (16-wide rows:
    # one block per row, a small grid), 3 users, 4 beams: items equal, scores equal to float rounding.
    import bench_constrained_decoding as bd

    args = bd.parse_args(["--quick", "--presets", "tiny", "--catalogues", "300:3x16", "--beams", "4", "--users", "3",
                          "--min-history", "2", "--max-history", "4"])
    model, tokenizer, item_tok = bd.build_model("tiny", 3, 16, args)
    world = bd.build_catalogue(model, tokenizer, item_tok, 300, 3, 16, args)
    prompts = world["prompts"]
    reference = bd.decoder_for(world, 4, 4, step_impl="reference").decode(prompts)
    triton = bd.decoder_for(world, 4, 4, step_impl="triton").decode(prompts)
    assert torch.equal(triton.items, reference.items) and bool((reference.items >= 0).all())
    torch.testing.assert_close(triton.scores, reference.scores, rtol=1e-5, atol=1e-5)
    assert world["trie_build_s"] >= 0 and world["codes"].unique(dim=0).shape[0] == 300


def test_synthetic_codes_are_unique_even_when_popular_parents_overflow():
    import bench_constrained_decoding as bd

    # 200 IDs of 2 x 16 codes with a steep Zipf law: the top parent would get far more than 16 children
    codes = bd.synthetic_codes(200, 2, 16, 2.0, 0)
    assert codes.shape == (200, 2) and codes.unique(dim=0).shape[0] == 200 and int(codes.max()) < 16
    assert bd.parse_catalogue("100k:3x8192") == (100_000, 3, 8192)
    with pytest.raises(ValueError):
        bd.synthetic_codes(300, 2, 16, 1.0, 0)  # 300 > 16**2 = 256 IDs


# ---- the GPU script ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_piece_on_cpu():
    # every registered piece at toy size on CPU, results to a temp folder; skips (missing modules) are allowed
    import subprocess

    result = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "gpu_check: dry OK" in result.stdout
    for name in ("kernel_tests", "constrained_step", "decoding", "training"):
        assert f"OK   {name}" in result.stdout, result.stdout[-3000:]


def test_gpu_check_registry_is_one_line_per_benchmark():
    text = (BENCH_DIR / "gpu_check.sh").read_text()
    names = re.findall(r"^register (\w+) ", text, flags=re.M)
    assert {"kernel_tests", "constrained_step", "decoding", "training"} <= set(names)
    assert "--presets qwen3-0.6b --catalogues 100k:4x256 --beams 32" in text  # the decoding check of the issue
    assert "--preset qwen3-0.6b --precision bf16 --workers 1 --zero-stages 2" in text  # the training check


def test_gpu_check_quality_mode_runs_the_beauty_ablation_rows():
    import subprocess

    text = (BENCH_DIR / "gpu_check.sh").read_text()
    # issue 14: rows base / ia / ia_r / ia_r_rl beside SASRec (and most-popular) on Beauty, its own <= 8 min budget
    assert 'QUALITY_ROWS="popular sasrec base ia ia_r ia_r_rl"' in text
    assert "--experiment beauty_ablation --device cuda --rows $QUALITY_ROWS" in text
    assert "QUALITY_SECONDS:-$([[ $MODE == dry ]] && echo 900 || echo 480)" in text
    result = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh"), "--quality", "--bogus"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stdout


def test_bench_data_extrapolates_only_the_data_dependent_memory():
    import bench_data

    def row(size, driver, worker):
        return {"size": size, "driver_peak_rss": {"median": driver}, "worker_peak_rss_max": {"median": worker}}

    # at 10k: pickled = driver 700 + 2 workers x 1000 = 2700; shards = 700 + 2 x 700 = 2100 (the fixed part).
    # Only the excess 600 grows 100x: 2100 + 600 x 100 = 62100 (scaling the whole 2700 would say 270000).
    pickled, shards = row(10_000, 700, 1000), row(10_000, 700, 700)
    assert bench_data.extrapolated_bytes(pickled, shards, 1_000_000, workers=2) == pytest.approx(62_100)
    # no shards run at that size: the whole pickled total scales (an upper bound)
    assert bench_data.extrapolated_bytes(pickled, None, 1_000_000, workers=2) == pytest.approx(270_000)


def test_quality_run_reads_a_pipeline_summary(tmp_path):
    """benchmarks/quality_run.py's record of a finished pipeline: metrics of the model, most-popular and SASRec from
    the eval stage, and the model / SASRec ratio (R@10 .06 / .08 = 0.75)."""
    import quality_run

    summary = {"stages": ["prepare", "align_multitask", "eval"], "seconds": 120.0,
               "prepare": {"seconds": 1.5}, "align_multitask": {"seconds": 100.0, "steps": 10,
                                                               "validation": {"metric": "recall@10", "best_step": 10,
                                                                              "curve": [{"step": 10,
                                                                                         "recall@10": 0.1}]}},
               "eval": {"seconds": 18.5, "dataset": "D", "split": "test", "num_users": 50, "num_items": 40,
                        "recall@10": 0.06, "ndcg@10": 0.03, "validity": 1.0, "users_per_s": 9.0,
                        "popular": {"recall@10": 0.01, "ndcg@10": 0.005},
                        "sasrec": {"recall@10": 0.08, "ndcg@10": 0.04, "best_epoch": 3, "stopped": "max_epochs"}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = quality_run.report_of(tmp_path)
    assert report["model"] == {"recall@10": 0.06, "ndcg@10": 0.03, "validity": 1.0}   # users_per_s is not a metric
    assert report["popular"] == {"recall@10": 0.01, "ndcg@10": 0.005}
    assert report["ratio_recall@10_model_over_sasrec"] == pytest.approx(0.75)
    assert report["stage_seconds"] == {"prepare": 1.5, "align_multitask": 100.0, "eval": 18.5}
    assert report["sasrec_run"]["best_epoch"] == 3 and report["validation"]["curve"] == [{"step": 10,
                                                                                          "recall@10": 0.1}]
    del summary["eval"]["sasrec"]   # a run without the SASRec anchor: no ratio, not a crash
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert quality_run.report_of(tmp_path)["ratio_recall@10_model_over_sasrec"] is None


def test_domains_compare_interval_and_gaps():
    """benchmarks/domains_compare.py's pure parts. Wilson 95 % interval of 50 hits in 100 users, z = 1.959964
    (the 97.5 % normal quantile, z^2 = 3.841459): centre (0.5 + z^2/200) / (1 + z^2/100) = 0.5, half
    z sqrt(0.25/100 + z^2/40000) / 1.0384146 = 1.959964 x 0.0509513 / 1.0384146 = 0.0961685 -> [0.403832, 0.596168]."""
    import domains_compare as dc

    low, high = dc.interval95(0.5, 100)
    assert low == pytest.approx(0.403832, abs=1e-6) and high == pytest.approx(0.596168, abs=1e-6)
    low, high = dc.interval95(0.0, 40)        # no hit: the interval still has width, from 0
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.087622, abs=1e-6)  # z^2/40 / (1 + z^2/40)

    def r(value):
        return {"recall@10": value, "users": 100, "ci95": dc.interval95(value, 100)}

    # A: the specialist (.30) beats joint (.28); B: joint (.22) beats the specialist (.20)
    recalls = {"spec_A": {"A": r(0.30), "B": r(0.05)}, "spec_B": {"A": r(0.04), "B": r(0.20)},
               "joint": {"A": r(0.28), "B": r(0.22)},
               "unify_rft": {"A": r(0.295), "B": r(0.25)}, "unify_distill": {"A": r(0.10), "B": r(0.21)}}
    gaps = dc.comparison(recalls, ["A", "B"])
    assert gaps["A"]["best"] == "spec_A" and gaps["A"]["gap_unify_rft"] == pytest.approx(-0.005)
    assert gaps["A"]["gap_unify_distill"] == pytest.approx(-0.20)
    assert gaps["B"]["best"] == "joint" and gaps["B"]["gap_unify_rft"] == pytest.approx(0.03)
    summary = {"think": {"per_domain": {"A": {"recall@10": 0.5, "users": 100}}}}
    assert dc.per_domain_recall(summary)["A"]["ci95"] == pytest.approx([0.403832, 0.596168], abs=1e-6)
    del recalls["joint"]["B"]   # an evaluation that drew no user of B (the first N users of 2-domain data)
    with pytest.raises(ValueError, match=r"domain 'B' has no test users in the evaluation of \['joint'\]"):
        dc.comparison(recalls, ["A", "B"])


def test_ablation_table_runs_a_row_once_and_reuses_its_summary(tmp_path, monkeypatch):
    """benchmarks/ablation_table.py: a row without OUT/<row>/summary.json runs `onerec ablation ... row=<row>` from the
    checkout (its data paths are relative to it); a row with one is not run again and keeps its recorded wall time."""
    import ablation_table as at

    calls = []

    def fake_run(command, check, cwd):   # what `onerec ablation` leaves behind
        calls.append((command, cwd))
        (tmp_path / "ia").mkdir()
        (tmp_path / "ia" / "summary.json").write_text(json.dumps({"ablation_row": "ia", "wall_seconds": 99.0}))

    monkeypatch.setattr(_common.subprocess, "run", fake_run)   # run_unless_done, shared with domains_compare
    record, _, ran = at.run_row(tmp_path, "scientific_ablation", "ia", ["eval.max_users=40"])
    assert ran and record["ablation_row"] == "ia" and len(calls) == 1
    command, cwd = calls[0]
    assert command[1:] == ["ablation", "experiment=scientific_ablation", "row=ia", f"output_dir={tmp_path}",
                           "eval.max_users=40"] and cwd == at.REPO
    record, seconds, ran = at.run_row(tmp_path, "scientific_ablation", "ia", [])
    assert not ran and seconds == 99.0 and len(calls) == 1
    # parents first: ia_more reads ia_r's step count, ia_r_rl starts from ia_r, ia_r* from ia
    order = at.ROW_ORDER
    assert order.index("ia") < order.index("ia_r") < order.index("ia_more")
    assert order.index("ia_r") < order.index("ia_r_rl")


def _rl_summary(rewards, before_hits, after_hits):
    """An ``onerec rl`` summary with what benchmarks/rl_control.py reads."""
    from onerec_dist.recipes import grpo

    heldout = {when: {"recall@10": float(np.mean(h)), "user_hits": h} for when, h in
               (("before", before_hits), ("after", after_hits))}
    return {"reward_first10": float(np.mean(rewards[:10])), "reward_last10": float(np.mean(rewards[-10:])),
            "rewards": rewards, "kl_max": 0.01, "steps": len(rewards), "export_dir": "e", "heldout": heldout,
            "heldout_change": grpo.heldout_change(heldout)}


def test_rl_control_windows_pairs_and_commands(tmp_path, monkeypatch):
    """benchmarks/rl_control.py. 25 steps with rewards 0.1 x (step // 10): windows of 10 have means 0.0 and 0.1 (the
    last 5 steps are a partial window, dropped); reward_first10 = 0.0, reward_last10 = mean(0.1 x 5, 0.2 x 5) = 0.15.
    The control's rewards stay 0.3: rise 0, so real - control = 0.15. Held-out after, real [1, 1, 0, 0] vs control
    [1, 0, 0, 0]: +0.25 user by user. Each seed runs the real run, then its control (shuffle_rewards=true)."""
    import rl_control as rc

    real_rewards = [0.1 * (step // 10) for step in range(25)]
    assert rc.window_means(real_rewards) == pytest.approx([0.0, 0.1])
    real = _rl_summary(real_rewards, [1, 0, 1, 0], [1, 1, 0, 0])
    control = _rl_summary([0.3] * 25, [1, 0, 1, 0], [1, 0, 0, 0])
    record = rc.run_record(real)
    assert record["rise"] == pytest.approx(0.15) and record["heldout_before"] == 0.5
    assert record["heldout_change"]["mean"] == 0.0                    # user 1 gained, user 2 lost
    pair = rc.pair_record(real, control)
    assert pair["rise_control"] == pytest.approx(0.0) and pair["rise_real_minus_control"] == pytest.approx(0.15)
    assert pair["heldout_after_real_minus_control"]["mean"] == 0.25

    commands, real_run = [], _common.subprocess.run

    def fake_run(command, *args, **kwargs):   # `onerec rl` leaves its summary in output_dir; git, uname (provenance) run
        if "rl" not in command:
            return real_run(command, *args, **kwargs)
        commands.append(command)
        out = Path(command[-1].split("=", 1)[1])
        out.mkdir(parents=True)
        body = control if "rl.debug.shuffle_rewards=true" in command else real
        (out / "summary.json").write_text(json.dumps(body))

    monkeypatch.setattr(_common.subprocess, "run", fake_run)
    monkeypatch.setattr(rc, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    assert rc.main([str(tmp_path / "runs"), "--sft", "SFT", "--seeds", "0", "1", "--set", "rl.max_steps=25",
                    "--allow-dirty"]) == 0
    assert [c[c.index("rl") + 1:][-4:] for c in commands][:2] == [
        ["rl.seed=0", "rl.debug.shuffle_rewards=false", "rl.max_steps=25", f"output_dir={tmp_path}/runs/reasoning_seed0"],
        ["rl.seed=0", "rl.debug.shuffle_rewards=true", "rl.max_steps=25",
         f"output_dir={tmp_path}/runs/reasoning_shuffled_seed0"]]
    assert all("model.name_or_path=SFT" in c and "experiment=reasoning" in c for c in commands) and len(commands) == 4
    report = json.loads((tmp_path / "results" / "rl_control_reasoning_cpu.json").read_text())
    assert report["overall"]["rise_real_mean"] == pytest.approx(0.15) and report["overall"]["rise_control_sd"] == 0.0
    assert (tmp_path / "results" / "rl_control_reasoning_cpu.png").is_file() and "provenance" in report
    rc.main([str(tmp_path / "runs"), "--sft", "SFT", "--seeds", "0", "1", "--allow-dirty"])
    assert len(commands) == 4                                          # every summary exists: nothing runs again
