"""Baselines and serving inside the user's domain (issue 14, OneReason's domains): SASRec, the ``hf_generate``
baseline and Think-Ahead recommend only items of the user's domain on data with several domains, and give the
output of before on single-domain data. Tiny models, single process, well under a second each (the `onerec eval`
run a few seconds)."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest
import torch

from onerec_dist.baselines.sasrec import SASRec, SASRecConfig, recommend
from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.decoding.domains import domain_restriction
from onerec_dist.evaluation import EvalConfig

SIZES = [3, 3, 3]
NUM_ITEMS = 12
ITEM_DOMAINS = np.array([0, 1] * 6)  # items 0, 2, 4, ... in domain 0; 1, 3, 5, ... in domain 1: 6 each


@functools.lru_cache(maxsize=None)
def world():
    """A tiny Qwen3 with item tokens, 12 items with unique 3-level IDs over codebooks [3, 3, 3] and 2 domains."""
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    gen = torch.Generator().manual_seed(0)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [27, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:NUM_ITEMS]].numpy()  # [12, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, seed=0).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=0)
    with torch.no_grad():  # spread the code logits so that rankings differ between prompts
        rows = item_tok.item_token_ids()
        emb = model.get_input_embeddings().weight
        emb[rows] += torch.randn(len(rows), emb.shape[1], generator=gen) * 0.5
    return model, tokenizer, item_tok, codes


def two_domain_data(users: list[str], user_domains: list[int]) -> InteractionData:
    catalogue = Catalogue([f"i{i}" for i in range(NUM_ITEMS)], [f"t{i}" for i in range(NUM_ITEMS)],
                          [""] * NUM_ITEMS, [""] * NUM_ITEMS, [[]] * NUM_ITEMS)
    sequences = {u: [int(d), int(d) + 2] for u, d in zip(users, user_domains)}
    return InteractionData("tiny", catalogue, sequences, domain_names=["A", "B"], item_domains=ITEM_DOMAINS,
                           user_domains=dict(zip(users, user_domains)))


# ---------------------------------------------------------------------------------------------- SASRec


def test_sasrec_ranks_only_the_users_domain_and_one_domain_is_unchanged():
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, SASRecConfig(hidden_size=16, num_blocks=1, max_len=6, dropout=0.0)).eval()
    histories = [[0, 3, 5], [1, 2], [7], [4, 6, 8, 10]]
    user_domains = np.array([0, 1, 1, 0])
    full = recommend(model, histories, NUM_ITEMS)  # [4, 12]: every item, best first
    # Masking the other domain's scores to -inf keeps the order of the rest: the top-K of a domain is the full
    # ranking filtered to the domain's items, cut at K; K = 8 > 6 items per domain pads with -1.
    ranked = recommend(model, histories, 8, item_domains=ITEM_DOMAINS, user_domains=user_domains)
    for row, domain in enumerate(user_domains):
        own = [i for i in full[row].tolist() if ITEM_DOMAINS[i] == domain]
        assert ranked[row].tolist() == own + [-1, -1]
    ranked = recommend(model, histories, 4, item_domains=ITEM_DOMAINS, user_domains=user_domains)
    assert (ITEM_DOMAINS[ranked] == user_domains[:, None]).all()
    # One domain (every item and user in domain 0): the unrestricted result, exactly.
    one = recommend(model, histories, 5, item_domains=np.zeros(NUM_ITEMS, int), user_domains=np.zeros(4, int))
    assert one.tolist() == recommend(model, histories, 5).tolist()


# ---------------------------------------------------------------------------------------------- hf_generate


def hf_eval_inputs(num_users: int = 6):
    model, tokenizer, item_tok, codes = world()
    texts = ["the user bought a red lamp", "blue", "a chair and a lamp", "red", "the user", "a blue chair"]
    prompts = [tokenizer.encode(t) for t in texts[:num_users]]
    eval_cfg = EvalConfig(beam_width=4, top_k=4, ks=[1], ndcg_ks=[1], baseline=["hf_generate"], model=False)
    return model, tokenizer, item_tok, codes, prompts, eval_cfg


def test_hf_generate_per_domain_trie_equals_the_domain_restricted_constrained_decoder():
    """HF generate with a domain's trie scores like ConstrainedDecoder(normalization=full) with that domain's
    allowed prefixes (tests/test_decoding.py shows the unrestricted equality): same items, same order. Beam 4 < 6
    items per domain, so the search prunes and the equality is not just "the domain's items"."""
    from onerec_dist.evaluation import build_decoder, decode_batches, merge_batches
    from onerec_dist.stages.eval import decode_hf

    model, tokenizer, item_tok, codes, prompts, eval_cfg = hf_eval_inputs()
    users = [f"u{u}" for u in range(len(prompts))]
    user_domains = np.array([0, 1, 1, 0, 1, 0])
    batches = [[0, 1, 2], [3, 4, 5]]  # both domains in each batch
    items, _ = decode_hf(eval_cfg, model, tokenizer, item_tok, codes, prompts, batches, ITEM_DOMAINS, user_domains)
    assert (items >= 0).all() and (ITEM_DOMAINS[items] == user_domains[:, None]).all()
    restriction = domain_restriction(two_domain_data(users, user_domains.tolist()), users, codes)
    decoder = build_decoder(model, item_tok, codes, eval_cfg, tokenizer.pad_token_id)
    results = decode_batches(decoder, prompts, [[]] * len(prompts), batches, False, progress=False,
                             restriction=restriction)
    expected, _ = merge_batches(results, batches, len(prompts), eval_cfg.top_k)
    assert items.tolist() == expected.tolist()
    # Without the restriction the same prompts do leave their domain (the test above can fail).
    free, _ = decode_hf(eval_cfg, model, tokenizer, item_tok, codes, prompts, batches)
    assert not (ITEM_DOMAINS[free] == user_domains[:, None]).all()


def test_hf_generate_with_one_domain_is_the_output_of_before():
    from onerec_dist.stages.eval import decode_hf

    model, tokenizer, item_tok, codes, prompts, eval_cfg = hf_eval_inputs(4)
    batches = [[0, 1], [2, 3]]
    before, _ = decode_hf(eval_cfg, model, tokenizer, item_tok, codes, prompts, batches)
    one, _ = decode_hf(eval_cfg, model, tokenizer, item_tok, codes, prompts, batches, np.zeros(NUM_ITEMS, int),
                       np.zeros(4, int))
    assert one.tolist() == before.tolist()


def test_onerec_eval_baselines_stay_in_the_domain_and_report_per_domain(tmp_path):
    import pyarrow.parquet as pq

    from onerec_dist.cli import main
    from onerec_dist.data.config import SyntheticConfig
    from onerec_dist.data.synthetic import generate_synthetic

    # 2 domains x 40 items x 20 users, an untrained tiny model and a 2-epoch SASRec; K = 10 <= 40 items per domain.
    assert main(["eval", f"output_dir={tmp_path}", "data.synthetic.num_domains=2", "data.synthetic.num_users=40",
                 "data.synthetic.num_items=80", "eval.beam_width=10", "eval.top_k=10", "eval.ks=[1,10]",
                 "eval.ndcg_ks=[10]", "sid.codebook_size=8", "eval.model=false",
                 "eval.baseline=[popular,sasrec,hf_generate]", "eval.sasrec.max_epochs=2",
                 "eval.sasrec.hidden_size=16", "eval.sasrec.num_blocks=1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = pq.read_table(tmp_path / "predictions.parquet")
    data = generate_synthetic(SyntheticConfig(num_domains=2, num_users=40, num_items=80))
    own = np.array([data.user_domains[u] for u in table.column("user").to_pylist()])  # [U]
    for name in ("popular", "sasrec", "hf_generate"):
        items = np.array(table.column(name).to_pylist())  # [U, 10]
        assert (items >= 0).all() and (data.item_domains[items] == own[:, None]).all(), name
        per_domain = summary[name]["per_domain"]
        assert {d: v["users"] for d, v in per_domain.items()} == {"Shop A": 20, "Shop B": 20}
        for key in ("recall@10", "validity"):  # equal weights: the overall value is the plain mean
            assert summary[name][key] == pytest.approx((per_domain["Shop A"][key] + per_domain["Shop B"][key]) / 2)


# ---------------------------------------------------------------------------------------------- Think-Ahead

# Two assignments of the 12 items to 2 domains: "shared" (alternating; the world's codes make every 2-level prefix
# of one domain also one of the other's for some, so the pure level m_d = 3 > m = 2: the online rows are refined to
# full IDs) and "first_code" (domain = first code != 0, m_d = 1 <= m = 2: cached prefixes are already pure).
ASSIGNMENTS = {"shared": lambda codes: ITEM_DOMAINS, "first_code": lambda codes: (codes[:, 0] != 0).astype(int)}
TA_USERS = ["u0", "u1", "u2", "u3"]
TA_DOMAINS = [0, 1, 1, 0]


@pytest.fixture(scope="module")
def think_world(tmp_path_factory):
    """The world's model with think tokens, saved as a model directory that carries its IDs."""
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus, load_pretrained
    from onerec_dist.reasoning.cot_format import add_think_tokens
    from onerec_dist.sid.model_ids import save_model_ids
    from onerec_dist.sid.tokens import ItemTokenizer, ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    _, _, _, codes = world()
    gen = torch.Generator().manual_seed(1)
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair. Domain: A B"] * 4,
                                            vocab_size=300)
    model = build_tiny_model(tokenizer, seed=0).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=0)
    add_think_tokens(model, tokenizer, seed=0)
    with torch.no_grad():
        rows = item_tok.item_token_ids()
        emb = model.get_input_embeddings().weight
        emb[rows] += torch.randn(len(rows), emb.shape[1], generator=gen) * 0.5
    root = tmp_path_factory.mktemp("domain_ta_model")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    save_model_ids(root, codes, [f"i{i}" for i in range(NUM_ITEMS)], SIZES, item_tok)
    model, tokenizer = load_pretrained(str(root), "sdpa")
    return root, model.eval(), tokenizer, ItemTokenizer.from_tokenizer(tokenizer), codes


