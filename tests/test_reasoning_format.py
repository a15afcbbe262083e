"""The think-block answer format (onerec_dist.reasoning.cot_format): vocabulary extension, training examples,
inference prompts, closing and parsing, all agreeing token for token."""

import copy

import numpy as np
import pytest
import torch

from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.reasoning.cot_format import (NOTHINK_TASK, REASONING_TASK, THINK_BEGIN, THINK_END, ThinkTokens,
                                              add_think_tokens, answer_ids, close_think, inference_prompt,
                                              parse_continuation, training_example)
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary
from onerec_dist.training.batching import IGNORE_INDEX

WORDS = "the user bought film cameras lenses and photo printers often from lumora next likely a".split()
CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
CODES = np.array([[0, 1], [2, 3], [1, 0], [3, 3], [2, 1]])  # 5 items, 2 levels x 4 codes


@pytest.fixture(scope="module")
def base():
    return build_tokenizer_from_corpus(CORPUS, vocab_size=300)


def extended_model(base, tied=True):
    tokenizer = copy.deepcopy(base)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied, seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(2, 4), noise_std=0.0)
    return tokenizer, model, item_tok


@pytest.mark.parametrize("tied", [True, False])
def test_think_tokens_are_added_with_old_rows_untouched(base, tied):
    tokenizer, model, item_tok = extended_model(base, tied)
    old_len = len(tokenizer)  # 300 + 2 + 8 = 310 tokens, 320 rows
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    think = add_think_tokens(model, tokenizer, noise_std=0.0)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    # Two new tokens land in spare rows 310, 311 of the 320: no resize, every row of an older token bit-identical.
    assert len(tokenizer) == old_len + 2 and new_in.shape == old_in.shape
    assert (think.begin_id, think.end_id) == (old_len, old_len + 1)
    assert torch.equal(new_in[:old_len], old_in[:old_len]) and torch.equal(new_out[:old_len], old_out[:old_len])
    assert (new_in is new_out) == tied
    # noise_std = 0: both rows are the mean of the 310 existing token rows of their own matrix.
    torch.testing.assert_close(new_in[old_len:old_len + 2], old_in[:old_len].mean(0).expand(2, -1))
    torch.testing.assert_close(new_out[old_len:old_len + 2], old_out[:old_len].mean(0).expand(2, -1))
    # The item tokens still have their contiguous layout, and the delimiters are never split.
    assert item_tok.item_token_ids().tolist() == list(range(300, 310))
    assert tokenizer.encode("a<think>b</think>", add_special_tokens=False)[1::2] == [think.begin_id, think.end_id]
    # A second call (or a tokenizer that has them, like Qwen3's) changes nothing.
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_think_tokens(model, tokenizer) == think and len(tokenizer) == old_len + 2
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_think_tokens_resize_when_no_spare_row(base):
    tokenizer = copy.deepcopy(base)
    model = build_tiny_model(tokenizer, seed=0, vocab_size=301)  # one spare row only
    old = model.get_input_embeddings().weight.detach().clone()
    think = add_think_tokens(model, tokenizer, noise_std=0.02, seed=3)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 320 and torch.equal(weight[:300], old[:300])
    noise = weight[[think.begin_id, think.end_id]] - old[:300].mean(0)
    assert 0 < noise.abs().max() < 0.2  # mean + N(0, 0.02^2): 128 draws all within 10 sd
    assert not torch.isnan(weight).any()


def test_missing_think_tokens_are_an_error(base):
    with pytest.raises(ValueError, match="lacks.*<think>.*add_think_tokens"):
        ThinkTokens.from_tokenizer(copy.deepcopy(base))


@pytest.fixture(scope="module")
def think_setup(base):
    tokenizer, model, item_tok = extended_model(base)
    think = add_think_tokens(model, tokenizer)
    item_ids = item_tok.encode_with_boundaries(torch.as_tensor(CODES)).tolist()  # [5][4]
    return tokenizer, think, item_ids


def test_training_example_is_prompt_then_answer_with_loss_after_think(think_setup):
    tokenizer, think, item_ids = think_setup
    rationale = "the user bought lenses often from lumora; photo printers next"
    ex = training_example(tokenizer, think, CODES, item_ids[4], [0, 1, 2], rationale, max_length=512, source="s")
    prompt = inference_prompt(tokenizer, think, CODES, [0, 1, 2])
    assert prompt[-1] == think.begin_id and ex.input_ids[:len(prompt)] == prompt and ex.task == REASONING_TASK
    # Loss exactly on what follows <think>: rationale, </think>, separator, item, eos (equal weight per token).
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + ex.input_ids[len(prompt):]
    text = tokenizer.decode(ex.input_ids[len(prompt) - 1:])
    assert text == (f"{THINK_BEGIN}\n{rationale}\n{THINK_END}\n\n<|item_begin|><item_a_2><item_b_1><|item_end|>"
                    "<|im_end|>")
    # Inference: prompt + generated body, closed, then the decoder's item + eos == the training sequence.
    body = ex.input_ids[len(prompt):ex.input_ids.index(think.end_id)]
    assert close_think(think, prompt, body) + item_ids[4] + [tokenizer.eos_token_id] == ex.input_ids


