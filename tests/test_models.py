"""Offline tokenizer, tiny Qwen3 builders and load_pretrained on a locally saved checkpoint (the real-user path)."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from onerec_dist import models
from onerec_dist.data.types import Catalogue
from onerec_dist.models import (
    PRESETS,
    build_config,
    build_tiny_model,
    build_tokenizer_from_corpus,
    load_pretrained,
    resolve_attn_implementation,
)
from onerec_dist.sid.tokens import ItemTokenizer, ItemTokenSpec, sid_to_text
from onerec_dist.sid.vocab import extend_vocabulary

CORPUS = [
    "red matte lipstick long lasting",
    "dry hair shampoo with argan oil",
    "blue denim jacket for men",
    "running shoes lightweight breathable",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer_from_corpus(CORPUS, vocab_size=300)


# ------------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_special_tokens(tokenizer):
    # The trainer puts the special tokens first, in SPECIAL_TOKENS order.
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "<|pad|>", "<|bos|>", "<|im_end|>", "<|unk|>", "<|im_start|>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    assert len(tokenizer) == 300
    # Nothing is added around plain text (like Qwen): encode gives only the text's tokens.
    assert tokenizer("red")["input_ids"] == tokenizer("red", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["red matte lipstick", "Zürich ☕ 東京 🚀", "  tabs\tand\nnewlines  ", "x" * 50])
def test_tokenizer_is_lossless_byte_level(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # every byte has a token, even bytes the corpus never had
    assert tokenizer.decode(ids) == text


def test_tokenizer_learns_merges():
    # One repeated word: 7 merges build "lipstick" and 8 more build "Ġlipstick" (byte-level marks the space as Ġ),
    # well within the 300 - 261 = 39 merges allowed. Letters never seen together stay one byte each.
    tok = build_tokenizer_from_corpus(["lipstick lipstick lipstick"] * 20, vocab_size=300)
    assert tok.tokenize("lipstick lipstick") == ["lipstick", "Ġlipstick"]
    assert tok.tokenize("qzvxw") == ["q", "z", "v", "x", "w"]
    assert len(tok) <= 300


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "You recommend."}, {"role": "user", "content": "red lipstick?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou recommend.<|im_end|>\n"
        "<|im_start|>user\nred lipstick?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(tokenizer.eos_token_id) == 2


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["red matte lipstick", "Zürich ☕", "<|im_start|>user\nhi<|im_end|>"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token, loaded.eos_token) == ("<|pad|>", "<|im_end|>")


@pytest.mark.parametrize(
    "texts, vocab_size, message",
    [([], 300, "non-empty"), (["", ""], 300, "non-empty"), (CORPUS, 260, "vocab_size must be >= 261")],
)
def test_tokenizer_bad_inputs(texts, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer_from_corpus(texts, vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------------------- builders


def test_presets_give_documented_shapes(tokenizer):
    tiny = build_config(tokenizer, "tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.num_key_value_heads,
            tiny.intermediate_size) == (64, 2, 4, 2, 128)
    small = build_config(tokenizer, "small")
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (256, 4, 8)
    # Qwen/Qwen3-0.6B config.json: 1024 hidden, 28 layers, 16 q / 8 kv heads of 128, 3072 MLP, rope 1e6.
    q = build_config(tokenizer, "qwen3-0.6b")
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads, q.head_dim,
            q.intermediate_size, q.max_position_embeddings) == (1024, 28, 16, 8, 128, 3072, 40960)
    assert q.rope_parameters["rope_theta"] == 1_000_000.0 and q.tie_word_embeddings
    for config in (tiny, small, q):
        assert config.vocab_size == 320  # 300 tokens -> next multiple of 64
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


def test_qwen3_0_6b_parameter_count(tokenizer):
    # Built on the meta device (no memory). Per layer: q 1024x2048 + k, v 1024x1024 + o 2048x1024 + q/k norms 2x128
    # + MLP 3x1024x3072 + 2 RMSNorms 2x1024 = 15,730,944; x 28 + final norm 1024 = 440,467,456 (Qwen: "0.44B
    # non-embedding parameters").
    with torch.device("meta"):
        model = build_tiny_model(tokenizer, preset="qwen3-0.6b")
    non_embedding = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert non_embedding == 440_467_456


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_runs(tokenizer, preset, tied):
    model = build_tiny_model(tokenizer, preset=preset, tie_word_embeddings=tied, seed=0)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config._attn_implementation == "sdpa" and model.training
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    ids = torch.tensor([tokenizer("red matte lipstick", add_special_tokens=False)["input_ids"]])  # [1, T]
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 320)
    # A random model predicts near-uniformly over 320 rows: loss ~ ln 320 = 5.77.
    assert abs(out.loss.item() - np.log(320)) < 0.5


def test_builder_overrides_and_seed(tokenizer):
    model = build_tiny_model(tokenizer, seed=3, num_hidden_layers=1, intermediate_size=96)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.model.layers[0].mlp.up_proj.weight.shape == (96, 64)
    again = build_tiny_model(tokenizer, seed=3, num_hidden_layers=1, intermediate_size=96)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="huge"), "preset must be one of"),
        (dict(hidden_sise=32), r"unknown Qwen3Config fields \['hidden_sise'\]"),
        (dict(vocab_size=128), "smaller than the tokenizer"),
    ],
)
def test_builder_bad_inputs(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tokenizer, **kwargs)


def test_presets_are_all_documented():
    assert set(PRESETS) == {"tiny", "small", "qwen3-0.6b"}


# ------------------------------------------------------------------------------------------------ load_pretrained


@pytest.mark.parametrize("tied", [True, False])
def test_load_pretrained_local_checkpoint_round_trip(tokenizer, tmp_path, tied):
    """Build, extend with item tokens (semantic init), save, load with load_pretrained: same ids, same weights."""
    tok = copy.deepcopy(tokenizer)
    model = build_tiny_model(tok, tie_word_embeddings=tied, seed=0)
    codes = np.array([[0, 1, 2], [0, 2, 4], [1, 0, 3], [2, 2, 0]])
    catalogue = Catalogue([f"i{i}" for i in range(4)], ["red lipstick", "dry shampoo", "denim jacket", "shoes"],
                          [""] * 4, [""] * 4, [[] for _ in range(4)], codes)
    item_tok = extend_vocabulary(model, tok, ItemTokenSpec(3, [3, 3, 5]), init="semantic", catalogue=catalogue)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, loaded_tok = load_pretrained(str(tmp_path))
    assert loaded.config._attn_implementation == "sdpa"  # CPU: no flash_attn
    assert loaded.dtype == torch.float32  # "auto" keeps the checkpoint's dtype
    texts = [f"bought {sid_to_text(row)} then red shoes" for row in codes.tolist()]
    assert loaded_tok(texts)["input_ids"] == tok(texts)["input_ids"]
    loaded_items = ItemTokenizer.from_tokenizer(loaded_tok)
    assert torch.equal(loaded_items.level_offset, item_tok.level_offset)
    assert torch.equal(loaded_items.encode(torch.from_numpy(codes)), item_tok.encode(torch.from_numpy(codes)))
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert (loaded.get_input_embeddings().weight is loaded.get_output_embeddings().weight) == tied
    # Same function: identical logits on a sequence with item tokens.
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)

    bf16, _ = load_pretrained(str(tmp_path), dtype="bfloat16", attn_implementation="eager")
    assert bf16.dtype == torch.bfloat16 and bf16.config._attn_implementation == "eager"


def test_load_pretrained_sets_missing_pad_token(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    build_tiny_model(tok, seed=0).save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, loaded_tok = load_pretrained(str(tmp_path))
    assert loaded_tok.pad_token == "<|im_end|>" == loaded_tok.eos_token


def test_load_pretrained_bad_inputs(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not a local checkpoint directory and not in the Hugging Face cache"):
        load_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a local checkpoint directory"):
        load_pretrained("no-such-org/no-such-model-xyz")
    build_tiny_model(tokenizer, seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_pretrained(str(tmp_path), attn_implementation="flash")
    with pytest.raises(ValueError, match="dtype must be"):
        load_pretrained(str(tmp_path), dtype="float33")
    with pytest.raises(ValueError, match="floating-point"):
        load_pretrained(str(tmp_path), dtype=torch.int8)


def _fake_flash(monkeypatch, installed: bool, cuda: bool):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            return object() if installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize(
    "installed, cuda, dtype, expected",
    [
        (True, True, torch.bfloat16, "flash_attention_2"),
        (True, True, torch.float16, "flash_attention_2"),
        (True, True, torch.float32, "sdpa"),  # flash-attn kernels take half precision only
        (True, False, torch.bfloat16, "sdpa"),
        (False, True, torch.bfloat16, "sdpa"),
    ],
)
def test_auto_attention_choice(monkeypatch, installed, cuda, dtype, expected):
    _fake_flash(monkeypatch, installed, cuda)
    assert resolve_attn_implementation("auto", dtype) == expected


def test_explicit_flash_without_flash_attn_is_refused(monkeypatch):
    _fake_flash(monkeypatch, installed=False, cuda=True)
    with pytest.raises(ValueError, match="needs the flash_attn package"):
        resolve_attn_implementation("flash_attention_2", torch.bfloat16)
    assert resolve_attn_implementation("sdpa") == "sdpa"
