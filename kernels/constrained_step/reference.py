"""PyTorch reference for one fused step of constrained beam search over one semantic-ID level.

One decoding step (OneRec-Think, constrained beam search over itemic tokens): every live beam may only continue
with codes that the prefix index allows after its current prefix. For each of the R = batch*beams rows this op

1. masks the level's code logits with the prefix-index mask ``allowed``,
2. turns them into step log-probs, either ``logits - norm_lse`` (``norm_lse`` = log-sum-exp over the FULL vocabulary,
   computed by the caller: the semantics of the public HF ``generate`` code) or, when ``norm_lse`` is None, a
   log-softmax over the ALLOWED codes only (probability renormalised over valid codes),
3. adds the beam's cumulative score and keeps the k best allowed codes, best first.

The caller then picks the W best of the [B, beams*k] candidates with :func:`select_beams`.

Ordering contract, shared exactly with the Triton kernel so that both return the same codes:
  * candidates are ranked by their logit taken as fp32 (the step log-prob is that logit minus a per-row constant,
    so the order is the same and no rounding of ``beam + logit - lse`` can invent or reorder ties);
  * ties go to the LOWER code index;
  * an allowed code always ranks above a masked one, even when its logit is -inf;
  * slots beyond the number of allowed codes hold score -inf and code -1.
A dead beam (beam score -inf) still reports its best allowed codes, all with score -inf. An allowed code with logit
-inf has step log-prob -inf (probability 0), never NaN. NaN and +inf logits, and a non-finite norm_lse, are not
supported. -0.0 and 0.0 are equal logits (a tie).

All math is in fp32 whatever the input dtype (bf16 -> fp32 is exact).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEG_INF = float("-inf")


class ConstrainedStepOutput(NamedTuple):
    topk_scores: torch.Tensor  # [R, k] fp32, beam score + step log-prob, descending
    topk_codes: torch.Tensor  # [R, k] int64, code index at this level, -1 for empty slots
    row_lse: torch.Tensor  # [R] fp32, log-sum-exp of the logits over allowed codes, -inf if none


def validate_inputs(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    beam_scores: torch.Tensor,
    k: int,
    norm_lse: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the offending argument when the inputs do not fit the op's contract."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [R, C], got {_describe(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits dtype must be one of {LOGIT_DTYPES}, got {logits.dtype}")
    rows, codes = logits.shape
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a torch.bool tensor [R, C], got {_describe(allowed)}")
    if tuple(allowed.shape) != (rows, codes):
        raise ValueError(f"allowed shape {tuple(allowed.shape)} must equal logits shape {(rows, codes)}")
    _check_row_vector("beam_scores", beam_scores, rows)
    if norm_lse is not None:
        _check_row_vector("norm_lse", norm_lse, rows)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= codes:
        raise ValueError(f"k must satisfy 1 <= k <= C (C = {codes} codes at this level), got k = {k}")
    devices = {t.device for t in (logits, allowed, beam_scores, norm_lse) if t is not None}
    if len(devices) != 1:
        names = sorted(map(str, devices))
        raise ValueError(f"logits, allowed, beam_scores and norm_lse must share one device, got {names}")


def _check_row_vector(name: str, tensor: torch.Tensor, rows: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 tensor [R], got {_describe(tensor)}")
    if tuple(tensor.shape) != (rows,):
        raise ValueError(f"{name} shape {tuple(tensor.shape)} must be (R,) = ({rows},)")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _rank_keys(masked: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """int64 key per code, unique within its row and ordered like (allowed, logit, -index), so that a plain
    torch.topk (which leaves the order of equal values unspecified) ranks exactly as the contract says.

    High 32 bits: the fp32 logit as an int32 that orders like the float (negative floats have their magnitude bits
    flipped), masked codes at int32 min, below an allowed -inf. Low 32 bits: C - 1 - index, so that among equal
    logits the lower index has the larger key. masked [R, C] fp32 (-inf where masked), allowed [R, C] bool.
    """
    codes = masked.shape[-1]
    bits = (masked + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0: the two compare equal, so they must tie
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # [R, C] int32, same order as the floats
    ordered = ordered.masked_fill(~allowed, torch.iinfo(torch.int32).min)
    lower_index_wins = codes - 1 - torch.arange(codes, device=masked.device)  # [C] in [0, C)
    return (ordered.to(torch.int64) << 32) + lower_index_wins  # [R, C]


def constrained_step_reference(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    beam_scores: torch.Tensor,
    k: int,
    norm_lse: torch.Tensor | None = None,
) -> ConstrainedStepOutput:
    """Top-k allowed continuations of every beam row; see the module docstring for the exact contract."""
    validate_inputs(logits, allowed, beam_scores, k, norm_lse)
    masked = logits.float().masked_fill(~allowed, NEG_INF)  # [R, C]
    row_lse = torch.logsumexp(masked, dim=-1)  # [R]; all -inf -> -inf
    norm = row_lse if norm_lse is None else norm_lse  # [R]

    order = torch.topk(_rank_keys(masked, allowed), k, dim=-1).indices  # [R, k], keys unique -> deterministic

    best_logits = masked.gather(-1, order)  # [R, k]
    step_logprob = best_logits - norm[:, None]
    # An allowed code with logit -inf has probability 0; this also avoids -inf - (-inf) = NaN in all -inf rows.
    step_logprob = step_logprob.masked_fill(best_logits == NEG_INF, NEG_INF)
    is_allowed = allowed.gather(-1, order)  # [R, k]
    topk_scores = (beam_scores[:, None] + step_logprob).masked_fill(~is_allowed, NEG_INF)
    topk_codes = order.masked_fill(~is_allowed, -1)
    return ConstrainedStepOutput(topk_scores, topk_codes, row_lse)


def select_beams(
    topk_scores: torch.Tensor, topk_codes: torch.Tensor, beam_width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``beam_width`` best of the beams*k candidates of every batch element.

    topk_scores, topk_codes: [B, beams, k] (the op's [R, k] outputs viewed per batch element).
    Returns (scores [B, W] fp32 descending, parent_beam [B, W] int64, codes [B, W] int64). Ties go to the lower
    flattened candidate index beam*k + slot, i.e. the lower parent beam, then the better slot; this is the same
    rule as within a row. When fewer than W candidates are finite the rest carry score -inf (and possibly code -1):
    the caller treats those beams as dead.
    """
    if topk_scores.dim() != 3 or topk_scores.dtype != torch.float32:
        raise ValueError(f"topk_scores must be a float32 tensor [B, beams, k], got {_describe(topk_scores)}")
    if topk_codes.shape != topk_scores.shape or topk_codes.dtype != torch.int64:
        raise ValueError(
            f"topk_codes must be an int64 tensor of shape {tuple(topk_scores.shape)}, got {_describe(topk_codes)}"
        )
    batch, beams, k = topk_scores.shape
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or not 1 <= beam_width <= beams * k:
        raise ValueError(f"beam_width must be an int in [1, beams*k = {beams * k}], got {beam_width!r}")
    flat_scores = topk_scores.reshape(batch, beams * k)  # [B, beams*k]
    # A stable descending sort keeps index order among equal scores; beams*k is small, so sorting is cheap.
    chosen = torch.sort(flat_scores, dim=-1, descending=True, stable=True).indices[:, :beam_width]  # [B, W]
    scores = flat_scores.gather(-1, chosen)
    codes = topk_codes.reshape(batch, beams * k).gather(-1, chosen)
    return scores, chosen // k, codes
