"""Itemic tokens: spec, text form, ItemTokenizer layout and round trips, vocabulary extension and its initialisation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from onerec_dist.data.types import Catalogue
from onerec_dist.models import build_config, build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.sid.tokens import (
    BEGIN_TOKEN,
    END_TOKEN,
    ItemTokenizer,
    ItemTokenSpec,
    all_item_tokens,
    sid_to_text,
    text_to_sid,
)
from onerec_dist.sid.vocab import extend_vocabulary, new_token_row_ids

WORDS = "red blue matte lipstick dry hair shampoo denim jacket cotton shirt running shoes leather bag".split()
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
NUM_ITEMS, NUM_LEVELS, CODEBOOK = 500, 4, 37  # 37: not a power of two


def random_unique_codes(num_items: int, num_levels: int, codebook: int, seed: int = 0) -> np.ndarray:
    """[N, L] distinct semantic IDs: distinct integers < K^L written in base K."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(codebook**num_levels, size=num_items, replace=False)
    digits = [(flat // codebook**p) % codebook for p in reversed(range(num_levels))]
    return np.stack(digits, axis=1).astype(np.int64)


def make_catalogue(codes: np.ndarray, titles: list[str] | None = None) -> Catalogue:
    n = codes.shape[0]
    if titles is None:
        rng = np.random.default_rng(1)
        titles = [" ".join(rng.choice(WORDS, size=3)) for _ in range(n)]
    return Catalogue([f"item{i}" for i in range(n)], titles, [""] * n, [""] * n, [[] for _ in range(n)], codes)


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer_from_corpus(CORPUS, vocab_size=300)


def fresh_tokenizer(base):
    """A private copy (extend_vocabulary mutates the tokenizer)."""
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def extended():
    """Tokenizer + tied tiny model extended with 4 levels x 37 codes, and the 500-item catalogue."""
    tokenizer = build_tokenizer_from_corpus(CORPUS, vocab_size=300)
    model = build_tiny_model(tokenizer, seed=0)
    catalogue = make_catalogue(random_unique_codes(NUM_ITEMS, NUM_LEVELS, CODEBOOK))
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(NUM_LEVELS, CODEBOOK), catalogue=catalogue)
    return tokenizer, model, item_tok, catalogue


# ---------------------------------------------------------------------------------------------------- spec and text


def test_spec_normalises_codebook_sizes():
    assert ItemTokenSpec(3, 5).codebook_sizes == [5, 5, 5]
    assert ItemTokenSpec(3, 5) == ItemTokenSpec(3, [5, 5, 5])
    assert hash(ItemTokenSpec(3, 5)) == hash(ItemTokenSpec(3, [5, 5, 5]))
    assert ItemTokenSpec(2, [5, 7]).num_code_tokens == 12


@pytest.mark.parametrize("levels, sizes", [(0, 5), (27, 5), (2, [5]), (2, [5, 0]), (2, "5"), (2.0, 5)])
def test_spec_rejects_bad_fields(levels, sizes):
    with pytest.raises(ValueError, match="ItemTokenSpec"):
        ItemTokenSpec(levels, sizes)


def test_all_item_tokens_order():
    # Begin, end, then level a's codes, then level b's: the order that makes each level contiguous.
    assert all_item_tokens(ItemTokenSpec(2, [2, 3])) == [
        BEGIN_TOKEN, END_TOKEN, "<item_a_0>", "<item_a_1>", "<item_b_0>", "<item_b_1>", "<item_b_2>",
    ]


def test_sid_text_form():
    assert sid_to_text([12, 7, 201, 3]) == (
        "<|item_begin|><item_a_12><item_b_7><item_c_201><item_d_3><|item_end|>"
    )
    assert sid_to_text(torch.tensor([0, 5])) == "<|item_begin|><item_a_0><item_b_5><|item_end|>"
    assert text_to_sid("<|item_begin|><item_a_12><item_b_7><item_c_201><item_d_3><|item_end|>") == [12, 7, 201, 3]


def test_twenty_six_levels():
    codes = list(range(26))
    text = sid_to_text(codes)
    assert text.endswith("<item_z_25><|item_end|>")
    assert text_to_sid(text) == codes
    assert len(all_item_tokens(ItemTokenSpec(26, 2))) == 2 + 26 * 2
    with pytest.raises(ValueError, match="1..26"):
        sid_to_text(list(range(27)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=26))
def test_text_round_trip_property(codes):
    assert text_to_sid(sid_to_text(codes)) == codes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<|item_begin|><|item_end|>",  # no codes
        "<item_a_1><item_b_2><|item_end|>",  # no begin
        "<|item_begin|><item_a_1><item_b_2>",  # no end
        "<|item_begin|><item_b_1><item_a_2><|item_end|>",  # levels out of order
        "<|item_begin|><item_a_1><item_c_2><|item_end|>",  # level skipped
        "<|item_begin|><item_a_01><|item_end|>",  # non-canonical code
        "<|item_begin|><item_a_-1><|item_end|>",
        "<|item_begin|><item_a_x><|item_end|>",
        "<|item_begin|> <item_a_1><|item_end|>",  # stray space
        "<|item_begin|><item_a_1><|item_end|><|item_begin|><item_a_2><|item_end|>",  # two items
        "<|item_begin|><item_A_1><|item_end|>",
    ],
)
def test_text_to_sid_rejects_malformed(text):
    with pytest.raises(ValueError, match="not an item"):
        text_to_sid(text)


