"""Residual k-means quantisation of item embeddings into L levels x K codes, and collision-free IDs.

Residual quantisation (RQ-Kmeans; OneRec Technical Report, arXiv:2506.13695, tokenizer section; the k-means
counterpart of TIGER's RQ-VAE, arXiv:2305.05065 Sec. 3.1): level l clusters the residuals r_l left by the levels
before it (r_0 = x) into K_l centroids C_l with scikit-learn's KMeans (MiniBatchKMeans for big N), the code is the
cluster, and r_{l+1} = r_l - C_l[code_l]. So x ~= sum_l C_l[code_l], coarse to fine.

Balanced option (OneRec's balanced k-means): every cluster takes at most ceil(N / K) items, so codes are used
evenly and buckets stay small. After the ordinary KMeans fit, ``balanced_iters`` rounds alternate a
capacity-constrained assignment and a centroid update. The assignment is a greedy proposal scheme, vectorised per
round: each unassigned item proposes its nearest cluster that still has room (among its ``num_candidates``
nearest, recomputed over the open clusters when those are exhausted), and each cluster accepts its nearest
proposers up to its remaining capacity. Every round fills a cluster or assigns every proposer, so it ends.

Codes are numbered in order of first use (code 0 of a level is the code of item 0, ...), which makes them
independent of KMeans' internal label order.

Collisions (items sharing all L codes, e.g. items with identical text) are resolved by the minimal reassignment
of the last level: in every shared ID the item closest to its last-level centroid keeps it, and the others, most
confident first, move to the nearest last-level code that no item under the same (L-1)-code prefix uses. Only
the moved items change, only in their last code, and their first L-1 codes (the coarse semantics) stay. This is
the zero-collision reassignment of the RQ-VAE indexes shipped with LETTER/CollisionGenRec; we prefer it to
TIGER's extra "collision level" appended to every ID because it keeps L tokens per item. Only when a prefix has no
free last-level code left (more than K_L items under one prefix) do we fall back to TIGER's way: one extra level
is appended to every ID, 0 for all items except the stranded ones, which are numbered 1, 2, ... within their
shared ID; the summary says so (``extra_level_added``). Without embeddings (IDs loaded from a file) the item with
the lowest catalogue index keeps the ID and the others take the lowest free codes.
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass

import numpy as np


# ----------------------------------------------------------------------------------------------------------------
# Balanced assignment and one level of k-means
# ----------------------------------------------------------------------------------------------------------------

def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """x [n, d], centroids [k, d] -> [n, k] squared Euclidean distances (float64)."""
    x, centroids = np.asarray(x, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    d2 = (x ** 2).sum(axis=1, keepdims=True) - 2.0 * x @ centroids.T + (centroids ** 2).sum(axis=1)
    return np.maximum(d2, 0.0)


def _nearest(x: np.ndarray, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The m nearest centroids of every row, nearest first: x [n, d], centroids [k, d] -> ([n, m] idx, [n, m] d²)."""
    chunk = max(64, 2 ** 24 // len(centroids))  # rows per block: a [chunk, k] float64 block stays ~128 MiB
    idx = np.empty((len(x), m), dtype=np.int64)
    dist = np.empty((len(x), m), dtype=np.float64)
    for start in range(0, len(x), chunk):
        d2 = squared_distances(x[start:start + chunk], centroids)  # [b, k]
        top = np.argpartition(d2, m - 1, axis=1)[:, :m] if m < d2.shape[1] else np.tile(np.arange(m), (len(d2), 1))
        top_d = np.take_along_axis(d2, top, axis=1)
        order = np.argsort(top_d, axis=1, kind="stable")
        idx[start:start + chunk] = np.take_along_axis(top, order, axis=1)
        dist[start:start + chunk] = np.take_along_axis(top_d, order, axis=1)
    return idx, dist


def balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int, num_candidates: int = 32) -> np.ndarray:
    """Assign each row of x [n, d] to a centroid [k, d] so that no centroid gets more than ``capacity`` rows.

    Greedy proposals (module docstring); needs k * capacity >= n. Returns labels [n].
    """
    n, k = len(x), len(centroids)
    if k * capacity < n:
        raise ValueError(f"balanced assignment: {k} clusters x capacity {capacity} < {n} items")
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    while (labels < 0).any():
        pending = np.flatnonzero(labels < 0)
        open_clusters = np.flatnonzero(load < capacity)
        m = min(num_candidates, len(open_clusters))
        cand, cand_d = _nearest(x[pending], centroids[open_clusters], m)
        cand = open_clusters[cand]  # [U, m] cluster ids, nearest first
        active = np.arange(len(pending))
        while active.size:
            room = load[cand[active]] < capacity  # [A, m]
            has_room = room.any(axis=1)
            active = active[has_room]  # the rest wait for fresh candidates in the outer loop
            if not active.size:
                break
            col = room[has_room].argmax(axis=1)  # first (= nearest) candidate with room
            want, want_d = cand[active, col], cand_d[active, col]
            order = np.lexsort((active, want_d, want))  # by cluster, then distance, then item
            clusters = want[order]
            starts = np.r_[0, np.flatnonzero(clusters[1:] != clusters[:-1]) + 1]
            rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
            accepted = order[rank < (capacity - load[clusters])]
            labels[pending[active[accepted]]] = want[accepted]
            load += np.bincount(want[accepted], minlength=k)
            active = np.setdiff1d(active, active[accepted], assume_unique=True)
    return labels


