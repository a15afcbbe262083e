"""Decoder modes against brute force: partial levels, per-row allowed prefixes, Gumbel-top-k sampling, item scoring,
batched decoding (issue 11 item 6).

The brute force never touches the decoder or the prefix index: it teacher-forces every catalogue item after the
prompt through the tiny model (one forward per prompt, the N items as N rows), reads each level's code logits, and
normalises them either over the full vocabulary ("full") or over the codes that lead to a still-allowed item, with
the children sets built from plain Python tuples ("valid"). Beam search with a width of at least the number of live
prefixes at every level prunes nothing, so it must return the exact top-K.
"""

import functools
import itertools
import math

import pytest
import torch

from onerec_dist.decoding.beam_search import ConstrainedDecoder
from onerec_dist.decoding.constraints import AllowedPrefixes, row_chunks
from onerec_dist.decoding.sampling import conditional_gumbel
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary

SIZES = [3, 4, 5]  # 60 possible IDs
TEXTS = ["the user bought a red lamp", "blue", "a chair and a lamp and a", "red red chair"]


@functools.lru_cache(maxsize=None)
def world(num_items=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [60, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:num_items]]  # [N, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, seed=seed).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=seed)
    with torch.no_grad():  # spread the code logits (the init gives nearly uniform ones) so distributions differ
        rows = item_tok.item_token_ids()
        emb = model.get_input_embeddings().weight
        emb[rows] += torch.randn(len(rows), emb.shape[1], generator=gen) * 0.5
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return model, tokenizer, item_tok, PrefixIndex.build(codes, SIZES), codes, prompts


def decoder(width, top_k=None, normalization="full", num_items=24, **kwargs):
    model, tok, item_tok, index, codes, _ = world(num_items)
    return ConstrainedDecoder(model, item_tok, index, width, top_k or width, normalization=normalization,
                              pad_token_id=tok.pad_token_id, item_codes=codes, **kwargs)


@torch.no_grad()
def code_logits(prompt, num_items=24):
    """[N, L, K_max] code logits (-inf past K_l) and [N, L] full-vocabulary lse of every item, by teacher forcing."""
    model, _, item_tok, _, codes, _ = world(num_items)
    ids = torch.tensor([prompt + [item_tok.begin_id] + (codes[i] + item_tok.level_offset).tolist()
                        for i in range(len(codes))])  # [N, T + 1 + L], no padding
    logits = model(ids).logits.float()  # [N, T + 1 + L, V]
    out = torch.full((len(codes), len(SIZES), max(SIZES)), float("-inf"))
    lse = torch.zeros(len(codes), len(SIZES))
    for level in range(len(SIZES)):
        row = logits[:, len(prompt) + level]  # predicts the level's token
        start, stop = item_tok.code_slice(level)
        out[:, level, : stop - start] = row[:, start:stop]
        lse[:, level] = torch.logsumexp(row, -1)
    return out, lse


def exact_level_logprobs(prompt, allowed_items, normalization, temperature=1.0, num_items=24):
    """{item: [L] step log-probs} for every item in ``allowed_items``; "valid" renormalises each level over the
    codes c such that (prefix, c) starts some allowed item (Python sets, no prefix index)."""
    codes = world(num_items)[4].tolist()
    logits, lse = code_logits(prompt, num_items)
    children = {}
    for i in allowed_items:
        for level in range(len(SIZES)):
            children.setdefault(tuple(codes[i][:level]), set()).add(codes[i][level])
    out = {}
    for i in allowed_items:
        steps = []
        for level, code in enumerate(codes[i]):
            if normalization == "full":
                steps.append(float(logits[i, level, code] - lse[i, level]))
            else:
                valid = sorted(children[tuple(codes[i][:level])])
                scaled = logits[i, level, valid] / temperature
                steps.append(float(scaled[valid.index(code)] - torch.logsumexp(scaled, 0)))
        out[i] = torch.tensor(steps)
    return out


