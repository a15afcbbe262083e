"""Batching: token-budget packing, the distributed sampler (sharding, determinism, resume), collation.

Pure and fast (no process group): every rank's view is computed in-process.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec_dist.training.batching import (
    DistributedBatchSampler,
    collate,
    fixed_size_batches,
    padded_length,
    sequence_lengths,
    task_names,
    token_budget_batches,
    validate_examples,
)


def example(n, task="t", first=1):
    ids = list(range(first, first + n))
    return {"input_ids": ids, "labels": ids, "task": task}


# ---- packing ---------------------------------------------------------------------------------------------------------
def test_token_budget_worked_example():
    # lengths by index: 0:5 1:3 2:8 3:2 4:7 5:3; sorted (stable): 3(2) 1(3) 5(3) 0(5) 4(7) 2(8); budget 12:
    # [3] -> +1: 3*2=6 -> +5: 3*3=9 -> +0: 5*4=20 > 12, close. [0] -> +4: 7*2=14 > 12. [4] -> +2: 8*2=16 > 12. [2]
    lengths = np.array([5, 3, 8, 2, 7, 3])
    batches = token_budget_batches(lengths, np.arange(6), max_tokens=12, window=6)
    assert batches == [[3, 1, 5], [0], [4], [2]]
    # Padded tokens 3*3 + 5 + 7 + 8 = 29, against 10 + 16 + 14 = 40 for fixed pairs in index order.
    assert sum(max(lengths[b]) * len(b) for b in batches) == 29
    assert sum(max(lengths[b]) * len(b) for b in fixed_size_batches(np.arange(6), 2)) == 40


def test_token_budget_respects_windows_and_padding_multiple():
    lengths = np.array([5, 3, 8, 2, 7, 3])
    # window 3: {0:5, 1:3, 2:8} -> [1, 0] (5*2=10), [2]; {3:2, 4:7, 5:3} -> [3, 5] (3*2=6), [4] (7*3=21 > 12)
    assert token_budget_batches(lengths, np.arange(6), 12, window=3) == [[1, 0], [2], [3, 5], [4]]
    # multiple of 4: widths 2,3 -> 4 and 5,7,8 -> 8: [3, 1, 5] costs 4*3 = 12 <= 12, then 8*2 = 16 > 12 each.
    assert token_budget_batches(lengths, np.arange(6), 12, window=6, pad_to_multiple_of=4) == [[3, 1, 5], [0], [4], [2]]
    assert padded_length(5, 4) == 8 and padded_length(8, 4) == 8 and padded_length(5, 1) == 5


def test_token_budget_rejects_an_example_longer_than_the_budget():
    with pytest.raises(ValueError, match=r"example 1 has 9 tokens.*max_tokens=8"):
        token_budget_batches(np.array([3, 9]), np.arange(2), max_tokens=8, window=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=80), st.integers(40, 200), st.integers(1, 50),
       st.sampled_from([1, 8]))
def test_token_budget_batches_cover_every_example_once_within_budget(lengths, max_tokens, window, multiple):
    lengths = np.array(lengths)
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = token_budget_batches(lengths, order, max_tokens, window, multiple)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert padded_length(lengths[b].max(), multiple) * len(b) <= max_tokens


# ---- sampler ---------------------------------------------------------------------------------------------------------
def test_sampler_shards_interleaved_and_leaves_out_the_partial_step():
    # 10 examples, batch 2, no shuffle: [0,1] [2,3] [4,5] [6,7] [8,9]; 2 ranks x 1 accumulation -> 4 batches kept.
    ranks = [DistributedBatchSampler(range(10), world_size=2, rank=r, batch_size=2, shuffle=False) for r in (0, 1)]
    assert ranks[0].rank_batches(0) == [[0, 1], [4, 5]]
    assert ranks[1].rank_batches(0) == [[2, 3], [6, 7]]
    stats = ranks[0].epoch_stats(0)
    assert stats["steps"] == 2 and stats["examples_used"] == 8 and stats["examples_left_out"] == 2
    assert ranks[0].next_step() == [[0, 1]] and ranks[1].next_step() == [[2, 3]]


def test_sampler_step_composition_is_independent_of_micro_batch_split():
    # World 2: micro-batch 4 x accumulation 1 and micro-batch 1 x accumulation 4 must see the same global batches.
    lengths = np.arange(3, 43)  # 40 examples -> 5 steps of 8
    def global_steps(batch_size, accum, n_steps):
        samplers = [DistributedBatchSampler(lengths, world_size=2, rank=r, grad_accum_steps=accum,
                                            batch_size=batch_size, seed=7) for r in (0, 1)]
        return [sorted(i for s in samplers for mb in s.next_step() for i in mb) for _ in range(n_steps)]
    assert global_steps(4, 1, 12) == global_steps(1, 4, 12)  # 12 steps cross two epoch boundaries


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.booleans(), st.integers(0, 3))
def test_sampler_ranks_get_equal_disjoint_shares(world, accum, batch_size, tokens, epoch):
    lengths = np.random.default_rng(epoch).integers(2, 30, size=97)
    kwargs = {"max_tokens": 64, "window": 16} if tokens else {"batch_size": batch_size}
    samplers = [DistributedBatchSampler(lengths, world_size=world, rank=r, grad_accum_steps=accum, seed=3, **kwargs)
                for r in range(world)]
    try:
        plans = [s.rank_batches(epoch) for s in samplers]
    except ValueError as err:  # too few examples for one step: the error says so
        assert "do not fill one optimizer step" in str(err)
        return
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) % accum == 0
    seen = [i for p in plans for b in p for i in b]
    assert len(seen) == len(set(seen))  # nobody sees an example twice in an epoch
    # rank r holds global micro-batches r, r + W, r + 2W, ...
    glob = samplers[0].global_batches(epoch)
    for r, plan in enumerate(plans):
        assert plan == glob[r::world]


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    a = DistributedBatchSampler(range(50), batch_size=5, seed=1)
    b = DistributedBatchSampler(range(50), batch_size=5, seed=1)
    assert a.global_batches(0) == b.global_batches(0)
    assert a.global_batches(0) != a.global_batches(1)
    assert a.global_batches(0) != DistributedBatchSampler(range(50), batch_size=5, seed=2).global_batches(0)


@pytest.mark.parametrize("stop", [1, 4, 5, 9])  # 5 steps per epoch: stops inside, at the end of and after epoch 0
def test_sampler_resume_continues_exactly(stop):
    lengths = np.random.default_rng(0).integers(2, 20, size=43)
    def make():
        return DistributedBatchSampler(lengths, world_size=2, rank=1, grad_accum_steps=2, max_tokens=40, window=8)
    uninterrupted = make()
    expected = [uninterrupted.next_step() for _ in range(12)]
    first = make()
    got = [first.next_step() for _ in range(stop)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_step() for _ in range(12 - stop)]
    assert got == expected


def test_sampler_refuses_state_of_a_different_plan():
    state = DistributedBatchSampler(range(20), world_size=2, batch_size=2).state_dict()
    other = DistributedBatchSampler(range(20), world_size=4, batch_size=2)
    with pytest.raises(ValueError, match="world_size: saved 2, now 4"):
        other.load_state_dict(state)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        DistributedBatchSampler(range(4))
    with pytest.raises(ValueError, match="rank=2"):
        DistributedBatchSampler(range(4), batch_size=1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        DistributedBatchSampler(range(3), batch_size=2, world_size=2).next_step()


# ---- collation and validation ----------------------------------------------------------------------------------------
def test_collate_worked_example():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "task": "b"},
                {"input_ids": [4, 5], "labels": [4, 5], "task": "a"}]
    batch = collate(examples, ["a", "b"], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["task_ids"].tolist() == [1, 0] and batch["task_names"] == ("a", "b")
    assert batch["input_ids"].dtype == torch.long
    wide = collate(examples, ["a", "b"], pad_token_id=0, pad_to_multiple_of=4)
    assert wide["input_ids"].shape == (2, 4) and wide["labels"][0].tolist() == [-100, 2, 3, -100]


def test_collate_rejects_unknown_task():
    with pytest.raises(ValueError, match=r"task 'c' is not one of the tasks \['a'\]"):
        collate([example(3, "c")], ["a"])


def test_validate_examples_names_the_problem():
    validate_examples([example(3), example(2)])
    with pytest.raises(ValueError, match=r"examples\[1\]: len\(input_ids\)=2 != len\(labels\)=1"):
        validate_examples([example(3), {"input_ids": [1, 2], "labels": [1], "task": "t"}])
    with pytest.raises(ValueError, match=r"examples\[0\] has no field 'task'"):
        validate_examples([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="needs >= 2 tokens"):
        validate_examples([example(1)])
    with pytest.raises(ValueError, match="empty"):
        validate_examples([])


def test_lengths_and_task_names_accept_records():
    class Record:
        def __init__(self, ids, task):
            self.input_ids, self.labels, self.task = ids, ids, task
    records = [Record([1, 2, 3], "z"), Record([1, 2], "a")]
    assert sequence_lengths(records).tolist() == [3, 2]
    assert task_names(records) == ["a", "z"]
    assert collate(records, ["a", "z"])["task_ids"].tolist() == [1, 0]


def test_sampler_step_source_over_shards_equals_over_the_list_and_resumes_exactly(tmp_path):
    # The same 30 examples in memory and in 3 memory-mapped shards give the same collated micro-batches; a source
    # restored from the state after 4 steps takes the uninterrupted source's steps 5..9 (epoch 0 has 30 // (2 x 2 x 3)
    # = 2 steps, so this crosses epochs).
    from onerec_dist.training.batching import SamplerStepSource
    from onerec_dist.training.shards import ShardedExamples, write_examples

    examples = [example(3 + i % 7, task="ab"[i % 2], first=i) for i in range(30)]
    write_examples(examples, tmp_path / "d", examples_per_shard=10, progress=False)

    def source(data):
        sampler = DistributedBatchSampler(sequence_lengths(examples), world_size=2, rank=1, grad_accum_steps=2,
                                          batch_size=3, seed=5)
        return SamplerStepSource(data, sampler, pad_token_id=0, pad_to_multiple_of=4)

    in_memory, mapped = source(examples), source(ShardedExamples(tmp_path / "d"))
    assert mapped.task_names == in_memory.task_names == ["a", "b"]
    steps = [in_memory.next_step() for _ in range(9)]
    for expected in steps[:4]:
        for got, ref in zip(mapped.next_step(), expected):
            assert got["input_ids"].equal(ref["input_ids"]) and got["task_ids"].equal(ref["task_ids"])
    resumed = source(ShardedExamples(tmp_path / "d"))
    resumed.load_state_dict(mapped.state_dict())
    for expected in steps[4:]:
        assert [b["input_ids"].tolist() for b in resumed.next_step()] == [b["input_ids"].tolist() for b in expected]