def relabel_by_first_use(labels: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters in order of first use (unused ones last): labels [n], centroids [k, d]."""
    k = len(centroids)
    used, first = np.unique(labels, return_index=True)
    order = np.concatenate([used[np.argsort(first)], np.setdiff1d(np.arange(k), used)])  # new j = old order[j]
    new_of_old = np.empty(k, dtype=np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old[labels], centroids[order]


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums [k, d] (float64) and sizes [k] of x [n, d], by a sparse one-hot product (np.add.at is slow)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(x)), (labels, np.arange(len(x)))), shape=(k, len(x)))  # [k, n]
    return np.asarray(onehot @ np.asarray(x, dtype=np.float64)), np.bincount(labels, minlength=k)


def fit_level(x: np.ndarray, k: int, *, minibatch: bool, balanced: bool, balanced_iters: int, n_init: int,
              max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One level of k-means: x [n, d] float64 -> (labels [n], centroids [k, d] float64)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    if minibatch:
        model = MiniBatchKMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed,
                                batch_size=max(1024, 4 * k))
    else:
        model = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # Fewer distinct points than k (duplicate texts, tiny residuals): some clusters stay empty; that is fine.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x)
    centroids = np.array(model.cluster_centers_, dtype=np.float64)
    labels = model.predict(x).astype(np.int64)
    if balanced:
        capacity = math.ceil(len(x) / k)
        for _ in range(balanced_iters):
            labels = balanced_assign(x, centroids, capacity)
            sums, counts = cluster_sums(x, labels, k)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        labels = balanced_assign(x, centroids, capacity)
    return labels, centroids


@dataclass
class ResidualQuantization:
    codes: np.ndarray  # [N, L] int64
    codebooks: list[np.ndarray]  # L x [K_l, d]
    last_input: np.ndarray  # [N, d] residual entering the last level (for collision moves)
    last_error: np.ndarray  # [N] squared distance of that residual to its own last-level centroid
    relative_residual: list[float]  # after each level: mean ||r_{l+1}||² / mean ||x||²


def check_codebook_sizes(sizes: list[int], num_items: int, on_small: str) -> tuple[list[int], bool]:
    """K_l > N cannot be clustered: ValueError, or with on_small='cap' every K_l is capped to N (reported)."""
    too_big = [k for k in sizes if k > num_items]
    if not too_big:
        return list(sizes), False
    if on_small != "cap":
        raise ValueError(f"sid.codebook_size: codebook sizes {sizes} exceed the number of items ({num_items}); "
                         f"k-means cannot make {max(too_big)} clusters of {num_items} points. Use a smaller "
                         "sid.codebook_size / sid.codebook_sizes, or sid.on_small_catalogue=cap to cap them to "
                         f"{num_items}")
    return [min(k, num_items) for k in sizes], True


def residual_kmeans(x: np.ndarray, sizes: list[int], *, minibatch: bool = False, balanced: bool = False,
                    balanced_iters: int = 5, n_init: int = 1, max_iter: int = 100, seed: int = 0
                    ) -> ResidualQuantization:
    """Residual k-means of x [N, d] into len(sizes) levels of sizes[l] codes (module docstring)."""
    n = len(x)
    check_codebook_sizes(sizes, n, "error")
    # float64 throughout: scikit-learn upcasts float32 distances chunk by chunk, which is slower than float64.
    residual = np.array(x, dtype=np.float64)  # [N, d]
    total = float((residual ** 2).sum(axis=1).mean()) or 1.0
    codes = np.zeros((n, len(sizes)), dtype=np.int64)
    codebooks, relative = [], []
    last_input = residual
    for level, k in enumerate(sizes):
        last_input = residual.copy()
        labels, centroids = fit_level(residual, k, minibatch=minibatch, balanced=balanced,
                                      balanced_iters=balanced_iters, n_init=n_init, max_iter=max_iter,
                                      seed=seed + level)
        labels, centroids = relabel_by_first_use(labels, centroids)
        codes[:, level] = labels
        codebooks.append(centroids)
        residual -= centroids[labels]
        relative.append(float((residual ** 2).sum(axis=1).mean()) / total)
    last_error = (residual ** 2).sum(axis=1)
    return ResidualQuantization(codes, codebooks, last_input, last_error, relative)


# ----------------------------------------------------------------------------------------------------------------
# Collisions
# ----------------------------------------------------------------------------------------------------------------

def shared_mask(codes: np.ndarray) -> np.ndarray:
    """[N] bool: True for items whose full ID (row of codes [N, L]) is shared with another item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


def bucket_statistics(codes: np.ndarray) -> dict:
    """Collision rate (share of items whose ID is shared) and the largest buckets of codes [N, L]."""
    _, counts = np.unique(codes, axis=0, return_counts=True)
    first = np.bincount(codes[:, 0]) if len(codes) else np.zeros(1, dtype=np.int64)
    return {"collision_rate": float(counts[counts > 1].sum()) / max(len(codes), 1),
            "num_shared_ids": int((counts > 1).sum()),
            "largest_bucket_full_id": int(counts.max()) if len(counts) else 0,
            "largest_bucket_first_level": int(first.max())}


def code_statistics(codes: np.ndarray, sizes: list[int]) -> dict:
    """Codes used per level and the entropy (bits) of each level's code distribution; at most log2 K_l."""
    used, entropy = [], []
    for level, k in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=k)
        p = counts[counts > 0] / counts.sum()
        used.append(int((counts > 0).sum()))
        entropy.append(round(float(-(p * np.log2(p)).sum()), 4))
    return {"codes_used_per_level": used, "entropy_per_level": entropy,
            "max_entropy_per_level": [round(math.log2(k), 4) for k in sizes]}