def ranked(scores: dict, prefix_len=None):
    """Items (or unique prefixes) sorted by total log-prob, best first: [(key, score)]."""
    codes = world()[4].tolist()
    if prefix_len is None:
        return sorted(((i, float(s.sum())) for i, s in scores.items()), key=lambda kv: -kv[1])
    best = {}
    for i, s in scores.items():  # every item under a prefix gives the prefix the same first-m log-probs
        best[tuple(codes[i][:prefix_len])] = float(s[:prefix_len].sum())
    return sorted(best.items(), key=lambda kv: -kv[1])


# ------------------------------------------------------------------------------------------------ partial levels


@pytest.mark.parametrize("normalization", ["full", "valid"])
@pytest.mark.parametrize("num_levels", [1, 2])
def test_decode_prefixes_equals_brute_force(normalization, num_levels):
    # The score of an m-level prefix is the sum of its first m step log-probs (the marginal over its continuations).
    # Width N >= number of live prefixes: exact. Slots past the number of distinct prefixes are dead (-1, -inf).
    _, _, _, _, codes, prompts = world()
    result = decoder(len(codes), normalization=normalization).decode_prefixes(prompts, num_levels)
    assert result.prefixes.shape == (len(prompts), len(codes), num_levels)
    for b, prompt in enumerate(prompts):
        expected = ranked(exact_level_logprobs(prompt, range(len(codes)), normalization), num_levels)
        n = len(expected)
        assert [tuple(p) for p in result.prefixes[b, :n].tolist()] == [p for p, _ in expected]
        torch.testing.assert_close(result.scores[b, :n], torch.tensor([s for _, s in expected]), atol=1e-4, rtol=0)
        assert bool((result.prefixes[b, n:] == -1).all()) and bool(torch.isinf(result.scores[b, n:]).all())
    torch.testing.assert_close(result.level_logprobs.sum(-1)[:, :1], result.scores[:, :1])