def test_non_thinking_answer_is_the_same_format_with_an_empty_block(think_setup):
    tokenizer, think, item_ids = think_setup
    ex = training_example(tokenizer, think, CODES, item_ids[1], [0, 2], None, max_length=512)
    prompt = inference_prompt(tokenizer, think, CODES, [0, 2])
    assert ex.task == NOTHINK_TASK and tokenizer.decode(ex.input_ids[len(prompt) - 1:]).startswith(
        f"{THINK_BEGIN}\n\n{THINK_END}\n\n<|item_begin|>")
    assert close_think(think, prompt) + item_ids[1] + [tokenizer.eos_token_id] == ex.input_ids
    blank = training_example(tokenizer, think, CODES, item_ids[1], [0, 2], "   ", max_length=512)
    assert blank.input_ids == ex.input_ids


def test_history_is_cut_from_the_left_and_answers_never(think_setup):
    tokenizer, think, item_ids = think_setup
    rationale = "lenses then photo printers"
    full = training_example(tokenizer, think, CODES, item_ids[0], [1, 2, 3, 4, 1], rationale, max_length=512)
    answer = answer_ids(tokenizer, think, rationale, item_ids[0])
    short = training_example(tokenizer, think, CODES, item_ids[0], [1, 2, 3, 4, 1], rationale,
                             max_length=len(full.input_ids) - 1)
    assert len(short.input_ids) < len(full.input_ids) and short.input_ids[-len(answer):] == answer
    assert short.input_ids[:-len(answer)] == inference_prompt(tokenizer, think, CODES, [2, 3, 4, 1])
    with pytest.raises(ValueError, match="cannot hold a prompt with one history item"):
        training_example(tokenizer, think, CODES, item_ids[0], [1], rationale, max_length=len(answer) + 3)


def test_parse_continuation_closed_and_unclosed(think_setup):
    tokenizer, think, item_ids = think_setup
    ex = training_example(tokenizer, think, CODES, item_ids[3], [0], "film cameras then lenses", max_length=512)
    prompt = inference_prompt(tokenizer, think, CODES, [0])
    parsed = parse_continuation(tokenizer, think, ex.input_ids[len(prompt):])
    assert parsed.closed and parsed.rationale == "film cameras then lenses"
    assert parsed.rest_ids == list(think.after_ids) + item_ids[3] + [tokenizer.eos_token_id]
    cut = parse_continuation(tokenizer, think, ex.input_ids[len(prompt):len(prompt) + 3])
    assert not cut.closed and cut.rest_ids == [] and cut.rationale_ids == ex.input_ids[len(prompt):len(prompt) + 3]
    # Force-closing an unclosed rationale gives a valid prefix for the item decoder.
    assert close_think(think, prompt, cut.rationale_ids)[-len(think.after_ids) - 1] == think.end_id


def test_cot_sft_examples_mix_nothink_and_shuffle_as_configured(think_setup):
    from onerec_dist.reasoning.sft_data import cot_sft_examples

    tokenizer, think, item_ids = think_setup
    records = [{"user": f"u{i}", "example_index": i, "history": [i % 5, (i + 1) % 5], "target": (i + 2) % 5,
                "rationale": f"lenses {'then ' * (i + 1)}printers"} for i in range(20)]

    def body(ex):  # the decoded rationale of an example ("" for an empty think block)
        start = ex.input_ids.index(think.begin_id) + 1
        return tokenizer.decode(ex.input_ids[start:ex.input_ids.index(think.end_id)]).strip()

    plain = cot_sft_examples(records, CODES, tokenizer, think, max_length=512)
    assert [body(e) for e in plain] == [r["rationale"] for r in records]
    # Full history -> target: the prompt is the record's own history, the answer ends with the target's item.
    assert plain[3].input_ids[:len(inference_prompt(tokenizer, think, CODES, [3, 4]))] == \
        inference_prompt(tokenizer, think, CODES, [3, 4])
    assert plain[3].input_ids[-5:] == item_ids[0] + [tokenizer.eos_token_id]  # target (3 + 2) % 5 = 0
    # nothink_ratio 0.25 of 20 -> exactly 5 empty blocks; the others keep their own rationale.
    mixed = cot_sft_examples(records, CODES, tokenizer, think, max_length=512, nothink_ratio=0.25, seed=1)
    bodies = [body(e) for e in mixed]
    assert bodies.count("") == 5 and sum(e.task == NOTHINK_TASK for e in mixed) == 5
    assert all(b in ("", r["rationale"]) for b, r in zip(bodies, records))
    # shuffle: the same multiset of rationales, most of them on another record (all 20 texts are distinct).
    shuffled = [body(e) for e in cot_sft_examples(records, CODES, tokenizer, think, max_length=512,
                                                  shuffle_rationales=True, seed=2)]
    assert sorted(shuffled) == sorted(r["rationale"] for r in records)
    assert sum(s != r["rationale"] for s, r in zip(shuffled, records)) >= 15
    with pytest.raises(ValueError, match="reasoning.sft.nothink_ratio"):
        cot_sft_examples(records, CODES, tokenizer, think, max_length=512, nothink_ratio=1.5)
