"""Build an alignment task's pool from contiguous chunks of its rows in a process pool, with the same result as one
serial pass (onerec_dist/training/tasks.py: persona per user, sequential per training example or per user,
captioning per item).

A task's builder is split in two: the driver prepares what every row needs (the tokenizer, the item-token table,
checks and whole-input reports) into a picklable *context*, and a module-level ``build_rows(context, start, stop)``
returns ``(examples, DropReport)`` of rows ``start .. stop - 1``. Each row's examples depend on that row and the
context only, so concatenating the chunks' examples in row order gives exactly the serial pool, and merging their
reports in row order gives exactly the serial report (counts added; the first three examples of each reason kept,
reasons in order of first appearance). The chunk count changes speed, never a result. Tokenizer calls stay batched
inside a chunk (``tasks._encode``: the fast tokenizer encodes each text independently, so a batch's split does not
change any text's ids).

Processes: ``fork`` when the platform has it and this process runs no other Python thread (a Ray driver's, a
watcher's), else ``spawn``. Fork copies the context for free; spawn pickles it once per worker (``initargs``) and
re-imports the package: measured on 6k sequential rows (2 workers, a 2-core CPU), the workers spent 4.0 s of CPU
forked and 12.6 s spawned (~4 s per worker of imports and unpickling). The children never touch torch (the
item-token table is computed by the driver). Small inputs stay serial: starting the pool costs more than the rows
(``min_parallel_rows``). A bar (``onerec_dist.progress.Progress``) counts finished chunks.

Pure: stdlib / numpy only (tokenizer calls happen in the builders).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from onerec_dist.data.types import DropReport

# Rows below which a pool is not started: one process start (fork + a tokenizer's first call) costs about as much
# as building ~1-2k sequential-preference rows (~0.5 ms each), spawn much more.
MIN_PARALLEL_ROWS = 2000
# Chunks per process: enough to balance uneven rows (long histories) and to move the bar; few enough that the per-chunk
# overhead (one pickled result) stays small.
CHUNKS_PER_PROCESS = 4

BuildRows = Callable[[Any, int, int], "tuple[list, DropReport]"]
_CONTEXT: Any = None  # the context of the pool's builder, set in each worker by _set_context


def chunk_bounds(num_rows: int, num_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of ``num_chunks`` contiguous chunks covering 0 .. num_rows - 1, sizes differing by at most 1
    (the first ``num_rows % num_chunks`` one longer). E.g. (10, 3) -> (0, 4), (4, 7), (7, 10)."""
    num_chunks = max(1, min(num_chunks, num_rows))
    size, extra = divmod(num_rows, num_chunks)
    bounds, start = [], 0
    for k in range(num_chunks):
        stop = start + size + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def start_method() -> str:
    """"fork" on Linux when no other Python thread runs (fork copies only the calling thread: a lock another thread
    holds, e.g. a Ray driver's, would stay locked in the child), else "spawn"."""
    import multiprocessing

    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods() \
            and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _set_context(context: Any) -> None:
    global _CONTEXT
    _CONTEXT = context


def _run_chunk(build_rows: BuildRows, start: int, stop: int) -> tuple[list, DropReport]:
    return build_rows(_CONTEXT, start, stop)


@contextmanager
def _quiet_forked_tokenizers(method: str) -> Iterator[None]:
    """A forked child of a process whose fast tokenizer already ran threads must not use them (the copied thread
    pool has no threads): with TOKENIZERS_PARALLELISM unset, ``tokenizers`` turns them off in the child itself but
    prints a warning per child. Setting it to false while the workers fork does the same silently; the driver's own
    setting is restored after."""
    if method != "fork" or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def build_in_chunks(build_rows: BuildRows, context: Any, num_rows: int, *, processes: int | None = None,
                    min_parallel_rows: int = MIN_PARALLEL_ROWS, desc: str = "build",
                    method: str | None = None) -> tuple[list, DropReport]:
    """``build_rows(context, 0, num_rows)``, computed as contiguous chunks in ``processes`` processes when
    ``processes`` > 1 and ``num_rows`` >= ``min_parallel_rows`` (else one serial call). Examples in row order;
    the chunks' reports merged in row order. ``build_rows`` must be a module-level function and ``context``
    picklable (spawn). An error in a chunk is raised as the earliest failing chunk's, like the serial pass.
    ``method``: "fork" | "spawn" | None (``start_method()``)."""
    if not processes or processes <= 1 or num_rows < max(2, min_parallel_rows):
        return build_rows(context, 0, num_rows)
    import multiprocessing

    from onerec_dist.progress import Progress

    bounds = chunk_bounds(num_rows, processes * CHUNKS_PER_PROCESS)
    method = method or start_method()
    workers = min(processes, len(bounds))
    if method == "fork":
        gc.freeze()  # the children's collector would otherwise touch (and so copy) every page of the driver's heap
    try:
        with _quiet_forked_tokenizers(method), \
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                    initializer=_set_context, initargs=(context,)) as pool:
            futures: list[Future] = [pool.submit(_run_chunk, build_rows, start, stop) for start, stop in bounds]
            # the bar after the submits: tqdm's monitor thread must not exist while the workers fork
            with Progress(len(bounds), desc, unit="chunk") as bar:
                for future in as_completed(futures):
                    bar.update(1, rows=sum(b - a for f, (a, b) in zip(futures, bounds) if f.done()))
    finally:
        gc.unfreeze()
    examples: list = []
    report = DropReport()
    for future in futures:  # row order; .result() raises the earliest chunk's error
        part, part_report = future.result()
        examples.extend(part)
        report.merge(part_report)
    return examples, report
