"""Constrained beam search: equivalence with HF generate, validity, exclusion, partial IDs, bad input."""

import itertools

import pytest
import torch

from onerec_dist.decoding.beam_search import ConstrainedDecoder
from onerec_dist.decoding.hf_baseline import hf_beam_search
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary

SIZES = [3, 5, 7]  # non-power-of-2 codebooks; 105 possible IDs


def make_world(num_items=40, seed=0, tie=True):
    gen = torch.Generator().manual_seed(seed)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [105, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:num_items]]  # [N, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tie, seed=seed).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=seed)
    index = PrefixIndex.build(codes, SIZES)
    prompts = [tokenizer.encode(t) for t in ["the user bought a red lamp", "blue", "a chair and a lamp and a"]]
    return model, tokenizer, item_tok, index, codes, prompts


@pytest.mark.parametrize("beams,top_k,tie", [(4, 4, True), (10, 5, False), (1, 1, True)])
def test_same_topk_as_hf_generate(beams, top_k, tie):
    model, tok, item_tok, index, codes, prompts = make_world(tie=tie)
    decoder = ConstrainedDecoder(model, item_tok, index, beams, top_k, normalization="full",
                                 pad_token_id=tok.pad_token_id)
    ours = decoder.decode(prompts)
    hf_items, hf_scores = hf_beam_search(model, item_tok, codes, prompts, beams, top_k, tok.pad_token_id)
    assert torch.equal(ours.items, hf_items)
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=1e-4)
    assert bool((ours.items >= 0).all()) and bool((ours.items < len(codes)).all())  # validity 100 %
    # Returned codes are the items' IDs, and per-level log-probs sum to the total.
    assert torch.equal(ours.codes, codes[ours.items])
    torch.testing.assert_close(ours.level_logprobs.sum(-1), ours.scores)


def test_scores_are_model_log_probs():
    # With full normalisation the score of an item is log p(code_1..code_L | prompt, <|item_begin|>) under the
    # model: recompute it by teacher forcing the returned ID.
    model, tok, item_tok, index, codes, prompts = make_world()
    result = ConstrainedDecoder(model, item_tok, index, 3, 3).decode(prompts[:1])
    ids = torch.tensor([prompts[0] + [item_tok.begin_id] + result.token_ids[0, 0].tolist()])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # [T, V]
    start = len(prompts[0])
    expected = sum(logp[start + j, ids[0, start + 1 + j]] for j in range(3)).detach()
    assert float(result.scores[0, 0]) == pytest.approx(float(expected), abs=1e-4)


