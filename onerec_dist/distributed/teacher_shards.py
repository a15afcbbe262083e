"""Shard the ``llm`` teacher's generation over Ray workers (``reasoning.teacher.num_workers`` > 1; OneRec-Think
Sec. 4.2 bootstraps every training window through a teacher, the slow part of the stage).

The requests of one call are cut into contiguous shards whose edges fall on multiples of
``reasoning.teacher.batch_size`` (``contiguous_shards``), so every worker forms exactly the batches the in-process
teacher forms; sampling is seeded per request (``teachers.llm.request_seed``). Together: the gathered rationales equal
in-process generation, request for request. ``num_workers`` actors each load the teacher once
(``teachers.llm.load_generator``: hf on CPU or GPU, or vLLM) and stay up across calls; shards go to whichever actor is
free, results come back in request order, a progress line per finished shard, and a failing worker raises a
RuntimeError naming its shard and the cause.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Up to this many shards per worker: a progress bar that moves, and a fast worker takes over a slow one's share.
SHARDS_PER_WORKER = 4


def contiguous_shards(count: int, batch_size: int, num_workers: int,
                      shards_per_worker: int = SHARDS_PER_WORKER) -> list[tuple[int, int]]:
    """[lo, hi) request ranges covering 0..count in order, each a run of whole batches of ``batch_size`` (the last may
    be short), at most ``num_workers * shards_per_worker`` of them, sizes differing by at most one batch."""
    if count <= 0:
        return []
    batches = math.ceil(count / batch_size)
    shards = min(batches, num_workers * shards_per_worker)
    base, extra = divmod(batches, shards)
    ranges, first = [], 0
    for shard in range(shards):
        size = base + (1 if shard < extra else 0)  # in batches
        ranges.append((first * batch_size, min((first + size) * batch_size, count)))
        first += size
    return ranges


def merge_shards(results: dict[int, list[str]], ranges: Sequence[tuple[int, int]]) -> list[str]:
    """The texts of all shards in request order; a shard missing or of the wrong length is an error."""
    merged: list[str] = []
    for number, (lo, hi) in enumerate(ranges):
        texts = results.get(number)
        if texts is None or len(texts) != hi - lo:
            got = "nothing" if texts is None else f"{len(texts)} rationales"
            raise RuntimeError(f"teacher shard {number} (requests {lo}..{hi - 1}) returned {got}, "
                               f"expected {hi - lo}")
        merged.extend(texts)
    return merged


class _TeacherWorker:
    """One Ray actor: loads the teacher once, then generates shard after shard."""

    def __init__(self, cfg, source):
        import torch

        from onerec_dist.reasoning.teachers.llm import load_generator

        if not cfg.use_gpu:
            torch.set_num_threads(1)  # one CPU per actor (num_cpus=1)
        self.generator = load_generator(cfg, source)

    def generate(self, number: int, prompts: list[str], indices: list[int]) -> tuple[int, list[str]]:
        return number, self.generator.generate(prompts, indices)


def _ensure_gpus(cfg) -> None:
    """A Ray task asking for a GPU the cluster lacks waits forever: say so instead."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu and gpus < 1:
        raise ValueError("reasoning.teacher.use_gpu=true but the Ray cluster has no GPU; set use_gpu=false "
                         "(backend=hf) to generate on CPU workers")


def _shard_failure(number: int, shard: tuple[int, int], err: Exception) -> RuntimeError:
    cause = getattr(err, "cause", None)  # RayTaskError: the worker's exception
    cause = cause if isinstance(cause, BaseException) else err
    return RuntimeError(f"teacher shard {number} (requests {shard[0]}..{shard[1] - 1}) failed on a Ray worker: "
                        f"{type(cause).__name__}: {cause}")


class ShardedGenerator:
    """``generate(prompts, indices)`` on ``cfg.num_workers`` Ray actors (started at the first call)."""

    def __init__(self, cfg, source):
        self.cfg, self.source, self.workers = cfg, source, []

    def _start(self) -> None:
        import ray

        from onerec_dist.distributed import ray_session

        ray_session.ensure_ray(include_dashboard=False, log_to_driver=False)
        _ensure_gpus(self.cfg)
        actor = ray.remote(num_cpus=1, num_gpus=1 if self.cfg.use_gpu else 0)(_TeacherWorker)
        self.workers = [actor.remote(self.cfg, self.source) for _ in range(self.cfg.num_workers)]

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> list[str]:
        import ray
        from ray.exceptions import RayError

        from onerec_dist.progress import Progress

        ranges = contiguous_shards(len(prompts), self.cfg.batch_size, self.cfg.num_workers)
        if not ranges:
            return []
        if not self.workers:
            self._start()
        todo = list(enumerate(ranges))
        running: dict = {}  # ObjectRef -> (shard number, worker)
        results: dict[int, list[str]] = {}

        def submit(worker) -> None:
            number, (lo, hi) = todo.pop(0)
            ref = worker.generate.remote(number, list(prompts[lo:hi]), list(indices[lo:hi]))
            running[ref] = (number, worker)

        for worker in self.workers[:len(todo)]:
            submit(worker)
        with Progress(len(ranges), f"teacher x{len(self.workers)} workers", unit="shard",
                      max_lines=len(ranges)) as bar:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                number, worker = running.pop(done[0])
                try:
                    _, texts = ray.get(done[0])
                except RayError as err:
                    self.close()
                    raise _shard_failure(number, ranges[number], err) from err
                results[number] = texts
                bar.update(1, rationales=sum(len(t) for t in results.values()))
                if todo:
                    submit(worker)
        return merge_shards(results, ranges)

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
