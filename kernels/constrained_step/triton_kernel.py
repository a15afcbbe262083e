"""Triton kernel for the fused constrained beam-search step; contract and tie rule in reference.py.

One program handles a [BLOCK_R, BLOCK_C] tile of rows (several short rows per program keeps small levels busy):
load logits + mask once, masked log-sum-exp, then k rounds of "best remaining allowed code" (argmax and knock-out).
Instead of writing -inf over the chosen code, round j keeps the codes strictly after round j-1's pick in the order
(logit descending, index ascending); this keeps allowed codes with logit -inf apart from masked ones and lets the
chunked variant (C > max block) re-scan the row from memory without a knock-out buffer.

This module imports triton at import time; import it lazily (dispatch.py does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ConstrainedStepOutput, validate_inputs

MAX_BLOCK_C = 8192  # widest row loaded as one block; wider levels loop over chunks
TILE_ELEMENTS = 8192  # largest BLOCK_R * BLOCK_C tile (several short rows share a program)
MAX_BLOCK_R = 64


@triton.jit
def _after_previous(x, ok, cols, prev_m, prev_i):
    """Allowed codes ranked strictly after the previous pick (prev_m, prev_i) in (logit desc, index asc) order."""
    later = (x < prev_m[:, None]) | ((x == prev_m[:, None]) & (cols[None, :] > prev_i[:, None]))
    return ok & later


@triton.jit
def _best(x, alive, cols, C):
    """Per row: best logit among `alive` and its lowest column index (C when nothing is alive)."""
    m = tl.max(tl.where(alive, x, float("-inf")), axis=1)  # [BLOCK_R]
    idx = tl.min(tl.where(alive & (x == m[:, None]), cols[None, :], C), axis=1)  # [BLOCK_R]
    return m, idx


@triton.jit
def _store_slot(scores_ptr, codes_ptr, out_offs, row_ok, beam, norm, m, idx, C):
    """Write slot j: score = beam + (logit - norm), -inf for logit -inf or an empty slot; code -1 if empty."""
    found = idx < C
    # norm (the row lse) is -inf only in rows without a finite allowed logit, where every m is -inf too; a finite
    # stand-in keeps -inf - (-inf) = NaN out, so an allowed code with logit -inf scores -inf.
    step = m - tl.where(norm == float("-inf"), 0.0, norm)
    score = tl.where(found, beam + step, float("-inf"))
    code = tl.where(found, idx, -1).to(tl.int64)
    tl.store(scores_ptr + out_offs, score, mask=row_ok)
    tl.store(codes_ptr + out_offs, code, mask=row_ok)


@triton.jit
def _load_tile(logits_ptr, allowed_ptr, rows64, row_ok, cols, C, stride_lr, stride_ar):
    """fp32 logits with masked codes at -inf, and the allowed mask, for a [BLOCK_R, BLOCK_C] tile."""
    mask = row_ok[:, None] & (cols[None, :] < C)
    x = tl.load(logits_ptr + rows64[:, None] * stride_lr + cols[None, :], mask=mask, other=float("-inf"))
    ok = tl.load(allowed_ptr + rows64[:, None] * stride_ar + cols[None, :], mask=mask, other=0) != 0
    return tl.where(ok, x.to(tl.float32), float("-inf")), ok


@triton.jit
def _lse_from_max_sum(m, s):
    """log-sum-exp from a running (max, sum of exp(x - safe max)); -inf for a row with nothing (or only -inf)."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(s > 0, m_safe + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))


@triton.jit
def _constrained_step_single_block_kernel(
    logits_ptr, allowed_ptr, beam_ptr, norm_ptr, scores_ptr, codes_ptr, lse_ptr,
    R, C, k, stride_lr, stride_ar,
    HAS_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    x, ok = _load_tile(logits_ptr, allowed_ptr, rows64, row_ok, cols, C, stride_lr, stride_ar)  # [BLOCK_R, BLOCK_C]

    m = tl.max(x, axis=1)  # [BLOCK_R]
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(x - m_safe[:, None]), axis=1)  # masked codes contribute exp(-inf) = 0
    lse = _lse_from_max_sum(m, s)
    tl.store(lse_ptr + rows64, lse, mask=row_ok)
    beam = tl.load(beam_ptr + rows64, mask=row_ok, other=float("-inf"))
    if HAS_NORM:
        norm = tl.load(norm_ptr + rows64, mask=row_ok, other=0.0)
    else:
        norm = lse

    prev_m = tl.full([BLOCK_R], float("inf"), tl.float32)
    prev_i = tl.full([BLOCK_R], -1, tl.int32)
    for j in range(k):
        best_m, best_i = _best(x, _after_previous(x, ok, cols, prev_m, prev_i), cols, C)
        _store_slot(scores_ptr, codes_ptr, rows64 * k + j, row_ok, beam, norm, best_m, best_i, C)
        prev_m = best_m
        prev_i = best_i


