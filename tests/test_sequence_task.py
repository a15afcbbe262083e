"""Whole-sequence sequential preference examples (onerec_dist/training/tasks_sequence.py) against one-target windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.splits import leave_one_out
from onerec_dist.data.synthetic import generate_synthetic
from onerec_dist.data.types import Catalogue, Examples, InteractionData
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary
from onerec_dist.training.batching import IGNORE_INDEX, collate
from onerec_dist.training.loss import causal_lm_loss_sums
from onerec_dist.training.tasks import SEQUENTIAL, build_alignment_mixture, sequential_preference
from onerec_dist.training.tasks_sequence import whole_sequence_preference

L = 3  # levels per item ID: an ID is L + 2 = 5 tokens, an answer 6 (with eos)


@pytest.fixture(scope="module")
def world():
    catalogue = Catalogue.ids_only([f"i{k}" for k in range(6)])
    codes = np.array([[k, (k + 1) % 8, (k * 3) % 8] for k in range(6)])
    tokenizer = build_tokenizer_from_corpus(["the user has purchased in order which item next"], vocab_size=300)
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, seed=0)
    extend_vocabulary(model, tokenizer, ItemTokenSpec(L, 8))
    return catalogue, codes, tokenizer, model.eval()


def loss_sum(model, examples) -> tuple[float, int]:
    batch = collate(examples, (SEQUENTIAL,))
    with torch.no_grad():
        sums = causal_lm_loss_sums(model, batch)
    return float(sums.loss_sum), int(sums.task_counts.sum())


def test_one_target_sequence_gives_the_window_loss(world):
    # User items [3, 5]: one training target (5 after 3). Window: prompt(3) -> ID(5) eos, loss on the 6 answer
    # tokens. Whole sequence: the same prompt listing s_0 = 3 (context, no loss: nothing predicts it) and the same
    # answer. Same tokens, same labels, so the same summed loss over the same 6 tokens.
    catalogue, codes, tokenizer, model = world
    data = InteractionData("t", catalogue, {"u": [3, 5, 0, 1]})
    train = Examples(["u"], [[3]], [5])
    [window] = sequential_preference(data, train, codes, tokenizer, max_length=256)
    [whole] = whole_sequence_preference(data, train, codes, tokenizer, max_length=256)
    assert whole.input_ids == window.input_ids and whole.labels == window.labels
    window_loss, window_tokens = loss_sum(model, [window])
    whole_loss, whole_tokens = loss_sum(model, [whole])
    assert window_tokens == whole_tokens == L + 3
    assert whole_loss == pytest.approx(window_loss, rel=1e-6) and whole_loss > 0


def test_every_target_carries_its_id_tokens_once(world):
    # User items s_0..s_3 = [1, 2, 4, 0]: targets s_1, s_2 in the prompt (5 ID tokens each) and s_3 as the answer
    # (5 + eos): 5 + 5 + 6 = 16 loss tokens, and exactly the ID tokens of items 2, 4 (the prompt's first item 1 has
    # none). The windows of the same user: 3 examples with 6 loss tokens each, 18 in all (3 eos instead of 1).
    catalogue, codes, tokenizer, _ = world
    data = InteractionData("t", catalogue, {"u": [1, 2, 4, 0, 5, 3]})
    train = Examples(["u"] * 3, [[1], [1, 2], [1, 2, 4]], [2, 4, 0])
    [whole] = whole_sequence_preference(data, train, codes, tokenizer, max_length=256)
    assert whole.num_loss_tokens == 16
    ids = {k: tokenizer.encode(f"<|item_begin|><item_a_{c[0]}><item_b_{c[1]}><item_c_{c[2]}><|item_end|>",
                               add_special_tokens=False) for k, c in enumerate(codes.tolist())}
    labelled = [t for t in whole.labels if t != IGNORE_INDEX]
    assert labelled == ids[2] + ids[4] + ids[0] + [tokenizer.eos_token_id]
    windows = sequential_preference(data, train, codes, tokenizer, max_length=256)
    assert sum(w.num_loss_tokens for w in windows) == 18
    assert len(whole) < sum(len(w) for w in windows)  # fewer tokens for the same targets


def test_long_sequence_is_cut_into_windows_covering_each_target_once(world):
    # 12 items, at most 4 items of context per window: windows end at s_11 (context s_7..s_10), s_7 (s_3..s_6),
    # s_3 (s_0..s_2). Targets: 4 + 4 + 3 = 11 = every item but s_0; loss tokens 11 x 5 + 3 eos.
    catalogue, codes, tokenizer, _ = world
    sequence = [k % 6 for k in range(12)]
    data = InteractionData("t", catalogue, {"u": sequence + [0, 1]})
    train = Examples(["u"], [sequence[:-1]], [sequence[-1]])
    examples = whole_sequence_preference(data, train, codes, tokenizer, max_length=256, max_history=4)
    assert [e.source for e in examples] == ["user u items 0..3", "user u items 3..7", "user u items 7..11"]
    assert sum(e.num_loss_tokens for e in examples) == 11 * (L + 2) + 3


def test_mixture_option_and_synthetic_data(world):
    _, _, tokenizer, _ = world
    data = generate_synthetic(SyntheticConfig(num_users=8, num_items=24, min_seq_len=6, max_seq_len=9, seed=1))
    codes = np.array([[k % 8, k // 8, (k * 3) % 8] for k in range(24)])  # 24 distinct IDs
    train = leave_one_out(data.sequences, max_history=50)["train"]
    window, _ = build_alignment_mixture(data, train, codes, tokenizer, ratios={SEQUENTIAL: 1.0}, tasks=[SEQUENTIAL],
                                        max_length=256)
    whole, stats = build_alignment_mixture(data, train, codes, tokenizer, ratios={SEQUENTIAL: 1.0},
                                           tasks=[SEQUENTIAL], max_length=256, sequential_format="whole_sequence")
    assert len(window) == len(train) and len(whole) == 8  # one example per user instead of one per target
    # Same targets: every training target's 5 ID tokens; windows add one eos per target, sequences one per user.
    assert stats["tasks"][SEQUENTIAL]["loss_tokens"] == len(train) * (L + 2) + 8
    with pytest.raises(ValueError, match="sequential_format"):
        build_alignment_mixture(data, train, codes, tokenizer, ratios={SEQUENTIAL: 1.0}, tasks=[SEQUENTIAL],
                                sequential_format="sliding")
