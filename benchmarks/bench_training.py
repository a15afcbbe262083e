"""Training throughput and scaling of the engine (Ray Train + DeepSpeed ZeRO) over workers x ZeRO stage x micro-batch.

  .venv/bin/python benchmarks/run_benchmarks.py training --quick          # CPU: 1, 2 workers x ZeRO 0/2/3, < 2 min
  .venv/bin/python benchmarks/bench_training.py --micro-batches 1,4,16 --zero-stages 0,1,2,3
  python benchmarks/bench_training.py --device cuda --preset qwen3-0.6b --seq-len 2048 --micro-batches 4

Workload: ``SyntheticLMJob``, a randomly initialised Qwen3 of --preset (onerec_dist.models.build_tiny_model) on
uniform random tokens, every position a loss token, --seq-len tokens per example, so every step has exactly
workers x micro-batch x seq-len tokens. Each run is a real ``run_sequence`` training (engine loop, DeepSpeed, AdamW),
one worker group per worker count (the group's start-up is not timed); its first --warmup-steps steps are discarded.

Measured per run (rank 0 unless said otherwise; medians over the measured steps):
  * step time and its phases from the engine's PhaseTimer (onerec_dist.distributed.worker): data (collation, the
    loss-token and logging all-reduces), forward, backward, optimizer (engine.step: clipping, AdamW, ZeRO's
    parameter all-gather);
  * tokens/s in total and per worker; MFU = model FLOPs per token (onerec_dist.training.flops: 4N + 2 N_trainable
    + causal attention) x tokens/s per worker / peak FLOP/s of a worker, the peak being a GEMM measured at the start
    on the same device, dtype and threads (or --peak-tflops);
  * communication, two ways: (a) DeepSpeed's comms logger (config ``comms_logger``): calls, bytes (DeepSpeed's
    message size: the tensor handed to the collective; for all_gather_into_tensor that is this rank's shard) and
    seconds inside DeepSpeed's collectives per step; torch.distributed calls of the engine loop are not counted;
    (b) the step-time difference against 1 worker with the same ZeRO stage and micro-batch (every worker computes
    the same micro-batch with the same threads, so the extra time is communication, waiting and contention);
  * peak memory per worker: max RSS (resource.getrusage, the high-water mark reset through /proc/self/clear_refs
    when a run starts, so runs sharing a worker process do not inherit each other's peak) on CPU,
    torch.cuda.max_memory_allocated on GPU; the maximum over workers is reported;
  * ratios against baselines of the same run: scaling efficiency = total tokens/s at W workers / (W x tokens/s at 1
    worker), same ZeRO stage and micro-batch; step time of each ZeRO stage / step time of ZeRO-0, same W and
    micro-batch; measured comm bytes / the model of SCALING.md (``predicted_collective_bytes``).
Thread settings: each worker runs torch with --threads-per-worker threads (OMP_NUM_THREADS and
torch.set_num_threads), 1 by default, so 1 worker uses one core and 2 workers two.
Statistics: --repeats interleaved rounds (>= 5 full, 3 quick; every config once per round, in one worker group);
each figure is the median over repeats of the per-run median over measured steps, with q1/q3 over repeats.
ZeRO-3 runs both ways by default (--zero3 regather,deepspeed). regather: stage3_param_persistence_threshold=0
(the default keeps tensors under 100k elements whole on every rank, i.e. all of a tiny model),
stage3_max_reuse_distance=0 and stage3_prefetch_bucket_size=0 (each module gathered before its forward and again
before its backward; with the defaults a small model is gathered once per step and kept); --zero3 deepspeed keeps
DeepSpeed's default prefetch / persistence / reuse settings. ZeRO-1/2 always keep DeepSpeed's defaults.
``--comm-model`` prints SCALING.md's table of the communication model instead of running anything.
Results: benchmarks/results/training_<cpu|gpu>[_tag].{csv,json,png} with provenance; a CPU run into the default
results folder regenerates SCALING.md section 4 from every training_cpu*.json there (update_scaling_md).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # _common sits beside this script (also when loaded by file path)
    sys.path.insert(0, str(BENCH_DIR))

from _common import (  # noqa: E402
    RESULTS_DIR,
    add_common_args,
    device_suffix,
    errorbar,
    format_table,
    new_figure,
    ratio,
    repeats,
    save_figure,
    start_run,
    summarize,
    write_csv,
)

from onerec_dist.training.engine_api import (  # noqa: E402
    causal_lm_loss,
    count_loss_tokens,
    default_param_groups,
    sampler_step_source,
)

PRESET_VOCAB = {"tiny": 1024, "small": 4096, "qwen3-0.6b": 151_936}  # 151,936: Qwen3's published vocab_size
QUICK = {"workers": "1,2", "zero_stages": "0,2,3", "micro_batches": "4", "warmup_steps": 2, "steps": 4}
FULL = {"workers": None, "zero_stages": "0,1,2,3", "micro_batches": "1,4,16", "warmup_steps": 5, "steps": 20}
SCALING_MD = BENCH_DIR / "SCALING.md"
MEASURED_BEGIN = "<!-- measured:begin (generated by bench_training.py from benchmarks/results/training_cpu*.json) -->"
MEASURED_END = "<!-- measured:end -->"
PHASES = ("data", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------- communication model
COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather")


def predicted_collective_bytes(num_params: int, zero_stage: int, bytes_per_element: int, *,
                               grad_all_reduce: bool = False, tied_embedding_params: int = 0) -> dict[str, float]:
    """Collective payload of one optimizer step (one micro-batch, no accumulation) by kind; see SCALING.md.

    Payload = the full tensor a collective produces or consumes (Psi = num_params elements for the model), not the
    bytes on the wire (``ring_bytes_per_rank``). Elements are ``bytes_per_element`` (2 for bf16, 4 for fp32):
      ZeRO-0:   all-reduce of gradients                                         -> all_reduce = Psi
      ZeRO-1/2: reduce-scatter of gradients + all-gather of updated parameters -> reduce_scatter = all_gather = Psi
      ZeRO-3:   all-gather of parameters in forward and again in backward,
                reduce-scatter of gradients (no all-gather after the step: a rank keeps its updated shard)
                                                                                -> all_gather = 2 Psi, reduce_scatter = Psi
    ``grad_all_reduce``: ZeRO-1/2 gradients all-reduced instead of reduce-scattered (DeepSpeed's default,
    zero_optimization.use_multi_rank_bucket_allreduce=true). ``tied_embedding_params`` (E): ZeRO-3 gathers a tied
    input embedding / LM head twice per pass when it is released between the two uses -> all_gather = 2 (Psi + E).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage!r}; allowed: 0, 1, 2, 3")
    if num_params < 0 or tied_embedding_params < 0 or bytes_per_element <= 0:
        raise ValueError(f"num_params={num_params} and tied_embedding_params={tied_embedding_params} must be >= 0, "
                         f"bytes_per_element={bytes_per_element} > 0")
    psi = float(num_params) * bytes_per_element
    out = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    if zero_stage == 0:
        out["all_reduce"] = psi
    elif zero_stage in (1, 2):
        out["all_reduce" if grad_all_reduce else "reduce_scatter"] = psi
        out["all_gather"] = psi
    else:
        out["reduce_scatter"] = psi
        out["all_gather"] = 2 * (psi + float(tied_embedding_params) * bytes_per_element)
    return out


