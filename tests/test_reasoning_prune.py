"""Pruned-context bootstrapping (onerec_dist.reasoning.prune) with hand-built similarities."""

import numpy as np
import pytest
import torch

from onerec_dist.data.types import Catalogue, Examples, InteractionData
from onerec_dist.reasoning.prune import (CooccurrenceSimilarity, EmbeddingSimilarity, MatrixSimilarity,
                                         PruneConfig, build_similarity, item_token_embeddings, prune_history)


def test_keeps_the_k_most_similar_in_time_order():
    # Similarity of each of 6 items to target 9: item 3 (0.9), 5 (0.8), 1 (0.7), 0 (0.1), 2 (0.05), 4 (0.0).
    sim = np.zeros((10, 10))
    sim[9, [3, 5, 1, 0, 2, 4]] = [0.9, 0.8, 0.7, 0.1, 0.05, 0.0]
    history = [0, 1, 2, 3, 4, 5]
    # k = 3 keeps {3, 5, 1}, written in history order: 1, 3, 5.
    assert prune_history(history, 9, MatrixSimilarity(sim), k=3) == [1, 3, 5]
    assert prune_history([5, 3, 1, 0], 9, MatrixSimilarity(sim), k=2) == [5, 3]
    # A history of at most k items is kept whole.
    assert prune_history([4, 2], 9, MatrixSimilarity(sim), k=3) == [4, 2]


def test_ties_go_to_the_more_recent_position_and_repeats_stay():
    sim = np.zeros((4, 4))
    sim[3, [0, 1, 2]] = [0.5, 0.5, 0.2]
    # Items 0 and 1 tie at 0.5: with k = 2 the last two occurrences of them win: positions 3 (1) and 4 (0).
    assert prune_history([0, 1, 2, 1, 0, 2], 3, MatrixSimilarity(sim), k=2) == [1, 0]
    assert prune_history([0, 1, 2, 1, 0, 2], 3, MatrixSimilarity(sim), k=4) == [0, 1, 1, 0]


def test_embedding_similarity_is_cosine():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    sim = EmbeddingSimilarity(emb)
    # cos to item 2 = (1, 1)/sqrt2: item 0 -> 1/sqrt2, item 1 -> 1/sqrt2, item 3 -> -1/sqrt2, zero row -> 0.
    np.testing.assert_allclose(sim(2, np.array([0, 1, 3, 4])), [2 ** -0.5, 2 ** -0.5, -(2 ** -0.5), 0.0])
    assert prune_history([3, 0, 4], 0, sim, k=1) == [0]


def test_cooccurrence_uses_only_the_training_split():
    # Training-period items: u1 {0, 1, 2}, u2 {0, 1}, u3 {2, 3}. Users in common: (0,1) = 2, (0,2) = 1, (2,3) = 1.
    train = Examples()
    train.append("u1", [0, 1], 2)
    train.append("u2", [0], 1)
    train.append("u3", [2], 3)
    sim = CooccurrenceSimilarity.fit(train, num_items=5)
    # cosine: |U0 & U1| / sqrt(|U0| |U1|) = 2 / sqrt(2 * 2) = 1; (0, 2): 1 / sqrt(2 * 2) = 0.5; (2, 3): 1/sqrt(2).
    np.testing.assert_allclose(sim(0, np.array([1, 2, 3, 4])), [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(sim(3, np.array([2, 3])), [2 ** -0.5, 1.0])
    # Item 4 (only a validation / test target, never in train) is similar to nothing.
    np.testing.assert_allclose(sim(4, np.arange(5)), 0.0)
    assert prune_history([3, 2, 1], 0, sim, k=1) == [1]


def test_item_token_embeddings_are_the_mean_of_code_rows():
    class Tok:  # ItemTokenizer of 2 levels, code c of level l at row 10 * (l + 1) + c
        def encode(self, codes):
            return codes + torch.tensor([10, 20])

    weight = torch.arange(30 * 2, dtype=torch.float32).reshape(30, 2)
    model = torch.nn.Module()
    emb = torch.nn.Embedding(30, 2)
    emb.weight.data = weight
    model.get_input_embeddings = lambda: emb
    out = item_token_embeddings(model, Tok(), np.array([[0, 1], [3, 0]]))
    # item 0 = mean(rows 10, 21) = ((20 + 42) / 2, (21 + 43) / 2) = (31, 32); item 1 = mean(rows 13, 20) = (33, 34).
    np.testing.assert_allclose(out, [[31.0, 32.0], [33.0, 34.0]])


def test_config_and_missing_inputs_are_named():
    with pytest.raises(ValueError, match="reasoning.prune.similarity.*allowed values: 'text', 'item_tokens'"):
        PruneConfig(similarity="bm25")
    with pytest.raises(ValueError, match="reasoning.prune.k"):
        PruneConfig(k=0)
    data = InteractionData("d", Catalogue.ids_only(["a", "b"]), {"u": [0, 1]})
    with pytest.raises(ValueError, match="similarity=item_tokens needs a model"):
        build_similarity(PruneConfig(similarity="item_tokens"), data, Examples())
    with pytest.raises(ValueError, match="similarity=text needs the sid config"):
        build_similarity(PruneConfig(similarity="text"), data, Examples())


def test_text_similarity_embeds_once_and_reads_the_cache(monkeypatch, tmp_path):
    import onerec_dist.sid.embed as embed
    from onerec_dist.sid.config import SidConfig

    calls = []

    def fake_encoder(texts, model_name, batch_size, device):
        calls.append(len(texts))
        # A 2-d "embedding" per text: (length, number of 'a's), enough to tell texts apart.
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)

    monkeypatch.setattr(embed, "encode_texts", fake_encoder)
    titles = ["aaaa", "aaab", "zzzz"]
    cat = Catalogue(["x", "y", "z"], titles, [""] * 3, [""] * 3, [[] for _ in range(3)])
    data = InteractionData("d", cat, {"u": [0, 1, 2]})
    cfg = PruneConfig(similarity="text", k=1)
    sid_cfg = SidConfig(cache_dir=str(tmp_path), normalize=True)
    sim = build_similarity(cfg, data, Examples(), sid_cfg=sid_cfg)
    # Unit vectors of (4, 4), (4, 3), (4, 0): item 1 is closer to item 0 than item 2 is.
    assert prune_history([2, 1], 0, sim, k=1) == [1]
    again = build_similarity(cfg, data, Examples(), sid_cfg=sid_cfg)
    assert calls == [3]  # the second build read every text from the cache
    np.testing.assert_allclose(again(0, np.arange(3)), sim(0, np.arange(3)), rtol=1e-6)
