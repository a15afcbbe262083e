"""Itemic Alignment tasks (OneRec-Think Sec. 3.2): token/label layout, item-token spelling, leakage, truncation,
general-text formats, mixture ratios, determinism and errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.splits import leave_one_out
from onerec_dist.data.synthetic import generate_synthetic
from onerec_dist.data.types import Catalogue, DropReport, Examples, InteractionData
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.prompts import item_text, next_item_question, render_prompt
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary
from onerec_dist.training.batching import IGNORE_INDEX, collate, task_names, validate_examples
from onerec_dist.training.tasks import (
    CAPTIONING,
    DEFAULT_RATIOS,
    GENERAL,
    PERSONA,
    SEQUENTIAL,
    TASKS,
    allocate_counts,
    build_alignment_mixture,
    cycle_sample,
    general_text,
    item_token_table,
    itemic_captioning,
    persona_grounding,
    resolve_ratios,
    sequential_preference,
    training_items,
    warmup_examples,
)
from onerec_dist.training.tasks_text import caption_question, derive_interest_summary, read_documents

NUM_LEVELS, CODEBOOK = 3, 8  # 512 possible IDs for 40 items
EOS_ID = 2  # <|im_end|>, id 2 in build_tokenizer_from_corpus's special tokens


def random_unique_codes(num_items: int, seed: int = 0) -> np.ndarray:
    """[N, L] distinct semantic IDs: distinct integers < K^L written in base K."""
    flat = np.random.default_rng(seed).choice(CODEBOOK**NUM_LEVELS, size=num_items, replace=False)
    return np.stack([(flat // CODEBOOK**p) % CODEBOOK for p in reversed(range(NUM_LEVELS))], axis=1)


@pytest.fixture(scope="module")
def world():
    """Synthetic data (30 users, 40 items), its leave-one-out splits, unique codes, an extended tokenizer."""
    data = generate_synthetic(SyntheticConfig(num_users=30, num_items=40, min_seq_len=6, max_seq_len=10, seed=3))
    splits = leave_one_out(data.sequences, max_history=50)
    codes = random_unique_codes(len(data.catalogue))
    cat = data.catalogue
    corpus = cat.titles + cat.descriptions + list(data.personas.values()) + read_documents(None)[:10]
    tokenizer = build_tokenizer_from_corpus(corpus, vocab_size=700)
    item_tok = extend_vocabulary(build_tiny_model(tokenizer, seed=0), tokenizer, ItemTokenSpec(NUM_LEVELS, CODEBOOK))
    return data, splits, codes, tokenizer, item_tok


def decode_items(input_ids: list[int], item_tok, codes: np.ndarray) -> list[int]:
    """Item indices of every <|item_begin|> c_1 .. c_L <|item_end|> run in ``input_ids``, in order."""
    index = {tuple(row): i for i, row in enumerate(codes.tolist())}
    ids = np.asarray(input_ids)
    found = []
    for start in np.flatnonzero(ids == item_tok.begin_id).tolist():
        run = ids[start:start + NUM_LEVELS + 2]
        assert run[-1] == item_tok.end_id, "an item must be exactly L + 2 tokens"
        found.append(index[tuple(item_tok.decode(torch.as_tensor(run[1:-1])).tolist())])
    return found


def train_index(example) -> int:
    return int(example.source.split("]")[0].removeprefix("train["))


# ---------------------------------------------------------------------------------------------------- item tokens


def test_item_text_becomes_exactly_l_plus_2_tokens(world):
    data, _, codes, tokenizer, item_tok = world
    table = item_token_table(tokenizer, codes, len(data.catalogue))
    expected = item_tok.encode_with_boundaries(torch.as_tensor(codes)).tolist()  # [N, L + 2]
    assert table == expected
    for i in range(len(codes)):
        ids = tokenizer.encode(item_text(codes[i]), add_special_tokens=False)
        assert len(ids) == NUM_LEVELS + 2 and ids == expected[i]


def test_item_token_table_rejects_bad_codes(world):
    data, _, codes, tokenizer, _ = world
    with pytest.raises(ValueError, match="rows but the catalogue"):
        item_token_table(tokenizer, codes[:5], len(data.catalogue))
    with pytest.raises(ValueError, match="levels"):
        item_token_table(tokenizer, codes[:, :2])
    with pytest.raises(ValueError, match="outside the codebook"):
        item_token_table(tokenizer, np.full((2, NUM_LEVELS), CODEBOOK))
    with pytest.raises(ValueError, match="integers"):
        item_token_table(tokenizer, codes.astype(float))
    plain = build_tokenizer_from_corpus(["a tokenizer without item tokens"], vocab_size=300)
    with pytest.raises(ValueError, match="no item tokens"):
        item_token_table(plain, codes)


# ---------------------------------------------------------------------------------------------------- sequential


def tiny_data() -> tuple[InteractionData, np.ndarray]:
    """3 items; one user u0 bought 0, 1, 2."""
    catalogue = Catalogue(["x", "y", "z"], ["Red Kettle", "Blue Pan", ""], ["A red kettle.", "", ""],
                          ["Lumora", "Velix", "Lumora"], [["Kitchen", "Kettles"], ["Kitchen", "Cookware"], []])
    codes = np.array([[1, 2, 3], [0, 5, 7], [4, 4, 4]])
    return InteractionData("tiny", catalogue, {"u0": [0, 1, 2]}), codes


def test_sequential_layout_hand_checked(world):
    _, _, _, tokenizer, item_tok = world
    data, codes = tiny_data()
    train = Examples(["u0"], [[0, 1]], [2])
    [example] = sequential_preference(data, train, codes, tokenizer, max_length=512)
    # The whole sequence, written out by hand in ChatML: prompt up to "assistant\n", then the answer.
    prompt_text = ("<|im_start|>user\nThe user has purchased, in order: "
                   "<|item_begin|><item_a_1><item_b_2><item_c_3><|item_end|>, "
                   "<|item_begin|><item_a_0><item_b_5><item_c_7><|item_end|>. "
                   "Which item will the user purchase next?<|im_end|>\n<|im_start|>assistant\n")
    answer_text = "<|item_begin|><item_a_4><item_b_4><item_c_4><|item_end|><|im_end|>"
    assert tokenizer.decode(example.input_ids) == prompt_text + answer_text
    # Answer ids by hand: begin, level offset + code for each level, end, eos.
    a, b, c = item_tok.level_offset.tolist()
    answer = [item_tok.begin_id, a + 4, b + 4, c + 4, item_tok.end_id, EOS_ID]
    num_prompt = len(example.input_ids) - 6
    assert example.input_ids[num_prompt:] == answer
    assert example.input_ids[0] == 4  # <|im_start|>
    assert example.labels == [IGNORE_INDEX] * num_prompt + answer
    assert example.input_ids[:num_prompt] == render_prompt(tokenizer, next_item_question(codes[[0, 1]].tolist()))
    assert example.task == SEQUENTIAL and example.num_loss_tokens == 6


def test_sequential_items_and_no_leakage(world):
    data, splits, codes, tokenizer, item_tok = world
    train = splits["train"]
    examples = sequential_preference(data, train, codes, tokenizer, max_length=1024)
    assert len(examples) == len(train)
    held_out = {(u, tuple(h), t) for name in ("valid", "test") for u, h, t in
                zip(splits[name].users, splits[name].histories, splits[name].targets)}
    for example in examples:
        i = train_index(example)
        items = decode_items(example.input_ids, item_tok, codes)
        assert items == list(train.histories[i]) + [train.targets[i]]  # history in the prompt, target as answer
        answer = [tok for tok, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]
        assert decode_items(answer, item_tok, codes) == [train.targets[i]]
        assert (train.users[i], tuple(items[:-1]), items[-1]) not in held_out
    # The valid/test targets of a user are the last two items of its sequence, never an answer of that user here.
    for example in examples:
        user = train.users[train_index(example)]
        seq = data.sequences[user]
        last_answer_pos = len(seq) - 3  # leave-one-out: training targets are s_1 .. s_{n-3}
        assert decode_items(example.input_ids, item_tok, codes)[-1] in seq[:last_answer_pos + 1]


def test_sequential_truncates_history_from_the_left(world):
    data, splits, codes, tokenizer, item_tok = world
    train = splits["train"]
    answer_len = NUM_LEVELS + 2 + 1
    full = [len(render_prompt(tokenizer, next_item_question(codes[h].tolist()))) + answer_len for h in train.histories]
    max_length = int(np.percentile(full, 30))  # most examples must be cut
    report = DropReport()
    examples = sequential_preference(data, train, codes, tokenizer, max_length=max_length, report=report)
    truncated = 0
    for example in examples:
        i = train_index(example)
        history = list(train.histories[i])
        assert len(example) <= max_length
        assert example.input_ids[-answer_len:] == item_token_table(tokenizer, codes)[train.targets[i]] + [EOS_ID]
        kept = decode_items(example.input_ids, item_tok, codes)[:-1]
        assert kept == history[len(history) - len(kept):]  # a suffix: cut from the left
        if len(kept) < len(history):
            truncated += 1
            one_more = render_prompt(tokenizer, next_item_question(codes[history[-len(kept) - 1:]].tolist()))
            assert len(one_more) + answer_len > max_length  # the longest suffix that fits
    assert truncated == sum(f > max_length for f in full) > 0
    assert report.counts == {f"history truncated from the left to fit max_length={max_length}": truncated}


def test_sequential_max_length_too_small_raises(world):
    data, splits, codes, tokenizer, _ = world
    with pytest.raises(ValueError, match="sequential_preference: max_length=20 cannot hold"):
        sequential_preference(data, splits["train"], codes, tokenizer, max_length=20)


def test_sequential_max_history_and_bad_indices(world):
    data, splits, codes, tokenizer, item_tok = world
    train = splits["train"]
    examples = sequential_preference(data, train, codes, tokenizer, max_length=1024, max_history=2)
    for example in examples:
        i = train_index(example)
        assert decode_items(example.input_ids, item_tok, codes)[:-1] == list(train.histories[i][-2:])
    bad = Examples(["u0"], [[0, 999]], [1])
    with pytest.raises(ValueError, match="item index 999 outside the catalogue"):
        sequential_preference(data, bad, codes, tokenizer, max_length=1024)


# ---------------------------------------------------------------------------------------------------- persona


def test_persona_uses_only_training_items(world):
    data, splits, codes, tokenizer, item_tok = world
    train = splits["train"]
    examples = persona_grounding(data, train, codes, tokenizer, max_length=2048)
    user_items = training_items(train)
    assert len(examples) == len(user_items) == len(data.sequences)
    for example in examples:
        user = example.source.removeprefix("user ")
        items = decode_items(example.input_ids, item_tok, codes)
        seq = data.sequences[user]
        assert items == seq[:len(seq) - 2]  # leave-one-out: everything but the valid and test targets
        train_items = {i for h, t, u in zip(train.histories, train.targets, train.users) if u == user for i in h + [t]}
        assert set(items) <= train_items
        assert example.labels == example.input_ids  # LM on the whole text
        text = tokenizer.decode(example.input_ids)
        assert data.personas[user] in text
        assert data.catalogue.titles[items[0]] in text and text.endswith("<|im_end|>")


def test_derived_interest_summary_hand_checked():
    data, codes = tiny_data()
    # Categories over items 0, 1: Kitchen x2, Kettles x1, Cookware x1 -> top three in first-seen order on ties.
    # Brands: Lumora, Velix (one each) -> first seen first.
    assert derive_interest_summary(data.catalogue, [0, 1]) == \
        "Buys mostly Kitchen, Kettles and Cookware; favourite brands Lumora and Velix."
    assert derive_interest_summary(data.catalogue, [2]) == "Favourite brand Lumora."
    assert derive_interest_summary(Catalogue.ids_only(["a"]), [0]) == ""


def test_persona_derived_text_hand_checked(world):
    _, _, _, tokenizer, _ = world
    data, codes = tiny_data()  # no personas: the summary is derived
    train = Examples(["u0"], [[0]], [1])
    [example] = persona_grounding(data, train, codes, tokenizer, max_length=512)
    assert tokenizer.decode(example.input_ids) == (
        "User profile.\nPurchased items, oldest first:\n"
        "- <|item_begin|><item_a_1><item_b_2><item_c_3><|item_end|> Red Kettle (Kitchen > Kettles)\n"
        "- <|item_begin|><item_a_0><item_b_5><item_c_7><|item_end|> Blue Pan (Kitchen > Cookware)\n"
        "Summary of interests: Buys mostly Kitchen, Kettles and Cookware; favourite brands Lumora and Velix.\n"
        "<|im_end|>")


def test_persona_drops_oldest_items_to_fit(world):
    data, splits, codes, tokenizer, item_tok = world
    train = splits["train"]
    full = persona_grounding(data, train, codes, tokenizer, max_length=4096)
    max_length = int(np.median([len(e) for e in full]))
    report = DropReport()
    cut = persona_grounding(data, train, codes, tokenizer, max_length=max_length, report=report)
    assert len(cut) == len(full)
    shorter = 0
    for before, after in zip(full, cut):
        assert len(after) <= max_length
        items_before = decode_items(before.input_ids, item_tok, codes)
        items_after = decode_items(after.input_ids, item_tok, codes)
        assert items_after == items_before[len(items_before) - len(items_after):]  # newest kept
        shorter += len(items_after) < len(items_before)
    assert shorter == sum(len(e) > max_length for e in full) > 0
    assert sum(report.counts.values()) == shorter
    with_skip = DropReport()
    assert persona_grounding(data, train, codes, tokenizer, max_length=10, report=with_skip) == []
    assert sum(with_skip.counts.values()) == len(full)


# ---------------------------------------------------------------------------------------------------- captioning


def test_captioning_layout_and_cuts(world):
    data, splits, codes, tokenizer, item_tok = world
    cat = data.catalogue
    report = DropReport()
    examples = itemic_captioning(data, splits["train"], codes, tokenizer, max_length=1024, max_description_tokens=5,
                                 report=report)
    assert len(examples) == len(cat)
    for item, example in enumerate(examples):
        prompt = render_prompt(tokenizer, caption_question(codes[item].tolist()))
        title = tokenizer.encode(cat.titles[item], add_special_tokens=False)
        description = tokenizer.encode("\n" + cat.descriptions[item], add_special_tokens=False)[:5]
        assert example.input_ids == prompt + title + description + [EOS_ID]
        assert example.labels == [IGNORE_INDEX] * len(prompt) + title + description + [EOS_ID]
        assert decode_items(example.input_ids, item_tok, codes) == [item]
    assert report.counts == {"description cut to max_description_tokens=5": len(cat)}


def test_captioning_skips_items_without_text(world):
    _, splits, codes, tokenizer, _ = world
    data, tiny_codes = tiny_data()  # item 2 has no title and no description; item 1 has a title only
    report = DropReport()
    examples = itemic_captioning(data, splits["train"], tiny_codes, tokenizer, max_length=512, report=report)
    assert [e.source for e in examples] == ["item x", "item y"]
    assert report.counts == {"item without title or description (no caption)": 1}
    assert tokenizer.decode(examples[1].input_ids).endswith("assistant\nBlue Pan<|im_end|>")
    # max_length that holds the prompt and the title but only 2 description tokens.
    prompt = render_prompt(tokenizer, caption_question(tiny_codes[0].tolist()))
    title = tokenizer.encode("Red Kettle", add_special_tokens=False)
    small = len(prompt) + len(title) + 2 + 1
    report = DropReport()
    first = itemic_captioning(data, splits["train"], tiny_codes, tokenizer, max_length=small, report=report)[0]
    assert len(first) == small and first.input_ids[-1] == EOS_ID
    assert report.counts[f"description cut to fit max_length={small}"] == 1


# ---------------------------------------------------------------------------------------------------- general text


DOCS = ["The river carries sand to the sea and builds a wide plain.",
        "Bread rises because yeast gives off gas that the dough traps.",
        "A short one."]


def write_corpus(tmp_path, fmt: str):
    if fmt == "txt":
        path = tmp_path / "c.txt"
        # Hard-wrapped first paragraph: its two lines make one document.
        path.write_text("The river carries sand to the sea\nand builds a wide plain.\n\n" + DOCS[1] + "\n\n\n"
                        + DOCS[2] + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": DOCS + [None], "id": [0, 1, 2, 3]}), path)
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_general_text_formats_and_chunking(world, tmp_path, fmt):
    tokenizer = world[3]
    path = write_corpus(tmp_path, fmt)
    assert read_documents(path) == DOCS
    examples = general_text(tokenizer, max_length=5, path=str(path))
    for d, doc in enumerate(DOCS):
        ids = tokenizer.encode(doc, add_special_tokens=False) + [EOS_ID]
        chunks = [e for e in examples if e.source.startswith(f"doc {d} ")]
        # ceil(len / 5) chunks, minus a final one-token chunk (dropped: nothing to predict).
        assert len(chunks) == math.ceil(len(ids) / 5) - (len(ids) % 5 == 1)
        joined = [t for e in chunks for t in e.input_ids]
        assert joined == ids[:len(joined)] and len(ids) - len(joined) in (0, 1)
        assert all(2 <= len(e) <= 5 and e.labels == e.input_ids and e.task == GENERAL for e in chunks)


def test_general_text_reports_nulls_and_builtin(world, tmp_path):
    report = DropReport()
    assert read_documents(write_corpus(tmp_path, "parquet"), report) == DOCS
    assert report.counts == {"empty or null document in c.parquet (skipped)": 1}
    builtin = read_documents(None)
    assert len(builtin) >= 40 and all(len(d.split()) > 20 for d in builtin)
    examples = general_text(world[3], max_length=64)
    assert examples and all(len(e) <= 64 for e in examples)


def test_general_text_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: expected a JSON object with a 'text' field"):
        read_documents(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
        read_documents(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="must be a string"):
        read_documents(tmp_path / "c.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"no column 'text'; columns: \['body'\]"):
        read_documents(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        read_documents(tmp_path / "e.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------------- mixture


def test_allocate_counts_paper_ratios_hand_checked():
    # 1000 x (0.2430, 0.6573, 0.0494, 0.0503) = 243.0, 657.3, 49.4, 50.3: floors sum to 999, and the one left
    # goes to the largest remainder, captioning's 0.4.
    assert allocate_counts(1000, resolve_ratios(None, None)) == {PERSONA: 243, SEQUENTIAL: 657, CAPTIONING: 50,
                                                                GENERAL: 50}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.lists(st.floats(0, 10), min_size=4, max_size=4).filter(lambda r: sum(r) > 0))
def test_allocate_counts_property(total, raw):
    probabilities = resolve_ratios(dict(zip(TASKS, raw)), None)
    counts = allocate_counts(total, probabilities)
    assert sum(counts.values()) == total
    assert all(abs(counts[t] - p * total) < 1 for t, p in probabilities.items())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(0, 100), st.integers(0, 3))
def test_cycle_sample_balanced(pool, count, seed):
    chosen = cycle_sample(pool, count, np.random.default_rng(seed))
    times = np.bincount(chosen, minlength=pool)
    assert len(chosen) == count and times.max() - times.min() <= 1 and times.min() == count // pool


def test_mixture_ratios_stats_and_engine_contract(world):
    data, splits, codes, tokenizer, _ = world
    examples, stats = build_alignment_mixture(data, splits["train"], codes, tokenizer, num_examples=1000,
                                              max_length=256, seed=0)
    counts = Counter(e.task for e in examples)
    assert counts == {PERSONA: 243, SEQUENTIAL: 657, CAPTIONING: 50, GENERAL: 50}
    assert stats["total_examples"] == 1000 and all(len(e) <= 256 for e in examples)
    for task in TASKS:
        mine = [e for e in examples if e.task == task]
        assert stats["tasks"][task]["count"] == len(mine)
        assert stats["tasks"][task]["tokens"] == sum(len(e) for e in mine)
        assert stats["tasks"][task]["loss_tokens"] == sum(e.num_loss_tokens for e in mine)
        assert stats["tasks"][task]["distinct"] == min(len(mine), stats["tasks"][task]["pool"])
        assert stats["tasks"][task]["ratio"] == pytest.approx(DEFAULT_RATIOS[task])
    assert stats["total_tokens"] == sum(len(e) for e in examples)
    assert stats["tasks"][PERSONA]["pool"] == len(data.sequences)
    assert stats["tasks"][SEQUENTIAL]["pool"] == len(splits["train"])
    validate_examples(examples)
    batch = collate(examples[:8], task_names(examples), pad_token_id=0)
    assert batch["input_ids"].shape[0] == 8


def test_mixture_default_size_uses_every_pool(world):
    data, splits, codes, tokenizer, _ = world
    ratios = {PERSONA: 1, SEQUENTIAL: 3}
    examples, stats = build_alignment_mixture(data, splits["train"], codes, tokenizer, ratios=ratios,
                                              max_length=512)
    pools = {t: stats["tasks"][t]["pool"] for t in ratios}
    total = max(math.ceil(pools[PERSONA] / 0.25), math.ceil(pools[SEQUENTIAL] / 0.75))
    assert len(examples) == total and stats["ignored_ratios"] == []
    assert all(stats["tasks"][t]["distinct"] == pools[t] for t in ratios)  # every example at least once
    assert set(stats["tasks"]) == {PERSONA, SEQUENTIAL}


def test_mixture_is_deterministic_by_seed(world):
    data, splits, codes, tokenizer, _ = world

    def build(seed):
        examples, _ = build_alignment_mixture(data, splits["train"], codes, tokenizer, num_examples=300,
                                              max_length=256, seed=seed)
        return [(e.task, e.source, tuple(e.input_ids), tuple(e.labels)) for e in examples]

    assert build(1) == build(1)
    assert build(1) != build(2)
    assert Counter(t for t, *_ in build(1)) == Counter(t for t, *_ in build(2))


def test_mixture_truncation_is_reported(world):
    data, splits, codes, tokenizer, _ = world
    examples, stats = build_alignment_mixture(data, splits["train"], codes, tokenizer, num_examples=200,
                                              max_length=90, seed=0, tasks=[SEQUENTIAL, GENERAL])
    assert all(len(e) <= 90 for e in examples)
    assert "history truncated from the left to fit max_length=90" in stats["tasks"][SEQUENTIAL][
        "skipped_or_truncated"]
    assert stats["ignored_ratios"] == []


def test_mixture_errors(world):
    data, splits, codes, tokenizer, _ = world
    train = splits["train"]

    def build(**kwargs):
        return build_alignment_mixture(data, train, codes, tokenizer, **{"num_examples": 10, "max_length": 256,
                                                                         **kwargs})

    with pytest.raises(ValueError, match=r"unknown alignment task 'foo'; valid tasks: \['persona_grounding'"):
        build(tasks=["foo"])
    with pytest.raises(ValueError, match=r"ratios: unknown alignment task 'bar'"):
        build(ratios={"bar": 1.0})
    with pytest.raises(ValueError, match=r"ratios\['general_text'\] must be a finite number >= 0, got -0.1"):
        build(ratios={PERSONA: 1.0, GENERAL: -0.1})
    with pytest.raises(ValueError, match="sum to 0"):
        build(ratios={PERSONA: 0.0, GENERAL: 0.0})
    with pytest.raises(ValueError, match="ratios has no entry for task 'itemic_captioning'"):
        build(ratios={PERSONA: 1.0}, tasks=[PERSONA, CAPTIONING])
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        build(num_examples=0)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        build(max_length=1)
    # Without item text every caption is skipped: a ratio the user chose for it is an error naming the task ...
    bare = replace(data, catalogue=Catalogue.ids_only(data.catalogue.item_ids), personas={})
    with pytest.raises(ValueError, match="alignment task 'itemic_captioning' has ratio 0.0494 but no example"):
        build_alignment_mixture(bare, train, codes, tokenizer, ratios=DEFAULT_RATIOS, num_examples=10,
                                max_length=256)
    with pytest.raises(ValueError, match="alignment task 'itemic_captioning' has ratio 0.1000 but no example"):
        build_alignment_mixture(bare, train, codes, tokenizer, ratios={SEQUENTIAL: 0.9, CAPTIONING: 0.1},
                                num_examples=10, max_length=256, explicit_ratios=[CAPTIONING])
    # ... and fine with ratio 0 (ratios of unselected tasks are ignored and reported).
    ratios = dict(DEFAULT_RATIOS, **{CAPTIONING: 0.0})
    examples, stats = build_alignment_mixture(bare, train, codes, tokenizer, ratios=ratios, num_examples=10,
                                              max_length=256, tasks=[PERSONA, SEQUENTIAL, CAPTIONING])
    assert stats["tasks"][CAPTIONING]["count"] == 0 and stats["ignored_ratios"] == [GENERAL]
    assert {e.task for e in examples} == {PERSONA, SEQUENTIAL}


def test_warmup_is_persona_only(world):
    data, splits, codes, tokenizer, _ = world
    examples, stats = warmup_examples(data, splits["train"], codes, tokenizer, max_length=512)
    assert {e.task for e in examples} == {PERSONA} and len(examples) == len(data.sequences)
    assert list(stats["tasks"]) == [PERSONA]
    assert all(e.labels == e.input_ids for e in examples)


def test_text_free_catalogue_drops_default_text_tasks(world):
    # An ID-only catalogue (Beauty-like) with the default ratios: captioning (no title / description anywhere) is
    # dropped, the other three renormalised over 1 - 0.0494 = 0.9506: persona 0.2430 / 0.9506 = 0.25563, sequential
    # 0.6573 / 0.9506 = 0.69146, general 0.0503 / 0.9506 = 0.05291. 100 examples by largest remainder: 25.563,
    # 69.146, 5.291 -> floors 25, 69, 5 (99), the one left goes to the largest remainder .563 (persona): 26, 69, 5.
    data, splits, codes, tokenizer, _ = world
    bare = replace(data, catalogue=Catalogue.ids_only(data.catalogue.item_ids), personas={})
    for ratios, explicit in ((None, None), (DEFAULT_RATIOS, [])):
        examples, stats = build_alignment_mixture(bare, splits["train"], codes, tokenizer, ratios=ratios,
                                                  num_examples=100, max_length=256, explicit_ratios=explicit)
        assert list(stats["dropped_tasks"]) == [CAPTIONING] and "no item text" in stats["dropped_tasks"][CAPTIONING]
        counts = {task: s["count"] for task, s in stats["tasks"].items()}
        assert counts == {PERSONA: 26, SEQUENTIAL: 69, CAPTIONING: 0, GENERAL: 5}
        assert stats["tasks"][PERSONA]["ratio"] == pytest.approx(0.2430 / 0.9506)
        assert {e.task for e in examples} == {PERSONA, SEQUENTIAL, GENERAL}
    # A catalogue with text keeps the paper's mixture and drops nothing.
    _, stats = build_alignment_mixture(data, splits["train"], codes, tokenizer, num_examples=100, max_length=256)
    assert stats["dropped_tasks"] == {} and stats["tasks"][CAPTIONING]["count"] == 5  # 0.0494 * 100 = 4.94 -> 5

