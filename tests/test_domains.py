"""Domains (OneReason's specialise-then-unify, issue 14 part 1): synthetic domains as data, prompts that name the
domain, decoding inside the domain's catalogue, per-domain metrics and ``rl.domain``. All single-process, seconds."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from onerec_dist.data.config import SyntheticConfig, SyntheticDomainConfig
from onerec_dist.data.domains import check_domains, domain_name_by_user, has_domains, user_domain_indices
from onerec_dist.data.synthetic import build_world, generate_synthetic, simulate_users
from onerec_dist.data.synthetic_domains import build_domains, domain_configs, split_sizes
from onerec_dist.data.types import InteractionData

SMALL = dict(num_users=40, num_items=80, min_seq_len=6, max_seq_len=10)  # 2 domains x 40 items x 20 users


def fingerprint(data: InteractionData) -> str:
    """sha256 of everything a dataset holds (catalogue columns, sequences, personas), canonical JSON."""
    cat = data.catalogue
    body = {"ids": cat.item_ids, "titles": cat.titles, "descriptions": cat.descriptions, "brands": cat.brands,
            "categories": cat.categories, "sequences": data.sequences, "personas": data.personas}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- 1. synthetic domains


# Fingerprints of the generator's output BEFORE domains existed (commit 85ceb4e, onerec_dist/data/synthetic.py at that
# commit run on the default SyntheticConfig and on mode=reasoning): num_domains=1 must reproduce them byte for byte.
BEFORE_DOMAINS = {"default": "f3e60fd626cad913053b3d845d9478ba2837e407c8331eca91d224456aeb0ecc",
                  "reasoning": "d242b01035e6f3e66e9fe87c3b432ed0320a85daf84a2ffcfbe480f8a2eb7448"}


@pytest.mark.parametrize("mode", ["default", "reasoning"])
def test_one_domain_is_the_dataset_of_before(mode):
    data = generate_synthetic(SyntheticConfig(mode=mode))
    assert fingerprint(data) == BEFORE_DOMAINS[mode]
    assert data.domain_names == [] and data.item_domains is None and data.user_domains == {}
    assert not has_domains(data) and user_domain_indices(data, ["u0"]) is None and domain_name_by_user(data) is None


def test_two_domains_are_separate_worlds_in_one_catalogue():
    cfg = SyntheticConfig(num_domains=2, **SMALL)
    data = generate_synthetic(cfg)
    check_domains(data)
    assert data.domain_names == ["Shop A", "Shop B"]
    assert data.item_domains.tolist() == [0] * 40 + [1] * 40  # items end to end, 80 // 2 each
    assert data.catalogue.item_ids == [str(i) for i in range(80)] and len(data.sequences) == 40
    assert [data.user_domains[f"u{i}"] for i in range(40)] == [0] * 20 + [1] * 20
    for user, items in data.sequences.items():  # every user shops in its own domain only
        assert set(data.item_domains[items].tolist()) == {data.user_domains[user]}
    # Each domain its own names: top categories (Audio..Photo Printing vs Fitness..Music) and brands are disjoint.
    tops = [{data.catalogue.categories[i][0] for i in range(80) if data.item_domains[i] == d} for d in (0, 1)]
    brands = [{data.catalogue.brands[i] for i in range(80) if data.item_domains[i] == d} for d in (0, 1)]
    assert tops[0] == {"Audio", "Cameras", "Kitchen", "Outdoor", "Photo Printing"}
    assert tops[1] == {"Fitness", "Gaming", "Home Office", "Garden", "Music"}
    assert not brands[0] & brands[1] and len(set(data.catalogue.titles)) == 80
    # Domain d is steps 1-10 of its own single-domain config: its slice equals that world, shifted by its first row.
    (name, single), _ = domain_configs(cfg)
    world = build_world(single)
    assert data.catalogue.titles[:40] == world.catalogue.titles and name == "Shop A"
    trace = simulate_users(world, single)
    assert data.sequences["u0"] == trace.items[0, :trace.lengths[0]].tolist()
    assert fingerprint(generate_synthetic(cfg)) == fingerprint(data)  # deterministic
    assert fingerprint(generate_synthetic(SyntheticConfig(num_domains=2, seed=1, **SMALL))) != fingerprint(data)


def test_domain_dynamics_spread_and_overrides():
    # Default spread, x = d / (D - 1): complement p(1 - x/2), drift min(1, q(1 + x)), rule r(1 - x/2).
    cfg = SyntheticConfig(num_domains=3, num_items=90, num_users=30, complement_prob=0.6, drift_prob=0.6,
                          rule_prob=0.8)
    singles = [c for _, c in domain_configs(cfg)]
    assert [c.complement_prob for c in singles] == pytest.approx([0.6, 0.45, 0.3])
    assert [c.drift_prob for c in singles] == pytest.approx([0.6, 0.9, 1.0])  # 1.2 capped at 1
    assert [c.rule_prob for c in singles] == pytest.approx([0.8, 0.6, 0.4])
    assert [c.num_items for c in singles] == [30] * 3 and len({c.seed for c in singles}) == 3
    assert split_sizes(7, 3) == [3, 2, 2]
    # Overrides: p = 1 makes every step a complement; p = 0 leaves only the fallback of step 8c (a subcategory
    # holding only the previous item), so domain B's complement share is far below domain A's 100 %.
    # 200 items per domain (10 per subcategory) make that fallback rare.
    cfg = SyntheticConfig(num_domains=2, domains=[{"name": "Always", "complement_prob": 1.0, "drift_prob": 0.0},
                                                  {"name": "Never", "complement_prob": 0.0}],
                          **{**SMALL, "num_items": 400})
    a, b = build_domains(cfg)
    assert (a.name, b.name) == ("Always", "Never") and b.cfg.drift_prob == pytest.approx(0.3)  # spread: 0.15 * 2
    steps = [(d.trace.items[:, 1:] >= 0) for d in (a, b)]
    share = [d.trace.via_complement[:, 1:][s].mean() for d, s in zip((a, b), steps)]
    assert share[0] == 1.0 and share[1] < 0.05


def test_bad_domain_settings_name_the_field():
    with pytest.raises(ValueError, match="data.synthetic.num_domains"):
        SyntheticConfig(num_domains=0)
    with pytest.raises(ValueError, match=r"data.synthetic.domains: has 1 entries"):
        SyntheticConfig(num_domains=2, domains=[{}])
    with pytest.raises(ValueError, match=r"data.synthetic.domains\[1\].complement_prob"):
        SyntheticConfig(num_domains=2, domains=[{}, {"complement_prob": 1.5}])
    with pytest.raises(ValueError, match="names must be distinct"):
        SyntheticConfig(num_domains=2, domains=[SyntheticDomainConfig("A"), SyntheticDomainConfig("A")])
    with pytest.raises(ValueError, match=r"data.synthetic.num_items: 30 items over num_domains=2 .* >= 40"):
        generate_synthetic(SyntheticConfig(num_domains=2, num_items=30))  # 20 subcategories per domain