def ring_bytes_per_rank(payload: dict[str, float], world_size: int) -> float:
    """Bytes each rank sends for ``payload`` with ring algorithms: (W-1)/W of an all-gather or reduce-scatter,
    2 (W-1)/W of an all-reduce (a reduce-scatter then an all-gather); other kinds count (W-1)/W. 0 for one rank."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    share = (world_size - 1) / world_size
    return share * sum(v * (2 if kind == "all_reduce" else 1) for kind, v in payload.items())


# Qwen3 shapes: 0.6B is the qwen3-0.6b preset of onerec_dist.models (Qwen/Qwen3-0.6B's config.json); 1.7B and 8B
# are Qwen/Qwen3-1.7B and Qwen/Qwen3-8B's published configs (model cards: 1.7B total / 1.4B non-embedding, 8.2B /
# 6.95B). All: head_dim 128, vocab 151,936, no attention bias, q/k RMSNorm.
QWEN3_SHAPES = {
    "Qwen3-0.6B": dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       vocab=151_936, tied=True),
    "Qwen3-1.7B": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
                       vocab=151_936, tied=True),
    "Qwen3-8B": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                     vocab=151_936, tied=False),
}


def qwen3_param_count(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                      vocab: int, tied: bool) -> int:
    """Parameters of a Qwen3ForCausalLM: embedding (+ LM head unless tied) + layers x (q, k, v, o projections,
    q/k norms, SwiGLU MLP, two RMSNorms) + final norm."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


# Per-GPU bandwidths of the paper model: NVLink 4 (H100) 900 GB/s bidirectional = 450 GB/s each way inside a node
# of 8 GPUs; InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one NIC per GPU) between nodes. A ring spanning nodes
# runs at its slowest link.
NVLINK_GBPS, INFINIBAND_GBPS, GPUS_PER_NODE = 450.0, 50.0, 8


def comm_seconds(wire_bytes: float, world_size: int) -> float:
    """Bandwidth-only time of ``wire_bytes`` per GPU: NVLink within one node, InfiniBand beyond (no latency term,
    no overlap with compute)."""
    gbps = NVLINK_GBPS if world_size <= GPUS_PER_NODE else INFINIBAND_GBPS
    return wire_bytes / (gbps * 1e9)


def scaling_table(world_sizes=(8, 16, 64, 256), bytes_per_element: int = 2, tokens_per_gpu: int = 16_384,
                  peak_tflops: float = 989.0, mfu: float = 0.4) -> list[dict[str, Any]]:
    """SCALING.md's table: per model and GPU count, wire GB per GPU per step and its time for ZeRO-1/2 (paper:
    reduce-scatter + all-gather; DeepSpeed's default: all-reduce + all-gather) and ZeRO-3, beside the compute
    time of ``tokens_per_gpu`` tokens at ``mfu`` of ``peak_tflops`` (6 x params FLOPs per token)."""
    rows = []
    for name, shape in QWEN3_SHAPES.items():
        params = qwen3_param_count(**shape)
        compute_s = 6 * params * tokens_per_gpu / (peak_tflops * 1e12 * mfu)
        for w in world_sizes:
            row = {"model": name, "params": params, "gpus": w, "link": "NVLink" if w <= GPUS_PER_NODE else "IB"}
            for label, stage, all_reduce in (("zero12", 2, False), ("zero12_ds", 2, True), ("zero3", 3, False)):
                wire = ring_bytes_per_rank(predicted_collective_bytes(params, stage, bytes_per_element,
                                                                      grad_all_reduce=all_reduce), w)
                row[f"{label}_gb"] = wire / 1e9
                row[f"{label}_s"] = comm_seconds(wire, w)
            row["compute_s"] = compute_s
            rows.append(row)
    return rows