def ta_settings():
    from onerec_dist.serving.config import ServingConfig

    return ServingConfig(num_rationales=2, prefix_levels=2, prefix_beam=4, max_think_tokens=4, shard_size=2,
                         beam_width=NUM_ITEMS, max_k=NUM_ITEMS, recent_items=3, generate_batch_size=8)


def ta_inputs(think_world, assignment: str):
    """(histories, item domains [N], the users' DomainRestriction, CatalogueDomains) of one assignment."""
    from onerec_dist.serving.think_ahead import CatalogueDomains

    codes = think_world[-1]
    item_domains = ASSIGNMENTS[assignment](codes)
    own_items = [np.flatnonzero(item_domains == d).tolist() for d in (0, 1)]
    histories = [own_items[d][u % 2:u % 2 + 3] for u, d in enumerate(TA_DOMAINS)]  # each in its own domain
    data = two_domain_data(TA_USERS, TA_DOMAINS)
    data.item_domains = item_domains
    restriction = domain_restriction(data, TA_USERS, codes)
    return histories, item_domains, restriction, CatalogueDomains(("A", "B"), restriction.prefixes)


def build_ta_cache(think_world, cache_dir, assignment: str, restricted: bool = True):
    from onerec_dist.serving.think_ahead import Fingerprints, build_shards, load_cache, prepare_cache_dir

    root, model, tokenizer, item_tok, codes = think_world
    histories, _, restriction, domains = ta_inputs(think_world, assignment)
    cfg, fps = ta_settings(), Fingerprints.of(root)
    todo = prepare_cache_dir(cache_dir, fps, cfg, TA_USERS, domains if restricted else None)
    build_shards(model, tokenizer, item_tok, codes, TA_USERS, histories, cfg, cache_dir, todo, fps,
                 restriction=restriction if restricted else None, domain_names=["A", "B"])
    return load_cache(cache_dir, fps)


