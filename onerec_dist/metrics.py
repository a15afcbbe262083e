"""Top-K ranking metrics as the generative-recommendation papers report them (TIGER, LC-Rec, OneRec-Think).

Predictions are ranked lists of item indices, best first, ``-1`` (or any id outside the catalogue) for an
invalid/empty slot. With one held-out target per user (leave-one-out):

- Recall@K = HR@K = 1 if the target is among the first K predictions else 0, averaged over users;
- NDCG@K = 1 / log2(rank + 1) for the target's 1-based rank <= K, else 0 (the ideal DCG with one relevant
  item is 1, so no normalisation is needed);
- Recall@K with several targets = |top-K ∩ targets| / |targets|;
- validity = share of predicted slots that name a catalogue item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_2d(predictions) -> np.ndarray:
    array = np.asarray(predictions, dtype=np.int64)
    if array.ndim != 2:
        raise ValueError(f"predictions must be [num_users, K], got shape {array.shape}")
    return array


def target_ranks(predictions, targets) -> np.ndarray:
    """1-based rank of each user's target in its prediction list; 0 when absent.  # [U]"""
    preds = _as_2d(predictions)
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (preds.shape[0],):
        raise ValueError(f"targets must have one entry per user ({preds.shape[0]}), got shape {targets.shape}")
    hits = preds == targets[:, None]  # [U, K]
    first = hits.argmax(axis=1) + 1
    return np.where(hits.any(axis=1), first, 0)


def recall_at_k(predictions, targets, k: int) -> float:
    """HR@K with one target per user."""
    ranks = target_ranks(predictions, targets)
    return float(np.mean((ranks >= 1) & (ranks <= k))) if len(ranks) else 0.0


def ndcg_at_k(predictions, targets, k: int) -> float:
    """NDCG@K with one target per user (leave-one-out)."""
    ranks = target_ranks(predictions, targets)
    gains = np.where((ranks >= 1) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0)
    return float(gains.mean()) if len(ranks) else 0.0


def recall_at_k_multi(predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], k: int) -> float:
    """Recall@K with several targets per user: |top-K ∩ targets| / |targets|, averaged over users."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} target sets")
    scores = []
    for preds, truth in zip(predictions, targets):
        truth = set(truth)
        if not truth:
            raise ValueError("recall_at_k_multi: a user has an empty target set")
        scores.append(len(set(list(preds)[:k]) & truth) / len(truth))
    return float(np.mean(scores)) if scores else 0.0


def validity(predictions, num_items: int) -> float:
    """Share of predicted slots that are catalogue items (0 <= id < num_items)."""
    preds = _as_2d(predictions)
    if preds.size == 0:
        return 0.0
    return float(((preds >= 0) & (preds < num_items)).mean())


def ranking_report(predictions, targets, num_items: int, ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20)) -> dict:
    """The metrics `onerec eval` reports, keyed like 'recall@10'. K larger than the list length counts as is."""
    report = {f"recall@{k}": recall_at_k(predictions, targets, k) for k in ks}
    report.update({f"ndcg@{k}": ndcg_at_k(predictions, targets, k) for k in ndcg_ks})
    report["validity"] = validity(predictions, num_items)
    return report


def per_domain_report(predictions, targets, user_domains, domain_names: Sequence[str], num_items: int,
                      ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20)) -> dict:
    """{domain name: ``ranking_report`` of that domain's users + "users"} (domains without users are left out).
    Every metric is a mean over users (validity over the K slots of each user), so the user-weighted mean of the
    per-domain values, sum_d users_d * m_d / sum_d users_d, is the overall value."""
    preds = _as_2d(predictions)
    targets = np.asarray(targets, dtype=np.int64)
    domains = np.asarray(user_domains, dtype=np.int64)
    if domains.shape != (preds.shape[0],):
        raise ValueError(f"user_domains must have one entry per user ({preds.shape[0]}), got shape {domains.shape}")
    out = {}
    for d, name in enumerate(domain_names):
        rows = domains == d
        if rows.any():
            out[name] = {**ranking_report(preds[rows], targets[rows], num_items, ks, ndcg_ks),
                         "users": int(rows.sum())}
    return out
