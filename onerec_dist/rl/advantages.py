"""Group-relative advantages: each prompt's G rollouts are compared with each other, no value model.

``rewards`` is [B, G]: B prompts (groups), G rollouts each; the advantage of rollout i is shared by all its tokens.

- ``grpo`` (DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2 "outcome supervision"; OneRec-Think Sec. 4.3):
  A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction as verl's and TRL's GRPO.
- ``dr_grpo`` (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, Sec. 3.1): A_i = r_i - mean(r). Dividing by the std
  weighs groups whose rewards barely differ (too easy / too hard prompts) as much as informative ones.
- ``rloo`` (REINFORCE leave-one-out, Ahmadian et al. 2024, arXiv:2402.14740, Sec. 3.2; Kool et al. 2019):
  A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)), the baseline of each sample excludes itself.

A group whose G rewards are equal gets advantage 0 under all three (no signal); ``zero_spread_share`` reports how
many groups are like that (a step where it nears 1 teaches nothing).
"""

from __future__ import annotations

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G] (B groups of G rollouts), got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group size G={rewards.shape[1]}: group-relative advantages need G >= 2 rollouts per prompt")


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B, G] (r - group mean) / (group std + eps)."""
    _check_groups(rewards)
    mean = rewards.mean(dim=1, keepdim=True)                                          # [B, 1]
    std = rewards.std(dim=1, keepdim=True, unbiased=True)                             # [B, 1]
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[B, G] r - group mean."""
    _check_groups(rewards)
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[B, G] r_i - mean of the group's other G - 1 rewards."""
    _check_groups(rewards)
    group_size = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)     # [B, G]
    return rewards - others_mean


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """[B, G] advantages by ``estimator`` (one of ADVANTAGE_ESTIMATORS)."""
    if estimator == "grpo":
        return grpo_advantages(rewards, eps)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    raise ValueError(f"advantage estimator={estimator!r} is not allowed; allowed values: {ADVANTAGE_ESTIMATORS}")


def zero_spread_share(rewards: torch.Tensor) -> float:
    """Share of the B groups whose G rewards are all equal (advantage 0 everywhere: no learning signal)."""
    _check_groups(rewards)
    return float((rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean())