def test_valid_normalisation_sums_to_one_per_level():
    # Three items whose IDs differ at level 0 and then have a single child per level: (0,1,2), (1,3,4), (2,0,6).
    # Normalised over valid codes, the three level-0 probabilities sum to 1 and every deeper step has
    # probability 1 (log-prob 0), so each item's total score is its level-0 log-prob.
    model, tok, item_tok, _, _, prompts = make_world()
    codes = torch.tensor([[0, 1, 2], [1, 3, 4], [2, 0, 6]])
    decoder = ConstrainedDecoder(model, item_tok, PrefixIndex.build(codes, SIZES), 3, 3, normalization="valid")
    result = decoder.decode(prompts[:1])
    assert sorted(result.items[0].tolist()) == [0, 1, 2]
    assert float(result.level_logprobs[0, :, 0].exp().sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(result.level_logprobs[0, :, 1:], torch.zeros(3, 2))
    torch.testing.assert_close(result.scores[0], result.level_logprobs[0, :, 0])


def test_exclusion_never_returns_excluded_items():
    model, tok, item_tok, index, codes, prompts = make_world()
    decoder = ConstrainedDecoder(model, item_tok, index, 6, 6, item_codes=codes)
    plain = decoder.decode(prompts)
    exclude = [plain.items[b, :3].tolist() + plain.items[b, :1].tolist() for b in range(len(prompts))]
    result = decoder.decode(prompts, exclude=exclude)
    for b in range(len(prompts)):
        assert not set(result.items[b].tolist()) & set(exclude[b])
        # The remaining items keep their relative order: plain ranks 4..6 come first now.
        assert result.items[b, :3].tolist() == plain.items[b, 3:6].tolist()
    assert bool((result.items >= 0).all())


def test_exclusion_prunes_whole_prefixes():
    # Exclude every item under one level-0 code but one: the beams must not spend slots on a dead subtree,
    # so with beam width = number of remaining items every slot is still a valid, non-excluded item.
    model, tok, item_tok, index, codes, prompts = make_world(num_items=20)
    first_code = int(codes[0, 0])
    excluded = [i for i in range(len(codes)) if int(codes[i, 0]) == first_code]
    remaining = len(codes) - len(excluded)
    decoder = ConstrainedDecoder(model, item_tok, index, remaining, remaining, item_codes=codes)
    result = decoder.decode(prompts[:1], exclude=[excluded])
    assert sorted(result.items[0].tolist()) == sorted(set(range(len(codes))) - set(excluded))


def test_partial_id_start():
    model, tok, item_tok, index, codes, prompts = make_world()
    start = codes[:3, :1]  # [3, 1] level-0 codes of items 0..2
    result = ConstrainedDecoder(model, item_tok, index, 2, 2).decode(prompts, start_codes=start)
    assert torch.equal(result.codes[:, :, 0], start.expand(-1, 2))
    assert torch.equal(result.codes, codes[result.items])
    assert result.level_logprobs.shape == (3, 2, 2)  # two levels decoded


def test_bad_input_messages():
    model, tok, item_tok, index, codes, prompts = make_world()
    with pytest.raises(ValueError, match="prompts is empty"):
        ConstrainedDecoder(model, item_tok, index, 2, 2).decode([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ConstrainedDecoder(model, item_tok, index, 2, 2).decode([[1], []])
    with pytest.raises(ValueError, match=r"beam_width=41 must be in \[1, number of catalogue items=40\]"):
        ConstrainedDecoder(model, item_tok, index, 41, 2)
    with pytest.raises(ValueError, match=r"top_k=3 must be in \[1, beam_width=2\]"):
        ConstrainedDecoder(model, item_tok, index, 2, 3)
    unused = next(c for c in range(SIZES[0]) if not bool((codes[:, 0] == c).any())) if len(
        set(codes[:, 0].tolist())) < SIZES[0] else None
    bad_start = torch.tensor([[codes[0, 0], 99]]) if unused is None else torch.tensor([[unused]])
    with pytest.raises(ValueError, match="is the start of no catalogue item"):
        ConstrainedDecoder(model, item_tok, index, 2, 2).decode(prompts[:1], start_codes=bad_start)
    small = build_tiny_model(tok, seed=0)  # tokenizer has the item tokens, this model's vocabulary does not
    small.resize_token_embeddings(64)
    with pytest.raises(ValueError, match="lacks the item tokens"):
        ConstrainedDecoder(small, item_tok, index, 2, 2)


# ------------------------------------------------------------------------------------------ speed switches
# Every switch changes how the search is computed, never what it returns: same items in the same order, same scores
# up to float rounding (the tree attends over the shared prompt cache, the others over per-beam copies).

SWITCHES = [dict(prefill="once"), dict(prefill="per_beam"), dict(code_logits="full"), dict(step_impl="naive"),
            dict(step_impl="reference", code_logits="full", prefill="once")]


@pytest.mark.parametrize("normalization", ["full", "valid"])
@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_switches_return_the_default_result(switch, normalization):
    model, tok, item_tok, index, codes, prompts = make_world()
    args = (model, item_tok, index, 6, 4, normalization)
    default = ConstrainedDecoder(*args, item_codes=codes)
    assert default.prefill == "tree"  # sdpa takes the 4-D tree mask
    other = ConstrainedDecoder(*args, item_codes=codes, **switch)
    exclude = [[0, 1], [], [5]]
    for kwargs in (dict(), dict(start_codes=codes[:3, :1]), dict(exclude=exclude)):
        expected, got = default.decode(prompts, **kwargs), other.decode(prompts, **kwargs)
        assert torch.equal(got.items, expected.items)
        assert torch.equal(got.codes, expected.codes)
        torch.testing.assert_close(got.level_logprobs, expected.level_logprobs, atol=1e-5, rtol=1e-5)


def test_tree_with_eager_attention_matches_hf_generate():
    # eager attention adds the float mask to the scores; sdpa (the other tests) takes it as attn_mask.
    model, tok, item_tok, index, codes, prompts = make_world()
    model.set_attn_implementation("eager")
    decoder = ConstrainedDecoder(model, item_tok, index, 5, 5, pad_token_id=tok.pad_token_id)
    assert decoder.prefill == "tree"
    ours = decoder.decode(prompts)
    hf_items, hf_scores = hf_beam_search(model, item_tok, codes, prompts, 5, 5, tok.pad_token_id)
    assert torch.equal(ours.items, hf_items)
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=1e-4)


def test_chunked_vocabulary_lse_equals_one_matmul():
    # lse over V computed as lse of per-chunk lse's: log sum_c sum_{v in c} e^x_v = log sum_c e^{lse_c}.
    model, tok, item_tok, index, codes, prompts = make_world()
    whole = ConstrainedDecoder(model, item_tok, index, 5, 5)
    chunked = ConstrainedDecoder(model, item_tok, index, 5, 5)
    chunked.lse_chunk = 37  # V = 320 rows -> 9 chunks, the last one short (24 rows)
    assert model.get_output_embeddings().weight.shape[0] > chunked.lse_chunk
    expected, got = whole.decode(prompts), chunked.decode(prompts)
    assert torch.equal(got.items, expected.items)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_naive_step_equals_reference(seed):
    # Integer logits force ties (lower code wins), a -inf logit on an allowed code scores -inf, an all-masked row
    # gives -inf / -1 slots, a dead beam (-inf) scores -inf everywhere.
    from onerec_dist.decoding.beam_search import naive_constrained_step
    from onerec_kernels.constrained_step import constrained_step_reference

    gen = torch.Generator().manual_seed(seed)
    rows, codes, k = 7, 11, 5
    logits = torch.randint(-3, 3, (rows, codes), generator=gen).float()
    logits[0, 2] = float("-inf")
    allowed = torch.rand(rows, codes, generator=gen) < 0.5
    allowed[0, 2], allowed[1] = True, False
    beam_scores = -torch.rand(rows, generator=gen)
    beam_scores[2] = float("-inf")
    for norm_lse in (None, torch.logsumexp(logits.masked_fill(torch.isinf(logits), 0.0), -1) + 1.0):
        ref = constrained_step_reference(logits, allowed, beam_scores, k, norm_lse)
        got = naive_constrained_step(logits, allowed, beam_scores, k, norm_lse)
        assert torch.equal(got.topk_codes, ref.topk_codes)
        torch.testing.assert_close(got.topk_scores, ref.topk_scores)
        torch.testing.assert_close(got.row_lse, ref.row_lse)


SYNC_OPS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu", "unique",
            "masked_select"}


def test_no_host_sync_in_the_level_loop(monkeypatch):
    # Record every tensor op that needs a value on the host (a device sync on CUDA) while _search runs, outside the
    # model's own forward (Hugging Face code, not ours). The default path must record none.
    from torch.overrides import TorchFunctionMode

    model, tok, item_tok, index, codes, prompts = make_world()
    decoder = ConstrainedDecoder(model, item_tok, index, 6, 6, item_codes=codes)
    state = {"loop": False, "model": False, "syncs": []}

    class SyncRecorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            boolean_index = name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
            if state["loop"] and not state["model"] and (name in SYNC_OPS or boolean_index):
                state["syncs"].append(name)
            return func(*args, **(kwargs or {}))

    body = model.get_decoder()

    def body_call(*args, **kwargs):
        state["model"] = True
        try:
            return body(*args, **kwargs)
        finally:
            state["model"] = False

    search = decoder._search

    def recorded_search(*args):
        state["loop"] = True
        try:
            return search(*args)
        finally:
            state["loop"] = False

    monkeypatch.setattr(model, "get_decoder", lambda: body_call)
    monkeypatch.setattr(decoder, "_search", recorded_search)
    with SyncRecorder():
        decoder.decode(prompts)
        decoder.decode(prompts, exclude=[[0], [1, 2], []])
    assert state["syncs"] == []
    # The recorder does see syncs: the naive step does one per row.
    decoder.step_impl = "naive"
    with SyncRecorder():
        decoder.decode(prompts)
    assert "nonzero" in state["syncs"]


def test_bad_switch_values():
    model, tok, item_tok, index, codes, prompts = make_world()
    for name in ("prefill", "code_logits", "step_impl", "normalization"):
        with pytest.raises(ValueError, match=f"{name}='bogus'; allowed values"):
            ConstrainedDecoder(model, item_tok, index, 2, 2, **{name: "bogus"})
    model.config._attn_implementation_internal = "flash_attention_2"  # flash-attn takes no 4-D mask
    assert ConstrainedDecoder(model, item_tok, index, 2, 2).prefill == "once"
    with pytest.raises(ValueError, match="prefill='tree' needs an attention implementation"):
        ConstrainedDecoder(model, item_tok, index, 2, 2, prefill="tree")