def items_below(codes: np.ndarray, prefixes) -> set[int]:
    keys = {tuple(p) for p in prefixes}
    return {i for i, c in enumerate(codes.tolist()) if tuple(c[:len(next(iter(keys)))]) in keys}


@pytest.mark.parametrize("assignment", list(ASSIGNMENTS))
def test_think_ahead_offline_prefixes_stay_inside_the_users_domain(think_world, tmp_path, assignment):
    codes = think_world[-1]
    _, item_domains, restriction, domains = ta_inputs(think_world, assignment)
    assert restriction.prefixes.num_levels == {"shared": 3, "first_code": 1}[assignment]
    cache = build_ta_cache(think_world, tmp_path / "r", assignment)
    assert cache.domains.to_json() == domains.to_json() and cache.user_domains == dict(zip(TA_USERS, TA_DOMAINS))
    for user, d in zip(TA_USERS, TA_DOMAINS):
        for prefix in cache.get(user):  # every cached prefix lies above an item of the user's domain ...
            below = items_below(codes, [prefix])
            assert any(item_domains[i] == d for i in below)
            if assignment == "first_code":  # ... and, the prefix being pure (m >= m_d), above no other item
                assert all(item_domains[i] == d for i in below)
    # The same build without the restriction leaves the domain for some user (the checks above can fail).
    free = build_ta_cache(think_world, tmp_path / "f", assignment, restricted=False)
    assert free.domains is None and free.user_domains == {}
    assert any(not any(item_domains[i] == d for i in items_below(codes, [p]))
               for u, d in zip(TA_USERS, TA_DOMAINS) for p in free.get(u))


