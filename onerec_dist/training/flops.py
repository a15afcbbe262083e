"""Model FLOPs of a training step and the measured peak they are compared with (MFU).

Model FLOPs per token of a decoder-only transformer trained with back-propagation (Kaplan et al. 2020, Sec. 2.1;
PaLM, Chowdhery et al. 2022, App. B), counting a multiply-add as 2 FLOPs:

    F = 2 N                forward: every matmul weight multiplies the token's activation once
      + 2 N                backward through activations: dL/dx = W^T dL/dy, for every weight (needed below the
                           lowest trainable weight too, so always counted)
      + 2 N_trainable      weight gradients: dL/dW = dL/dy x^T, only for weights that train
      + 12 L H d_h C       attention scores and mixing, which have no weights: forward Q K^T and P V are 2 matmuls of
                           2 H d_h FLOPs per (query, key) pair per layer = 4 L H d_h C; backward has 4 such matmuls
                           (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) = 8 L H d_h C
N: parameters that multiply activations: all of them except the input embedding table (a lookup, no FLOPs); a tied
LM head is counted once (its matmul is real). Norm weights are included (negligible). N_trainable: the part of N that
gets a weight gradient (requires_grad); a parameter restricted to some rows (token warm-up: only the item-token rows
train, ``trainable_rows`` set by onerec_dist.training.engine_api.restrict_rows) counts those rows only. So a full
fine-tune costs 6N (+ attention) per token, a LoRA or warm-up run about 4N: its MFU drops accordingly.
C: mean number of keys a query attends to. Causal attention over a sequence of T tokens: query t sees t keys, mean
(T + 1) / 2 (``mean_causal_context``). PaLM counts T (no causal halving), i.e. up to 2x more attention FLOPs than
done; here only the work a causal kernel must do is counted. Recomputation (activation checkpointing) is not model
FLOPs and is not counted.

MFU = F x tokens/s per worker / peak FLOP/s of a worker. The peak is measured (``measured_matmul_peak_flops``: the
best of a few large square GEMMs on the same device and dtype, a roofline the hardware demonstrably reaches) unless
the user gives one (trainer.peak_tflops).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_flops_per_token(layers: int, heads: int, head_dim: int, context: float) -> float:
    """12 L H d_h C: forward (4) + backward (8) FLOPs of the weightless attention matmuls per token."""
    return 12.0 * layers * heads * head_dim * context


def model_flops_per_token(n_params: float, n_trainable: float, *, layers: int = 0, heads: int = 0,
                          head_dim: int = 0, context: float = 0.0) -> float:
    """Training FLOPs per token: 2N (forward) + 2N (backward, activations) + 2 N_trainable (weight gradients) +
    12 L H d_h C (attention); see the module docstring."""
    if n_params < 0 or not 0 <= n_trainable <= n_params:
        raise ValueError(f"need 0 <= n_trainable ({n_trainable}) <= n_params ({n_params})")
    if context < 0:
        raise ValueError(f"context={context} must be >= 0")
    return 4.0 * n_params + 2.0 * n_trainable + attention_flops_per_token(layers, heads, head_dim, context)


def mean_causal_context(sequence_lengths: Iterable[int]) -> float:
    """Keys per query averaged over all tokens of causal sequences: sum T (T + 1) / 2 / sum T."""
    lengths = [int(t) for t in sequence_lengths]
    total = sum(lengths)
    return sum(t * (t + 1) / 2 for t in lengths) / total if total else 0.0


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 partitioned parameters keep their full size here


def matmul_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(N, N_trainable) of the module docstring: parameters except the input embedding (unless tied to the head),
    each shared tensor once; trainable = requires_grad, only ``trainable_rows`` rows of a row-restricted one."""
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(head_module, "weight", None)
    n = trainable = 0
    for param in model.parameters():  # yields a tied tensor once
        if param is embed and param is not head:
            continue
        size = _numel(param)
        n += size
        if param.requires_grad:
            rows = getattr(param, "trainable_rows", None)  # e.g. item-token rows of the embedding / LM head
            rows_total = getattr(param, "ds_shape", param.shape)[0]  # ZeRO-3: the local shape is empty
            trainable += size if rows is None else size // rows_total * int(rows)
    return n, trainable


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, query heads, head_dim) of a HF decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, head_dim


def training_flops_per_token(model: torch.nn.Module, sequence_lengths: Iterable[int]) -> float:
    """``model_flops_per_token`` of a HF causal LM (peft-wrapped too) trained on sequences of these lengths."""
    n, trainable = matmul_param_counts(model)
    layers, heads, head_dim = attention_shape(model.config)
    return model_flops_per_token(n, trainable, layers=layers, heads=heads, head_dim=head_dim,
                                 context=mean_causal_context(sequence_lengths))


def mfu(flops_per_token: float, tokens_per_s_per_worker: float, peak_flops_per_worker: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s of a worker / its peak FLOP/s."""
    if peak_flops_per_worker <= 0:
        raise ValueError(f"peak_flops_per_worker={peak_flops_per_worker} must be > 0")
    return flops_per_token * tokens_per_s_per_worker / peak_flops_per_worker


@functools.lru_cache(maxsize=8)
def measured_matmul_peak_flops(device: str = "cpu", precision: str = "fp32", size: int | None = None,
                               repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` [size, size] x [size, size] GEMMs (2 size^3 FLOPs) on ``device`` in
    ``precision``, after one warm-up: the attainable matmul roofline of this device, threads and dtype.
    Best-of, not median: a peak is what the hardware can reach, and load from other processes only lowers it.
    Default size: 1024 on CPU (~0.1 s per GEMM at 20 GFLOP/s), 8192 on CUDA. Cached per process."""
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(DTYPES)}")
    size = size or (8192 if device.startswith("cuda") else 1024)
    dtype = DTYPES[precision]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for i in range(repeats + 1):
        sync()
        started = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i:  # the first call is a warm-up (allocation, kernel selection)
            best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best