def scaling_table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | GPUs | link | ZeRO-1/2 GB/GPU | s | ZeRO-1/2 DeepSpeed GB/GPU | s | ZeRO-3 GB/GPU | s |"
             " compute s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.3f} B | {r['gpus']} | {r['link']} | "
                     f"{r['zero12_gb']:.2f} | {r['zero12_s']:.3f} | {r['zero12_ds_gb']:.2f} | {r['zero12_ds_s']:.3f} | "
                     f"{r['zero3_gb']:.2f} | {r['zero3_s']:.3f} | {r['compute_s']:.3f} |")
    return "\n".join(lines)


def measured_payload(interval: dict[str, list[float]], world_size: int) -> dict[str, float]:
    """One comms-logger interval as payload bytes by kind (as ``predicted_collective_bytes``). DeepSpeed logs the
    tensor handed to the call: the full tensor for all-reduce / reduce-scatter, this rank's shard for all-gather
    (scaled by W here); anything else (broadcast, reduce) lands in "other"."""
    kinds = {"all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "inference_all_reduce": "all_reduce",
             "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter": "reduce_scatter",
             "all_gather_into_tensor": "all_gather", "all_gather": "all_gather"}
    out = dict.fromkeys((*COLLECTIVE_KINDS, "other"), 0.0)
    for name, (_, sent, _) in interval.items():
        kind = kinds.get(name.split(" |")[0], "other")
        out[kind] += sent * (world_size if kind == "all_gather" else 1)
    return out


# ------------------------------------------------------------------------------------------- worker-side probes
def reset_peak_memory(cuda: bool) -> None:
    """Restart the peak-memory high-water mark of this process (best effort)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the new mark starts from live memory
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM / ru_maxrss to the current RSS


def peak_memory_bytes(cuda: bool) -> int:
    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def comm_totals() -> dict[str, list[float]]:
    """{op: [calls, bytes, seconds]} of DeepSpeed's collectives so far in this process (comms logger).

    The logger's latency entries are cumulative per op name (DeepSpeed reads its op timer with reset=False), so the
    op's total seconds is its largest entry. Only deepspeed.comm's timed collectives appear; {} when disabled.
    """
    module = sys.modules.get("deepspeed.comm.comm")  # loaded by the engine before any step; never imported here
    logger = getattr(module, "comms_logger", None)
    if logger is None or not logger.enabled:
        return {}
    totals = {}
    for name, by_size in logger.comms_dict.items():
        calls = sum(v[0] for v in by_size.values())
        sent = sum(size * v[0] for size, v in by_size.items())
        seconds = max((max(v[1]) for v in by_size.values() if v[1]), default=0.0) / 1e3  # ms -> s
        totals[name] = [float(calls), float(sent), seconds]
    return totals


def comm_deltas(snapshots: list[dict[str, list[float]]]) -> list[dict[str, list[float]]]:
    """Per interval between consecutive snapshots: {op: [calls, bytes, seconds]} (ops that did not run: absent)."""
    out = []
    for before, after in zip(snapshots, snapshots[1:]):
        delta = {}
        for name, values in after.items():
            prev = before.get(name, [0.0, 0.0, 0.0])
            diff = [a - b for a, b in zip(values, prev)]
            if diff[0] > 0:
                delta[name] = diff
        out.append(delta)
    return out


class _VocabOnly:
    """What build_tiny_model reads from a tokenizer: its length and special ids (ids 0..2, as in onerec models)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass
class SyntheticLMJob:
    """A TrainJob (engine_api protocol): a Qwen3 of ``preset`` on uniform random tokens; snapshots comms and peak
    memory at every step's forward.

    Snapshot k is taken when step k's forward starts, so snapshot k+1 - snapshot k is exactly step k (forward,
    backward, optimizer); the last step and the export after it fall outside every interval.
    """

    preset: str = "tiny"
    vocab_size: int = 1024
    seq_len: int = 128
    n_examples: int = 64
    seed: int = 0
    cuda: bool = False
    attn: str = "sdpa"
    _snapshots: list = field(default_factory=list, repr=False)
    _memory: list = field(default_factory=list, repr=False)

    def build_model(self):
        from onerec_dist.models import build_tiny_model

        reset_peak_memory(self.cuda)
        self._snapshots, self._memory = [], []
        model = build_tiny_model(_VocabOnly(self.vocab_size), self.preset, attn_implementation=self.attn,
                                 seed=self.seed)
        return model, None

    def examples(self):
        rng = np.random.default_rng(self.seed)
        ids = rng.integers(3, self.vocab_size, size=(self.n_examples, self.seq_len)).tolist()
        return [{"input_ids": row, "labels": row, "task": "lm"} for row in ids]

    def step_source(self, ctx):
        return sampler_step_source(self.examples(), ctx)

    def configure_trainable(self, model, weight_decay):
        return default_param_groups(model, weight_decay)

    def loss_units(self, batch):
        return count_loss_tokens(batch["labels"])

    def save_model_extras(self, model_dir):
        pass

    def loss(self, model, batch):
        self._snapshots.append(comm_totals())
        self._memory.append(peak_memory_bytes(self.cuda))
        return causal_lm_loss(model, batch, getattr(self, "loss_config", None))

    def final_metrics(self, model):
        from onerec_dist.distributed.probes import gather_from_ranks  # runs on every rank, inside the engine

        peak = self._memory[-1] if self._memory else peak_memory_bytes(self.cuda)
        per_rank = gather_from_ranks(peak)
        return {"comm_per_step": comm_deltas(self._snapshots), "peak_memory_bytes_per_rank": per_rank}


