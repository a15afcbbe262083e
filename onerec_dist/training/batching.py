"""Batching of token sequences for data-parallel training: plans, a deterministic distributed sampler, collation.

An example is a mapping (or an object with attributes) holding ``input_ids: list[int]``, ``labels: list[int]``
aligned with ``input_ids`` (Hugging Face convention: ``labels[t]`` is the token at position t, -100 where no loss
is taken; the loss shifts by one) and ``task: str``.

Two ways to cut an epoch into micro-batches:

* fixed size (``batch_size``): ``batch_size`` examples per micro-batch, in shuffled order;
* token budget (``max_tokens``): within a shuffled window of ``window`` examples, examples are sorted by length and
  packed greedily while ``padded_len * n_examples <= max_tokens``. Short semantic-ID sequences then share a batch with
  other short ones instead of being padded to the longest reasoning trace (length bucketing, as in fairseq's
  ``batch_by_size``). The batch order is shuffled again so that lengths do not drift through the epoch.

The sampler shards micro-batches over ranks: global micro-batch ``i`` of an epoch goes to rank ``i % world_size``,
and one optimizer step of rank ``r`` takes its next ``grad_accum_steps`` micro-batches. Every rank therefore holds
the same number of micro-batches, and the examples of global step ``s`` are the global micro-batches
``[s * W * G, (s + 1) * W * G)`` whatever the split into micro-batch size x accumulation x ranks. The tail of an
epoch that does not fill a whole step (at most ``W * G`` micro-batches) is left out of that epoch; ``epoch_stats``
reports how many examples that was, and the next epoch's shuffle puts them elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def _field(example: Any, name: str) -> Any:
    return example[name] if isinstance(example, Mapping) else getattr(example, name)


def validate_examples(examples: Sequence[Any]) -> None:
    """Raise a ValueError naming the example index and field for malformed examples."""
    if len(examples) == 0:
        raise ValueError("examples: the training set is empty")
    for i, example in enumerate(examples):
        try:
            input_ids, labels, task = (_field(example, k) for k in ("input_ids", "labels", "task"))
        except (KeyError, AttributeError) as err:
            raise ValueError(f"examples[{i}] has no field {err}; each example needs input_ids, labels and task")
        if len(input_ids) != len(labels):
            raise ValueError(f"examples[{i}]: len(input_ids)={len(input_ids)} != len(labels)={len(labels)}")
        if len(input_ids) < 2:
            raise ValueError(f"examples[{i}]: needs >= 2 tokens (one input, one predicted), got {len(input_ids)}")
        if not isinstance(task, str) or not task:
            raise ValueError(f"examples[{i}].task must be a non-empty string, got {task!r}")


def sequence_lengths(examples: Sequence[Any]) -> np.ndarray:
    return np.fromiter((len(_field(e, "input_ids")) for e in examples), dtype=np.int64, count=len(examples))


def task_names(examples: Sequence[Any]) -> list[str]:
    """Sorted task names: the index of a name is its ``task_id`` in collated batches."""
    if hasattr(examples, "task_names"):  # a memory-mapped dataset knows them (shards module): no example is read
        return list(examples.task_names)
    return sorted({_field(e, "task") for e in examples})


def example_lengths(examples: Sequence[Any]) -> np.ndarray:
    """[N] tokens per example; a memory-mapped dataset answers from its offsets without reading tokens."""
    if hasattr(examples, "lengths"):
        return np.asarray(examples.lengths, dtype=np.int64)
    return sequence_lengths(examples)


def padded_length(length: int, multiple: int) -> int:
    return -(-int(length) // multiple) * multiple


def fixed_size_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive full batches of ``order``; a partial tail is not returned."""
    n_full = len(order) // batch_size
    return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(n_full)]