def test_text_to_sid_checks_spec():
    spec = ItemTokenSpec(2, [3, 4])
    assert text_to_sid(sid_to_text([2, 3]), spec) == [2, 3]
    with pytest.raises(ValueError, match="levels"):
        text_to_sid(sid_to_text([2, 3, 0]), spec)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        text_to_sid(sid_to_text([2, 4]), spec)


# ------------------------------------------------------------------------------------------------- ItemTokenizer


def test_every_item_round_trips(extended):
    """Codes -> ids -> codes, and codes -> text -> HF tokens -> text -> codes, for all 500 items."""
    tokenizer, _, item_tok, catalogue = extended
    codes = torch.from_numpy(catalogue.semantic_ids)  # [500, 4]
    ids = item_tok.encode(codes)  # [500, 4]
    decoded = item_tok.decode(ids)
    assert torch.equal(decoded, codes)
    item_of = {tuple(row): i for i, row in enumerate(catalogue.semantic_ids.tolist())}
    assert [item_of[tuple(row)] for row in decoded.tolist()] == list(range(NUM_ITEMS))

    # Column l lies in level l's slice, at offset = code.
    for level in range(NUM_LEVELS):
        start, stop = item_tok.code_slice(level)
        assert stop - start == CODEBOOK
        assert torch.equal(ids[:, level] - start, codes[:, level])

    texts = [sid_to_text(row) for row in catalogue.semantic_ids.tolist()]
    hf_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(len(row) == NUM_LEVELS + 2 for row in hf_ids)  # one token per level + begin + end: never split
    assert torch.equal(torch.tensor(hf_ids), item_tok.encode_with_boundaries(codes))
    for text, row, code_row in zip(texts, hf_ids, catalogue.semantic_ids.tolist()):
        assert tokenizer.decode(row) == text
        assert text_to_sid("".join(tokenizer.convert_ids_to_tokens(row))) == code_row


def test_item_inside_running_text(extended):
    tokenizer, _, item_tok, catalogue = extended
    codes = catalogue.semantic_ids[7].tolist()
    ids = tokenizer(f"user bought {sid_to_text(codes)} and red shoes", add_special_tokens=False)["input_ids"]
    item_ids = item_tok.encode_with_boundaries(torch.tensor(codes)).tolist()
    start = ids.index(item_tok.begin_id)
    assert ids[start : start + NUM_LEVELS + 2] == item_ids
    assert item_tok.decode(torch.tensor(ids[start + 1 : start + 1 + NUM_LEVELS])).tolist() == codes


def test_mixed_codebook_sizes_layout(base_tokenizer):
    # Sizes 5, 7, 3 appended after the n existing tokens: begin n, end n+1, a at n+2.., b at n+7.., c at n+14..
    tokenizer = fresh_tokenizer(base_tokenizer)
    n = len(tokenizer)
    model = build_tiny_model(tokenizer, seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, [5, 7, 3]))
    assert (item_tok.begin_id, item_tok.end_id) == (n, n + 1)
    assert item_tok.level_offset.tolist() == [n + 2, n + 7, n + 14]
    assert [item_tok.code_slice(lv) for lv in range(3)] == [(n + 2, n + 7), (n + 7, n + 14), (n + 14, n + 17)]
    assert tokenizer.convert_ids_to_tokens(list(range(n + 7, n + 14))) == [f"<item_b_{c}>" for c in range(7)]
    assert item_tok.encode(torch.tensor([[4, 6, 2], [0, 0, 0]])).tolist() == [[n + 6, n + 13, n + 16],
                                                                           [n + 2, n + 7, n + 14]]
    with pytest.raises(ValueError, match="level must be"):
        item_tok.code_slice(3)


