"""Tokenized training data on disk: Arrow IPC shards written once by the driver, memory-mapped by every rank.

A shard directory holds ``manifest.json`` and ``shard-<k>.arrow`` files (Arrow IPC file format, uncompressed, one
record batch each) with the columns of a training example (batching module):

    input_ids   list<int32>                  token ids
    labels      list<int32>                  aligned with input_ids, -100 = no loss
    task        dictionary<int32, string>    the example's task

Global example ``i`` is example ``i - start[k]`` of shard ``k``, shards in manifest order. The manifest lists the
shards, their example / token counts, and the sorted task names (``task_id`` = index in that list).

Why a memory map: the ranks read the *same* files (a shard is never pickled into the Ray loop config, nor copied per
rank); ``pyarrow.memory_map`` plus an uncompressed IPC file is zero-copy, so opening a dataset allocates nothing and
reading example i touches only the pages of its tokens (plus the 4-byte offsets every rank reads once for the
sampler's lengths). The OS page cache shares those pages between the ranks of a node.

Writing runs in parallel processes (``write_shards(build, inputs, processes=P)``): ``build(inputs[k])`` returns the
examples of shard k, so tokenization itself is spread over the processes; the shards' order (and so every example's
index) does not depend on P.

Pure: numpy / pyarrow only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from onerec_dist.training.batching import _field, validate_examples

FORMAT = "onerec-shards/1"
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                    ("task", pa.dictionary(pa.int32(), pa.string()))])


def shard_file_name(k: int) -> str:
    return f"shard-{k:05d}.arrow"


# ---------------------------------------------------------------------------------------------------- writing
def _list_array(rows: Sequence[Any]) -> pa.ListArray:
    """[n] variable-length int sequences -> list<int32> (offsets [n+1], values [sum of lengths])."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows
              else np.zeros(0, dtype=np.int32))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_shard(examples: Sequence[Any], path: str | Path) -> dict[str, Any]:
    """Validate ``examples`` and write them as one shard; returns {file, num_examples, num_tokens, tasks}."""
    validate_examples(examples)
    tasks = [_field(e, "task") for e in examples]
    columns = [_list_array([_field(e, "input_ids") for e in examples]),
               _list_array([_field(e, "labels") for e in examples]),
               pa.array(tasks, type=pa.string()).dictionary_encode().cast(SCHEMA.field("task").type)]
    batch = pa.RecordBatch.from_arrays(columns, schema=SCHEMA)
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    tmp.replace(path)
    return {"file": path.name, "num_examples": len(examples), "num_tokens": len(columns[0].values),
            "tasks": sorted(set(tasks))}


def _build_and_write(build: Callable[[Any], Iterable[Any]], inputs: Any, path: str) -> dict[str, Any]:
    return write_shard(list(build(inputs)), path)


def _identity(examples: Any) -> Any:
    return examples


def write_shards(build: Callable[[Any], Iterable[Any]], shard_inputs: Sequence[Any], out_dir: str | Path, *,
                 processes: int = 1, desc: str = "write shards", progress: bool = True) -> dict[str, Any]:
    """Write shard k = ``build(shard_inputs[k])`` into ``out_dir`` (replaced), then the manifest; returns it.

    ``processes`` > 1 runs the builds in a spawn process pool (``build`` and the inputs must be picklable:
    a module-level function). ``progress``: a bar (terminal) or bounded log lines counting finished shards.
    """
    from onerec_dist.progress import Progress

    if not shard_inputs:
        raise ValueError("write_shards: no shard inputs (the training set would be empty)")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # never mix a previous run's shards with this one's
    out_dir.mkdir(parents=True)
    paths = [str(out_dir / shard_file_name(k)) for k in range(len(shard_inputs))]
    results: list[dict[str, Any] | None] = [None] * len(shard_inputs)
    bar = Progress(len(shard_inputs), desc, unit="shard", mode=None if progress else "off")
    if processes <= 1:
        for k, inputs in enumerate(shard_inputs):
            results[k] = _build_and_write(build, inputs, paths[k])
            bar.update(1, examples=sum(r["num_examples"] for r in results if r))
    else:
        import multiprocessing

        # spawn: the driver may hold threads (Ray, tokenizers, torch) that fork would copy in a locked state
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_build_and_write, build, inputs, paths[k]): k
                       for k, inputs in enumerate(shard_inputs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1, examples=sum(r["num_examples"] for r in results if r))
    bar.close()
    manifest = {"format": FORMAT, "num_examples": sum(r["num_examples"] for r in results),
                "num_tokens": sum(r["num_tokens"] for r in results),
                "task_names": sorted({t for r in results for t in r["tasks"]}),
                "shards": [{k: r[k] for k in ("file", "num_examples", "num_tokens")} for r in results]}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / MANIFEST)
    return manifest


