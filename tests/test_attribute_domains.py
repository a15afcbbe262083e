"""Domains from an item attribute (onerec_dist/data/attribute_domains.py, issue 14 part 1): one read dataset split
by e.g. its level-1 category. Hand-worked tiny datasets through the real readers, the errors, and Scientific."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import shared_dataset

from onerec_dist.config import from_mapping
from onerec_dist.data.attribute_domains import majority_domain, split_by_attribute
from onerec_dist.data.config import DataConfig, DomainSplitConfig
from onerec_dist.data.domains import check_domains, user_domain_indices, user_domain_names
from onerec_dist.data.readers import DataError, read_letter
from onerec_dist.data.splits import load_dataset, make_splits, statistics
from onerec_dist.decoding.domains import DomainPrefixes
from onerec_dist.evaluation import most_popular
from onerec_dist.metrics import per_domain_report
from onerec_dist.prompts import next_item_question

# Items 0..7: their category path (level 1 is the domain value) and 2-level semantic ID. Item 6 has no level-1 value.
# a_0 is shared by A's items 0, 1 and B's item 3; a_1 by A's 2 and C's 7: first codes do not keep domains apart.
CATEGORIES = ["Root,A,x", "Root,A,y", "Root,A", "Root,B,z", "Root,B", "Root,C", "Root", "Root,C"]
SIDS = [(0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (3, 0), (3, 1), (1, 1)]
# Users' items in time order, with the domains' letters: u1 A A B A A, u2 B B A B B, u3 B B A A, u4 C C C none,
# u5 B A A B, u6 A A A.
SEQUENCES = {"u1": [0, 1, 3, 2, 0], "u2": [3, 4, 0, 3, 4], "u3": [3, 3, 0, 0], "u4": [5, 7, 5, 6],
             "u5": [3, 0, 0, 3], "u6": [1, 2, 1]}
# Interactions per value: A = u1 4 + u2 1 + u3 2 + u5 2 + u6 3 = 12; B = 1 + 4 + 2 + 2 = 9; C = 3 (u4); none = 1.


def toy_dir(tmp_path, categories=CATEGORIES, sequences=SEQUENCES):
    items = {str(i): {"title": f"t{i}", "description": "d", "brand": f"brand{i % 2}", "categories": cats}
             for i, cats in enumerate(categories)}
    index = {str(i): [f"<a_{a}>", f"<b_{b}>"] for i, (a, b) in enumerate(SIDS)}
    for name, body in (("inter", sequences), ("item", items), ("index", index)):
        (tmp_path / f"Toy.{name}.json").write_text(json.dumps(body))
    return tmp_path


def cfg(path, data: dict | None = None, **split) -> DataConfig:
    body = {"format": "letter", "name": "Toy", "dir": str(path), **(data or {})}
    if split:
        body["domain_split"] = split
    return from_mapping(DataConfig, body, "data")


def interactions(data) -> int:
    return sum(len(s) for s in data.sequences.values())


def test_majority_domain_ties_go_to_the_latest():
    assert majority_domain([0, 0, 1]) == 0
    assert majority_domain([1, 1, 0, 0]) == 0  # 2 each: the latest interaction is in 0
    assert majority_domain([1, 0, 0, 1]) == 1  # 2 each: latest in 1 (not the first-ranked domain 0)
    assert majority_domain([2, 1, 0]) == 0


def test_merge_hand_worked(tmp_path):
    data = load_dataset(cfg(toy_dir(tmp_path), attribute="categories", level=1, max_domains=2))
    check_domains(data)
    # Ranked A (12) > B (9) > C (3); max_domains=2 keeps A, B; C and the value-less item 6 merge into "Other".
    assert data.domain_names == ["A", "B", "Other"]
    assert data.item_domains.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert len(data.catalogue) == 8 and data.catalogue.semantic_ids.tolist() == [list(s) for s in SIDS]
    # u1 A 4 : B 1 -> A; u2 B 4 : A 1 -> B; u3 B B A A tie, latest A -> A; u4 all Other; u5 B A A B tie, latest B.
    assert data.user_domains == {"u1": 0, "u2": 1, "u3": 0, "u4": 2, "u5": 1, "u6": 0}
    assert data.sequences == {"u1": [0, 1, 2, 0], "u2": [3, 4, 3, 4], "u3": [0, 0], "u4": [5, 7, 5, 6],
                              "u5": [3, 3], "u6": [1, 2, 1]}
    # Outside the user's domain: u1 1 + u2 1 + u3 2 + u5 2 = 6 interactions, 25 read = 19 kept + 6.
    assert data.report.counts == {"interaction outside the user's domain (interaction dropped: data.domain_split)": 6}
    assert interactions(data) == 19
    # u3 and u5 keep 2 < min_seq_len=3 items: on_short_user=drop drops them in make_splits (counted there).
    config = cfg(tmp_path, attribute="categories", level=1, max_domains=2)
    splits = make_splits(data, config)
    assert sorted(data.sequences) == ["u1", "u2", "u4", "u6"]
    assert data.report.counts["user with fewer than 3 interactions (user dropped)"] == 2
    stats = statistics(data, splits)
    assert stats["domains"] == {"A": {"users": 2, "items": 3}, "B": {"users": 1, "items": 2},
                                "Other": {"users": 1, "items": 3}}
    strict = cfg(tmp_path, {"on_short_user": "error"}, attribute="categories", level=1, max_domains=2)
    with pytest.raises(DataError, match="2 users have fewer than data.min_seq_len=3 interactions, e.g. user 'u3'"):
        make_splits(load_dataset(strict), strict)


def test_three_domains_keep_c(tmp_path):
    data = load_dataset(cfg(toy_dir(tmp_path), attribute="categories", level=1, max_domains=3))
    # A, B, C kept; only item 6 (no level-1 value) is "Other", a domain without users (u4: C 3 : Other 1 -> C).
    assert data.domain_names == ["A", "B", "C", "Other"]
    assert data.item_domains.tolist() == [0, 0, 0, 1, 1, 2, 3, 2]
    assert data.user_domains["u4"] == 2 and data.sequences["u4"] == [5, 7, 5]
    assert data.report.counts["interaction outside the user's domain (interaction dropped: data.domain_split)"] == 7


def test_drop_hand_worked(tmp_path):
    data = load_dataset(cfg(toy_dir(tmp_path), attribute="categories", level=1, max_domains=2, other="drop"))
    check_domains(data)
    # Items 5, 6, 7 leave the catalogue; the rest keep their external ids and semantic IDs (rows 0..4 unchanged).
    assert data.domain_names == ["A", "B"] and data.item_domains.tolist() == [0, 0, 0, 1, 1]
    assert data.catalogue.item_ids == ["0", "1", "2", "3", "4"] and data.catalogue.index_of("7") is None
    assert data.catalogue.semantic_ids.tolist() == [list(s) for s in SIDS[:5]]
    # u4's 4 interactions were all with dropped items: u4 goes, counted; the others as with merge.
    assert "u4" not in data.sequences and "u4" not in data.user_domains
    assert data.report.counts == {
        "item whose categories level 1 value is none of the 2 domains (item dropped: data.domain_split.other=drop)": 3,
        "interaction with a dropped item (data.domain_split.other=drop)": 4,
        "user whose every interaction was with a dropped item (user dropped)": 1,
        "interaction outside the user's domain (interaction dropped: data.domain_split)": 6}
    assert interactions(data) == 25 - 4 - 6


def test_remapped_rows_after_drop(tmp_path):
    # C is the largest value here (u4 x3 + u7 x3 = 6 > A's 5), so with other=drop the kept items are not a prefix
    # of the catalogue: C's items 5, 7 become rows 3, 4 (A's 0, 1, 2 stay 0, 1, 2; B's 3, 4 and item 6 go).
    sequences = {"u4": [5, 7, 5], "u7": [7, 7, 5, 2], "u6": [1, 2, 1, 0]}
    data = load_dataset(cfg(toy_dir(tmp_path, sequences=sequences), attribute="categories", level=1, max_domains=2,
                            other="drop"))
    assert data.domain_names == ["C", "A"] and data.catalogue.item_ids == ["0", "1", "2", "5", "7"]
    assert data.item_domains.tolist() == [1, 1, 1, 0, 0]
    assert data.catalogue.semantic_ids.tolist() == [[0, 0], [0, 1], [1, 0], [3, 0], [1, 1]]
    assert data.sequences == {"u4": [3, 4, 3], "u7": [4, 4, 3], "u6": [1, 2, 1, 0]}  # u7's A item 2 dropped


def test_brand_attribute(tmp_path):
    # brand0: items 0, 2, 4, 6; brand1: 1, 3, 5, 7. Interactions: brand0 u1 3 + u2 3 + u3 2 + u4 1 + u5 2 + u6 1
    # = 12, brand1 25 - 12 = 13, so brand1 ranks first. u1 0 1 3 2 0 -> brand0 3 : 2 -> brand0, items [0, 2, 0].
    data = load_dataset(cfg(toy_dir(tmp_path), attribute="brand"))
    assert data.domain_names == ["brand1", "brand0"] and data.item_domains.tolist() == [1, 0] * 4
    assert data.user_domains["u1"] == 1 and data.sequences["u1"] == [0, 2, 0]
    with pytest.raises(ValueError, match=r"data.domain_split.level=1: .* allowed values: 0 \.\. 0"):
        load_dataset(cfg(tmp_path, attribute="brand", level=1))


def test_off_by_default_is_the_data_as_read(tmp_path):
    path = toy_dir(tmp_path)
    assert DataConfig().domain_split == DomainSplitConfig() and DomainSplitConfig().attribute is None
    read, loaded = read_letter(cfg(path)), load_dataset(cfg(path))
    assert loaded.sequences == read.sequences == SEQUENCES
    assert loaded.catalogue.item_ids == read.catalogue.item_ids
    assert loaded.catalogue.categories == read.catalogue.categories
    assert np.array_equal(loaded.catalogue.semantic_ids, read.catalogue.semantic_ids)
    assert loaded.report.counts == read.report.counts == {}
    assert loaded.domain_names == [] and loaded.item_domains is None and loaded.user_domains == {}


def test_given_splits_are_restricted_too(tmp_path):
    # MiniOneRec layout: u1's rows give the sequence [0, 1, 3, 2] (A 3 : B 1 -> A).
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "Toy.item.json").write_text(json.dumps(
        {str(i): {"title": f"t{i}", "categories": c} for i, c in enumerate(CATEGORIES)}))
    rows = {"train": ['u1,"[3]",0\n', 'u2,"[3, 4]",0\n'], "valid": ['u1,"[0, 1]",3\n', 'u2,"[3, 0]",4\n'],
            "test": ['u1,"[0, 1, 3]",2\n', 'u2,"[3, 0, 4]",3\n']}
    for split, lines in rows.items():
        (tmp_path / split).mkdir()
        (tmp_path / split / "Toy.csv").write_text("user_id,history_item_id,item_id\n" + "".join(lines))
    body = {"format": "minionerec", "name": "Toy", "dir": str(tmp_path), "split": "given",
            "domain_split": {"attribute": "categories", "level": 1, "max_domains": 2}}
    data = load_dataset(from_mapping(DataConfig, body, "data"))
    check_domains(data)
    # u2's longest sequence [3, 0, 4, 3]: B 3 : A 1 -> B. Examples kept with their history inside the domain:
    # u1 train [3] -> 0: history empties (dropped); u1 valid target 3 is B (dropped); u1 test [0, 1] -> 2;
    # u2 train target 0 is A (dropped); u2 valid [3] -> 4 (item 0 dropped); u2 test [3, 4] -> 3 (item 0 dropped).
    assert data.domain_names == ["A", "B", "Other"] and data.user_domains == {"u1": 0, "u2": 1}
    given = {k: list(zip(v.users, v.histories, v.targets)) for k, v in data.given_splits.items()}
    assert given == {"train": [], "valid": [("u2", [3], 4)], "test": [("u1", [0, 1], 2), ("u2", [3, 4], 3)]}
    counts = data.report.counts
    assert counts["given-split example whose target is outside the user's domain (example dropped: "
                  "data.domain_split)"] == 2
    assert counts["given-split example with no history left in the user's domain (example dropped)"] == 1
    # One history item each from u1 train, u1 test, u2 valid, u2 test.
    assert counts["given-split history item outside the user's domain (dropped: data.domain_split)"] == 4


def test_errors_name_the_field(tmp_path):
    path = toy_dir(tmp_path)
    with pytest.raises(ValueError, match=r"data.domain_split.attribute='color'.*attributes they have: categories, "
                                         "brand"):
        load_dataset(cfg(path, attribute="color"))
    with pytest.raises(ValueError, match="data.domain_split.max_domains: must be >= 2"):
        cfg(path, attribute="categories", max_domains=1)
    with pytest.raises(ValueError, match=r"data.domain_split.other='keep' is not allowed; allowed values: 'merge'"):
        cfg(path, attribute="categories", other="keep")
    with pytest.raises(ValueError, match=r"data.domain_split.level=3: .* allowed values: 0 \.\. 2"):
        load_dataset(cfg(path, attribute="categories", level=3))
    # Level 0 is 'Root' for every item: one domain only.
    with pytest.raises(ValueError, match=r"gives 1 domain\(s\) with users \(Root"):
        load_dataset(cfg(path, attribute="categories", level=0))
    with pytest.raises(ValueError, match="data.domain_split.other_name='A' is also a kept categories value"):
        load_dataset(cfg(path, attribute="categories", level=1, other_name="A"))
    with pytest.raises(ValueError, match="data.domain_split.attribute: must be null with data.synthetic.num_domains=2"):
        from_mapping(DataConfig, {"synthetic": {"num_domains": 2}, "domain_split": {"attribute": "categories"}}, "data")
    # A catalogue with ids only (Beauty) has no attribute.
    (tmp_path / "ids").mkdir()
    (tmp_path / "ids" / "Toy.inter.json").write_text(json.dumps(SEQUENCES))
    with pytest.raises(ValueError, match=r"attributes they have: none \(the catalogue has ids only\)"):
        load_dataset(cfg(tmp_path / "ids", attribute="categories"))
    data = load_dataset(cfg(path, attribute="categories", level=1))
    with pytest.raises(ValueError, match="already has domains"):
        split_by_attribute(data, DomainSplitConfig(attribute="categories", level=1))


def test_prompts_decoding_and_metrics_read_the_split(tmp_path):
    """What eval does with the fields (stages/eval.py), in-process: prompts name the domain, domain prefixes keep each
    user in its catalogue, popularity stays in the domain, metrics come per domain."""
    config = cfg(toy_dir(tmp_path), attribute="categories", level=1, max_domains=2)
    data = load_dataset(config)
    test = make_splits(data, config)["test"]  # users u1, u2, u4, u6
    names = user_domain_names(data, test.users)
    assert names == ["A", "B", "Other", "A"]
    codes = data.catalogue.semantic_ids
    assert next_item_question([codes[i] for i in test.histories[0]], names[0]).startswith("Domain: A.\n")
    # a_0 is in A and B, so 1-level prefixes are not pure; the full 2 levels are.
    prefixes = DomainPrefixes.build(codes, data.item_domains, len(data.domain_names))
    assert prefixes.num_levels == 2
    assert prefixes.prefixes[0].tolist() == [[0, 0], [0, 1], [1, 0]]  # A's items 0, 1, 2
    domains = user_domain_indices(data, test.users)
    counts = Counter(i for s in data.sequences.values() for i in s)
    top = most_popular(counts, len(data.catalogue), 2, len(test), data.item_domains, domains)
    for row, d in zip(top.tolist(), domains.tolist()):
        assert all(data.item_domains[i] == d for i in row if i >= 0)
    report = per_domain_report(top, test.targets, domains, data.domain_names, len(data.catalogue), ks=(1,),
                               ndcg_ks=(1,))
    assert {k: v["users"] for k, v in report.items()} == {"A": 2, "B": 1, "Other": 1}


def test_scientific_level_one_categories():
    path = shared_dataset("scientific")
    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config

    config = data_config(compose(["experiment=scientific_domains", f"data.dir={path}"]))
    read = read_letter(config)  # the hook itself is covered above; here the split of the data as read
    read_interactions, read_users = interactions(read), len(read.sequences)
    data = split_by_attribute(read, config.domain_split)
    check_domains(data)
    assert len(data.domain_names) == config.domain_split.max_domains == 4
    for user, seq in data.sequences.items():  # every user in one domain, every kept interaction inside it
        assert {int(data.item_domains[i]) for i in seq} == {data.user_domains[user]}
    # Nothing lost silently: read = kept + dropped with dropped items + dropped outside the user's domain.
    counts = data.report.counts
    dropped = (counts["interaction with a dropped item (data.domain_split.other=drop)"]
               + counts["interaction outside the user's domain (interaction dropped: data.domain_split)"])
    assert read_interactions == interactions(data) + dropped
    assert read_users == len(data.sequences) + counts[
        "user whose every interaction was with a dropped item (user dropped)"]
    level1 = {cats[1] for cats in data.catalogue.categories}
    assert level1 == set(data.domain_names)
    make_splits(data, config)
    users = Counter(data.user_domains[u] for u in data.sequences)
    assert min(users.values()) >= 500, users  # the experiment's promise: >= 500 test users per domain
    prefixes = DomainPrefixes.build(data.catalogue.semantic_ids, data.item_domains, len(data.domain_names))
    assert sum(p.shape[0] for p in prefixes.prefixes) == len(data.catalogue)  # full IDs unique: one prefix per item