def test_decode_marks_non_item_tokens(extended):
    tokenizer, _, item_tok, _ = extended
    a0, b0 = item_tok.level_offset[0].item(), item_tok.level_offset[1].item()
    word = tokenizer("red", add_special_tokens=False)["input_ids"][0]
    # Column 0: a plain word; column 1: begin; column 2: a level-b token in the level-c column; column 3: valid d_5.
    ids = torch.tensor([[word, item_tok.begin_id, b0 + 3, item_tok.level_offset[3].item() + 5]])
    assert item_tok.decode(ids).tolist() == [[-1, -1, -1, 5]]
    # Element-wise views ignore position: b0+3 is level 1, code 3.
    flat = torch.tensor([word, item_tok.end_id, a0 + 36, b0 + 3])
    assert item_tok.token_level(flat).tolist() == [-1, -1, 0, 1]
    assert item_tok.token_code(flat).tolist() == [-1, -1, 36, 3]


def test_encode_rejects_bad_codes(extended):
    _, _, item_tok, _ = extended
    with pytest.raises(ValueError, match=r"row 1 = \[0, 37, 0, 0\]"):
        item_tok.encode(torch.tensor([[0, 0, 0, 0], [0, 37, 0, 0]]))
    with pytest.raises(ValueError, match="outside the codebook"):
        item_tok.encode(torch.tensor([[0, 0, -1, 0]]))
    with pytest.raises(ValueError, match="last dim num_levels=4"):
        item_tok.encode(torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="last dim num_levels=4"):
        item_tok.decode(torch.tensor([[0, 0, 0]]))


def test_from_tokenizer_infers_spec(extended):
    tokenizer, _, item_tok, _ = extended
    inferred = ItemTokenizer.from_tokenizer(tokenizer)
    assert inferred.spec == ItemTokenSpec(NUM_LEVELS, CODEBOOK)
    assert torch.equal(inferred.level_offset, item_tok.level_offset)
    assert (inferred.begin_id, inferred.end_id) == (item_tok.begin_id, item_tok.end_id)


def test_item_tokenizer_needs_contiguous_item_tokens(base_tokenizer):
    with pytest.raises(ValueError, match="lacks 8 item tokens"):
        ItemTokenizer(base_tokenizer, ItemTokenSpec(2, 3))
    with pytest.raises(ValueError, match="no item tokens"):
        ItemTokenizer.from_tokenizer(base_tokenizer)
    # Level a's codes added out of order: <item_a_1> gets the smaller id, so code c is not offset + c.
    tokenizer = fresh_tokenizer(base_tokenizer)
    tokens = all_item_tokens(ItemTokenSpec(2, 3))
    tokens[2], tokens[3] = tokens[3], tokens[2]
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    with pytest.raises(ValueError, match="level 0 .* contiguous"):
        ItemTokenizer(tokenizer, ItemTokenSpec(2, 3))


# ------------------------------------------------------------------------------------------- extend_vocabulary


@pytest.mark.parametrize("tied", [True, False])
def test_extension_keeps_old_rows_and_pads(base_tokenizer, tied):
    tokenizer = fresh_tokenizer(base_tokenizer)
    old_len = len(tokenizer)  # 300 -> model rows 320
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied, seed=0)
    old_in = model.get_input_embeddings().weight.detach().clone()  # [320, 64]
    old_out = model.get_output_embeddings().weight.detach().clone()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(NUM_LEVELS, CODEBOOK), noise_std=0.0)

    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    # 300 + 2 + 4 * 37 = 450 tokens -> 512 rows (next multiple of 64).
    assert len(tokenizer) == 450
    assert new_in.shape == (512, 64) and new_out.shape == (512, 64)
    assert model.config.vocab_size == 512
    # The 300 real token rows are bit-identical; spare rows 300..319 now hold the first item tokens.
    assert torch.equal(new_in[:old_len], old_in[:old_len])
    assert torch.equal(new_out[:old_len], old_out[:old_len])
    assert (new_in is new_out) == tied and (model.get_input_embeddings().weight is new_out) == tied

    # noise_std=0: every item row is exactly the mean of the 300 real token rows of its own matrix.
    rows = new_token_row_ids(item_tok)
    assert torch.equal(rows, torch.arange(old_len, old_len + 2 + NUM_LEVELS * CODEBOOK))
    torch.testing.assert_close(new_in[rows], old_in[:old_len].mean(0).expand(len(rows), -1))
    torch.testing.assert_close(new_out[rows], old_out[:old_len].mean(0).expand(len(rows), -1))
    # Padding rows 450..511 are written too (mean), never left as garbage.
    torch.testing.assert_close(new_in[450:], old_in[:old_len].mean(0).expand(62, -1))


