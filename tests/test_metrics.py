import math

import pytest

from onerec_dist.metrics import (
    ndcg_at_k,
    ranking_report,
    recall_at_k,
    recall_at_k_multi,
    target_ranks,
    validity,
)

# Three users, lists of 4 predictions each (best first).
PREDS = [
    [7, 3, 9, 1],  # target 3 at rank 2
    [5, 6, 2, 8],  # target 8 at rank 4
    [4, 0, 1, -1],  # target 2 absent; last slot invalid
]
TARGETS = [3, 8, 2]


def test_target_ranks():
    assert target_ranks(PREDS, TARGETS).tolist() == [2, 4, 0]


def test_recall_hand_worked():
    # @1: no target at rank 1 -> 0/3; @2: user 0 -> 1/3; @4: users 0 and 1 -> 2/3.
    assert recall_at_k(PREDS, TARGETS, 1) == 0.0
    assert recall_at_k(PREDS, TARGETS, 2) == pytest.approx(1 / 3)
    assert recall_at_k(PREDS, TARGETS, 4) == pytest.approx(2 / 3)


def test_ndcg_hand_worked():
    # rank 2 -> 1/log2(3) = 0.6309; rank 4 -> 1/log2(5) = 0.4307; absent -> 0.
    # @2: 0.6309 / 3 = 0.2103; @4: (0.6309 + 0.4307) / 3 = 0.3539.
    assert ndcg_at_k(PREDS, TARGETS, 2) == pytest.approx((1 / math.log2(3)) / 3)
    assert ndcg_at_k(PREDS, TARGETS, 4) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert ndcg_at_k(PREDS, TARGETS, 4) == pytest.approx(0.35387, abs=1e-5)
    # A target at rank 1 scores exactly 1.
    assert ndcg_at_k([[3, 1]], [3], 1) == 1.0


def test_recall_multi_hand_worked():
    # user 0: top-3 {1,2,3} ∩ {2,3,9,10} = {2,3} -> 2/4; user 1: top-3 {7,8,9} ∩ {8} -> 1/1. Mean 0.75.
    assert recall_at_k_multi([[1, 2, 3, 9], [7, 8, 9]], [[2, 3, 9, 10], [8]], 3) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty target set"):
        recall_at_k_multi([[1]], [[]], 1)


def test_validity_hand_worked():
    # 12 slots; -1 invalid; with 9 items ids 9 is invalid too: [7,3,9,1] has 9 -> 2 invalid of 12 -> 10/12.
    assert validity(PREDS, num_items=9) == pytest.approx(10 / 12)
    assert validity(PREDS, num_items=10) == pytest.approx(11 / 12)


def test_report_keys_and_shape_errors():
    report = ranking_report(PREDS, TARGETS, num_items=10, ks=(1, 4), ndcg_ks=(4,))
    assert set(report) == {"recall@1", "recall@4", "ndcg@4", "validity"}
    with pytest.raises(ValueError, match="one entry per user"):
        recall_at_k(PREDS, [1, 2], 1)
    with pytest.raises(ValueError, match=r"\[num_users, K\]"):
        recall_at_k([1, 2, 3], [1, 2, 3], 1)