def write_examples(examples: Sequence[Any], out_dir: str | Path, *, examples_per_shard: int = 100_000,
                   progress: bool = True) -> dict[str, Any]:
    """Examples already in memory (e.g. built by a recipe on the driver) -> shards of ``examples_per_shard``."""
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    chunks = [examples[i:i + examples_per_shard] for i in range(0, len(examples), examples_per_shard)]
    return write_shards(_identity, chunks, out_dir, progress=progress)  # in-process: no copy of the examples


# ---------------------------------------------------------------------------------------------------- reading
def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{shard_dir} is not a shard directory: {MANIFEST} is missing (write it with write_shards)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class _MappedShard:
    """Zero-copy numpy views of one memory-mapped shard's columns."""

    def __init__(self, path: Path, global_task_ids: dict[str, int]):
        self.source = pa.memory_map(str(path), "r")
        batch = pa.ipc.open_file(self.source).get_batch(0)
        ids, labels, task = (batch.column(name) for name in ("input_ids", "labels", "task"))
        self.offsets = ids.offsets.to_numpy()            # [n+1] int32, shared by labels (same lengths)
        self.input_ids = ids.values.to_numpy()           # [tokens] int32, views of the map
        self.labels = labels.values.to_numpy()           # [tokens] int32
        if not np.array_equal(labels.offsets.to_numpy(), self.offsets):
            raise ValueError(f"{path}: labels are not aligned with input_ids")
        names = task.dictionary.to_pylist()
        self.task_ids = np.asarray([global_task_ids[n] for n in names], dtype=np.int32)[task.indices.to_numpy()] \
            if len(names) else np.zeros(0, dtype=np.int32)  # [n] global task id (a small copy: 4 bytes/example)
        self.num_examples = len(batch)


class ShardedExamples(Sequence):
    """The examples of a shard directory, memory-mapped: ``len``, ``[i]`` -> {input_ids, labels, task} (int32
    numpy views of the map), ``lengths`` [N] and ``task_names``. Opening reads the manifest and the offsets only."""

    def __init__(self, shard_dir: str | Path):
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(self.shard_dir)
        self.task_names: list[str] = list(manifest["task_names"])
        index = {name: i for i, name in enumerate(self.task_names)}
        self._shards = [_MappedShard(self.shard_dir / s["file"], index) for s in manifest["shards"]]
        counts = [s.num_examples for s in self._shards]
        if counts != [s["num_examples"] for s in manifest["shards"]]:
            raise ValueError(f"{self.shard_dir}: shard sizes {counts} differ from the manifest's")
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [S+1]

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 tokens per example (from the offsets; no token is read)."""
        return np.concatenate([np.diff(s.offsets).astype(np.int64) for s in self._shards])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard, local = self._shards[k], i - int(self._starts[k])
        begin, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
        return {"input_ids": shard.input_ids[begin:end], "labels": shard.labels[begin:end],
                "task": self.task_names[int(shard.task_ids[local])]}
