"""Domains (OneReason's specialise-then-unify, issue 14 part 1): synthetic domains as data, prompts that name the
domain, decoding inside the domain's catalogue, per-domain metrics and ``rl.domain``. All single-process, seconds."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest
import torch

from onerec_dist.data.config import SyntheticConfig, SyntheticDomainConfig
from onerec_dist.data.domains import (check_domains, domain_name_by_user, examples_of_domain, has_domains,
                                      user_domain_indices)
from onerec_dist.data.splits import leave_one_out
from onerec_dist.data.synthetic import build_world, generate_synthetic, simulate_users
from onerec_dist.data.synthetic_domains import build_domains, domain_configs, split_sizes
from onerec_dist.data.types import Catalogue, Examples, InteractionData
from onerec_dist.decoding.domains import DomainPrefixes, domain_restriction, pure_prefix_levels
from onerec_dist.metrics import per_domain_report, ranking_report

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


# ---------------------------------------------------------------------------------------------- 2. prompts


def tiny_two_domain_data() -> tuple[InteractionData, np.ndarray]:
    """4 items; items 0, 1 in domain "Home", 2, 3 in "Garden"; u0 (Home) bought 0, 1, u1 (Garden) 2, 3.
    Codes overlap across domains at level 1 (0 in both) and are unique in full."""
    catalogue = Catalogue(["a", "b", "c", "d"], ["Kettle", "Pan", "Hose", "Rake"], [""] * 4, [""] * 4, [[]] * 4)
    codes = np.array([[0, 1, 1], [1, 0, 2], [0, 1, 0], [2, 2, 2]])
    data = InteractionData("tiny", catalogue, {"u0": [0, 1], "u1": [2, 3]}, domain_names=["Home", "Garden"],
                           item_domains=np.array([0, 0, 1, 1]), user_domains={"u0": 0, "u1": 1})
    return data, codes


@functools.lru_cache(maxsize=None)
def tokenizer_and_items():
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    tokenizer = build_tokenizer_from_corpus(["The user has purchased, in order: Domain: Home Garden."] * 4,
                                            vocab_size=300)
    model = build_tiny_model(tokenizer, seed=0).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, 3), seed=0)
    return tokenizer, model, item_tok


def test_prompts_name_the_domain_only_when_there_are_several():
    from onerec_dist.evaluation import build_prompts
    from onerec_dist.prompts import next_item_question
    from onerec_dist.training.tasks import sequential_preference

    question = "The user has purchased, in order: {}. Which item will the user purchase next?"
    assert next_item_question([]) == question.format("")  # single domain: the text of before
    assert next_item_question([], "Home") == "Domain: Home.\n" + question.format("")
    tokenizer, _, _ = tokenizer_and_items()
    data, codes = tiny_two_domain_data()
    train = Examples(["u0", "u1"], [[0], [2]], [1, 3])
    texts = [tokenizer.decode(e.input_ids) for e in sequential_preference(data, train, codes, tokenizer,
                                                                           max_length=256)]
    item = "<|item_begin|><item_a_{}><item_b_{}><item_c_{}><|item_end|>"
    assert texts[0].startswith("<|im_start|>user\nDomain: Home.\nThe user has purchased, in order: "
                               + item.format(0, 1, 1) + ". Which item")
    assert texts[1].startswith("<|im_start|>user\nDomain: Garden.\nThe user has purchased, in order: "
                               + item.format(0, 1, 0) + ". Which item")
    single = InteractionData("tiny", data.catalogue, data.sequences)  # the same users without domains
    plain = [tokenizer.decode(e.input_ids) for e in sequential_preference(single, train, codes, tokenizer,
                                                                           max_length=256)]
    assert plain[0].startswith("<|im_start|>user\nThe user has purchased") and "Domain" not in plain[0] + plain[1]
    from onerec_dist.training.tasks_sequence import whole_sequence_preference

    whole = whole_sequence_preference(data, Examples(["u1"], [[2]], [3]), codes, tokenizer, max_length=256)
    assert len(whole) == 1 and tokenizer.decode(whole[0].input_ids).startswith(
        "<|im_start|>user\nDomain: Garden.\nThe user has purchased, in order: " + item.format(0, 1, 0))
    assert build_prompts(tokenizer, train, codes) == build_prompts(tokenizer, train, codes, None)
    named = build_prompts(tokenizer, train, codes, ["Home", "Garden"])
    assert tokenizer.decode(named[1]).startswith("<|im_start|>user\nDomain: Garden.\n")


def test_cot_prompts_name_the_domain():
    from onerec_dist.reasoning.cot_format import add_think_tokens, inference_prompt, training_example
    from onerec_dist.reasoning.sft_data import cot_sft_examples

    tokenizer, model, item_tok = tokenizer_and_items()
    import copy

    tokenizer, model = copy.deepcopy(tokenizer), copy.deepcopy(model)
    think = add_think_tokens(model, tokenizer, noise_std=0.0)
    _, codes = tiny_two_domain_data()
    plain = inference_prompt(tokenizer, think, codes, [0])
    named = inference_prompt(tokenizer, think, codes, [0], domain="Home")
    assert "Domain" not in tokenizer.decode(plain) and "Domain: Home.\n" in tokenizer.decode(named)
    assert plain == inference_prompt(tokenizer, think, codes, [0], domain=None)
    ids = item_tok.encode_with_boundaries(torch.as_tensor(codes[[1]]))[0].tolist()
    example = training_example(tokenizer, think, codes, ids, [0], "why", 256, domain="Home")
    assert example.input_ids[:len(named)] == named  # training and inference see the same prompt
    records = [{"user": "u1", "history": [2], "target": 3, "rationale": "r"}]
    [cot] = cot_sft_examples(records, codes, tokenizer, think, max_length=256, user_domains={"u1": "Garden"})
    assert tokenizer.decode(cot.input_ids).startswith("<|im_start|>user\nDomain: Garden.\n")


# ---------------------------------------------------------------------------------------------- 3. decoding


def test_pure_prefix_level_is_the_smallest_exact_one():
    _, codes = tiny_two_domain_data()
    domains = torch.tensor([0, 0, 1, 1])
    # Level 1: code 0 starts items of both domains -> impure. Level 2: prefixes (0,1), (1,0) | (0,1), (2,2):
    # (0,1) is in both -> impure. Level 3 (full IDs, unique) -> m = 3.
    assert pure_prefix_levels(torch.as_tensor(codes), domains) == 3
    disjoint = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 1]])  # first codes {0} | {1, 2}: m = 1
    assert pure_prefix_levels(disjoint, domains) == 1
    prefixes = DomainPrefixes.build(disjoint, domains)
    assert prefixes.num_levels == 1 and [p.tolist() for p in prefixes.prefixes] == [[[0]], [[1], [2]]]
    allowed = prefixes.allowed([1, -1, 0])
    assert allowed.offsets.tolist() == [0, 2, 2, 3] and allowed.codes.tolist() == [[1], [2], [0]]
    assert allowed.unrestricted.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="share a full semantic ID"):
        pure_prefix_levels(torch.tensor([[0, 0], [0, 0]]), torch.tensor([0, 1]))


def test_decoding_never_leaves_the_domain():
    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.evaluation import decode_batches
    from onerec_dist.sid.prefix_index import PrefixIndex

    tokenizer, model, item_tok = tokenizer_and_items()
    data, codes = tiny_two_domain_data()
    index = PrefixIndex.build(torch.as_tensor(codes), [3, 3, 3])
    decoder = ConstrainedDecoder(model, item_tok, index, 4, 4, pad_token_id=tokenizer.pad_token_id,
                                 item_codes=torch.as_tensor(codes))
    users = ["u0", "u1", "u1", "u0"]
    restriction = domain_restriction(data, users, codes)
    assert restriction.user_domains.tolist() == [0, 1, 1, 0] and restriction.prefixes.num_levels == 3
    prompts = [tokenizer.encode(t) for t in ("Home", "Garden", "The user", "Domain")]
    out = decoder.decode(prompts, allowed_prefixes=restriction.allowed(range(4)))
    # Beam width 4 >= every domain's 2 items: each row returns exactly its domain's items, then empty slots (-1).
    for row, user in enumerate(users):
        items = out.items[row].tolist()
        assert sorted(items[:2]) == ([0, 1] if user == "u0" else [2, 3]) and items[2:] == [-1, -1]
    assert sorted(decoder.decode(prompts[:1]).items[0].tolist()) == [0, 1, 2, 3]  # unrestricted: all items
    # decode_batches (onerec eval) with the restriction: the same per-row sets.
    results = decode_batches(decoder, prompts, [[]] * 4, [[0, 1], [2, 3]], False, progress=False,
                             restriction=restriction)
    got = np.concatenate([results[0][0], results[1][0]])
    assert all(set(row[row >= 0].tolist()) == ({0, 1} if u == "u0" else {2, 3}) for row, u in zip(got, users))
    assert restriction.take([1]).allowed([0]).codes.tolist() == codes[[2, 3]].tolist()
    assert restriction.repeat(2).user_domains.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert domain_restriction(InteractionData("one", data.catalogue, data.sequences), users, codes) is None


# ---------------------------------------------------------------------------------------------- 4. metrics


def test_per_domain_metrics_worked_example():
    # 4 users, K = 2: A = users 0, 1; B = users 2, 3. Ranks of the targets: 1, miss, 2, 1.
    predictions = np.array([[5, 6], [7, 8], [1, 2], [3, 4]])
    targets = np.array([5, 9, 2, 3])
    domains = np.array([0, 0, 1, 1])
    report = per_domain_report(predictions, targets, domains, ["A", "B", "Empty"], num_items=10, ks=(1, 2),
                               ndcg_ks=(2,))
    # A: recall@1 = 1/2, recall@2 = 1/2, ndcg@2 = (1 + 0) / 2.  B: recall@1 = 1/2 (user 3), recall@2 = 1,
    # ndcg@2 = (1/log2(3) + 1) / 2.  No user in "Empty": left out.
    assert set(report) == {"A", "B"} and report["A"]["users"] == 2 and report["B"]["users"] == 2
    assert report["A"]["recall@1"] == 0.5 and report["A"]["recall@2"] == 0.5 and report["A"]["ndcg@2"] == 0.5
    assert report["B"]["recall@2"] == 1.0 and report["B"]["ndcg@2"] == pytest.approx((1 / np.log2(3) + 1) / 2)
    overall = ranking_report(predictions, targets, num_items=10, ks=(1, 2), ndcg_ks=(2,))
    for key in ("recall@1", "recall@2", "ndcg@2", "validity"):  # user-weighted mean of the domains = overall
        mean = sum(r["users"] * r[key] for r in report.values()) / sum(r["users"] for r in report.values())
        assert mean == pytest.approx(overall[key])
    assert overall["recall@2"] == 0.75  # 3 of 4 users hit


def test_most_popular_stays_in_the_domain():
    from collections import Counter

    from onerec_dist.evaluation import most_popular

    counts = Counter({0: 5, 1: 1, 2: 9, 3: 2})
    # Overall ranking 2, 0, 3, 1. Domain 0 = items {0, 1}: 0, 1; domain 1 = {2, 3}: 2, 3; K = 3 pads with -1.
    items = most_popular(counts, 4, 3, 3, item_domains=np.array([0, 0, 1, 1]), user_domains=np.array([1, 0, 1]))
    assert items.tolist() == [[2, 3, -1], [0, 1, -1], [2, 3, -1]]
    assert most_popular(counts, 4, 3, 1).tolist() == [[2, 0, 3]]


# ---------------------------------------------------------------------------------------------- 5. rl.domain


def test_rl_domain_is_validated_against_the_data():
    from onerec_dist.recipes import grpo

    names = ["Electronics", "Lifestyle"]
    assert grpo.rl_config({}).domain is None and grpo.rl_config({}).domain_index(names) is None
    assert grpo.rl_config({"domain": "Lifestyle"}).domain_index(names) == 1
    with pytest.raises(ValueError, match=r"rl.domain='Books' .* allowed values: null \(all domains\), "
                                         r"'Electronics', 'Lifestyle'"):
        grpo.rl_config({"domain": "Books"}).domain_index(names)
    with pytest.raises(ValueError, match="rl.domain='Books' .* the data has a single domain"):
        grpo.rl_config({"domain": "Books"}).domain_index([])
    with pytest.raises(ValueError, match="rl.domain"):
        grpo.rl_config({"domain": " "})


def test_rl_domain_selects_the_domains_users_and_checks_the_beam():
    from onerec_dist.recipes import grpo

    data = generate_synthetic(SyntheticConfig(num_domains=2, **SMALL))
    splits = leave_one_out(data.sequences, max_history=50)
    train, valid = grpo.domain_examples(grpo.rl_config({"domain": "Shop B", "beam_width": 8}), data, splits)
    assert {data.user_domains[u] for u in train.users + valid.users} == {1}
    assert len(valid) == 20 and len(train) == sum(data.user_domains[u] == 1 for u in splits["train"].users)
    assert train.histories == [h for u, h in zip(splits["train"].users, splits["train"].histories)
                               if data.user_domains[u] == 1]
    joint, _ = grpo.domain_examples(grpo.rl_config({"beam_width": 8}), data, splits)
    assert len(joint) == len(splits["train"])  # null: all domains
    with pytest.raises(ValueError, match=r"rl.beam_width=41 is larger than domain 'Shop A'.s catalogue \(40"):
        grpo.domain_examples(grpo.rl_config({"beam_width": 41}), data, splits)
    assert len(examples_of_domain(splits["test"], data, 0)) == 20


class RecordingDecoder:
    """Stands in for the reward's ConstrainedDecoder: returns item 0 / code [0, 0, 0] for every row and beam, and
    records the allowed prefixes it was given."""

    def __init__(self):
        self.allowed = []

    def decode(self, prompts, allowed_prefixes=None):
        from onerec_dist.decoding.beam_search import DecodeResult

        self.allowed.append(allowed_prefixes)
        n = len(prompts)
        zeros = torch.zeros(n, 2, 3, dtype=torch.long)
        return DecodeResult(torch.zeros(n, 2, dtype=torch.long), zeros, zeros, torch.zeros(n, 2), torch.zeros(n, 2, 3))


def test_rollout_reward_decode_is_restricted_to_each_users_domain():
    from onerec_dist.recipes import grpo

    data, codes = tiny_two_domain_data()
    restriction = domain_restriction(data, ["u0", "u1"], codes)
    prompts = grpo.PromptSet([[1], [2]], np.array([1, 3]), codes[[1, 3]], [[0], [2]], restriction)
    picked = prompts.take([1])  # u1 only: the restriction follows the rows
    assert picked.restriction.user_domains.tolist() == [1]
    # G = 2 rollouts per prompt, rows prompt-major: rows 0, 1 are u0's (Home: items 0, 1), rows 2, 3 u1's.
    allowed = prompts.allowed_prefixes(2)
    assert allowed.offsets.tolist() == [0, 2, 4, 6, 8]
    assert allowed.codes.tolist() == codes[[0, 1, 0, 1, 2, 3, 2, 3]].tolist()
    rollout = grpo.Rollout([[1], [1], [2], [2]], [[], [], [], []], np.ones(4, dtype=bool),
                           torch.as_tensor(codes[[1, 1, 3, 3]]), 2, allowed)
    think = type("Think", (), {"end_id": 9, "after_ids": (8,), "empty_body_ids": (7,)})()
    decoder = RecordingDecoder()
    rewards, _ = grpo.rollout_rewards(decoder, think, rollout, "rollout_beam")
    assert decoder.allowed == [allowed] and rewards.shape == (2, 2)
    plain = grpo.PromptSet([[1]], np.array([1]), codes[[1]], [[0]])
    assert plain.allowed_prefixes(4) is None and plain.take([0]).restriction is None


# ---------------------------------------------------------------------------------------------- 6. the experiment


def test_domains_experiment_composes_and_validates():
    from omegaconf import OmegaConf

    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config
    from onerec_dist.recipes import grpo

    cfg = compose(["experiment=domains"])
    synthetic = data_config(cfg).synthetic
    assert synthetic.num_domains == 2 and synthetic.mode == "reasoning"
    assert [d.name for d in synthetic.domains] == ["Electronics", "Lifestyle"]
    singles = domain_configs(synthetic)
    assert [c.num_items for _, c in singles] == [300, 300] and [c.num_users for _, c in singles] == [1600, 1600]
    assert [c.complement_prob for _, c in singles] == [0.7, 0.4]  # the file's dynamics, not the default spread
    rl = grpo.rl_config(OmegaConf.to_container(compose(["experiment=domains", "rl.domain=Lifestyle"]).rl,
                                               resolve=True))
    assert rl.domain_index([d.name for d in synthetic.domains]) == 1
    assert data_config(compose([])).synthetic.num_domains == 1  # the default run keeps one domain


def test_onerec_eval_reports_per_domain_and_stays_in_the_domain(tmp_path):
    import pyarrow.parquet as pq

    from onerec_dist.cli import main

    # 2 domains x 40 items x 20 users, an untrained tiny model; K = 10 <= 40 items per domain, so every slot holds an
    # item of the user's own domain (the restriction is exact) and validity stays 1.
    assert main(["eval", f"output_dir={tmp_path}", "data.synthetic.num_domains=2", "data.synthetic.num_users=40",
                 "data.synthetic.num_items=80", "eval.beam_width=10", "eval.top_k=10", "eval.ks=[1,10]",
                 "eval.ndcg_ks=[10]", "sid.codebook_size=8", "eval.baseline=popular"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = pq.read_table(tmp_path / "predictions.parquet")
    assert summary["domains"] == {"Shop A": 20, "Shop B": 20}
    data = generate_synthetic(SyntheticConfig(num_domains=2, num_users=40, num_items=80))
    users = table.column("user").to_pylist()
    own = np.array([data.user_domains[u] for u in users])  # [U]
    for name in ("model", "popular"):
        items = np.array(table.column(name).to_pylist())  # [U, 10]
        assert (items >= 0).all() and (data.item_domains[items] == own[:, None]).all()
        per_domain = summary[name]["per_domain"]
        assert {d: v["users"] for d, v in per_domain.items()} == {"Shop A": 20, "Shop B": 20}
        for key in ("recall@10", "ndcg@10", "validity"):  # equal weights: the overall value is the plain mean
            assert summary[name][key] == pytest.approx((per_domain["Shop A"][key] + per_domain["Shop B"][key]) / 2)