def test_mean_init_noise_is_seeded_gaussian(base_tokenizer):
    def extend(seed):
        tokenizer = fresh_tokenizer(base_tokenizer)
        model = build_tiny_model(tokenizer, seed=0)
        old_mean = model.get_input_embeddings().weight[:300].detach().mean(0)
        item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(NUM_LEVELS, CODEBOOK), noise_std=0.02,
                                     seed=seed)
        return model.get_input_embeddings().weight[new_token_row_ids(item_tok)].detach() - old_mean

    residual = extend(seed=0)  # [150, 64]: 9600 draws of N(0, 0.02^2)
    # Sample std of 9600 normal draws is within 0.02 * (1 +- 3 / sqrt(2 * 9600)) ~ [0.0196, 0.0204] w.h.p.
    assert 0.0190 < residual.std().item() < 0.0210
    assert abs(residual.mean().item()) < 0.002  # 3 standard errors: 3 * 0.02 / sqrt(9600) = 0.0006, slack 3x
    assert torch.equal(extend(seed=0), residual)
    assert not torch.equal(extend(seed=1), residual)


@pytest.mark.parametrize("tied", [True, False])
def test_semantic_init_is_mean_of_title_embeddings(base_tokenizer, tied):
    """Codes shared by items start at the mean of those items' mean title-token rows, computed here by hand."""
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied, seed=0)
    titles = ["red lipstick", "dry hair shampoo", "blue denim jacket", ""]
    # Level a (K=3): code 0 <- items 0, 1; code 1 <- item 2; code 2 unused.
    # Level b (K=4): code 1 <- item 0; code 2 <- items 1, 2; code 3 <- item 3 only, whose title is empty -> unused.
    codes = np.array([[0, 1], [0, 2], [1, 2], [0, 3]])
    catalogue = make_catalogue(codes, titles)
    matrices = {"in": model.get_input_embeddings().weight.detach().clone()}
    if not tied:
        matrices["out"] = model.get_output_embeddings().weight.detach().clone()

    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(2, [3, 4]), init="semantic", catalogue=catalogue,
                                 noise_std=0.0)
    new = {"in": model.get_input_embeddings().weight, "out": model.get_output_embeddings().weight}
    a, b = item_tok.level_offset.tolist()
    for name, old in matrices.items():
        title_ids = [base_tokenizer(t, add_special_tokens=False)["input_ids"] for t in titles[:3]]
        e = [old[ids].mean(0) for ids in title_ids]  # mean token row of each title
        global_mean = old[:300].mean(0)
        expected = {
            a + 0: (e[0] + e[1]) / 2,
            a + 1: e[2],
            a + 2: global_mean,  # unused -> mean (+ zero noise)
            b + 0: global_mean,
            b + 1: e[0],
            b + 2: (e[1] + e[2]) / 2,
            b + 3: global_mean,  # only an item without a title
            item_tok.begin_id: global_mean,
            item_tok.end_id: global_mean,
        }
        for row, value in expected.items():
            torch.testing.assert_close(new[name][row], value, msg=f"{name} row {row}")
        assert torch.equal(new[name][:300], old[:300])
    assert (new["in"] is new["out"]) == tied


def test_bfloat16_model(base_tokenizer):
    # Means are taken in float32 and cast once: item rows equal bf16(mean of the bf16 old rows in float32).
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    old = model.get_input_embeddings().weight.detach().clone()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3), noise_std=0.0)
    weight = model.get_input_embeddings().weight
    assert weight.dtype == torch.bfloat16 and torch.equal(weight[:300], old[:300])
    expected = old[:300].float().mean(0).to(torch.bfloat16)
    assert torch.equal(weight[new_token_row_ids(item_tok)], expected.expand(8, -1))


