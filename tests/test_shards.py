"""Arrow shards of tokenized examples: written once, memory-mapped by every rank (onerec_dist.training.shards)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from onerec_dist.training.batching import collate
from onerec_dist.training.shards import ShardedExamples, read_manifest, write_examples, write_shards


def toy_examples(seed: int, n: int = 7) -> list[dict]:
    """n examples of lengths 2..21 over ids 0..999, the first half of each masked; tasks 'a' / 'b' by parity."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(0, 1000, size=int(rng.integers(2, 22))).tolist()
        labels = [-100] * (len(ids) // 2) + ids[len(ids) // 2:]
        out.append({"input_ids": ids, "labels": labels, "task": "ab"[(seed + i) % 2]})
    return out


def as_lists(example) -> tuple:
    return list(map(int, example["input_ids"])), list(map(int, example["labels"])), example["task"]


def test_round_trip_keeps_examples_and_order(tmp_path):
    examples = toy_examples(0, 23)
    manifest = write_examples(examples, tmp_path / "d", examples_per_shard=5)   # shards of 5,5,5,5,3
    assert [s["num_examples"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    data = ShardedExamples(tmp_path / "d")
    assert len(data) == 23 and data.task_names == ["a", "b"]
    assert [as_lists(data[i]) for i in range(23)] == [as_lists(e) for e in examples]
    assert as_lists(data[-1]) == as_lists(examples[-1])
    assert data.lengths.tolist() == [len(e["input_ids"]) for e in examples]
    assert manifest["num_tokens"] == sum(len(e["input_ids"]) for e in examples)
    # collating mapped examples gives the tensors of the in-memory ones
    ref, got = collate(examples[3:9], ["a", "b"]), collate([data[i] for i in range(3, 9)], ["a", "b"])
    for key in ("input_ids", "labels", "attention_mask", "task_ids"):
        assert got[key].equal(ref[key]), key
    with pytest.raises(IndexError):
        data[23]


def test_invalid_examples_are_refused_when_written(tmp_path):
    bad = toy_examples(0, 3)
    bad[1] = {**bad[1], "labels": bad[1]["labels"][:-1]}
    with pytest.raises(ValueError, match=r"examples\[1\]: len\(input_ids\)"):
        write_examples(bad, tmp_path / "d")
    with pytest.raises(ValueError, match="manifest.json is missing"):
        ShardedExamples(tmp_path / "nothing")


def _shard_of_seed(seed: int) -> list[dict]:  # module level: picklable for the process pool
    return toy_examples(seed)


def test_parallel_sharded_build_equals_serial(tmp_path):
    # Shard k = build(inputs[k]) whatever the number of processes: 2 spawn processes give the serial run's files.
    serial = write_shards(_shard_of_seed, [3, 1, 4, 1, 5], tmp_path / "serial", processes=1)
    parallel = write_shards(_shard_of_seed, [3, 1, 4, 1, 5], tmp_path / "parallel", processes=2)
    assert serial == parallel
    a, b = ShardedExamples(tmp_path / "serial"), ShardedExamples(tmp_path / "parallel")
    assert [as_lists(a[i]) for i in range(len(a))] == [as_lists(b[i]) for i in range(len(b))]
    expected = [as_lists(e) for s in [3, 1, 4, 1, 5] for e in toy_examples(s)]
    assert [as_lists(a[i]) for i in range(len(a))] == expected
    for name in serial["shards"]:
        assert (tmp_path / "serial" / name["file"]).read_bytes() == (tmp_path / "parallel" / name["file"]).read_bytes()


def test_reading_is_memory_mapped(tmp_path):
    # 2,000 examples of 500 tokens: 2 x 4 MB of int32 columns. A memory-mapped, uncompressed IPC file is read zero-copy:
    # opening it and reading examples allocates nothing from Arrow's memory pool, and an example's ids are a view into
    # the map (no copy). Reading the same file through a plain file handle copies it into the pool: the check can fail.
    n, length = 2000, 500
    rows = np.arange(n * length, dtype=np.int64).reshape(n, length) % 50_000
    write_examples([{"input_ids": r, "labels": r, "task": "t"} for r in rows], tmp_path / "d", examples_per_shard=n)
    pool_before = pa.total_allocated_bytes()
    data = ShardedExamples(tmp_path / "d")
    example = data[1234]
    assert pa.total_allocated_bytes() == pool_before
    assert example["input_ids"].base is not None and not example["input_ids"].flags.owndata
    assert example["input_ids"].tolist() == rows[1234].tolist()
    with pa.OSFile(str(tmp_path / "d" / read_manifest(tmp_path / "d")["shards"][0]["file"])) as handle:
        copied = pa.ipc.open_file(handle).get_batch(0)
        assert pa.total_allocated_bytes() - pool_before >= 2 * n * length * 4
        del copied