def _prefix_ids(codes: np.ndarray) -> np.ndarray:
    """[N] id of each row's first L-1 codes (all 0 when L == 1)."""
    if codes.shape[1] == 1:
        return np.zeros(len(codes), dtype=np.int64)
    _, inverse = np.unique(codes[:, :-1], axis=0, return_inverse=True)
    return inverse.reshape(-1)


def resolve_collisions(codes: np.ndarray, sizes: list[int], keep_cost: np.ndarray | None = None,
                       move_cost=None) -> tuple[np.ndarray, list[int], dict]:
    """Make every row of codes [N, L] distinct by moving the fewest items in the last level (module docstring).

    keep_cost [N]: in a shared ID the lowest keeps it (default: the catalogue index). move_cost(items [m]) ->
    [m, K_L] cost of each last-level code for those items (default: the code number, i.e. lowest free code).
    Returns (codes [N, L] or [N, L+1], sizes, info).
    """
    n, num_levels = codes.shape
    sizes = list(sizes)
    keep_cost = np.arange(n, dtype=np.float64) if keep_cost is None else np.asarray(keep_cost, dtype=np.float64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rows = np.flatnonzero(counts[inverse] > 1)
    info = {"num_moved": 0, "extra_level_added": False, "num_needing_extra_level": 0}
    if not rows.size:
        return codes.copy(), sizes, info
    grouped = rows[np.lexsort((rows, keep_cost[rows], inverse[rows]))]  # by ID, best keeper first
    keeper = np.r_[True, inverse[grouped][1:] != inverse[grouped][:-1]]
    movers = grouped[~keeper]
    movers = movers[np.lexsort((movers, keep_cost[movers]))]  # most confident movers choose first
    prefix = _prefix_ids(codes)
    need = np.isin(prefix, np.unique(prefix[movers]))
    used: dict[int, set[int]] = {}
    for p, c in zip(prefix[need].tolist(), codes[need, -1].tolist()):
        used.setdefault(p, set()).add(c)
    k_last = sizes[-1]
    out = codes.copy()
    stranded = []
    for start in range(0, len(movers), 1024):  # cost blocks of [1024, K_L]
        block = movers[start:start + 1024]
        cost = (np.tile(np.arange(k_last, dtype=np.float64), (len(block), 1)) if move_cost is None
                else np.array(move_cost(block), dtype=np.float64))
        for item, row in zip(block.tolist(), cost):
            taken = used[prefix[item]]
            if len(taken) >= k_last:
                stranded.append(item)
                continue
            row[list(taken)] = np.inf
            code = int(row.argmin())
            out[item, -1] = code
            taken.add(code)
    info["num_moved"] = len(movers) - len(stranded)
    if stranded:
        out, sizes = _extra_level(out, sizes, np.asarray(stranded), inverse)
        info.update(extra_level_added=True, num_needing_extra_level=len(stranded))
    return out, sizes, info


def _extra_level(codes: np.ndarray, sizes: list[int], stranded: np.ndarray, group: np.ndarray):
    """Append a level: 0 for every item, 1, 2, ... for the stranded items of each shared ID (TIGER's fallback)."""
    extra = np.zeros(len(codes), dtype=np.int64)
    order = stranded[np.lexsort((stranded, group[stranded]))]
    g = group[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    extra[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)])) + 1
    return np.concatenate([codes, extra[:, None]], axis=1), sizes + [int(extra.max()) + 1]


