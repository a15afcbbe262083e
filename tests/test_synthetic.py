"""Synthetic dataset: determinism, sizes, and each step of the generative process in onerec_dist/data/synthetic.py.

Notation as in the module docstring: p = complement_prob, C(a) = the complements of item a, K interests per user.
Statistical checks use a fixed seed (deterministic) and a 4-sigma band around the exact expectation, so a correct
generator passes with margin and a wrong mechanism (no complements, no brand affinity, no exclusion) fails.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.synthetic import (BRAND_AFFINITY, NUM_COMPLEMENTS, ZIPF_EXPONENT, build_world,
                                        generate_synthetic, majority_subcategory, simulate_users, write_personas)


def steps(trace):
    """Every step t >= 1 inside a sequence: user [M], t [M], previous item a [M], item b [M]."""
    users, t = np.nonzero(trace.items[:, 1:] >= 0)
    t = t + 1
    return users, t, trace.items[users, t - 1], trace.items[users, t]


def complement_matrix(world):
    n = len(world.item_sub)
    matrix = np.zeros((n, n), dtype=bool)  # [N, N] matrix[a, b]: b in C(a)
    for a in range(n):
        matrix[a, world.complements[a, :world.num_complements[a]]] = True
    return matrix


def interest_draws(world, trace, users, t, prev):
    """The interest draw of step t, worked out from the docstring's steps 7 and 8c independently of the sampler:
    an interest k is chosen with 1/K; within its subcategory w_i = popularity_i * (BRAND_AFFINITY if brand_i is
    the user's preferred brand else 1), w_prev = 0, normalised. Returns items [M, K, J] (J = largest subcategory,
    padding points at item 0 with probability 0), P(item) [M, K, J] (1/K included), and [M] the share of
    interests whose subcategory holds only prev (the draw then falls back to a complement)."""
    k = trace.interests.shape[2]
    largest = max(len(items) for items in world.items_of_sub)
    table = np.full((len(world.items_of_sub), largest), -1)
    for s, items in enumerate(world.items_of_sub):
        table[s, :len(items)] = items
    items = table[trace.interests[users, t]]  # [M, K, J]
    valid = items >= 0
    items = np.maximum(items, 0)
    w = world.popularity[items] * valid * np.where(
        world.item_brand[items] == trace.brand[users][:, None, None], BRAND_AFFINITY, 1.0)
    if prev is not None:
        w = w * (items != prev[:, None, None])
    total = w.sum(axis=2, keepdims=True)
    probs = np.divide(w, total, out=np.zeros_like(w), where=total > 0) / k
    return items, probs, (total[..., 0] == 0).mean(axis=1)


# ---------------------------------------------------------------- determinism, sizes, catalogue


def test_same_seed_same_data_other_seed_differs():
    a, b, c = (generate_synthetic(SyntheticConfig(seed=s)) for s in (0, 0, 1))
    assert a.sequences == b.sequences and a.personas == b.personas
    for field in ("item_ids", "titles", "descriptions", "brands", "categories"):
        assert getattr(a.catalogue, field) == getattr(b.catalogue, field)
    assert a.sequences != c.sequences and a.personas != c.personas and a.catalogue.titles != c.catalogue.titles


def test_sizes_bounds_and_catalogue():
    cfg = SyntheticConfig()  # 600 users, 300 items, 5 tops x 4 subcategories, lengths 6..16
    data, world = generate_synthetic(cfg, name="toy"), build_world(cfg)
    cat = data.catalogue
    assert data.name == "toy" and len(cat) == 300 and cat.item_ids == [str(i) for i in range(300)]
    assert cat.semantic_ids is None and len(set(cat.titles)) == 300
    assert len(data.sequences) == 600 and data.personas.keys() == data.sequences.keys()
    lengths = [len(s) for s in data.sequences.values()]
    # 600 draws of U{6..16}: P(an end value never drawn) <= 2 * (10/11)^600 ~ 1e-25, so both ends show up.
    assert min(lengths) == 6 and max(lengths) == 16
    assert all(0 <= i < 300 for s in data.sequences.values() for i in s)
    assert all(x != y for s in data.sequences.values() for x, y in zip(s, s[1:])), "an item followed itself"
    assert len(world.top_names) == 5 and len(world.sub_names) == 20 and len(set(world.sub_names)) == 20
    assert len(world.brand_names) == len(set(world.brand_names)) == 5 * 4
    for i in range(300):
        sub = world.item_sub[i]
        top = world.top_names[world.sub_top[sub]]
        assert cat.categories[i] == [top, world.sub_names[sub]]
        assert cat.brands[i] in world.brand_names[world.sub_top[sub] * 4:(world.sub_top[sub] + 1) * 4]
        assert cat.titles[i].startswith(cat.brands[i] + " ") and world.sub_nouns[sub] in cat.titles[i]
        assert world.sub_names[sub].lower() in cat.descriptions[i]
        assert world.sub_nouns[sub].lower() in cat.descriptions[i]
        assert cat.descriptions[i].count(". ") == 1 and cat.descriptions[i].endswith(".")  # two sentences


def test_names_repeat_with_suffixes_past_the_lists():
    # 12 tops > 10 names, 7 subcategories > 6 per name list: 84 distinct subcategories, "Audio 2", "Headphones II".
    world = build_world(SyntheticConfig(num_top_categories=12, subcategories_per_top=7, num_items=100))
    assert len(world.sub_names) == len(set(world.sub_names)) == 84
    assert world.top_names[10] == "Audio 2" and world.sub_names[6] == "Headphones II"
    assert world.sub_names[10 * 7] == "Headphones 2"


def test_sizes_that_cannot_work_are_rejected():
    with pytest.raises(ValueError, match="data.synthetic.num_items: must be >= .* = 20"):
        build_world(SyntheticConfig(num_items=19))
    with pytest.raises(ValueError, match="data.synthetic.interests_per_user: must be <= .* 4"):
        generate_synthetic(SyntheticConfig(num_top_categories=1, interests_per_user=5))
    with pytest.raises(ValueError, match="data.synthetic.brands_per_top: must be >= 1"):
        build_world(SyntheticConfig(brands_per_top=0))


# ---------------------------------------------------------------- world: relations, popularity, complements


def test_related_subcategories():
    world = build_world(SyntheticConfig())
    name = {n: s for s, n in enumerate(world.sub_names)}
    for s, related in enumerate(world.related):
        siblings = set(np.flatnonzero(world.sub_top == world.sub_top[s]).tolist()) - {s}
        assert siblings <= set(related.tolist()) and s not in related
        assert any(world.sub_top[r] != world.sub_top[s] for r in related), "no cross-top partner"
        assert all(s in world.related[r] for r in related), "relation not symmetric"
    # The hand-picked pair of the brief: Cameras/Lenses <-> Photo Printing/Photo Printers.
    assert name["Photo Printers"] in world.related[name["Lenses"]]


def test_popularity_is_zipf_within_each_subcategory():
    world = build_world(SyntheticConfig())
    for items in world.items_of_sub:
        # ranks r = 1..n get 1/r^s / H, H = sum_r 1/r^s; e.g. n = 3, s = 1: 6/11, 3/11, 2/11.
        ranks = np.arange(1, len(items) + 1) ** -ZIPF_EXPONENT
        np.testing.assert_allclose(np.sort(world.popularity[items])[::-1], ranks / ranks.sum())


def test_complements_are_distinct_nearby_items():
    world = build_world(SyntheticConfig())
    # Default world: every subcategory has >= 2 items and 4+ related ones, so every item has NUM_COMPLEMENTS.
    assert (world.num_complements == NUM_COMPLEMENTS).all()
    for a in range(len(world.item_sub)):
        comps = world.complements[a, :world.num_complements[a]]
        assert len(set(comps.tolist())) == len(comps) and a not in comps
        near = {world.item_sub[a], *world.related[world.item_sub[a]].tolist()}
        assert {world.item_sub[c] for c in comps} <= near
    assert world.is_complement(np.array([0, 0]), np.array([world.complements[0, 0], 0])).tolist() == [True, False]


# ---------------------------------------------------------------- users: the next-item signal


def test_complement_prob_one_makes_every_step_a_complement():
    cfg = SyntheticConfig(complement_prob=1.0, drift_prob=0.0)
    world, trace = build_world(cfg), simulate_users(build_world(cfg), cfg)
    _, _, a, b = steps(trace)
    assert len(a) > 0 and world.is_complement(a, b).all()
    users, t = np.nonzero(trace.items[:, 1:] >= 0)
    assert trace.via_complement[users, t + 1].all() and not trace.via_complement[:, 0].any()


@pytest.mark.parametrize("p", [0.0, 0.6])
def test_complement_rate_matches_the_process(p):
    # Given the state before step t (a, interests, brand), item b is a complement of a with probability
    #   pi_t = p + (1 - p) * q_t,   q_t = sum_{c in C(a)} P(interest draw = c) + P(interest subcategory == {a}).
    # The sum over steps of [b in C(a)] - pi_t is a martingale: its sd is sqrt(sum pi_t (1 - pi_t)).
    cfg = SyntheticConfig(complement_prob=p)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    users, t, a, b = steps(trace)
    items, probs, only_prev = interest_draws(world, trace, users, t, a)
    q = (probs * complement_matrix(world)[a[:, None, None], items]).sum(axis=(1, 2)) + only_prev
    pi = p + (1 - p) * q
    hits = world.is_complement(a, b).sum()
    assert abs(hits - pi.sum()) < 4 * np.sqrt((pi * (1 - pi)).sum()), (hits, pi.sum())
    # The complement branch itself is taken with probability p (no subcategory of this world holds one item).
    assert only_prev.max() == 0
    taken, n = trace.via_complement[users, t].sum(), len(t)
    assert abs(taken - p * n) <= 4 * np.sqrt(n * p * (1 - p)), (taken, p * n)
    # And the signal is real: the base rate q is far below the complement rate at p = 0.6 (~0.1 vs ~0.64).
    assert q.mean() < 0.2 and (p == 0 or hits / n > 0.6)


def test_interest_draws_follow_popularity_and_brand():
    # With p = 0 every item is an interest draw: expected count of item i = sum over draws of P(i | state).
    # Pearson's X^2 of a sum of independent categorical draws is stochastically below chi2(df), so its 1e-6
    # upper quantile is a safe bound (Wilson-Hilferty: df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3, z = 4.75,
    # ~ 424 for df = 300); without BRAND_AFFINITY or without popularity weights X^2 is in the thousands.
    cfg = SyntheticConfig(num_users=1500, complement_prob=0.0)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    users, t, a, b = steps(trace)
    n = len(world.item_sub)
    first_users = np.arange(cfg.num_users)
    first_items, first_probs, _ = interest_draws(world, trace, first_users, np.zeros_like(first_users), None)
    items, probs, _ = interest_draws(world, trace, users, t, a)
    expected = (np.bincount(first_items.ravel(), first_probs.ravel(), minlength=n)
                + np.bincount(items.ravel(), probs.ravel(), minlength=n))  # [N]
    observed = np.bincount(np.concatenate([trace.items[:, 0], b]), minlength=n)
    assert abs(expected.sum() - observed.sum()) < 1e-6 * observed.sum()  # every draw is an interest draw
    keep = expected >= 5
    x2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = keep.sum()
    assert x2 < df * (1 - 2 / (9 * df) + 4.75 * np.sqrt(2 / (9 * df))) ** 3, x2
    # Item counts barely see the brand affinity (preferred brands are spread evenly over a top's brands), so
    # check it per draw: P(draw has the user's brand) = sum of probs over the user's-brand items, ~0.24 here;
    # it is ~0.13 with BRAND_AFFINITY = 1. Sum of Bernoullis: 4-sigma band.
    pi = np.concatenate([
        (first_probs * (world.item_brand[first_items] == trace.brand[:, None, None])).sum(axis=(1, 2)),
        (probs * (world.item_brand[items] == trace.brand[users][:, None, None])).sum(axis=(1, 2))])
    brand_of_draw = np.concatenate([trace.brand, trace.brand[users]])
    hits = (world.item_brand[np.concatenate([trace.items[:, 0], b])] == brand_of_draw).sum()
    assert abs(hits - pi.sum()) < 4 * np.sqrt((pi * (1 - pi)).sum()), (hits, pi.sum())


# ---------------------------------------------------------------- users: interests, drift, personas


def test_without_drift_every_item_comes_from_an_interest_or_a_complement():
    cfg = SyntheticConfig(drift_prob=0.0)
    world = build_world(cfg)
    data, trace = generate_synthetic(cfg), simulate_users(world, cfg)
    assert data.sequences == {u: r[:n].tolist() for u, r, n in zip(trace.user_ids, trace.items, trace.lengths)}
    assert (trace.interests == trace.interests[:, :1]).all()  # interests never change
    for u, user in enumerate(trace.user_ids):
        seq, interests = data.sequences[user], set(trace.interests[u, 0].tolist())
        assert world.item_sub[seq[0]] in interests
        for a, b in zip(seq, seq[1:]):
            assert world.item_sub[b] in interests or world.is_complement([a], [b])[0]


@pytest.mark.parametrize("drift", [1.0, 0.15])
def test_drift_replaces_one_interest_by_a_related_one(drift):
    cfg = SyntheticConfig(drift_prob=drift)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    users, t, a, b = steps(trace)
    before, after = trace.interests[users, t - 1], trace.interests[users, t]  # [M, K]
    changed = before != after
    assert (changed.sum(axis=1) <= 1).all()
    rows, slots = np.nonzero(changed)
    assert all(after[m, k] in world.related[before[m, k]] for m, k in zip(rows, slots))
    assert all(len(set(row)) == cfg.interests_per_user for row in after.tolist())
    # A drift step is blocked only when every related subcategory is already an interest; here each has >= 4
    # related and K = 2, so it never is: P(change) = drift exactly.
    n = len(t)
    assert abs(len(rows) - drift * n) <= 4 * np.sqrt(n * drift * (1 - drift)) + 1e-9, (len(rows), drift * n)
    # Interest draws come from the interests in force at that step.
    drawn = ~trace.via_complement[users, t]
    assert (world.item_sub[b[drawn]][:, None] == after[drawn]).any(axis=1).all()


def test_personas_name_initial_interests_and_the_preferred_brand():
    cfg = SyntheticConfig(interests_per_user=3)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    personas = write_personas(world, trace, cfg)
    assert personas == generate_synthetic(cfg).personas
    for u, user in enumerate(trace.user_ids):
        text = personas[user]
        assert all(world.sub_names[s].lower() in text for s in trace.interests[u, 0])
        assert world.brand_names[trace.brand[u]] in text and len(text) < 160
        # The preferred brand belongs to the top category of the first interest.
        assert trace.brand[u] // cfg.brands_per_top == world.sub_top[trace.interests[u, 0, 0]]


# ---------------------------------------------------------------- any small config


@settings(max_examples=30, deadline=None)
@given(tops=st.integers(1, 3), subs=st.integers(1, 3), brands=st.integers(1, 3), extra_items=st.integers(0, 12),
       users=st.integers(1, 15), k=st.integers(1, 3), min_len=st.integers(3, 5), spread=st.integers(0, 4),
       p=st.sampled_from([0.0, 0.5, 1.0]), drift=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 10_000))
def test_invariants_hold_for_any_small_config(tops, subs, brands, extra_items, users, k, min_len, spread, p,
                                              drift, seed):
    num_subs = tops * subs
    cfg = SyntheticConfig(num_users=users, num_items=max(2, num_subs) + extra_items, num_top_categories=tops,
                          subcategories_per_top=subs, brands_per_top=brands, interests_per_user=min(k, num_subs),
                          min_seq_len=min_len, max_seq_len=min_len + spread, complement_prob=p,
                          drift_prob=drift, seed=seed)
    world = build_world(cfg)
    data, trace = generate_synthetic(cfg), simulate_users(world, cfg)
    assert len(set(data.catalogue.titles)) == cfg.num_items and len(data.sequences) == users
    assert (world.num_complements >= 1).all()
    for u, seq in enumerate(data.sequences.values()):
        assert min_len <= len(seq) <= min_len + spread and all(0 <= i < cfg.num_items for i in seq)
        for t in range(1, len(seq)):
            a, b = seq[t - 1], seq[t]
            assert a != b
            # Every step is explained: a complement of a, or an item of an interest in force at step t.
            assert world.is_complement([a], [b])[0] or world.item_sub[b] in trace.interests[u, t]


# ---------------------------------------------------------------- mode=reasoning (step 10)


def _digest(data):
    import hashlib
    import json

    cat = data.catalogue
    blob = json.dumps([data.sequences, data.personas, cat.titles, cat.descriptions, cat.brands, cat.categories],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_default_mode_is_unchanged_by_the_reasoning_mode():
    # Digests of the generator's output as it was before mode=reasoning existed (commit 7f39707, computed with
    # the same _digest): adding step 10 must not move a single draw of steps 1-9.
    assert _digest(generate_synthetic(SyntheticConfig())) == \
        "7a2fec412aa544466b0442a82db04b6dfabbe38daa9e8fe4648704fc4a434ce9"
    small = SyntheticConfig(num_users=50, num_items=80, num_top_categories=3, drift_prob=0.5, seed=7)
    assert _digest(generate_synthetic(small)) == "f86ab7970b675470d02b9625f691e14d1efe588844e1dc370f2d2b1986a1a9fd"
    trace = simulate_users(build_world(SyntheticConfig()), SyntheticConfig())
    assert trace.via_rule is None and trace.brand_by_top is None


def test_partner_is_the_hand_picked_cross_top_subcategory():
    world = build_world(SyntheticConfig())
    name = {n: s for s, n in enumerate(world.sub_names)}
    assert world.partner[name["Lenses"]] == name["Photo Printers"]
    assert world.partner[name["Espresso Machines"]] == name["Travel Mugs"]
    for s, p in enumerate(world.partner):
        assert world.sub_top[p] != world.sub_top[s] and p in world.related[s]


def test_majority_subcategory_counts_then_prefers_the_most_recent():
    item_sub = np.array([0, 1, 2, 0, 1])  # item -> subcategory
    window = np.array([[0, 1, 3, 2],   # subs 0 1 0 2: 0 twice -> 0
                       [0, 1, 2, 4],   # subs 0 1 2 1: 1 twice -> 1
                       [0, 1, 4, 3],   # subs 0 1 1 0: tie 0/1, 0 seen last -> 0
                       [2, 1, 0, 4]])  # subs 2 1 0 1: 1 twice -> 1
    assert majority_subcategory(item_sub, window).tolist() == [0, 1, 0, 1]
    assert majority_subcategory(item_sub, np.array([[0, 1, 2]])).tolist() == [2]  # all distinct: the last


def _rule_steps(world, cfg, trace):
    """Every step t >= W inside a sequence, with the rule's subcategory recomputed here by a plain Counter:
    users [M], t [M], partner of the majority [M]."""
    from collections import Counter

    users, ts, want = [], [], []
    for u in range(len(trace.user_ids)):
        seq = trace.items[u, :trace.lengths[u]].tolist()
        for t in range(cfg.rule_window, len(seq)):
            subs = [int(world.item_sub[i]) for i in seq[t - cfg.rule_window:t]]
            counts = Counter(subs)
            top = max(counts.values())
            majority = next(s for s in reversed(subs) if counts[s] == top)
            users.append(u), ts.append(t), want.append(world.partner[majority])
    return np.array(users), np.array(ts), np.array(want)


@pytest.mark.parametrize("rule_prob", [0.7, 0.3])
def test_reasoning_rule_holds_with_the_documented_probability(rule_prob):
    cfg = SyntheticConfig(mode="reasoning", rule_prob=rule_prob, num_users=1000)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    data = generate_synthetic(cfg)
    assert data.sequences == {u: r[:n].tolist() for u, r, n in zip(trace.user_ids, trace.items, trace.lengths)}
    users, t, want = _rule_steps(world, cfg, trace)
    fired = trace.via_rule[users, t]
    item_sub = world.item_sub[trace.items[users, t]]
    # Every rule step lands in partner(majority of the last W items), recomputed independently above.
    assert (item_sub[fired] == want[fired]).all()
    assert not trace.via_rule[:, :cfg.rule_window].any()
    # The rule fires with probability rule_prob exactly (every subcategory of this world holds >= 2 items, so the
    # "partner holds only item t-1" exception never applies): Binomial(n, p), 4-sigma band.
    n = len(t)
    assert abs(fired.sum() - rule_prob * n) < 4 * np.sqrt(n * rule_prob * (1 - rule_prob)), (fired.sum(), n)
    # Seen from the data alone: P(item in partner(majority)) = rule_prob + (1 - rule_prob) * q, with q the base rate
    # of the other steps (measured on the non-rule steps, ~0.1), so the rule's signal is plain in the sequences.
    q = (item_sub[~fired] == want[~fired]).mean()
    assert q < 0.2
    hits, expected = (item_sub == want).sum(), n * (rule_prob + (1 - rule_prob) * q)
    assert abs(hits - expected) < 4 * np.sqrt(n * 0.25), (hits, expected)


def test_reasoning_rule_prefers_the_users_brand_of_the_partners_top():
    # A rule draw from subcategory s for a user whose preferred brand there is b, skipping a = item t-1, picks item
    # i with w_i = popularity_i * (BRAND_AFFINITY if brand_i == b else 1), w_a = 0, normalised. The count of rule
    # items with brand b minus its expectation is a sum of independent centred Bernoullis: 4-sigma band.
    cfg = SyntheticConfig(mode="reasoning", num_users=1000)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    users, t = np.nonzero(trace.via_rule)
    items, prev = trace.items[users, t], trace.items[users, t - 1]
    pi = np.empty(len(t))
    for m, (u, i, a) in enumerate(zip(users, items, prev)):
        s = world.item_sub[i]
        candidates = world.items_of_sub[s][world.items_of_sub[s] != a]
        preferred = trace.brand_by_top[u, world.sub_top[s]]
        w = world.popularity[candidates] * np.where(world.item_brand[candidates] == preferred, BRAND_AFFINITY, 1.0)
        pi[m] = w[world.item_brand[candidates] == preferred].sum() / w.sum()
    hits = (world.item_brand[items] == trace.brand_by_top[users, world.sub_top[world.item_sub[items]]]).sum()
    assert abs(hits - pi.sum()) < 4 * np.sqrt((pi * (1 - pi)).sum()), (hits, pi.sum())
    assert pi.mean() > 0.4  # ~1/2 with 4 brands and affinity 3, against ~1/4 without it
    # The persona's brand is the preferred brand of interest 0's top.
    assert (trace.brand_by_top[np.arange(cfg.num_users), world.sub_top[trace.interests[:, 0, 0]]] == trace.brand).all()


def test_reasoning_mode_is_seeded_and_validated():
    cfg = SyntheticConfig(mode="reasoning", num_users=50)
    assert generate_synthetic(cfg).sequences == generate_synthetic(cfg).sequences
    assert generate_synthetic(cfg).sequences != generate_synthetic(SyntheticConfig(num_users=50)).sequences
    with pytest.raises(ValueError, match="data.synthetic.num_top_categories: must be >= 2 with mode=reasoning"):
        SyntheticConfig(mode="reasoning", num_top_categories=1)
    with pytest.raises(ValueError, match="data.synthetic.mode.*allowed values: 'default', 'reasoning'"):
        SyntheticConfig(mode="think")
    with pytest.raises(ValueError, match="data.synthetic.rule_prob"):
        SyntheticConfig(rule_prob=1.5)
