"""Pruned-context bootstrapping (OneRec-Think, arXiv:2510.11639, Sec. 4.2): for a training example (history H,
target y) keep the k history items most similar to y, in time order, so that a teacher explains y from the part of
the history that supports it. The CoT SFT example that follows still uses the full, noisy history.

Similarity sources (``reasoning.prune.similarity``), each an ``ItemSimilarity``:
  * ``text``: cosine of item text embeddings (MiniLM via onerec_dist.sid.embed, cached per text), ``text_similarity``;
  * ``item_tokens``: cosine of a model's item-token embeddings, item i = the mean of the input-embedding rows of its
    L code tokens (``item_token_similarity``);
  * ``cooccurrence``: cosine of items' user-incidence vectors over the *training split only*: two items are similar
    when the same users bought both in their training period (``CooccurrenceSimilarity.fit``). Validation and test
    targets never enter it.

Ties (equal similarity) go to the more recent position, so the result is deterministic. A history of at most k
items is kept whole. Repeated items keep each occurrence that makes the cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from onerec_dist.config import require
from onerec_dist.data.types import Examples, InteractionData

SIMILARITIES = ("text", "item_tokens", "cooccurrence")


@dataclass
class PruneConfig:
    """``reasoning.prune`` (conf/reasoning/default.yaml documents every field)."""

    k: int = 10
    similarity: Literal["text", "item_tokens", "cooccurrence"] = "cooccurrence"

    def __post_init__(self) -> None:
        require(self.k >= 1, "reasoning.prune.k", f"must be >= 1, got {self.k}")
        require(self.similarity in SIMILARITIES, "reasoning.prune.similarity",
                f"{self.similarity!r} is not allowed; allowed values: {', '.join(map(repr, SIMILARITIES))}")


class ItemSimilarity(Protocol):
    """similarity(target, items) -> [len(items)] float scores, higher = more similar."""

    def __call__(self, target: int, items: np.ndarray) -> np.ndarray: ...


class EmbeddingSimilarity:
    """Cosine similarity of rows of an [N, d] item embedding matrix."""

    def __init__(self, embeddings: np.ndarray):
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must have shape [num_items, dim], got {emb.shape}")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        self.unit = emb / np.maximum(norms, 1e-12)  # [N, d]; a zero row has similarity 0 with everything

    def __call__(self, target: int, items: np.ndarray) -> np.ndarray:
        return self.unit[np.asarray(items, dtype=np.int64)] @ self.unit[int(target)]


class MatrixSimilarity:
    """Scores read from a given [N, N] matrix (dense or scipy sparse), e.g. one built by hand in a test."""

    def __init__(self, matrix):
        self.matrix = matrix

    def __call__(self, target: int, items: np.ndarray) -> np.ndarray:
        row = self.matrix[int(target)]
        row = row.toarray().ravel() if hasattr(row, "toarray") else np.asarray(row).ravel()
        return row[np.asarray(items, dtype=np.int64)].astype(np.float64)


class CooccurrenceSimilarity(MatrixSimilarity):
    """sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|), U_i = training users who bought i (cosine of binary user
    vectors; sim(i, i) = 1 for a bought item). Sparse [N, N]."""

    @classmethod
    def fit(cls, train: Examples, num_items: int) -> "CooccurrenceSimilarity":
        """From the training split only: each user's training-period items (histories and targets of their
        training windows). Validation and test targets are not in ``train``, so they never count."""
        from scipy.sparse import csr_matrix, diags

        items_of_user: dict[str, set[int]] = {}
        for user, history, target in zip(train.users, train.histories, train.targets):
            items_of_user.setdefault(user, set()).update(history, [target])
        rows = np.fromiter((u for u, items in enumerate(items_of_user.values()) for _ in items), dtype=np.int64)
        cols = np.fromiter((i for items in items_of_user.values() for i in items), dtype=np.int64)
        incidence = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(items_of_user), num_items))  # [U, N]
        counts = (incidence.T @ incidence).tocsr()  # [N, N] users in common
        degree = np.sqrt(counts.diagonal())
        inv = diags(np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0))
        return cls((inv @ counts @ inv).tocsr())


def prune_history(history: Sequence[int], target: int, similarity: ItemSimilarity, k: int = 10) -> list[int]:
    """The k items of ``history`` most similar to ``target``, in their original (time) order."""
    items = np.asarray(history, dtype=np.int64)
    if len(items) <= k:
        return items.tolist()
    scores = np.asarray(similarity(target, items), dtype=np.float64)  # [n]
    # lexsort: last key is primary -> by score descending, then by position descending (recent first on ties).
    order = np.lexsort((-np.arange(len(items)), -scores))
    return items[np.sort(order[:k])].tolist()


def item_token_embeddings(model, item_tokenizer, item_codes: np.ndarray) -> np.ndarray:
    """[N, d] float32: item i = mean of the model's input-embedding rows of its L code tokens."""
    import torch

    ids = item_tokenizer.encode(torch.as_tensor(np.asarray(item_codes), dtype=torch.long))  # [N, L]
    weight = model.get_input_embeddings().weight.detach()
    return weight[ids.to(weight.device)].float().mean(1).cpu().numpy()  # [N, d]


def text_similarity(data: InteractionData, sid_cfg) -> EmbeddingSimilarity:
    """Cosine of the catalogue's MiniLM text embeddings (sid_cfg: embedding model, cache dir, device)."""
    from onerec_dist.sid.embed import embed_catalogue

    embeddings, _ = embed_catalogue(data.catalogue, data.sequences, sid_cfg)
    return EmbeddingSimilarity(embeddings)


def item_token_similarity(model, item_tokenizer, item_codes: np.ndarray) -> EmbeddingSimilarity:
    return EmbeddingSimilarity(item_token_embeddings(model, item_tokenizer, item_codes))


def build_similarity(cfg: PruneConfig, data: InteractionData, train: Examples, *, sid_cfg=None, model=None,
                     item_tokenizer=None, item_codes: np.ndarray | None = None) -> ItemSimilarity:
    """The similarity ``cfg.similarity`` names; ValueError naming what it needs when that is not given."""
    if cfg.similarity == "cooccurrence":
        return CooccurrenceSimilarity.fit(train, len(data.catalogue))
    if cfg.similarity == "text":
        if sid_cfg is None:
            raise ValueError("reasoning.prune.similarity=text needs the sid config (embedding model, cache)")
        return text_similarity(data, sid_cfg)
    if model is None or item_tokenizer is None or item_codes is None:
        raise ValueError("reasoning.prune.similarity=item_tokens needs a model with item tokens, its ItemTokenizer "
                         "and the items' semantic IDs")
    return item_token_similarity(model, item_tokenizer, item_codes)