@triton.jit
def _constrained_step_chunked_kernel(
    logits_ptr, allowed_ptr, beam_ptr, norm_ptr, scores_ptr, codes_ptr, lse_ptr,
    R, C, k, stride_lr, stride_ar,
    HAS_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]

    # Online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", Alg. 3).
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, C, BLOCK_C):
        x, ok = _load_tile(
            logits_ptr + start, allowed_ptr + start, rows64, row_ok, cols, C - start, stride_lr, stride_ar
        )
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    lse = _lse_from_max_sum(m, s)
    tl.store(lse_ptr + rows64, lse, mask=row_ok)
    beam = tl.load(beam_ptr + rows64, mask=row_ok, other=float("-inf"))
    if HAS_NORM:
        norm = tl.load(norm_ptr + rows64, mask=row_ok, other=0.0)
    else:
        norm = lse

    # Each slot re-scans the row (L2-resident after the first pass); chunks go in index order, so on equal logits
    # the earlier chunk's index is already the lower one.
    prev_m = tl.full([BLOCK_R], float("inf"), tl.float32)
    prev_i = tl.full([BLOCK_R], -1, tl.int32)
    for j in range(k):
        best_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_R], tl.int32) + C  # C = nothing found yet
        for start in range(0, C, BLOCK_C):
            x, ok = _load_tile(
                logits_ptr + start, allowed_ptr + start, rows64, row_ok, cols, C - start, stride_lr, stride_ar
            )
            gcols = start + cols
            chunk_m, chunk_i = _best(x, _after_previous(x, ok, gcols, prev_m, prev_i), gcols, C)
            take = (chunk_m > best_m) | ((chunk_m == best_m) & (chunk_i < best_i))
            best_i = tl.where(take, chunk_i, best_i)
            best_m = tl.where(take, chunk_m, best_m)
        _store_slot(scores_ptr, codes_ptr, rows64 * k + j, row_ok, beam, norm, best_m, best_i, C)
        prev_m = best_m
        prev_i = best_i


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def constrained_step_triton(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    beam_scores: torch.Tensor,
    k: int,
    norm_lse: torch.Tensor | None = None,
    max_block_c: int = MAX_BLOCK_C,
) -> ConstrainedStepOutput:
    """Launch the fused step. Rows may be strided (e.g. a code slice of the full-vocab logits); codes must be
    contiguous. `max_block_c` (a power of two) caps the block width; wider levels use the chunked kernel."""
    validate_inputs(logits, allowed, beam_scores, k, norm_lse)
    if max_block_c < 1 or max_block_c & (max_block_c - 1):
        raise ValueError(f"max_block_c must be a positive power of two, got {max_block_c}")
    rows, codes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if allowed.stride(1) != 1:
        allowed = allowed.contiguous()
    allowed_u8 = allowed.view(torch.uint8)  # same bytes; a plain integer pointer in every Triton backend
    beam_scores = beam_scores.contiguous()
    norm = norm_lse.contiguous() if norm_lse is not None else beam_scores  # dummy pointer when HAS_NORM is off

    topk_scores = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    topk_codes = torch.empty((rows, k), dtype=torch.int64, device=logits.device)
    row_lse = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    if rows == 0:
        return ConstrainedStepOutput(topk_scores, topk_codes, row_lse)

    block_c = min(_next_power_of_2(codes), max_block_c)
    block_r = max(1, min(_next_power_of_2(rows), TILE_ELEMENTS // block_c, MAX_BLOCK_R))
    kernel = _constrained_step_single_block_kernel if block_c >= codes else _constrained_step_chunked_kernel
    num_warps = 8 if block_r * block_c >= 4096 else 4
    grid = (triton.cdiv(rows, block_r),)
    kernel[grid](
        logits, allowed_u8, beam_scores, norm, topk_scores, topk_codes, row_lse,
        rows, codes, k, logits.stride(0), allowed_u8.stride(0),
        HAS_NORM=norm_lse is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return ConstrainedStepOutput(topk_scores, topk_codes, row_lse)