def token_budget_batches(lengths: np.ndarray, order: np.ndarray, max_tokens: int, window: int,
                         pad_to_multiple_of: int = 1) -> list[list[int]]:
    """Length-bucketed batches whose padded size ``max(padded_len) * n_examples`` stays <= ``max_tokens``.

    Each window of ``order`` is sorted by length (stable) and packed greedily; batches are returned in window order.
    """
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        current: list[int] = []
        for idx in chunk.tolist():
            width = padded_length(lengths[idx], pad_to_multiple_of)  # ascending: the newcomer is the longest
            if width > max_tokens:
                raise ValueError(f"example {idx} has {lengths[idx]} tokens (padded {width}) > trainer.max_tokens="
                                 f"{max_tokens}; raise trainer.max_tokens or shorten the example")
            if current and width * (len(current) + 1) > max_tokens:
                batches.append(current)
                current = []
            current.append(idx)
        if current:
            batches.append(current)
    return batches


class DistributedBatchSampler:
    """Deterministic epoch plans sharded over ranks, resumable at any step (see the module docstring).

    Every rank builds the same global plan from (seed, epoch), so no communication is needed. ``next_step()`` returns
    this rank's ``grad_accum_steps`` micro-batches (lists of example indices) of the next optimizer step; the state is
    (epoch, position = steps taken in that epoch).
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, *, world_size: int = 1, rank: int = 0,
                 grad_accum_steps: int = 1, batch_size: int | None = None, max_tokens: int | None = None,
                 window: int = 1024, pad_to_multiple_of: int = 1, shuffle: bool = True, seed: int = 0):
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("DistributedBatchSampler: give exactly one of batch_size (fixed size) or max_tokens")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        for name, value in (("grad_accum_steps", grad_accum_steps), ("window", window),
                            ("pad_to_multiple_of", pad_to_multiple_of), ("batch_size", batch_size or 1),
                            ("max_tokens", max_tokens or 1)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.world_size, self.rank, self.grad_accum_steps = world_size, rank, grad_accum_steps
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.window, self.pad_to_multiple_of = window, pad_to_multiple_of
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    # ---- plans ------------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All ranks' micro-batches of ``epoch``, truncated to whole steps (a multiple of world_size x accumulation),
        as flat example indices [M] and batch bounds [B+1] (batch b = indices[bounds[b]:bounds[b+1]]).

        Flat arrays, not lists of lists: 8 bytes per example instead of ~60 for Python ints in lists, so a rank's
        memory for the plan of a million-example epoch stays ~8 MB."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        per_step = self.world_size * self.grad_accum_steps  # micro-batches per optimizer step
        if self.batch_size is not None:  # consecutive full batches of the shuffled order (fixed_size_batches)
            bounds = np.arange(0, n // self.batch_size * self.batch_size + 1, self.batch_size)
            indices = order
        else:
            batches = token_budget_batches(self.lengths, order, self.max_tokens, self.window, self.pad_to_multiple_of)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            indices = np.fromiter((i for b in batches for i in b), dtype=np.int64, count=sum(map(len, batches)))
            bounds = np.concatenate([[0], np.cumsum([len(b) for b in batches], dtype=np.int64)])
        bounds = bounds[:(len(bounds) - 1) // per_step * per_step + 1]
        if len(bounds) == 1:
            unit = (f"{self.batch_size} examples" if self.batch_size is not None
                    else f"a batch of <= {self.max_tokens} padded tokens")
            raise ValueError(f"{n} examples do not fill one optimizer step: a step needs world_size={self.world_size}"
                             f" x grad_accum_steps={self.grad_accum_steps} micro-batches of {unit}")
        self._cache = (epoch, (indices[:bounds[-1]], bounds))
        return self._cache[1]

    def global_batches(self, epoch: int) -> list[list[int]]:
        """``plan(epoch)`` as lists of example indices."""
        indices, bounds = self.plan(epoch)
        return [indices[a:b].tolist() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank::self.world_size]

    def steps_in_epoch(self, epoch: int) -> int:
        return (len(self.plan(epoch)[1]) - 1) // (self.world_size * self.grad_accum_steps)

    def epoch_stats(self, epoch: int) -> dict[str, int]:
        """Examples used / left out, and real vs padded tokens, of one epoch (all ranks)."""
        batches = self.global_batches(epoch)
        used = sum(len(b) for b in batches)
        real = sum(int(self.lengths[b].sum()) for b in batches)
        padded = sum(padded_length(self.lengths[b].max(), self.pad_to_multiple_of) * len(b) for b in batches)
        return {"steps": self.steps_in_epoch(epoch), "micro_batches": len(batches), "examples_used": used,
                "examples_left_out": len(self.lengths) - used, "real_tokens": real, "padded_tokens": padded}

    # ---- iteration --------------------------------------------------------------------------------------------
    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches of the next optimizer step (``grad_accum_steps`` lists of example indices)."""
        if self.position >= self.steps_in_epoch(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0
        indices, bounds = self.plan(self.epoch)
        g, w = self.grad_accum_steps, self.world_size
        # this rank's k-th micro-batch is global micro-batch k * W + rank; step p holds k = p * G .. p * G + G - 1
        mine = [(self.position * g + j) * w + self.rank for j in range(g)]
        self.position += 1
        return [indices[bounds[m]:bounds[m + 1]].tolist() for m in mine]

    # ---- resume -----------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {"num_examples": len(self.lengths), "world_size": self.world_size,
                "grad_accum_steps": self.grad_accum_steps, "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "window": self.window, "pad_to_multiple_of": self.pad_to_multiple_of,
                "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` stopped; the plan settings must match or the position means nothing."""
        mine = self._fingerprint()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError("sampler state does not match this run (the data or batching changed): " + "; ".join(diff))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SamplerStepSource:
    """A StepSource (onerec_dist.training.engine_api) over a dataset: the sampler's index lists of the next step,
    looked up in ``examples`` (a list, or memory-mapped ShardedExamples: only these examples' pages are read) and
    collated. The state is the sampler's (epoch, position), so a resumed run takes exactly the same batches."""

    def __init__(self, examples: Sequence[Any], sampler: DistributedBatchSampler, pad_token_id: int = 0,
                 pad_to_multiple_of: int = 1):
        if len(examples) != len(sampler.lengths):
            raise ValueError(f"SamplerStepSource: {len(examples)} examples but the sampler plans "
                             f"{len(sampler.lengths)}")
        if not hasattr(examples, "task_names"):  # a shard directory was validated when it was written
            validate_examples(examples)
        self.examples, self.sampler = examples, sampler
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of
        self.task_names = task_names(examples)
        self.lengths = sampler.lengths  # [N] tokens per example (the engine's FLOP count reads them)

    def next_step(self) -> list[dict[str, Any]]:
        return [collate([self.examples[i] for i in ids], self.task_names, self.pad_token_id, self.pad_to_multiple_of)
                for ids in self.sampler.next_step()]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def collate(examples: Sequence[Any], task_names: Sequence[str], pad_token_id: int = 0,
            pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad examples into tensors.

    Returns input_ids [B, L], labels [B, L] (-100 on padding), attention_mask [B, L] (1 = real token),
    task_ids [B] (index into task_names) and task_names (the tuple itself, for per-task metrics).
    """
    import torch  # here, not at the top: shard-writing processes import this module and need no torch

    index = {name: i for i, name in enumerate(task_names)}
    width = padded_length(max(len(_field(e, "input_ids")) for e in examples), pad_to_multiple_of)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    task_ids = torch.empty(batch_size, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = _field(example, "input_ids")  # a list, or a read-only int32 view of a memory map (np.asarray copies)
        input_ids[row, :len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        labels[row, :len(ids)] = torch.from_numpy(np.asarray(_field(example, "labels"), dtype=np.int64))
        attention_mask[row, :len(ids)] = 1
        task = _field(example, "task")
        if task not in index:
            raise ValueError(f"example task {task!r} is not one of the tasks {list(task_names)}")
        task_ids[row] = index[task]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "task_ids": task_ids,
            "task_names": tuple(task_names)}