# ------------------------------------------------------------------------------------------- runs
def run_specs(args, workers: int, root: Path):
    from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig

    specs, keys = [], []
    configs = [(micro, stage, mode) for micro in args.micro_batches for stage in args.zero_stages
               for mode in (args.zero3 if stage == 3 else ["-"])]
    for repeat in range(args.repeats):  # interleaved: every config once per round, so load drifts hit all alike
        for micro, stage, mode in configs:
            steps = args.warmup_steps + args.steps + 1  # +1: the last step's comms fall outside every interval
            job = SyntheticLMJob(preset=args.preset, vocab_size=args.vocab, seq_len=args.seq_len,
                                 n_examples=steps * workers * micro, seed=args.seed, cuda=args.device == "cuda",
                                 attn=args.attn)
            trainer = TrainerConfig(
                num_workers=workers, use_gpu=args.device == "cuda", cpus_per_worker=args.threads_per_worker,
                max_steps=steps, micro_batch_size=micro, grad_accum_steps=1, lr=1e-4, lr_schedule="constant",
                precision=args.precision, checkpoint_every=0, log_every=steps, resume="never", seed=args.seed,
                wandb={"mode": "disabled"}, run_name=f"bench-w{workers}-z{stage}{mode}-mb{micro}-r{repeat}",
                ray_temp_dir=args.ray_temp_dir, peak_tflops=args.peak_flops_per_worker / 1e12)
            # ZeRO-3 in the large-model regime: every module's parameters gathered before its forward and again
            # before its backward. DeepSpeed's defaults (reuse distance 1e9 elements, 5e7-element prefetch buckets)
            # gather a model this small once per step and keep it for the backward (see SCALING.md).
            regather = stage == 3 and mode == "regather"
            zero3 = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
            extra: dict[str, Any] = {"zero_optimization": zero3 if regather else {}}
            if args.comms_logger:
                extra["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
            persistence = {"stage3_param_persistence_threshold": 0} if regather else {}
            ds = DeepSpeedConfig(zero_stage=stage, extra=extra, **persistence)
            specs.append((job, trainer, ds, root / f"w{workers}_z{stage}{mode}_mb{micro}_r{repeat}"))
            keys.append((workers, stage, mode, micro))
    return keys, specs


@contextlib.contextmanager
def worker_environment(threads: int):
    """Environment the Ray workers inherit: this folder importable (they unpickle SyntheticLMJob from
    bench_training), one OpenMP pool of ``threads``, fast Ray Train polling, no wandb, offline hub."""
    from onerec_dist.env import apply_offline_defaults

    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = "1"  # the engine's rank-0 progress bar, relayed line by line by Ray
    os.environ["PYTHONWARNINGS"] = "ignore::FutureWarning"  # torch's deprecation notice on every ZeRO collective
    apply_offline_defaults()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def comm_columns(comm: list[dict[str, list[float]]], workers: int, stage: int, num_params: int, args,
                 mode: str = "regather") -> dict:
    """Measured (comms logger, medians over steps) against predicted communication of one run.

    The prediction is DeepSpeed's actual scheme (ZeRO-1/2 gradients all-reduced; ZeRO-3 re-gathering the tied
    embedding for the LM head; with --zero3 deepspeed a small model is gathered once per step and measures below
    it); ``wire_vs_ideal`` compares the measured ring bytes with the paper's ZeRO
    (reduce-scatter of gradients). With one worker DeepSpeed skips the all-gathers and nothing crosses a wire, so
    the ratios are left empty.
    """
    from onerec_dist.models import PRESETS

    bytes_per_element = 2 if args.precision in ("bf16", "fp16") else 4
    # build_tiny_model ties the LM head to the embedding; re-gathered for the head only when released in between
    tied = args.vocab * PRESETS[args.preset]["hidden_size"] if mode == "regather" else 0
    predicted = predicted_collective_bytes(num_params, stage, bytes_per_element, grad_all_reduce=True,
                                           tied_embedding_params=tied)
    ideal = predicted_collective_bytes(num_params, stage, bytes_per_element)
    out: dict[str, Any] = {"predicted_payload_bytes": sum(predicted.values()),
                           "predicted_wire_bytes": ring_bytes_per_rank(predicted, workers),
                           "ideal_wire_bytes": ring_bytes_per_rank(ideal, workers)}
    if not comm:
        return out
    payloads = [measured_payload(c, workers) for c in comm]
    out["comm_calls"] = median([sum(v[0] for v in c.values()) for c in comm])
    out["comm_s"] = median([sum(v[2] for v in c.values()) for c in comm])
    out["comm_payload_bytes"] = median([sum(p.values()) for p in payloads])
    out["comm_wire_bytes"] = median([ring_bytes_per_rank(p, workers) for p in payloads])
    names = sorted({name for c in comm for name in c})
    out["comm_ops"] = " ".join(f"{n}:{median([c.get(n, [0])[0] for c in comm]):g}" for n in names)
    if workers > 1:
        out["payload_vs_model"] = ratio(out["comm_payload_bytes"], out["predicted_payload_bytes"])
        out["wire_vs_ideal"] = ratio(out["comm_wire_bytes"], out["ideal_wire_bytes"])
    return out


def summarise(key, summary: dict[str, Any], args) -> dict[str, Any]:
    """One result row from a run's summary (steps after the warm-up only)."""
    workers, stage, mode, micro = key
    measured = slice(args.warmup_steps, args.warmup_steps + args.steps)
    timings = summary["step_timings"][measured]
    step_s = median([t["total"] for t in timings])
    tokens_per_step = median([t["tokens"] for t in timings])
    per_worker = tokens_per_step / workers / step_s
    row = {"workers": workers, "zero_stage": stage, "zero3_mode": mode, "micro_batch": micro, "seq_len": args.seq_len,
           "params": summary["num_params"], "tokens_per_step": tokens_per_step, "step_s": step_s,
           "step_s_min": min(t["total"] for t in timings)}  # the least disturbed step: robust on a shared machine
    row.update({f"{p}_s": median([t[p] for t in timings]) for p in PHASES})
    row.update(tokens_per_s=tokens_per_step / step_s, tokens_per_s_per_worker=per_worker,
               mfu=args.flops_per_token * per_worker / args.peak_flops_per_worker,
               trainable_params=summary["trainable_params"])
    row.update(comm_columns(summary["final_metrics"]["comm_per_step"][measured], workers, stage,
                            summary["num_params"], args, mode))
    peaks = summary["final_metrics"]["peak_memory_bytes_per_rank"]
    row["peak_mem_mib"] = max(peaks) / 2**20
    row["loss_first"], row["loss_last"] = summary["loss_first"], summary["loss_last"]
    row["_timings"], row["_peaks"] = timings, peaks
    return row


STAT_FIELDS = ("step_s", "tokens_per_s", "tokens_per_s_per_worker", "mfu", "comm_s")


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per config from its interleaved repeats: every number is the median over repeats (each repeat's own
    value being the median over its measured steps); STAT_FIELDS also get _q1, _q3, _iqr; step_s_min is the best
    step of all repeats (best-of, beside the median)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["workers"], run["zero_stage"], run["zero3_mode"], run["micro_batch"]), []).append(run)
    rows = []
    for group in groups.values():
        row = dict(group[0])
        for name, value in group[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.startswith("_"):
                values = [g[name] for g in group if g.get(name) is not None]
                row[name] = statistics.median(values) if values else None
        for name in STAT_FIELDS:
            values = [g[name] for g in group if g.get(name) is not None]
            if values:
                st = summarize(values)
                row.update({f"{name}_q1": st["q1"], f"{name}_q3": st["q3"], f"{name}_iqr": st["iqr"]})
        row["step_s_min"] = min(g["step_s_min"] for g in group)
        row["repeats"] = len(group)
        row["_timings"] = [g["_timings"] for g in group]
        row["_peaks"] = [g["_peaks"] for g in group]
        rows.append(row)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against baselines measured in the same run (see the module docstring); None where absent."""
    by_key = {(r["workers"], r["zero_stage"], r["zero3_mode"], r["micro_batch"]): r for r in rows}
    for r in rows:
        one = by_key.get((1, r["zero_stage"], r["zero3_mode"], r["micro_batch"]))
        zero0 = by_key.get((r["workers"], 0, "-", r["micro_batch"]))
        r["scaling_efficiency"] = ratio(r["tokens_per_s"], r["workers"] * one["tokens_per_s"]) if one else None
        # the same from the fastest step of each run: tokens per step are fixed, so tok/s ratio = inverse step ratio
        r["scaling_efficiency_best"] = (ratio(one["step_s_min"] * r["tokens_per_step"],
                                              r["workers"] * r["step_s_min"] * one["tokens_per_step"]) if one else None)
        r["comm_est_s"] = r["step_s"] - one["step_s"] if one else None
        r["step_vs_zero0"] = ratio(r["step_s"], zero0["step_s"]) if zero0 else None
        r["comm_s_vs_zero0"] = ratio(r.get("comm_s"), zero0.get("comm_s")) if zero0 else None
        r["mem_vs_zero0"] = ratio(r["peak_mem_mib"], zero0["peak_mem_mib"]) if zero0 else None


ENGINE_COLLECTIVES_PER_STEP = 2  # the engine loop's own all-reduces (loss tokens, logging stats), not in the logger


def fit_latency_bandwidth(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fit comm_est_s = n x alpha + wire_bytes / beta over the runs with W > 1 (non-negative least squares).

    n = DeepSpeed's collectives per step (comms logger) + the engine's own; wire_bytes = measured ring bytes per
    rank. alpha is the fixed cost of one collective (latency, synchronisation, Python around it), beta the
    bandwidth; None when fewer than 2 runs qualify. 1 / beta = 0 means the bandwidth term was not resolvable.
    """
    from scipy.optimize import nnls

    points = [r for r in rows if r["workers"] > 1 and r.get("comm_calls") is not None and r["comm_est_s"] is not None]
    if len(points) < 2:
        return None
    a = np.array([[r["comm_calls"] + ENGINE_COLLECTIVES_PER_STEP, r["comm_wire_bytes"]] for r in points])
    y = np.array([r["comm_est_s"] for r in points])
    scale = np.array([1.0, 1e-9])  # seconds per call, seconds per GB: comparable magnitudes for the solver
    (alpha, inv_beta_gb), _ = nnls(a * scale, y)
    predicted = (a * scale) @ np.array([alpha, inv_beta_gb])
    return {"alpha_s": float(alpha), "beta_bytes_per_s": float(1e9 / inv_beta_gb) if inv_beta_gb > 0 else None,
            "points": [[r["workers"], r["zero_stage"], r["zero3_mode"], r["micro_batch"]] for r in points],
            "measured_s": y.tolist(), "predicted_s": predicted.tolist()}


def run_all(args) -> list[dict[str, Any]]:
    from onerec_dist.distributed import run_sequence

    rows = []
    root = Path(tempfile.mkdtemp(prefix="onerec_bench_train_"))
    try:
        with worker_environment(args.threads_per_worker):
            for workers in args.workers:  # one worker group per worker count
                keys, specs = run_specs(args, workers, root)
                started = time.perf_counter()
                summaries = run_sequence(specs)
                print(f"{workers} worker(s): {len(specs)} runs in {time.perf_counter() - started:.1f} s", flush=True)
                rows += [summarise(key, summary, args) for key, summary in zip(keys, summaries)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(args.ray_temp_dir, ignore_errors=True)
    rows = aggregate(rows)
    add_ratios(rows)
    return rows


# ------------------------------------------------------------------------------------------- output
TABLE = [("workers", "W"), ("zero_stage", "zero"), ("zero3_mode", "z3 mode"), ("micro_batch", "mb"),
         ("step_s", "step_s"), ("step_s_q1", "q1"), ("step_s_q3", "q3"),
         ("forward_s", "fwd_s"), ("backward_s", "bwd_s"), ("optimizer_s", "opt_s"), ("data_s", "data_s"),
         ("tokens_per_s_per_worker", "tok/s/worker"), ("scaling_efficiency", "scaling_eff"),
         ("scaling_efficiency_best", "eff(best)"),
         ("step_vs_zero0", "step/zero0"), ("comm_s", "comm_s(log)"), ("comm_est_s", "comm_s(vs W=1)"),
         ("payload_vs_model", "bytes/model"), ("wire_vs_ideal", "wire/ideal"), ("mfu", "mfu"),
         ("peak_mem_mib", "peak_MiB")]


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    fig, (ax_tput, ax_eff, ax_break) = new_figure(3, width_per_panel=6.0, height=4.5)
    micro = rows[0]["micro_batch"]
    for stage, mode in sorted({(r["zero_stage"], r["zero3_mode"]) for r in rows}):
        sel = sorted((r for r in rows if (r["zero_stage"], r["zero3_mode"]) == (stage, mode)
                      and r["micro_batch"] == micro), key=lambda r: r["workers"])
        ws = [r["workers"] for r in sel]
        label = f"ZeRO-{stage}" + (f" ({mode})" if stage == 3 else "")
        errorbar(ax_tput, ws, [{"median": r["tokens_per_s"], "q1": r["tokens_per_s_q1"],
                                "q3": r["tokens_per_s_q3"]} for r in sel], label=label)
        ax_eff.plot(ws, [r["scaling_efficiency"] or math.nan for r in sel], "o-", label=label)
    ws_all = sorted({r["workers"] for r in rows})
    base = next((r for r in rows if r["workers"] == 1 and r["micro_batch"] == micro), None)
    if base:
        ax_tput.plot(ws_all, [w * base["tokens_per_s"] for w in ws_all], "k:", label="linear (from W=1)")
    ax_tput.set(xlabel="workers", ylabel="tokens / s (median, IQR over repeats)",
                title=f"throughput, micro-batch {micro}")
    for ax in (ax_tput, ax_eff):
        ax.set_xticks(ws_all)
    ax_eff.axhline(1.0, color="k", ls=":")
    ax_eff.set(xlabel="workers", ylabel="tokens/s(W) / (W x tokens/s(1))", title="scaling efficiency", ylim=(0, 1.2))
    labels = [f"W{r['workers']} Z{r['zero_stage']}{'' if r['zero3_mode'] == '-' else r['zero3_mode'][0]} "
              f"mb{r['micro_batch']}" for r in rows]
    bottom = np.zeros(len(rows))
    for phase in PHASES:
        values = np.array([r[f"{phase}_s"] * 1e3 for r in rows])
        ax_break.bar(labels, values, bottom=bottom, label=phase)
        bottom += values
    ax_break.set(ylabel="ms per step (median)", title="step-time breakdown")
    ax_break.tick_params(axis="x", rotation=60)
    for ax in (ax_tput, ax_eff, ax_break):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def parse_int_list(text: str, name: str, parser) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        parser.error(f"{name} must be a comma list of integers, got {text!r}")
    if not values or min(values) < (0 if name == "--zero-stages" else 1):
        parser.error(f"{name} entries must be >= {0 if name == '--zero-stages' else 1}, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)  # --quick (1, 2 workers x ZeRO 0/2/3, micro-batch 4), --device, --repeats, ...
    parser.add_argument("--workers", default=None, help="comma list (default: 1 and powers of 2 up to the devices)")
    parser.add_argument("--zero-stages", default=None, help=f"comma list (default {FULL['zero_stages']})")
    parser.add_argument("--micro-batches", default=None, help=f"comma list (default {FULL['micro_batches']})")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESET_VOCAB))
    parser.add_argument("--vocab", type=int, default=None, help="vocab size (default per preset)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 CPU, bf16 CUDA")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps discarded per run")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per worker, for MFU (default: a GEMM measured now on the device, dtype and threads)")
    parser.add_argument("--comms-logger", choices=["auto", "on", "off"], default="auto",
                        help="DeepSpeed's comms logger; auto: on for CPU, off for CUDA (there its op timer re-reads "
                             "every past CUDA event at each call, which grows quadratically over a run)")
    parser.add_argument("--zero3", default="regather,deepspeed",
                        help="comma list of ZeRO-3 settings to run: regather (partition every parameter, gather per "
                             "module before forward and again before backward: the large-model regime) and/or "
                             "deepspeed (DeepSpeed's default prefetch / persistence / reuse settings)")
    parser.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                        help="attention kernel; auto: flash-attn for bf16 on CUDA when installed, else SDPA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files: training_<cpu|gpu>_<tag>.*")
    parser.add_argument("--no-scaling-md", action="store_true", help="do not regenerate SCALING.md section 4")
    parser.add_argument("--comm-model", action="store_true", help="print SCALING.md's table and exit")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    devices = torch.cuda.device_count() if args.device == "cuda" else os.cpu_count() or 1
    default_workers = ",".join(str(2**i) for i in range(int(math.log2(max(1, devices // args.threads_per_worker))) + 1))
    args.workers = parse_int_list(args.workers or preset["workers"] or default_workers, "--workers", parser)
    args.zero_stages = parse_int_list(args.zero_stages or preset["zero_stages"], "--zero-stages", parser)
    args.micro_batches = parse_int_list(args.micro_batches or preset["micro_batches"], "--micro-batches", parser)
    if max(args.zero_stages) > 3:
        parser.error(f"--zero-stages entries must be in 0..3, got {args.zero_stages}")
    args.zero3 = args.zero3.split(",")
    if not args.zero3 or set(args.zero3) - {"regather", "deepspeed"}:
        parser.error(f"--zero3 entries must be regather or deepspeed, got {args.zero3}")
    args.warmup_steps = preset["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
    args.steps = args.steps or preset["steps"]
    if args.warmup_steps < 0 or args.steps < 1 or args.seq_len < 2 or args.threads_per_worker < 1:
        parser.error("--warmup-steps must be >= 0, --steps >= 1, --seq-len >= 2, --threads-per-worker >= 1")
    try:
        args.repeats = repeats(args)
    except ValueError as err:
        parser.error(str(err))
    args.vocab = args.vocab or PRESET_VOCAB[args.preset]
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    from onerec_dist.models import resolve_attn_implementation

    try:
        args.attn = resolve_attn_implementation(args.attn, torch.bfloat16 if args.precision == "bf16" else None)
    except ValueError as err:
        parser.error(str(err))
    args.comms_logger = args.comms_logger == "on" or (args.comms_logger == "auto" and args.device == "cpu")
    needed = max(args.workers) * (1 if args.device == "cuda" else args.threads_per_worker)
    if needed > devices:
        parser.error(f"--workers {max(args.workers)} x --threads-per-worker {args.threads_per_worker} needs {needed} "
                     f"{'GPUs' if args.device == 'cuda' else 'CPU cores'}, this machine has {devices}")
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    args.ray_temp_dir = f"/tmp/ray_b{os.getpid()}"
    return args


def model_flops(args) -> tuple[float, float, str]:
    """(model FLOPs per token of this workload, peak FLOP/s per worker, where the peak comes from).
    FLOPs: onerec_dist.training.flops (4N + 2 N_trainable + causal attention over --seq-len). Peak: --peak-tflops,
    else a GEMM measured now on the device in the run's precision with --threads-per-worker threads."""
    from onerec_dist.training.flops import measured_matmul_peak_flops, training_flops_per_token

    job = SyntheticLMJob(preset=args.preset, vocab_size=args.vocab, seq_len=args.seq_len, seed=args.seed)
    model, _ = job.build_model()
    job.configure_trainable(model, 0.0)
    flops = training_flops_per_token(model, [args.seq_len])
    del model
    if args.peak_tflops:
        return flops, args.peak_tflops * 1e12, "--peak-tflops"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads_per_worker)
    try:
        peak = measured_matmul_peak_flops(args.device, args.precision)
    finally:
        torch.set_num_threads(threads)
    return flops, peak, f"measured GEMM ({args.device}, {args.precision}, {args.threads_per_worker} thread(s))"


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.comm_model:
        rows = scaling_table()
        print(scaling_table_markdown(rows))
        return {"benchmark": "training", "comm_model": rows}
    run = start_run("training", args)
    args.flops_per_token, args.peak_flops_per_worker, peak_source = model_flops(args)
    print(f"model FLOPs/token {args.flops_per_token:.4g}; peak {args.peak_flops_per_worker / 1e12:.4g} TFLOP/s per "
          f"worker ({peak_source})", flush=True)
    rows = run_all(args)
    print(format_table(rows, TABLE))
    baseline = ("medians over interleaved repeats (each repeat: median over its measured steps), q1/q3 over repeats; "
                "scaling_eff: tokens/s at W / (W x tokens/s at 1 worker); eff(best): the same from each run's "
                "fastest step; step/zero0: step time / ZeRO-0 step time "
                "(same W, micro-batch); comm_s(log): seconds inside DeepSpeed's collective calls (comms logger); "
                "comm_s(vs W=1): step time - 1-worker step time; bytes/model: comms-logger payload / "
                "predicted_collective_bytes (DeepSpeed's scheme); wire/ideal: measured ring bytes per rank / the "
                "paper's ZeRO (reduce-scatter of gradients); mfu: model FLOPs (training/flops.py) / measured peak")
    print(baseline)
    fit = fit_latency_bandwidth(rows)
    if fit:
        beta = f"{fit['beta_bytes_per_s'] / 1e6:.0f} MB/s" if fit["beta_bytes_per_s"] else "not resolved"
        print(f"communication fit over W > 1: alpha = {fit['alpha_s'] * 1e3:.2f} ms per collective, beta = {beta}")
    stem = f"training_{device_suffix(args.device)}{'_' + args.tag if args.tag else ''}"
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    report = {"baselines": baseline, "latency_bandwidth_fit": fit,
              "mfu": {"flops_per_token": args.flops_per_token, "peak_flops_per_worker": args.peak_flops_per_worker,
                      "peak_source": peak_source,
                      "formula": "4 N + 2 N_trainable + 12 L H d_h (T+1)/2 per token (onerec_dist/training/flops.py)"},
              "results": public, "step_timings": [{"key": [r["workers"], r["zero_stage"], r["zero3_mode"],
                                                           r["micro_batch"]],
                                                   "timings_per_repeat": r["_timings"],
                                                   "peak_memory_bytes_per_rank_per_repeat": r["_peaks"]}
                                                  for r in rows]}
    path = run.finish(report, stem, args.out_dir)
    write_csv(public, path.with_suffix(".csv"))
    title = (f"{args.preset} Qwen3 ({rows[0]['params']:,} params), seq {args.seq_len}, {args.precision}, "
             f"{args.threads_per_worker} thread(s)/worker, {run.provenance['cpu_model']}")
    write_plot(rows, path.with_suffix(".png"), title)
    if args.device == "cpu" and not args.no_scaling_md and Path(args.out_dir) == RESULTS_DIR:
        update_scaling_md(RESULTS_DIR, SCALING_MD)
        print(f"updated {SCALING_MD} section 4")
    print(f"wrote {path}, .csv, .png ({run.wall_s:.0f} s)")
    return report


# ------------------------------------------------------------------------------------------- SCALING.md section 4
MEASURED_COLUMNS = [("workers", "W"), ("zero_stage", "ZeRO"), ("zero3_mode", "ZeRO-3 settings"),
                    ("step_s", "step ms (median)"), ("step_s_q1", "q1"), ("step_s_q3", "q3"),
                    ("tokens_per_s_per_worker", "tokens/s/worker"), ("scaling_efficiency", "scaling eff."),
                    ("step_vs_zero0", "step / ZeRO-0"), ("comm_calls", "collectives/step"),
                    ("payload_vs_model", "bytes / model"), ("mfu", "MFU"), ("peak_mem_mib", "peak MiB")]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key.startswith("step_s"):
        return f"{value * 1e3:.1f}"
    if key == "mfu":
        return f"{value:.2%}"
    if key.startswith("tokens") or key == "peak_mem_mib":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def measured_section(results: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown of section 4 from training result files [(file name, report)]: nothing but their numbers."""
    lines = ["Generated by `benchmarks/bench_training.py` from the results files named below (regenerate with "
             "`python benchmarks/run_benchmarks.py all --quick`); no number here is typed by hand.", ""]
    for name, report in results:
        prov, mfu = report["provenance"], report.get("mfu", {})
        cfg = prov["config"]
        lines += [f"### `{name}`", "",
                  f"{cfg.get('preset')} Qwen3, Ψ = {report['results'][0]['params']:,}, {cfg.get('precision')}, "
                  f"seq {cfg.get('seq_len')}, micro-batch {cfg.get('micro_batches')}, "
                  f"{cfg.get('threads_per_worker')} thread(s) per worker, {cfg.get('repeats')} interleaved repeats "
                  f"x {cfg.get('steps')} measured steps. Commit `{str(prov['git_commit'])[:10]}` "
                  f"(dirty: {prov['dirty']}), {prov['cpu_model']}, {prov['cpu_threads']} threads, load average "
                  f"{prov['load_average_start']} at start, {prov['load_average_end']} at end. MFU: "
                  f"{mfu.get('flops_per_token', 0):.4g} FLOPs/token against {mfu.get('peak_source')} = "
                  f"{mfu.get('peak_flops_per_worker', 0) / 1e9:.1f} GFLOP/s per worker.", "",
                  "| " + " | ".join(h for _, h in MEASURED_COLUMNS) + " |",
                  "|" + "---|" * len(MEASURED_COLUMNS)]
        for row in report["results"]:
            lines.append("| " + " | ".join(_cell(k, row.get(k)) for k, _ in MEASURED_COLUMNS) + " |")
        fit = report.get("latency_bandwidth_fit")
        if fit:
            beta = f"{fit['beta_bytes_per_s'] / 1e6:.0f} MB/s" if fit["beta_bytes_per_s"] else "not resolved"
            lines += ["", f"Fit of (step time − 1-worker step time) = n·α + wire bytes / β over the W > 1 runs: "
                          f"α = {fit['alpha_s'] * 1e3:.2f} ms per collective, β = {beta}."]
        lines.append("")
    return "\n".join(lines)


def update_scaling_md(results_dir: Path, path: Path) -> None:
    """Replace the text between MEASURED_BEGIN and MEASURED_END in ``path`` with ``measured_section`` of every
    results_dir/training_cpu*.json (sorted by name)."""
    import json

    files = sorted(results_dir.glob("training_cpu*.json"))
    results = [(f.name, json.loads(f.read_text())) for f in files]
    results = [(name, r) for name, r in results if "provenance" in r and "mfu" in r]  # older files: not shown
    text = path.read_text()
    if MEASURED_BEGIN not in text or MEASURED_END not in text:
        raise ValueError(f"{path} lacks the markers {MEASURED_BEGIN!r} ... {MEASURED_END!r}")
    head, rest = text.split(MEASURED_BEGIN, 1)
    _, tail = rest.split(MEASURED_END, 1)
    path.write_text(head + MEASURED_BEGIN + "\n" + measured_section(results) + MEASURED_END + tail)


if __name__ == "__main__":
    # Ray workers unpickle SyntheticLMJob by module name: run main from the module imported as bench_training,
    # not from __main__ (whose classes the workers cannot import).
    import bench_training

    bench_training.main()
