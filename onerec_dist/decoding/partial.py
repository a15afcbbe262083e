"""Partial decoding: beam search over the first m levels of the item ID only, returning prefixes with their scores.

Think-Ahead's offline part (OneRec-Think, arXiv:2510.11639, Sec. 4.4): after each rationale, beam-search only the
first m levels (the paper: m = 2) and cache the union of the prefixes; online, the remaining L - m levels are decoded
below the cached prefixes (``ConstrainedDecoder.decode(allowed_prefixes=...)``, see constraints.py).

Scores are what the full beam search would have accumulated after m levels: with normalization="full",
log p(c_1..c_m | prompt) under the model, which is the marginal of every continuation (valid or not) of the prefix;
with "valid", the log-prob of the prefix under the per-level distribution renormalised over the codes the prefix
index allows. Only prefixes of catalogue items are reachable (the prefix index masks the rest), and with
``exclude`` only prefixes that still have a non-excluded item below them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixResult:
    prefixes: torch.Tensor  # [B, K, m] codes of the top-K prefixes, best first (start codes included); -1: dead slot
    token_ids: torch.Tensor  # [B, K, m] their ID tokens (a dead slot's codes read as code 0)
    scores: torch.Tensor  # [B, K] total log-prob of the decoded levels; -inf for a dead slot
    level_logprobs: torch.Tensor  # [B, K, m - l0] per-level step log-probs


def finish_prefixes(decoder, node, beam_scores, codes_so_far, step_logprobs, start_codes, num_prompts,
                    width: int, top_k: int) -> PrefixResult:
    """Top-K of the ``width`` sorted beams per prompt. A slot is dead (fewer than K prefixes reachable) when its
    node is -1 or its score -inf; its codes are then -1."""
    full_codes = torch.cat([start_codes.repeat_interleave(width, 0), codes_so_far], 1)  # [B*W, m]
    dead = (node < 0) | torch.isinf(beam_scores)  # [B*W]
    full_codes = full_codes.masked_fill(dead[:, None], -1).view(num_prompts, width, -1)[:, :top_k]  # [B, K, m]
    tokens = full_codes.clamp(min=0) + decoder.item_tokenizer.level_offset[: full_codes.shape[2]].to(node.device)
    return PrefixResult(
        prefixes=full_codes,
        token_ids=tokens,
        scores=beam_scores.view(num_prompts, width)[:, :top_k],
        level_logprobs=step_logprobs.view(num_prompts, width, -1)[:, :top_k],
    )
