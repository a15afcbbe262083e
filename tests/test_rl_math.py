"""The pure GRPO math of onerec_dist.rl on hand-worked examples (expected numbers derived in the comments), and the
micro-batching invariance the engine relies on: 1 micro-batch of 4 rollouts == 4 micro-batches of 1."""

from __future__ import annotations

import math

import pytest
import torch

from onerec_dist.rl.advantages import (
    dr_grpo_advantages,
    group_advantages,
    grpo_advantages,
    rloo_advantages,
    zero_spread_share,
)
from onerec_dist.rl.losses import (
    LOSS_AGG_MODES,
    aggregate,
    aggregate_mean,
    clipped_policy_loss,
    entropy_from_logits,
    grpo_loss,
    k3_kl,
    token_logprobs,
)
from onerec_dist.rl.rewards import (
    compute_reward,
    hit_diversity_reward,
    hit_reward,
    minionerec_beam_rewards,
    ndcg_normaliser,
    positional_match_counts,
    prefix_match_lengths,
    rank_aware_reward,
    rollout_beam_reward,
)

approx = pytest.approx


def close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.detach().float(), torch.tensor(expected, dtype=torch.float32), rtol=rtol,
                               atol=atol)


# ---- rewards ---------------------------------------------------------------------------------------------------------
def beams_and_target() -> tuple[torch.Tensor, torch.Tensor]:
    """N = 2 rollouts, K = 3 beams (best first), L = 3 levels."""
    target = torch.tensor([[1, 2, 3],
                           [0, 0, 0]])
    beams = torch.tensor([[[1, 5, 3],      # levels 0, 2 match: positional 2, prefix 1
                           [1, 6, 7],      # level 0 matches: positional 1, prefix 1
                           [4, 2, 3]],     # levels 1, 2 match: positional 2, prefix 0 (wrong root)
                          [[0, 1, 0],      # positional 2, prefix 1
                           [0, 0, 0],      # the target itself, at rank 1: positional 3, prefix 3
                           [-1, -1, -1]]])  # no third beam (missing): matches nothing, not even code 0... of -1
    return beams, target


def test_match_counts_worked_by_hand():
    beams, target = beams_and_target()
    assert positional_match_counts(beams, target).tolist() == [[2, 1, 2], [2, 3, 0]]
    assert prefix_match_lengths(beams, target).tolist() == [[1, 1, 0], [1, 3, 0]]


def test_rollout_beam_rewards_worked_by_hand():
    beams, target = beams_and_target()
    # positional: max over beams / L -> rollout 0: max(2, 1, 2) / 3 = 2/3; rollout 1: 3/3 = 1
    assert rollout_beam_reward(beams, target, "positional").tolist() == approx([2 / 3, 1.0])
    # prefix: rollout 0: max(1, 1, 0) / 3 = 1/3 (the beam right on levels 1-2 sits under the wrong root)
    assert rollout_beam_reward(beams, target, "prefix").tolist() == approx([1 / 3, 1.0])
    # hit: only rollout 1 has the target among its beams
    assert hit_reward(beams, target).tolist() == [0.0, 1.0]
    # rank-aware: rollout 1 hits at rank 1 -> 1 / log2(1 + 2) = 0.63093
    assert rank_aware_reward(beams, target).tolist() == approx([0.0, 1 / math.log2(3)])
    # hit x diversity: rollout 1's existing beams (2 of 3) start with codes {0, 0}: 1 distinct / 2 = 0.5
    assert hit_diversity_reward(beams, target).tolist() == approx([0.0, 0.5])
    assert compute_reward("rollout_beam_prefix", beams, target).tolist() == approx([1 / 3, 1.0])
    with pytest.raises(ValueError, match="reward='ndcg' is not allowed"):
        compute_reward("ndcg", beams, target)
    with pytest.raises(ValueError, match=r"beams must be \[N, K, L\]"):
        rollout_beam_reward(beams[:, :, :2], target)


def test_rank_aware_first_hit_and_diversity_of_distinct_roots():
    target = torch.tensor([[7, 7]])
    beams = torch.tensor([[[7, 7], [1, 1], [7, 7]]])      # hit at ranks 0 and 2: the first counts -> 1/log2(2) = 1
    assert rank_aware_reward(beams, target).tolist() == [1.0]
    # first codes {7, 1, 7}: 2 distinct of 3 existing beams -> 1 x 2/3
    assert hit_diversity_reward(beams, target).tolist() == approx([2 / 3])


