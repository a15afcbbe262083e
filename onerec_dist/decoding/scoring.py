"""Score given items: the teacher-forced log-prob of each candidate item's L ID tokens after the prompt.

Used for the log-likelihood of a target given a rationale (OneRec-Think's ΔLL, the gain from the model's own
rationale), for re-ranking given candidates, and to check beam-search scores. Normalisation as in beam search:
  * "full": log_softmax over the full vocabulary (the model's true probability of the ID tokens);
  * "valid": log_softmax over the codes the prefix index allows after the item's own prefix, i.e. the score beam
    search with normalization="valid" reports for that item (no ``exclude`` here: every catalogue item is scored).

The prompt is prefilled once per row; the C candidates are then fed level by level as C branches of the same token
tree beam search uses (``_TreeBeams``; or per-candidate cache copies with prefill="once"/"per_beam"), so a call costs
one prefill of B rows and L - 1 steps of B*C tokens, and a candidate's score equals the beam-search score of that
item up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onerec_dist.decoding.sampling import masked_log_softmax


@dataclass
class ScoreResult:
    scores: torch.Tensor  # [B, C] total log-prob of each candidate's L ID tokens
    level_logprobs: torch.Tensor  # [B, C, L] per-level step log-probs


def candidate_codes(index, item_codes: torch.Tensor | None, items, codes, num_prompts: int) -> torch.Tensor:
    """[B, C, L] candidate IDs from ``items`` [B, C] (catalogue rows; needs ``item_codes``) or ``codes`` [B, C, L];
    raises ValueError naming the row when a candidate is not a catalogue item. Host syncs: call before decoding."""
    if (items is None) == (codes is None):
        raise ValueError("give exactly one of items=[B, C] catalogue rows or codes=[B, C, L] semantic IDs")
    device = index.device
    if items is not None:
        items = torch.as_tensor(items, dtype=torch.long, device=device)
        if items.dim() != 2 or items.shape[0] != num_prompts or items.shape[1] < 1:
            raise ValueError(f"items must be [B={num_prompts}, C >= 1] catalogue rows, got {tuple(items.shape)}")
        if item_codes is None:
            raise ValueError("scoring items by catalogue row needs the catalogue codes: pass item_codes=[N, L] to "
                             "ConstrainedDecoder, or give codes=[B, C, L]")
        bad = (items < 0) | (items >= item_codes.shape[0])
        if bool(bad.any()):
            row, col = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"items[{row}, {col}] = {int(items[row, col])} is not a catalogue row "
                             f"[0, {item_codes.shape[0]})")
        codes = item_codes.to(device)[items]  # [B, C, L]
    codes = torch.as_tensor(codes, dtype=torch.long, device=device)
    if codes.dim() != 3 or codes.shape[0] != num_prompts or codes.shape[2] != index.num_levels or codes.shape[1] < 1:
        raise ValueError(f"codes must be [B={num_prompts}, C >= 1, L={index.num_levels}], got {tuple(codes.shape)}")
    node = index.nodes_of_prefix(codes.reshape(-1, index.num_levels))  # [B*C]
    if bool((node < 0).any()):
        bad = int((node < 0).nonzero()[0, 0])
        row, col = divmod(bad, codes.shape[1])
        raise ValueError(f"codes[{row}, {col}] = {codes[row, col].tolist()} is not a catalogue item")
    return codes


def teacher_forced_scores(decoder, beams, codes: torch.Tensor) -> ScoreResult:
    """Per-level log-probs of ``codes`` [B, C, L] after each prompt (module docstring). ``beams`` holds the B
    prefilled prompts with width C; ``decoder`` is the ConstrainedDecoder (output layer, index, normalization)."""
    index = decoder.index
    num_prompts, num_candidates, num_levels = codes.shape
    flat = codes.reshape(-1, num_levels)  # [B*C, L]
    device = flat.device
    hidden = beams.hidden  # [B, H]
    node = index.root(num_prompts)  # [B], then [B*C]
    to_candidates = torch.arange(num_prompts, device=device).repeat_interleave(num_candidates)  # [B*C] prompt row
    own_branch = torch.arange(num_candidates, device=device).expand(num_prompts, -1)  # [B, C] candidate c -> c
    steps = []
    for level in range(num_levels):
        logits, norm_lse, offset = decoder._level_logits(hidden, level)
        code_logits = logits[:, offset:offset + index.codebook_sizes[level]].float()  # [R, K_l]
        if norm_lse is None:
            step_lp = masked_log_softmax(code_logits, index.allowed_codes(level, node))
        else:
            step_lp = code_logits - norm_lse[:, None]
        if level == 0:  # the B prompt rows branch into B*C candidates
            step_lp, node = step_lp[to_candidates], node[to_candidates]
        steps.append(step_lp.gather(1, flat[:, level:level + 1]).squeeze(1))  # [B*C]
        node = index.advance(level, node, flat[:, level])
        if level + 1 < num_levels:
            src = to_candidates if level == 0 else torch.arange(flat.shape[0], device=device)
            parent = torch.zeros_like(own_branch) if level == 0 else own_branch
            hidden = beams.feed(src, parent, decoder._code_tokens(level, flat[:, level]))  # [B*C, H]
    level_logprobs = torch.stack(steps, 1).view(num_prompts, num_candidates, num_levels)
    return ScoreResult(scores=level_logprobs.sum(-1), level_logprobs=level_logprobs)
