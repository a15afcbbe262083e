"""On-policy distillation math (onerec_dist/rl/distill.py): worked examples, numbers by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from onerec_dist.rl.distill import distill_loss, exact_reverse_kl, truncated_importance_weights


def test_distill_loss_worked_example():
    # Two sequences, three positions, the last one masked. cap c = 2.
    #  (row, t)  logp   logp_old  logp_T   A = T - old   w = min(exp(logp - old), 2)     w * A * logp
    #  (0, 0)    -1.0   -1.0      -0.5      0.5          exp(0)  = 1                      -0.5
    #  (0, 1)    -1.0   -2.0      -3.0     -1.0          exp(1)  = 2.718 -> 2 (truncated)  2.0
    #  (1, 0)    -2.0   -1.0      -1.0      0.0          exp(-1) = 0.3679                  0.0
    #  (1, 1)    -0.2   -0.2      -1.2     -1.0          1                                 0.2
    # loss = -(-0.5 + 2.0 + 0.0 + 0.2) / 4 tokens = -0.425
    # reverse KL (k1) = mean(old - T) = (-0.5 + 1 + 0 + 1) / 4 = 0.375; weight mean = (1 + 2 + 0.3679 + 1) / 4
    logp = torch.tensor([[-1.0, -1.0, -5.0], [-2.0, -0.2, -5.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -0.2, -9.0]])
    teacher = torch.tensor([[-0.5, -3.0, 0.0], [-1.0, -1.2, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, stats = distill_loss(logp, old, teacher, mask, cap=2.0)
    assert loss.item() == pytest.approx(-0.425)
    assert stats["reverse_kl"] == pytest.approx(0.375) and stats["advantage"] == pytest.approx(-0.375)
    assert stats["weight_mean"] == pytest.approx((1 + 2 + math.exp(-1) + 1) / 4)
    assert stats["truncated_share"] == pytest.approx(0.25) and stats["tokens"] == 4
    # d loss / d logp = -w * A * mask / 4: (0,0) -0.125, (0,1) +0.5, (1,0) 0, (1,1) +0.25, masked 0. A and w are
    # constants (no gradient flows through the weight or the advantage).
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.125, 0.5, 0.0], [0.0, 0.25, 0.0]]))


def test_on_policy_weight_is_one_and_the_cap_is_validated():
    logp = torch.tensor([[-0.3, -2.0]])
    assert torch.equal(truncated_importance_weights(logp, logp.clone(), 1.5), torch.ones(1, 2))
    # pi / pi_old = exp(1) = 2.718 -> capped at 1.5; exp(-1) stays
    got = truncated_importance_weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]]), 1.5)
    assert torch.allclose(got, torch.tensor([[1.5, math.exp(-1)]]))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(logp, logp, 0.0)


def test_exact_reverse_kl_worked_example():
    # Student p = (1/2, 1/2) (logits 0, 0); teacher p = (3/4, 1/4) (logits ln 3, 0).
    # KL(s || T) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3) = 0.143841. A masked position
    # (where the two agree exactly, KL 0, but carrying a different value would change the mean) does not count.
    student = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 5.0]]])
    assert exact_reverse_kl(student, teacher, torch.tensor([[1, 0]])) == pytest.approx(0.5 * math.log(4 / 3))
    assert exact_reverse_kl(student, student, torch.tensor([[1, 1]])) == pytest.approx(0.0, abs=1e-7)