def test_minionerec_beam_rewards_worked_by_hand():
    beams, target = beams_and_target()
    # K = 3 discounts 1/log2(k+2) = [1, 0.63093, 0.5], S = 2.13093; penalties -d/S = [-0.46928, -0.29609, -0.23464]
    s = ndcg_normaliser(3)
    assert s == approx(1 + 1 / math.log2(3) + 0.5)
    rewards = minionerec_beam_rewards(beams, target)
    assert rewards[0].tolist() == [0.0, 0.0, 0.0]                    # no hit in the group: all 0
    assert rewards[1].tolist() == approx([-1 / s, 1.0, -0.5 / s])  # the hit gets the rule reward 1, others penalised
    # summed over the group: 1 - (S - 0.63093) / S = 0.63093 / S = rank_aware / S
    assert rewards.sum(dim=1).tolist() == approx((rank_aware_reward(beams, target) / s).tolist())


# ---- advantages ------------------------------------------------------------------------------------------------------
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                        [0.5, 0.5, 0.5, 0.5]])


def test_group_advantages_worked_by_hand():
    # group 0: mean 0.5, deviations +-0.5, unbiased std = sqrt(4 x 0.25 / 3) = 0.57735 -> GRPO +-0.86603
    assert grpo_advantages(REWARDS)[0].tolist() == approx([0.866025, -0.866025, -0.866025, 0.866025], rel=1e-5)
    # Dr. GRPO: no std division -> +-0.5
    assert dr_grpo_advantages(REWARDS)[0].tolist() == approx([0.5, -0.5, -0.5, 0.5])
    # RLOO: r=1 vs mean of [0, 0, 1] = 1/3 -> 2/3; r=0 vs mean of [1, 0, 1] = 2/3 -> -2/3 (= 4/3 x Dr. GRPO)
    assert rloo_advantages(REWARDS)[0].tolist() == approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # group 1 has no spread: advantage 0 under all three, and it is one of the two groups
    for estimator in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages(REWARDS, estimator)[1].tolist() == [0.0] * 4
    assert zero_spread_share(REWARDS) == 0.5
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="estimator='ppo'"):
        group_advantages(REWARDS, "ppo")


# ---- per-token pieces ------------------------------------------------------------------------------------------------
def test_clipped_policy_loss_worked_by_hand():
    # ratios [[1.5, 1.1], [0.5, 1.0]], advantages [+1, -1], clip 0.2 -> ratio range [0.8, 1.2]
    ratios = torch.tensor([[1.5, 1.1], [0.5, 1.0]])
    old = torch.zeros(2, 2)
    logprobs = ratios.log().requires_grad_(True)
    loss, clipped = clipped_policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), clip_low=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped), max(-1.1, -1.1) = -1.1 (not clipped: equal)
    # A=-1: max(0.5, 0.8) = 0.8 (clipped: the ratio fell below 1 - eps), max(1.0, 1.0) = 1.0
    close(loss, [[-1.2, -1.1], [0.8, 1.0]])
    assert clipped.tolist() == [[True, False], [True, False]]
    # gradient w.r.t. logp: 0 where clipped, else -A x ratio (d ratio / d logp = ratio)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    close(grad, [[0.0, -1.1], [0.0, 1.0]])
    # asymmetric clip (DAPO's clip-higher): eps_high = 0.6 lets ratio 1.5 through for A > 0
    loss_high, _ = clipped_policy_loss(ratios.log(), old, torch.tensor([1.0, -1.0]), 0.2, 0.6)
    assert loss_high[0, 0].item() == approx(-1.5)


def test_k3_kl_worked_by_hand_and_unbiased():
    # logp = log 0.5, logp_ref = log 0.25: r = 0.5 -> 0.5 - log 0.5 - 1 = 0.5 + 0.69315 - 1 = 0.19315
    assert k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])).item() == approx(0.193147, rel=1e-5)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    # E_{x~p}[k3] = sum_x p (q/p) - sum_x p log(q/p) - 1 = 1 + KL(p||q) - 1 = KL(p||q):
    # p = [0.5, 0.5], q = [0.25, 0.75]: KL = 0.5 log 2 + 0.5 log(2/3) = 0.34657 - 0.20273 = 0.14384
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expectation = (p * k3_kl(p.log(), q.log())).sum().item()
    assert expectation == approx(0.143841, rel=1e-5)


def test_logprobs_and_entropy_worked_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])      # probs [0.25, 0.75] and [0.5, 0.5]
    close(token_logprobs(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    # H([0.25, 0.75]) = 0.25 log 4 + 0.75 log(4/3) = 0.34657 + 0.21576 = 0.56233; H([0.5, 0.5]) = log 2
    close(entropy_from_logits(logits), [[0.562335, math.log(2)]])


def test_aggregation_modes_worked_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])            # the third rollout has no loss token
    # token-mean: (1 + 2 + 4) / 3 tokens
    assert aggregate(per_token, mask, "token-mean") == (approx(7.0), 3)
    # seq-mean-token-sum: ((1 + 2) + 4) / 2 rollouts
    assert aggregate(per_token, mask, "seq-mean-token-sum") == (approx(7.0), 2)
    # seq-mean-token-mean: (1.5 + 4) / 2 rollouts
    assert aggregate(per_token, mask, "seq-mean-token-mean") == (approx(5.5), 2)
    assert aggregate_mean(per_token, mask, "seq-mean-token-mean").item() == approx(2.75)
    with pytest.raises(ValueError, match="loss_agg_mode='sum'"):
        aggregate(per_token, mask, "sum")