@pytest.mark.parametrize("assignment", list(ASSIGNMENTS))
def test_think_ahead_online_cached_and_fallback_rows_stay_inside_the_domain(think_world, tmp_path, assignment):
    """Beam width = number of items prunes nothing, so the unrestricted decode of the same prompt ranks every item
    exactly; a row's answer must be that ranking filtered to the items of the user's domain below its cached
    prefixes (cached) or to all of its domain's items (fallback: no entry, or none of it inside the domain)."""
    from onerec_dist.serving.think_ahead import ThinkAheadService

    root, model, tokenizer, item_tok, codes = think_world
    histories, item_domains, _, _ = ta_inputs(think_world, assignment)
    cache = build_ta_cache(think_world, tmp_path, assignment)
    del cache.prefixes["u1"]  # a user of domain B without a cache entry
    service = ThinkAheadService(model, tokenizer, item_tok, codes, cache, ta_settings())
    stranger = [int(np.flatnonzero(item_domains == 1)[0])]  # unknown user: domain B read off its history
    users, hist = [*TA_USERS, "stranger", "u0"], [*histories, stranger, histories[0]]
    # The last request names domain B for u0 (cached in A): only u0's cached prefixes shared with B survive (some in
    # "shared", none in "first_code"), else it falls back to B's catalogue.
    names = [None] * 5 + ["B"]
    answers = service.recommend(users, hist, domains=names)
    own = [*TA_DOMAINS, 1, 1]
    free = service.decoder.decode([service.prompt(u, h, "AB"[d]) for u, h, d in zip(users, hist, own)])
    for row, (user, answer, d) in enumerate(zip(users, answers, own)):
        allowed = {i for i in range(NUM_ITEMS) if item_domains[i] == d}
        cached = cache.get(user)
        inside = allowed & items_below(codes, cached) if cached else set()
        assert answer.path == ("cached" if inside else "fallback")
        keep = inside or allowed
        expected = [i for i in free.items[row].tolist() if i in keep]
        assert answer.items == expected and answer.items, (user, assignment)
    assert [a.path for a in answers][1:5] == ["fallback", "cached", "cached", "fallback"]


def test_think_ahead_shard_worker_builds_the_same_restricted_shard_in_process(think_world, tmp_path):
    """distributed/think_ahead_shards._ShardBuilder (the Ray actor's class, called in-process here) carries the
    users' restriction to build_shards: its shard equals the single-process one."""
    import pyarrow.parquet as pq

    from onerec_dist.distributed.think_ahead_shards import _ShardBuilder
    from onerec_dist.serving.think_ahead import Fingerprints, prepare_cache_dir, shard_path

    root, model, tokenizer, item_tok, codes = think_world
    histories, _, restriction, domains = ta_inputs(think_world, "shared")
    build_ta_cache(think_world, tmp_path / "single", "shared")
    cfg, fps = ta_settings(), Fingerprints.of(root)
    prepare_cache_dir(tmp_path / "worker", fps, cfg, TA_USERS, domains)
    worker = _ShardBuilder(cfg, str(root), codes, TA_USERS, histories, str(tmp_path / "worker"), fps, restriction,
                           ["A", "B"])
    assert worker.build(1) == 2  # users u2, u3
    got = pq.read_table(shard_path(tmp_path / "worker", 1)).to_pydict()
    assert got == pq.read_table(shard_path(tmp_path / "single", 1)).to_pydict()
    assert got["domain"] == [1, 0]


def test_recommend_request_domain_field():
    from onerec_dist.serving.api import RequestError, parse_recommend

    index = {"a": 0, "b": 1}.get
    assert parse_recommend(b'{"user": "u", "history": ["a"], "domain": "B"}', index, 5, ("A", "B")).domain == "B"
    assert parse_recommend(b'{"user": "u", "history": ["a"]}', index, 5, ("A", "B")).domain is None
    for domains, message in ((("A", "B"), "allowed: 'A', 'B'"), ((), "single domain")):
        with pytest.raises(RequestError, match=message) as err:
            parse_recommend(b'{"user": "u", "history": ["a"], "domain": "C"}', index, 5, domains)
        assert err.value.status == 422