def assign_free_ids(codes: np.ndarray, missing: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Give every item with missing[i] a free ID: the lowest free last-level code under the least crowded prefix.

    codes [N, L] (rows of missing items are ignored), missing [N] bool. Prefixes are those of the known items;
    ValueError when all of them are full.
    """
    out = codes.copy()
    known = np.flatnonzero(~missing)
    if not known.size:
        raise ValueError("no item has a semantic ID to build on; rebuild IDs with sid.source=kmeans")
    prefix = _prefix_ids(codes[known])
    used: dict[int, set[int]] = {}
    for p, c in zip(prefix.tolist(), codes[known, -1].tolist()):
        used.setdefault(p, set()).add(c)
    first_row = {p: known[i] for i, p in reversed(list(enumerate(prefix.tolist())))}
    heap = [(len(taken), p) for p, taken in used.items()]
    heapq.heapify(heap)
    for item in np.flatnonzero(missing).tolist():
        count, p = heapq.heappop(heap)
        if count >= sizes[-1]:
            raise ValueError(f"cannot assign a free semantic ID: every prefix already uses all {sizes[-1]} "
                             "last-level codes; rebuild IDs with sid.source=kmeans")
        code = next(c for c in range(sizes[-1]) if c not in used[p])
        out[item, :-1] = codes[first_row[p], :-1]
        out[item, -1] = code
        used[p].add(code)
        heapq.heappush(heap, (count + 1, p))
    return out
