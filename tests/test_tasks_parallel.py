"""Alignment pools built in chunks in a process pool (onerec_dist/training/tasks_parallel.py) are the serial pools:
same examples (input_ids, labels, task, source), same order, same stats and drop reports, whatever the chunking."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.splits import leave_one_out
from onerec_dist.data.synthetic import generate_synthetic
from onerec_dist.data.types import DropReport
from onerec_dist.models import build_tokenizer_from_corpus
from onerec_dist.sid.tokens import ItemTokenSpec, all_item_tokens
from onerec_dist.training import tasks, tasks_parallel
from onerec_dist.training.config import AlignConfig
from onerec_dist.training.tasks import build_alignment_mixture, warmup_examples
from onerec_dist.training.tasks_parallel import build_in_chunks, chunk_bounds
from onerec_dist.training.tasks_text import read_documents

NUM_LEVELS, CODEBOOK = 3, 8


@pytest.fixture(scope="module")
def world():
    """Synthetic data (20 users, 40 items, sequences of 6-24 items), leave-one-out splits, unique codes, a tokenizer
    with the item tokens (those extend_vocabulary adds; no model needed to build examples)."""
    data = generate_synthetic(SyntheticConfig(num_users=20, num_items=40, min_seq_len=6, max_seq_len=24, seed=5))
    splits = leave_one_out(data.sequences, max_history=50)
    flat = np.random.default_rng(0).choice(CODEBOOK**NUM_LEVELS, size=len(data.catalogue), replace=False)
    codes = np.stack([(flat // CODEBOOK**p) % CODEBOOK for p in reversed(range(NUM_LEVELS))], axis=1)
    cat = data.catalogue
    corpus = cat.titles + cat.descriptions + list(data.personas.values()) + read_documents(None)[:10]
    tokenizer = build_tokenizer_from_corpus(corpus, vocab_size=700)
    tokenizer.add_special_tokens({"extra_special_tokens": all_item_tokens(ItemTokenSpec(NUM_LEVELS, CODEBOOK))},
                                 replace_extra_special_tokens=False)
    return data, splits["train"], codes, tokenizer


def test_chunk_bounds_hand_checked():
    # 10 rows in 3 chunks: sizes 4, 3, 3 (the first 10 % 3 = 1 chunk one longer)
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]  # never an empty chunk
    assert chunk_bounds(7, 1) == [(0, 7)]


def test_merge_report_equals_one_serial_report():
    """Reporting rows 0..9 into one report == reporting chunks (0..3, 4..6, 7..9) and merging in order: counts
    added, the first three examples kept, reasons in order of first appearance."""
    rows = [("cut", f"r{i}") if i % 2 == 0 else ("skip", f"r{i}") for i in range(10)] + [("late", "")]
    serial = DropReport()
    for reason, example in rows:
        serial.add(reason, example)
    merged = DropReport()
    for start, stop in [(0, 4), (4, 7), (7, 11)]:
        part = DropReport()
        for reason, example in rows[start:stop]:
            part.add(reason, example)
        merged.merge(part)
    assert merged.counts == serial.counts == {"cut": 5, "skip": 5, "late": 1}
    assert merged.examples == serial.examples == {"cut": ["r0", "r2", "r4"], "skip": ["r1", "r3", "r5"], "late": []}
    assert list(merged.counts) == list(serial.counts)


def _square_rows(context: dict, start: int, stop: int):
    """A toy builder: row i -> i * i (odd rows reported), and a ValueError naming row i when i >= fail_from."""
    report = DropReport()
    out = []
    for i in range(start, stop):
        if i >= context["fail_from"]:
            raise ValueError(f"row {i} failed")
        if i % 2:
            report.add("odd row", f"row {i}")
        out.append(i * i)
    return out, report


@pytest.mark.parametrize("chunks_per_process", [1, 5])
def test_chunk_count_does_not_change_the_result(monkeypatch, chunks_per_process):
    monkeypatch.setattr(tasks_parallel, "CHUNKS_PER_PROCESS", chunks_per_process)
    context = {"fail_from": 10**9}
    serial, serial_report = build_in_chunks(_square_rows, context, 37)
    parallel, report = build_in_chunks(_square_rows, context, 37, processes=2, min_parallel_rows=2)
    assert parallel == serial == [i * i for i in range(37)]
    assert report.as_dict() == serial_report.as_dict() == {"odd row": {"count": 18,
                                                                       "examples": ["row 1", "row 3", "row 5"]}}


def test_earliest_failing_chunk_error_is_raised():
    # rows >= 11 fail: chunks (0..9), (10..18), ... -> the serial pass and every chunking raise "row 11"
    with pytest.raises(ValueError, match="row 11 failed"):
        build_in_chunks(_square_rows, {"fail_from": 11}, 40, processes=2, min_parallel_rows=2)


def test_small_inputs_stay_serial(monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started for a small input")

    monkeypatch.setattr(tasks_parallel, "ProcessPoolExecutor", no_pool)
    assert build_in_chunks(_square_rows, {"fail_from": 99}, 5, processes=4, min_parallel_rows=6)[0] == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("sequential_format", ["window", "whole_sequence"])
def test_parallel_mixture_is_the_serial_mixture(world, sequential_format):
    """processes=2 with chunking forced (min_parallel_rows=2) on every per-row task: identical examples, order and
    stats. max_length=130 and no persona item cap make every task truncate (reports merged across chunks)."""
    data, train, codes, tokenizer = world
    kwargs = dict(max_length=130, seed=3, max_description_tokens=8, sequential_format=sequential_format)
    serial, serial_stats = build_alignment_mixture(data, train, codes, tokenizer, processes=1, **kwargs)
    parallel, stats = build_alignment_mixture(data, train, codes, tokenizer, processes=2, min_parallel_rows=2,
                                              **kwargs)
    assert parallel == serial  # dataclass equality: input_ids, labels, task, source, in order
    assert stats == serial_stats
    reported = {task: s["skipped_or_truncated"] for task, s in stats["tasks"].items()}
    assert reported[tasks.PERSONA] and reported[tasks.SEQUENTIAL] and reported[tasks.CAPTIONING]


def test_parallel_warmup_is_the_serial_warmup(world):
    data, train, codes, tokenizer = world
    serial = warmup_examples(data, train, codes, tokenizer, max_length=150, seed=1)
    assert warmup_examples(data, train, codes, tokenizer, max_length=150, seed=1, processes=2,
                           min_parallel_rows=2) == serial


def test_spawned_contexts_give_the_same_pools(world, monkeypatch):
    """Under spawn each worker receives the context pickled: a round-tripped context (tokenizer, catalogue, train)
    builds the same rows. Checked in-process (spawning would re-import torch per worker)."""
    def through_pickle(build_rows, context, num_rows, **_):
        return build_rows(pickle.loads(pickle.dumps(context)), 0, num_rows)

    data, train, codes, tokenizer = world
    kwargs = dict(max_length=130, seed=2, sequential_format="whole_sequence")
    serial = build_alignment_mixture(data, train, codes, tokenizer, **kwargs)
    monkeypatch.setattr(tasks, "build_in_chunks", through_pickle)  # persona, captioning
    monkeypatch.setattr(tasks_parallel, "build_in_chunks", through_pickle)  # whole_sequence imports it lazily
    assert build_alignment_mixture(data, train, codes, tokenizer, **kwargs) == serial


def test_process_count_validation(world):
    data, train, codes, tokenizer = world
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="processes must be an int >= 1"):
            build_alignment_mixture(data, train, codes, tokenizer, processes=bad)
    with pytest.raises(ValueError, match="min_parallel_rows must be an int >= 1"):
        build_alignment_mixture(data, train, codes, tokenizer, min_parallel_rows=0)


def test_build_processes_config_field():
    assert AlignConfig(build_processes=3).build_processes == 3
    assert AlignConfig().build_processes is None  # null = min(4, CPU count) in stages/align.py
    with pytest.raises(ValueError, match=r"align\.build_processes.*>= 1.*null"):
        AlignConfig(build_processes=0)
