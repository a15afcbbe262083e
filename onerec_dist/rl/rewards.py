"""Rewards of a rationale from the K items that constrained beam search decodes after it.

For each of N rollouts (rationales), beam search over the item catalogue returns K semantic IDs of L levels
(``beams`` [N, K, L], best beam first; a beam that does not exist, e.g. K larger than the catalogue, is all -1),
and the target item's ID is ``target`` [N, L]. Every reward here is a float in [0, 1] per rollout ([N]) unless it
says otherwise; dividing match counts by L is the normalisation ("all L levels right" = 1).

- ``rollout_beam_reward`` (OneRec-Think, arXiv:2510.11639, Sec. 4.3, the paper's default): the best beam's number
  of levels equal to the target's, max over the K beams, / L. ``match="positional"`` counts every level l with
  beam[l] == target[l]; ``match="prefix"`` counts the common prefix only (a level counts when it and every level
  before it match: a right code under a wrong parent names a different subtree of the ID tree).
- ``hit_reward``: 1 when one of the K beams is the target item, else 0 (the sparse reward of plain GRPO).
- ``rank_aware_reward`` (after MiniOneRec, Kong et al. 2025, the ``ranking`` reward of its rl.py):
  1 / log2(rank + 2) of the first beam that hits (rank 0 = best beam -> 1), 0 without a hit: NDCG@K with the target
  as the one relevant item.
  ``minionerec_beam_rewards`` gives MiniOneRec's own per-beam rewards [N, K], where each beam is a rollout; summed
  over a group's beams they equal ``rank_aware_reward`` / sum_k 1/log2(k+2) (tested).
- ``hit_diversity_reward`` (OneReason-style, our reading): hit x (distinct first-level codes among the existing
  beams / number of existing beams): a rationale whose beams hit the target while still spanning several coarse
  categories scores higher than one whose beams collapse onto a single branch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MISSING_CODE = -1  # code of a beam that does not exist (fewer than K items reachable)


def _check(beams: torch.Tensor, target: torch.Tensor) -> None:
    if beams.dim() != 3 or target.dim() != 2 or beams.shape[0] != target.shape[0] or beams.shape[2] != target.shape[1]:
        raise ValueError(f"beams must be [N, K, L] and target [N, L]; got {tuple(beams.shape)} and "
                         f"{tuple(target.shape)}")


def level_matches(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K, L] bool: beam k's level-l code equals the target's (a missing beam matches nothing)."""
    _check(beams, target)
    return (beams == target.unsqueeze(1)) & (beams != MISSING_CODE)


def positional_match_counts(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K] number of levels l with beams[n, k, l] == target[n, l]."""
    return level_matches(beams, target).sum(dim=-1)


def prefix_match_lengths(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K] length of the common prefix of beam k and the target (cumulative product of level matches)."""
    return level_matches(beams, target).long().cumprod(dim=-1).sum(dim=-1)


def beam_hits(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K] bool: beam k is the target item (all L levels match)."""
    return level_matches(beams, target).all(dim=-1)


def rollout_beam_reward(beams: torch.Tensor, target: torch.Tensor,
                        match: Literal["positional", "prefix"] = "positional") -> torch.Tensor:
    """[N] max over the K beams of the matched levels, / L (OneRec-Think Sec. 4.3)."""
    if match == "positional":
        counts = positional_match_counts(beams, target)
    elif match == "prefix":
        counts = prefix_match_lengths(beams, target)
    else:
        raise ValueError(f"match={match!r}; allowed: 'positional', 'prefix'")
    return counts.max(dim=1).values.float() / target.shape[1]


def hit_reward(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] 1.0 when any beam is the target item, else 0.0."""
    return beam_hits(beams, target).any(dim=1).float()


def rank_aware_reward(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] 1 / log2(r + 2) for the first hitting beam's rank r (0-based), 0 without a hit."""
    hits = beam_hits(beams, target)                                                   # [N, K]
    num_beams = hits.shape[1]
    discount = 1.0 / torch.log2(torch.arange(num_beams, dtype=torch.float32, device=beams.device) + 2.0)  # [K]
    first = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), num_beams)      # [N] rank, K if none
    padded = torch.cat([discount, discount.new_zeros(1)])                             # [K + 1], 0 for "none"
    return padded[first]


def minionerec_beam_rewards(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, K] MiniOneRec's ``rule + ndcg_rule`` reward of each beam taken as a rollout of a group of K.

    rule: 1 for the beam that is the target. ndcg_rule: in a group that contains a hit, every non-hitting beam at
    rank k gets -(1 / log2(k + 2)) / S with S = sum_j 1 / log2(j + 2) (hard negatives near the top cost more); in a
    group without a hit every beam gets 0.
    """
    hits = beam_hits(beams, target)                                                   # [N, K]
    num_beams = hits.shape[1]
    discount = 1.0 / torch.log2(torch.arange(num_beams, dtype=torch.float32, device=beams.device) + 2.0)  # [K]
    penalty = -discount / discount.sum()                                              # [K], sums to -1
    group_has_hit = hits.any(dim=1, keepdim=True)                                     # [N, 1]
    return hits.float() + torch.where(group_has_hit & ~hits, penalty, torch.zeros_like(penalty))


def hit_diversity_reward(beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] hit x (distinct first-level codes among existing beams) / (existing beams)."""
    hits = hit_reward(beams, target)                                                  # [N]
    first = beams[:, :, 0]                                                            # [N, K]
    exists = first != MISSING_CODE                                                    # [N, K]
    sorted_first = first.sort(dim=1).values                                           # [N, K]
    new_value = torch.ones_like(exists)
    new_value[:, 1:] = sorted_first[:, 1:] != sorted_first[:, :-1]
    distinct = (new_value & (sorted_first != MISSING_CODE)).sum(dim=1).float()        # [N]
    return hits * distinct / exists.sum(dim=1).clamp(min=1).float()


REWARDS = {
    "rollout_beam": lambda beams, target: rollout_beam_reward(beams, target, "positional"),
    "rollout_beam_prefix": lambda beams, target: rollout_beam_reward(beams, target, "prefix"),
    "hit": hit_reward,
    "rank_aware": rank_aware_reward,
    "hit_diversity": hit_diversity_reward,
}


def compute_reward(name: str, beams: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N] reward ``name`` (one of REWARDS) of each rollout."""
    if name not in REWARDS:
        raise ValueError(f"reward={name!r} is not allowed; allowed values: {', '.join(map(repr, REWARDS))}")
    return REWARDS[name](beams, target)


def ndcg_normaliser(num_beams: int) -> float:
    """S = sum_{k<K} 1 / log2(k + 2), the constant relating MiniOneRec's per-beam rewards to rank_aware_reward."""
    return sum(1.0 / math.log2(k + 2) for k in range(num_beams))