def test_grpo_loss_on_policy_worked_by_hand():
    # on-policy (old = current, detached): ratio 1, nothing clipped, pg = -A per token; ref = current: KL 0.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), torch.tensor([0.5, -1.0]), mask, kl_coef=0.1)
    # token sum: 3 x (-0.5) + 2 x (+1.0) = 0.5 over 5 tokens
    assert (out.loss_sum.item(), out.units, out.tokens, out.clipped_tokens) == (approx(0.5), 5, 5, 0)
    assert out.kl_sum.item() == 0.0 and out.pg_sum.item() == approx(0.5)
    # the REINFORCE gradient: d loss / d logp = -A on every loss token, 0 on the masked one
    (grad,) = torch.autograd.grad(out.loss_sum, logprobs)
    close(grad, [[-0.5, -0.5, -0.5], [1.0, 1.0, 0.0]])


# ---- micro-batching --------------------------------------------------------------------------------------------------
def _rollout_batch(seed: int = 0):
    """4 rollouts of up to 6 tokens (lengths 6, 2, 4, 1) from a linear policy logits = features @ weight."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(4, 6, 5, generator=g)                                      # [N, T, F]
    weight = torch.randn(5, 11, generator=g, requires_grad=True)                      # [F, V]
    tokens = torch.randint(0, 11, (4, 6), generator=g)                                # [N, T]
    mask = (torch.arange(6) < torch.tensor([6, 2, 4, 1]).unsqueeze(1)).long()         # [N, T]
    with torch.no_grad():
        current = token_logprobs(features @ weight, tokens)
        old = current + 0.3 * torch.randn(current.shape, generator=g)                 # ratios far enough to clip
        ref = current + 0.5 * torch.randn(current.shape, generator=g)
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0])
    return features, weight, tokens, mask, old, ref, advantages


def _loss(features, weight, tokens, mask, old, ref, advantages, mode):
    logprobs = token_logprobs(features @ weight, tokens)
    return grpo_loss(logprobs, old, ref, advantages, mask, clip_low=0.2, kl_coef=0.1, mode=mode)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_one_micro_batch_of_four_equals_four_of_one(mode):
    features, weight, tokens, mask, old, ref, advantages = _rollout_batch()
    whole = _loss(features, weight, tokens, mask, old, ref, advantages, mode)
    assert whole.clipped_tokens > 0                                                   # the clip branch is exercised
    (grad_whole,) = torch.autograd.grad(whole.loss_sum / whole.units, weight)

    # the engine's way: units of every micro-batch counted first, each numerator divided by the global units
    parts = [slice(i, i + 1) for i in range(4)]
    global_units = sum(aggregate(torch.zeros(1, 6), mask[p], mode)[1] for p in parts)
    assert global_units == whole.units
    total, grad_parts = 0.0, torch.zeros_like(weight)
    for p in parts:
        part = _loss(features[p], weight, tokens[p], mask[p], old[p], ref[p], advantages[p], mode)
        (grad,) = torch.autograd.grad(part.loss_sum / global_units, weight)
        total, grad_parts = total + part.loss_sum.item() / global_units, grad_parts + grad
    assert total == approx(whole.loss_sum.item() / whole.units, rel=1e-5)
    torch.testing.assert_close(grad_parts, grad_whole, atol=1e-6, rtol=1e-5)


def test_averaging_micro_batch_means_would_break_token_mean():
    """Why the engine normalises globally: the mean of 4 per-micro-batch token means weighs the 1-token rollout's
    token 6x more than a token of the 6-token rollout, so it is not the global token mean."""
    features, weight, tokens, mask, old, ref, advantages = _rollout_batch()
    whole = _loss(features, weight, tokens, mask, old, ref, advantages, "token-mean")
    naive = sum(aggregate_mean(*_per_token(features[i:i + 1], weight, tokens[i:i + 1], old[i:i + 1],
                                           advantages[i:i + 1]), mask[i:i + 1]).item() for i in range(4)) / 4
    assert naive != approx(whole.loss_sum.item() / whole.units, rel=1e-3)


def _per_token(features, weight, tokens, old, advantages):
    per_token, _ = clipped_policy_loss(token_logprobs(features @ weight, tokens), old, advantages)
    return (per_token,)
