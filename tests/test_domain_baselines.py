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