def test_decode_prefixes_from_a_partial_id():
    # Start below level-0 code c: only level 1 is decoded, from one node, so width 2 gives the exact top-2 children.
    # The score counts the decoded level only: the level-1 step log-prob log p(c_1 | prompt, c_0).
    _, _, item_tok, _, codes, prompts = world()
    start = codes[:len(prompts), :1]  # [B, 1]
    result = decoder(2).decode_prefixes(prompts, 2, start_codes=start)
    assert result.level_logprobs.shape == (len(prompts), 2, 1)
    assert torch.equal(result.token_ids, result.prefixes.clamp(min=0) + item_tok.level_offset[:2])
    for b, prompt in enumerate(prompts):
        exact = exact_level_logprobs(prompt, range(len(codes)), "full")
        step = {tuple(codes[i, :2].tolist()): float(s[1]) for i, s in exact.items() if codes[i, 0] == start[b, 0]}
        expected = sorted(step.items(), key=lambda kv: -kv[1])[:2]
        n = len(expected)
        assert [tuple(p) for p in result.prefixes[b, :n].tolist()] == [p for p, _ in expected]
        torch.testing.assert_close(result.scores[b, :n], torch.tensor([s for _, s in expected]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ per-row allowed prefixes


def random_prefix_sets(num_rows, num_levels, seed):
    codes = world()[4]
    prefixes = sorted({tuple(p) for p in codes[:, :num_levels].tolist()})
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(num_rows):  # ragged: 1..3 prefixes per row
        pick = torch.randperm(len(prefixes), generator=gen)[: 1 + b % 3].tolist()
        rows.append([list(prefixes[i]) for i in pick])
    return rows


@pytest.mark.parametrize("normalization", ["full", "valid"])
@pytest.mark.parametrize("num_levels", [1, 2])
def test_allowed_prefixes_give_the_per_row_restricted_topk(normalization, num_levels):
    # Row b's answer is the brute-force ranking of the items under its own prefixes ("valid": renormalised over the
    # codes that still lead to such an item, as with exclusion). Everything past them is dead.
    _, _, _, _, codes, prompts = world()
    rows = random_prefix_sets(len(prompts), num_levels, seed=num_levels)
    allowed = AllowedPrefixes.from_lists(rows)
    assert allowed.offsets.tolist() == [0, 1, 3, 6, 7]
    result = decoder(len(codes), normalization=normalization).decode(prompts, allowed_prefixes=allowed)
    for b, prompt in enumerate(prompts):
        under = [i for i in range(len(codes)) if codes[i, :num_levels].tolist() in rows[b]]
        expected = ranked(exact_level_logprobs(prompt, under, normalization))
        n = len(expected)
        assert result.items[b, :n].tolist() == [i for i, _ in expected]
        torch.testing.assert_close(result.scores[b, :n], torch.tensor([s for _, s in expected]), atol=1e-4, rtol=0)
        assert bool((result.items[b, n:] == -1).all()) and bool(torch.isinf(result.scores[b, n:]).all())


def test_unrestricted_rows_decode_the_whole_catalogue_in_the_same_batch():
    # Think-Ahead's fallback: rows without a cached set (None) get exactly the plain decode, the others their
    # restricted one, in one call.
    _, _, _, _, codes, prompts = world()
    rows = random_prefix_sets(len(prompts), 2, seed=4)
    mixed = AllowedPrefixes.from_lists([None, rows[1], None, rows[3]])
    assert mixed.unrestricted.tolist() == [True, False, True, False]
    dec = decoder(8, 5)
    got = dec.decode(prompts, allowed_prefixes=mixed)
    plain = dec.decode(prompts)
    restricted = dec.decode(prompts, allowed_prefixes=AllowedPrefixes.from_lists(rows))
    for b, expected in enumerate([plain, restricted, plain, restricted]):
        assert got.items[b].tolist() == expected.items[b].tolist()
    assert mixed.select([2, 1]).unrestricted.tolist() == [True, False]


def test_allowed_prefixes_compose_with_exclusion_start_codes_and_partial_decode():
    _, _, _, _, codes, prompts = world()
    rows = random_prefix_sets(len(prompts), 1, seed=3)
    allowed = AllowedPrefixes.from_lists(rows)
    dec = decoder(len(codes))
    plain = dec.decode(prompts, allowed_prefixes=allowed)
    exclude = [plain.items[b, :1].tolist() for b in range(len(prompts))]
    result = dec.decode(prompts, allowed_prefixes=allowed, exclude=exclude)
    for b in range(len(prompts)):
        live = [i for i in plain.items[b].tolist() if i >= 0]
        assert [i for i in result.items[b].tolist() if i >= 0] == live[1:]  # the best one excluded, order kept
    # A start code inside the row's prefix: only its subtree; a partial decode of level 2 stays below the prefixes.
    start = torch.tensor([[r[0][0]] for r in rows])
    below = dec.decode(prompts, start_codes=start, allowed_prefixes=allowed)
    assert bool((below.codes[:, :, 0][below.items >= 0] == start.expand(-1, len(codes))[below.items >= 0]).all())
    prefixes = dec.decode_prefixes(prompts, 2, allowed_prefixes=allowed).prefixes
    for b in range(len(prompts)):
        live = prefixes[b][prefixes[b, :, 0] >= 0]
        assert all([p[0]] in rows[b] for p in live.tolist()) and len(live) > 0


def test_union_of_groups_and_bad_allowed_prefixes():
    # Two users x T=2 rationales, b=2 prefixes each: user 0 sees {(0,1),(2,0)} and {(0,1),dead}; user 1 sees
    # {(1,1),(1,2)} twice -> unions [(0,1),(2,0)] and [(1,1),(1,2)], sorted, duplicates and dead slots dropped.
    decoded = torch.tensor([[[2, 0], [0, 1]], [[0, 1], [-1, -1]], [[1, 2], [1, 1]], [[1, 1], [1, 2]]])
    union = AllowedPrefixes.union_of_groups(decoded, group_size=2)
    assert union.offsets.tolist() == [0, 2, 4]
    assert union.codes.tolist() == [[0, 1], [2, 0], [1, 1], [1, 2]]
    assert union.select([1]).codes.tolist() == [[1, 1], [1, 2]]

    _, _, _, _, codes, prompts = world()
    dec = decoder(4)
    good = [[codes[0, :2].tolist()]] * len(prompts)
    with pytest.raises(ValueError, match="allowed_prefixes row 1 is empty"):
        dec.decode(prompts, allowed_prefixes=AllowedPrefixes.from_lists([good[0], [], good[0], good[0]], 2))
    missing = next(p for p in itertools.product(range(3), range(4)) if list(p) not in codes[:, :2].tolist())
    with pytest.raises(ValueError, match=r"row 2: prefix .* is the start of no catalogue item"):
        dec.decode(prompts, allowed_prefixes=AllowedPrefixes.from_lists(good[:2] + [[list(missing)]] + good[:1]))
    with pytest.raises(ValueError, match="has 1 rows for 4 prompts"):
        dec.decode(prompts, allowed_prefixes=AllowedPrefixes.from_lists(good[:1]))
    other = next(c for c in range(3) if c != int(codes[0, 0]) and bool((codes[:, 0] == c).any()))
    with pytest.raises(ValueError, match="start_codes row 0 .* lies below none of the row's allowed prefixes"):
        dec.decode(prompts, start_codes=torch.tensor([[other]] * 4), allowed_prefixes=AllowedPrefixes.from_lists(good))
    with pytest.raises(ValueError, match="an unrestricted row of allowed_prefixes must have no prefixes"):
        AllowedPrefixes(torch.tensor([0, 1]), torch.tensor([[0]]), torch.tensor([True]))
    with pytest.raises(ValueError, match="same number of levels"):
        AllowedPrefixes.from_lists([[[0], [0, 1]]])
    with pytest.raises(ValueError, match=r"num_levels=1 must be an int in \(l0=1, L=3\]"):
        dec.decode_prefixes(prompts, 1, start_codes=codes[:4, :1])
    with pytest.raises(ValueError, match=r"num_levels=0 must be an int in \(l0=0, L=3\]"):
        dec.decode_prefixes(prompts, 0)


# ------------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("normalization", ["full", "valid"])
@pytest.mark.parametrize("prefill", ["tree", "once"])
def test_score_items_equals_teacher_forcing(normalization, prefill):
    # Every catalogue item scored after every prompt equals the brute-force teacher-forced log-prob, per level.
    _, _, _, _, codes, prompts = world()
    items = torch.arange(len(codes)).expand(len(prompts), -1)  # [B, N]
    got = decoder(4, normalization=normalization, prefill=prefill).score_items(prompts, items=items)
    for b, prompt in enumerate(prompts):
        exact = exact_level_logprobs(prompt, range(len(codes)), normalization)
        torch.testing.assert_close(got.level_logprobs[b], torch.stack([exact[i] for i in range(len(codes))]),
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(got.scores, got.level_logprobs.sum(-1))


def test_score_items_reproduces_beam_scores_and_rejects_non_items():
    _, _, _, _, codes, prompts = world()
    dec = decoder(5)
    beams = dec.decode(prompts)
    scored = dec.score_items(prompts, codes=beams.codes)  # [B, 5, L] candidates given as codes
    torch.testing.assert_close(scored.scores, beams.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.level_logprobs, beams.level_logprobs, atol=1e-5, rtol=0)
    missing = next(p for p in itertools.product(*map(range, SIZES)) if list(p) not in codes.tolist())
    bad = beams.codes.clone()
    bad[2, 1] = torch.tensor(missing)
    with pytest.raises(ValueError, match=r"codes\[2, 1\] = .* is not a catalogue item"):
        dec.score_items(prompts, codes=bad)
    with pytest.raises(ValueError, match=r"items\[0, 0\] = 99 is not a catalogue row"):
        dec.score_items(prompts, items=torch.full((4, 1), 99))
    with pytest.raises(ValueError, match="exactly one of"):
        dec.score_items(prompts)


# ------------------------------------------------------------------------------------------------ batching


def test_batch_equals_each_row_alone_and_row_budget_chunks():
    # Prompts of lengths 1..9 tokens (left padding differs per batch): decoding them together, one by one, or in
    # chunks of a row budget (sorted by length) returns the same items and, up to float rounding, the same scores.
    _, tok, _, _, codes, prompts = world()
    prompts = prompts + [tok.encode("red"), tok.encode("the user bought a red lamp and a blue chair")]
    dec, chunked = decoder(6, 4), decoder(6, 4, row_budget=13)  # 13 // 6 = 2 prompts per chunk
    together = dec.decode(prompts)
    lengths = [len(p) for p in prompts]
    chunks = row_chunks(lengths, 2)  # longest first, so each chunk pads to similar lengths
    assert len(chunks) == 3 and min(lengths[i] for i in chunks[0]) >= max(lengths[i] for i in chunks[1])
    for got in [chunked.decode(prompts)] + [None]:
        if got is None:
            alone = [dec.decode([p]) for p in prompts]
            got_items = torch.cat([a.items for a in alone])
            got_scores = torch.cat([a.scores for a in alone])
        else:
            got_items, got_scores = got.items, got.scores
        assert torch.equal(got_items, together.items)
        torch.testing.assert_close(got_scores, together.scores, atol=1e-5, rtol=1e-6)  # |score| ~ 90: fp32 ulps
    for method, args in (("decode_prefixes", (2,)), ("score_items", ())):
        kwargs = {"items": together.items} if method == "score_items" else {}
        full, parts = getattr(dec, method)(prompts, *args, **kwargs), getattr(chunked, method)(prompts, *args, **kwargs)
        torch.testing.assert_close(parts.scores, full.scores, atol=1e-5, rtol=1e-6)
    allowed = AllowedPrefixes.from_lists(random_prefix_sets(len(prompts), 1, seed=0))  # per-row sets are chunked too
    full, parts = dec.decode(prompts, allowed_prefixes=allowed), chunked.decode(prompts, allowed_prefixes=allowed)
    assert torch.equal(parts.items, full.items)
    with pytest.raises(ValueError, match="row_budget=0 must be None"):
        decoder(6, 4, row_budget=0)


# ------------------------------------------------------------------------------------------------ sampling


def test_conditional_gumbel_worked_example():
    # Children perturbed to G = [1, 0, -inf], parent key T = 2 (Kool et al. 2019, Eq. 10): Z = 1, so
    # G~_0 = -log(e^-2 - e^-1 + e^-1) = 2 (the argmax takes the parent's key), G~_1 = -log(e^-2 - e^-1 + e^0)
    # = -log(0.135335 - 0.367879 + 1) = -log(0.767456) = 0.264674, G~_2 = -inf. A dead parent gives -inf.
    got = conditional_gumbel(torch.tensor([[1.0, 0.0, float("-inf")], [0.0, 1.0, 2.0]]),
                             torch.tensor([2.0, float("-inf")]))
    assert got[0, 0] == 2.0 and float(got[0, 1]) == pytest.approx(0.264674, abs=1e-5)
    assert torch.isinf(got[0, 2]) and bool(torch.isinf(got[1]).all())


def test_samples_are_distinct_valid_and_seeded():
    _, _, _, _, codes, prompts = world()
    dec = decoder(4)
    draw = lambda seed, k=10: dec.sample(prompts, k, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = draw(0), draw(0), draw(1)
    for b, prompt in enumerate(prompts):
        items = first.items[b].tolist()
        assert len(set(items)) == 10 and min(items) >= 0  # distinct catalogue items
        exact = exact_level_logprobs(prompt, range(len(codes)), "full")
        torch.testing.assert_close(first.scores[b], torch.stack([exact[i].sum() for i in items]), atol=1e-4, rtol=0)
        q = exact_level_logprobs(prompt, range(len(codes)), "valid")  # the sampling distribution at T = 1
        torch.testing.assert_close(first.sample_logprobs[b], torch.stack([q[i].sum() for i in items]), atol=1e-4,
                                   rtol=0)
    assert torch.equal(first.codes, codes[first.items])
    assert bool((first.keys[:, :-1] >= first.keys[:, 1:]).all())  # in key order
    assert torch.equal(first.items, again.items) and torch.equal(first.keys, again.keys)
    assert not torch.equal(first.items, other.items)
    everything = draw(2, len(codes))  # K = N: every item once, whatever the noise
    assert all(sorted(row) == list(range(len(codes))) for row in everything.items.tolist())


def test_sampling_respects_allowed_prefixes_and_exclusion():
    _, _, _, _, codes, prompts = world()
    rows = random_prefix_sets(len(prompts), 1, seed=5)
    exclude = [[0, 1, 2]] * len(prompts)
    got = decoder(4).sample(prompts, 12, generator=torch.Generator().manual_seed(0),
                            allowed_prefixes=AllowedPrefixes.from_lists(rows), exclude=exclude)
    for b in range(len(prompts)):
        reachable = {i for i in range(len(codes)) if codes[i, :1].tolist() in rows[b]} - set(exclude[b])
        live = [i for i in got.items[b].tolist() if i >= 0]
        assert set(live) == reachable if len(reachable) <= 12 else set(live) < reachable
        assert bool(torch.isinf(got.keys[b, len(live):]).all())


TINY = 6  # items in the frequency test's catalogue


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_match_the_exact_distribution(temperature):
    # One prompt repeated R = 4000 times; each row draws K = 2 items without replacement. The first draw of a row is
    # item i with probability q_i (product over levels of the softmax of logits / T over the valid codes); the
    # second is j with probability sum_{i != j} q_i q_j / (1 - q_i) (Gumbel-top-k = sampling without replacement,
    # Kool et al. 2019, Sec. 3). A frequency f of R Bernoulli(p) rows has standard deviation sqrt(p (1 - p) / R)
    # <= 0.0079; we allow 5 of them (+ 1/R): with 2 x 6 frequencies the chance of a false alarm is < 1e-5 under
    # the normal approximation, while a wrong distribution (e.g. uniform over items, or T ignored) is off by
    # several percentage points. The seed is fixed, so the test is deterministic.
    _, _, _, _, codes, prompts = world(TINY)
    q = exact_level_logprobs(prompts[0], range(TINY), "valid", temperature, num_items=TINY)
    q = torch.stack([q[i].sum() for i in range(TINY)]).exp()  # [6]
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-5)
    second = torch.stack([sum(q[i] * q[j] / (1 - q[i]) for i in range(TINY) if i != j) for j in range(TINY)])
    repeats = 4000
    got = decoder(2, normalization="full", num_items=TINY).sample(
        [prompts[0]] * repeats, 2, temperature=temperature, generator=torch.Generator().manual_seed(7))
    assert bool((got.items[:, 0] != got.items[:, 1]).all())
    for position, expected in ((0, q), (1, second)):
        freq = torch.bincount(got.items[:, position], minlength=TINY).float() / repeats
        tolerance = 5 * (expected * (1 - expected) / repeats).sqrt() + 1 / repeats
        assert bool(((freq - expected).abs() <= tolerance).all()), (position, freq, expected)
    assert float((q - 1 / TINY).abs().max()) > 0.05  # the distribution is far from uniform: the test can fail


def test_bad_sampling_arguments():
    _, _, _, _, codes, prompts = world()
    dec = decoder(4)
    with pytest.raises(ValueError, match=r"num_samples=25 must be an int in \[1, number of catalogue items=24\]"):
        dec.sample(prompts, 25)
    for temperature in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature=.* must be a finite number > 0"):
            dec.sample(prompts, 2, temperature=temperature)


def test_no_host_sync_in_the_new_level_loops(monkeypatch):
    # As tests/test_decoding.py::test_no_host_sync_in_the_level_loop, for the allowed-prefix mask (inside _search),
    # the partial decode and the sampling loop: no op that needs a device value on the host, outside the model.
    from torch.overrides import TorchFunctionMode

    from onerec_dist.decoding import beam_search

    sync_ops = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu",
                "unique", "masked_select"}
    model, _, _, _, codes, prompts = world()
    dec = decoder(6, 4)
    state = {"loop": False, "model": False, "syncs": [], "loops_run": 0}

    class SyncRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            boolean_index = name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
            if state["loop"] and not state["model"] and (name in sync_ops or boolean_index):
                state["syncs"].append(name)
            return func(*args, **(kwargs or {}))

    def flagged(fn, key):
        def wrapper(*args, **kwargs):
            state[key] = True
            state["loops_run"] += key == "loop"
            try:
                return fn(*args, **kwargs)
            finally:
                state[key] = False
        return wrapper

    body = model.get_decoder()
    monkeypatch.setattr(model, "get_decoder", lambda: flagged(body, "model"))
    monkeypatch.setattr(dec, "_search", flagged(dec._search, "loop"))
    monkeypatch.setattr(beam_search, "stochastic_beam_search", flagged(beam_search.stochastic_beam_search, "loop"))
    allowed = AllowedPrefixes.from_lists(random_prefix_sets(len(prompts), 2, seed=0))
    with SyncRecorder():
        dec.decode(prompts, allowed_prefixes=allowed, exclude=[[0], [], [1], [2]])
        dec.decode_prefixes(prompts, 2, allowed_prefixes=allowed)
        dec.sample(prompts, 5, generator=torch.Generator().manual_seed(0), allowed_prefixes=allowed)
    assert state["syncs"] == [] and state["loops_run"] == 3
    with SyncRecorder():  # the recorder does see syncs inside the loop
        state["loop"] = True
        codes.nonzero()
        state["loop"] = False
    assert state["syncs"] == ["nonzero"]


MODE_SWITCHES = [dict(prefill="once"), dict(prefill="per_beam"), dict(code_logits="full"), dict(step_impl="naive"),
                 dict(step_impl="triton")]  # triton: the fused kernel (interpreted on CPU, conftest)


@pytest.mark.parametrize("switch", MODE_SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_switches_return_the_default_result_in_every_mode(switch):
    # The speed switches change how the modes compute, never what they return (as for decode in test_decoding.py);
    # sampling draws the same noise for the same seed, so it must return the same items too.
    _, _, _, _, codes, prompts = world()
    allowed = AllowedPrefixes.from_lists(random_prefix_sets(len(prompts), 1, seed=1))
    start = codes[:len(prompts), :1]
    results = []
    for kwargs in ({}, switch):
        dec = decoder(6, 4, normalization="valid", **kwargs)
        seed = torch.Generator().manual_seed(3)
        results.append([dec.decode(prompts, allowed_prefixes=allowed), dec.decode_prefixes(prompts, 2),
                        dec.sample(prompts, 5, temperature=0.7, generator=seed, start_codes=start),
                        dec.score_items(prompts, items=torch.arange(8).expand(len(prompts), -1))])
    for expected, got in zip(*results):
        for name in ("items", "prefixes", "codes"):
            if hasattr(expected, name):
                assert torch.equal(getattr(got, name), getattr(expected, name)), name
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=1e-6)
    sampled = results[0][2]
    assert torch.equal(sampled.codes[:, :, 0], start.expand(-1, 5)) and bool((sampled.items >= 0).all())
