"""``run_on_workers``: run one function on every Ray Train worker with the DeepSpeed strategy set up, and return
what each rank returned (rank order). The RL recipe's worker loop and the multi-worker tests go through it, so they
share ray_job's Ray session, resource checks and error handling instead of a second launcher.

    def fn(strategy: DeepSpeedStrategy, config: Any) -> Any   # importable by the workers (a module function)

``fn`` gets a strategy whose process group is up (``setup_distributed``) and whose RNGs are seeded with
trainer.seed; it calls ``strategy.prepare`` / ``prepare_reference`` / collectives as it needs. Its return value must
be picklable. Results travel through files in ``output_dir`` (Ray Train V2 returns nothing from a worker), so on a
multi-node cluster ``output_dir`` must be storage every node sees, as for ``run_training``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from onerec_dist.distributed import ray_job
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig

RESULTS_DIR = "worker_results"


def run_on_workers(fn: Callable[[Any, Any], Any], config: Any, trainer: TrainerConfig, ds: DeepSpeedConfig,
                   output_dir: str | Path | None = None) -> list[Any]:
    """``[fn(strategy_r, config) for r in ranks]`` computed on trainer.num_workers Ray Train workers.

    ``output_dir`` holds the per-rank results and Ray's run directory (default: a temporary directory on this
    machine, removed afterwards). No retries (trainer.max_failures is ignored): a failing ``fn`` fails the call;
    a ValueError raised by ``fn`` is re-raised here as a ValueError with its message.
    """
    keep = output_dir is not None
    root = Path(output_dir).expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="onerec_workers_"))
    results = root / RESULTS_DIR
    shutil.rmtree(results, ignore_errors=True)  # never return a previous call's results
    results.mkdir(parents=True)
    try:
        loop_config = {"fn": fn, "config": config, "trainer": trainer, "deepspeed": ds, "results_dir": str(results)}
        storage = ray_job._storage_path(trainer, root)
        name = f"workers-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        ray_job._launch(_worker_entry, loop_config, replace(trainer, max_failures=0), storage, name)
        return [_read_result(results, rank) for rank in range(trainer.num_workers)]
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _worker_entry(loop_config: dict[str, Any]) -> None:
    from onerec_dist.distributed.strategy import DeepSpeedStrategy, seed_everything

    trainer: TrainerConfig = loop_config["trainer"]
    strategy = DeepSpeedStrategy(trainer, loop_config["deepspeed"])
    strategy.setup_distributed()
    seed_everything(trainer.seed)  # identical models on every rank, as in the training loop
    result = loop_config["fn"](strategy, loop_config["config"])
    path = _result_path(Path(loop_config["results_dir"]), strategy.rank)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(path)  # the driver never reads a half-written file
    strategy.barrier()


def _result_path(results: Path, rank: int) -> Path:
    return results / f"rank{rank:05d}.pt"


def _read_result(results: Path, rank: int) -> Any:
    path = _result_path(results, rank)
    if not path.exists():
        raise RuntimeError(f"worker rank {rank} finished without writing its result {path}; on a multi-node "
                           "cluster, output_dir must be storage every node sees")
    return torch.load(path, weights_only=False)