def test_semantic_ids_argument_overrides_catalogue(base_tokenizer):
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, seed=0)
    old = model.get_input_embeddings().weight.detach().clone()
    catalogue = make_catalogue(np.array([[0], [0]]), ["red lipstick", "blue jacket"])
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(1, 2), init="semantic", catalogue=catalogue,
                                 semantic_ids=torch.tensor([[0], [1]]), noise_std=0.0)
    e1 = old[base_tokenizer("blue jacket", add_special_tokens=False)["input_ids"]].mean(0)
    torch.testing.assert_close(model.get_input_embeddings().weight[item_tok.level_offset[0] + 1], e1)


def test_spare_rows_are_used_without_resizing(base_tokenizer):
    # Like Qwen3 (151669 tokens, 151936 rows): 300 tokens, 512 rows, 8 new tokens fit into rows 300..307.
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, seed=0, vocab_size=512)
    old = model.get_input_embeddings().weight.detach().clone()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3))
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 512 and model.config.vocab_size == 512
    assert torch.equal(new_token_row_ids(item_tok), torch.arange(300, 308))
    assert torch.equal(weight[:300], old[:300]) and torch.equal(weight[308:], old[308:])
    assert not torch.equal(weight[300:308], old[300:308])


def test_extended_model_trains_item_rows(extended):
    tokenizer, model, item_tok, catalogue = extended
    text = f"user bought {sid_to_text(catalogue.semantic_ids[0].tolist())}"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert torch.isfinite(loss)
    # The item rows that appear in the text get gradient (as inputs and as targets).
    first_code_row = item_tok.level_offset[0] + int(catalogue.semantic_ids[0, 0])
    assert grad[item_tok.begin_id].abs().sum() > 0 and grad[first_code_row].abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_reload_round_trip(base_tokenizer, tmp_path, tied):
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied, seed=0)
    catalogue = make_catalogue(random_unique_codes(50, 3, 11))
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, 11), init="semantic", catalogue=catalogue)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    tokenizer2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    texts = [f"red {sid_to_text(row)} shoes" for row in catalogue.semantic_ids.tolist()]
    assert tokenizer2(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    item_tok2 = ItemTokenizer.from_tokenizer(tokenizer2)
    assert torch.equal(item_tok2.level_offset, item_tok.level_offset)
    assert torch.equal(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(model2.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert (model2.get_input_embeddings().weight is model2.get_output_embeddings().weight) == tied


# -------------------------------------------------------------------------------------------------------- errors


def test_extending_twice_is_refused(base_tokenizer):
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, seed=0)
    extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3))
    size = len(tokenizer)
    with pytest.raises(ValueError, match="already contains 8 item tokens"):
        extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3))
    assert len(tokenizer) == size  # nothing added by the refused call


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init="random"), "init must be one of"),
        (dict(noise_std=-1.0), "noise_std"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(init="semantic"), "needs a catalogue"),
        (dict(init="semantic", catalogue=Catalogue.ids_only(["x", "y"])), "needs a catalogue"),  # no semantic IDs
        (dict(init="semantic", catalogue=Catalogue.ids_only(["x", "y"], np.array([[0, 1], [1, 2]]))),
         "every catalogue title is empty"),
        (dict(semantic_ids=np.array([[0, 3], [1, 2]])), "level 1 has code 3 but codebook size 3"),
        (dict(semantic_ids=np.array([[0, 1, 2]])), r"shape \[N, num_levels=2\]"),
        (dict(semantic_ids=np.array([[0, -1]])), "negative codes"),
        (dict(semantic_ids=np.array([[0.0, 1.0]])), "must be integers"),
        (dict(catalogue=make_catalogue(np.zeros((2, 2), np.int64), ["a", "b"]), semantic_ids=np.zeros((3, 2), int)),
         "3 rows but the catalogue 2 items"),
    ],
)
def test_bad_arguments_raise(base_tokenizer, kwargs, message):
    tokenizer = fresh_tokenizer(base_tokenizer)
    model = build_tiny_model(tokenizer, seed=0)
    with pytest.raises(ValueError, match=message):
        extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3), **kwargs)
    assert len(tokenizer) == 300  # validation happens before the tokenizer is touched


def test_tokenizer_larger_than_model_is_refused(base_tokenizer):
    tokenizer = fresh_tokenizer(base_tokenizer)
    config = build_config(tokenizer)
    config.vocab_size = 256  # build_config itself refuses a vocab smaller than the tokenizer
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="300 tokens but the model's input embeddings only 256 rows"):
        extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 3))
