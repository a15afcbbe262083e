"""``run_training``: start (or join) Ray, run ``train_worker`` on trainer.num_workers Ray Train workers, return the
run summary. ``run_sequence``: several trainings in one worker group (tests, small sweeps).

Checkpoints are reported to Ray (``<storage_path>/<run_name>/checkpoint_step<N>``). Resuming:
  * a worker-group failure: Ray restarts the group (trainer.max_failures times) and ``ray.train.get_checkpoint()``
    hands back the latest checkpoint;
  * trainer.resume=auto: a re-run with the same output_dir / storage_path and run_name continues that Ray run
    (Ray Train restores its checkpoint list from storage);
  * trainer.resume=<path>: a checkpoint directory (or a directory holding checkpoints: the newest is taken) is
    checked here, before Ray starts, then loaded by every worker; the run gets a fresh Ray run directory;
  * trainer.resume=never: a fresh Ray run directory even when run_name exists.
On a multi-node cluster, output_dir, storage_path and a resume path must be on storage every node sees.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from onerec_dist.distributed import checkpoint as ckpt
from onerec_dist.distributed.worker import PROGRESS_FILE, SUMMARY_FILE
from onerec_dist.progress import terminal_mode, watch_progress_file
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig, check_resources
from onerec_dist.training.engine_api import TrainJob

# Ray Train's controller polls the workers at this interval; its default (2 s) adds seconds to every start, report
# and finish of short runs, and polling a handful of actors twice a second costs nothing.
HEALTH_CHECK_INTERVAL_S = "0.5"


def run_training(job: TrainJob, trainer: TrainerConfig, ds: DeepSpeedConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train ``job`` with DeepSpeed on Ray Train workers; export to ``output_dir/export``; return the summary:

    loss_first, loss_last, losses (one per optimizer step, resumed runs included), steps, tokens, seconds,
    tokens_per_s_per_worker, mfu, checkpoint_dir (latest, or None), export_dir, log (rows every log_every steps),
    final_metrics (TrainJob.final_metrics of rank 0), ray_run_dir.
    """
    output_dir = _prepare_output_dir(output_dir)
    resume_dir = None
    if trainer.resume_mode == "path":  # check before any worker starts: a bad path fails in a second
        resume_dir = ckpt.find_checkpoint(trainer.resume)
        ckpt.verify_checkpoint(resume_dir, {"world_size": trainer.num_workers, "zero_stage": ds.zero_stage,
                                            "precision": trainer.precision})
    storage = _storage_path(trainer, output_dir)
    name = _run_name(trainer, storage)
    loop_config = {"job": job, "trainer": trainer, "deepspeed": ds, "output_dir": str(output_dir),
                   "resume_dir": str(resume_dir) if resume_dir else None, "progress": terminal_mode()}
    # one live bar on the driver's terminal, fed by rank 0 through a file; in logs the workers write a few lines
    with watch_progress_file(output_dir / PROGRESS_FILE, trainer.max_steps, "train",
                             enabled=loop_config["progress"] == "bar"):
        result = _launch(_train_worker_entry, loop_config, trainer, storage, name)
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    summary["checkpoint_dir"] = result.checkpoint.path if result.checkpoint is not None else None
    summary["ray_run_dir"] = f"{storage}/{name}"
    return summary


def run_sequence(runs: Sequence[tuple[TrainJob, TrainerConfig, DeepSpeedConfig, str | Path]]) -> list[dict[str, Any]]:
    """Several trainings back to back in ONE Ray worker group; returns one summary per run (as run_training).

    Starting a worker group costs ~15 s on a small machine (processes, imports, process group), more than a small
    training: this serves equivalence tests and small sweeps. All runs share num_workers, use_gpu and
    cpus_per_worker. Checkpoints are merged under each run's ``output_dir/checkpoints`` (storage every rank sees),
    not reported to Ray; trainer.resume may name a checkpoint an earlier run of the sequence writes; no retries.
    """
    if not runs:
        raise ValueError("run_sequence: no runs given")
    first = runs[0][1]
    for i, (_, trainer, _, _) in enumerate(runs):
        for key in ("num_workers", "use_gpu", "cpus_per_worker"):
            if getattr(trainer, key) != getattr(first, key):
                raise ValueError(f"run_sequence: runs[{i}] has trainer.{key}={getattr(trainer, key)!r} but runs[0] "
                                 f"has {getattr(first, key)!r}; one worker group serves every run")
    configs = []
    for job, trainer, ds, output_dir in runs:
        out = _prepare_output_dir(output_dir)
        if trainer.resume_mode == "path":  # workers run in other directories: make the path absolute here
            trainer = replace(trainer, resume=str(Path(trainer.resume).expanduser().resolve()))
        configs.append({"job": job, "trainer": trainer, "deepspeed": ds, "output_dir": str(out),
                        "progress": "lines"})  # a sweep's log: a few lines per run
    storage = _storage_path(first, Path(configs[0]["output_dir"]))
    name = f"sequence-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    _launch(_train_worker_sequence_entry, {"runs": configs}, replace(first, max_failures=0), storage, name)
    return [json.loads((Path(c["output_dir"]) / SUMMARY_FILE).read_text()) for c in configs]


def _prepare_output_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SUMMARY_FILE).unlink(missing_ok=True)  # never report a previous run's summary
    return output_dir


def _storage_path(trainer: TrainerConfig, output_dir: Path) -> str:
    storage = trainer.storage_path or str(output_dir / "ray_results")
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _launch(entry, loop_config: dict[str, Any], trainer: TrainerConfig, storage: str, name: str):
    """Start or join Ray, check resources, run a TorchTrainer; returns its Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_ray = ensure_training_ray(trainer)
    try:
        resources = ray.cluster_resources()
        check_resources(trainer, gpus=resources.get("GPU", 0.0), cpus=resources.get("CPU", 0.0))
        per_worker = {"CPU": trainer.cpus_per_worker, **({"GPU": 1} if trainer.use_gpu else {})}
        torch_trainer = TorchTrainer(
            entry, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=trainer.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints)))
        return _fit(torch_trainer)
    finally:
        if started_ray:
            ray.shutdown()


def _train_worker_entry(config: dict[str, Any]) -> None:
    from onerec_dist.distributed.worker import train_worker

    train_worker(config)


def _train_worker_sequence_entry(config: dict[str, Any]) -> None:
    from onerec_dist.distributed.worker import train_worker_sequence

    train_worker_sequence(config)


def ensure_training_ray(trainer: TrainerConfig) -> bool:
    """Use, join or start the Ray that ``trainer``'s workers run on, through the one session helper (ray_session);
    a local start is checked against the machine first. Everything started beside the workers (e.g. GRPO's rollout
    actors, distributed/rollout_pool.py) comes through here too, so the Ray it starts is the workers' Ray: the
    Ray Train health-check interval is set before the raylet inherits the environment.

    Returns True when this call connected (the caller shuts Ray down)."""
    import ray
    import torch

    from onerec_dist.distributed import ray_session

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    if ray.is_initialized() or ray_session.session_address(trainer.ray_address):
        return ray_session.ensure_ray(trainer.ray_address)
    check_resources(trainer, gpus=torch.cuda.device_count(), cpus=os.cpu_count() or 1)  # fail before starting Ray
    # Ray's default dashboard stays on (~2 s): it also serves the state API that Ray Train's placement-group
    # cleaner polls; without it the cleaner logs "State API may be temporarily unavailable" every second.
    return ray_session.ensure_ray(temp_dir_path=trainer.ray_temp_dir, num_cpus=os.cpu_count(),
                                  num_gpus=torch.cuda.device_count())


def _run_name(trainer: TrainerConfig, storage: str) -> str:
    """trainer.run_name, made unique unless resume=auto (Ray Train would otherwise restore that run's checkpoints)."""
    name = trainer.run_name
    if trainer.resume_mode == "auto":
        return name
    if "://" in storage or (Path(storage) / name).exists():
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return name


def _fit(torch_trainer):
    """trainer.fit(), re-raising a configuration / checkpoint ValueError from a worker as a plain ValueError."""
    from ray.train import TrainingFailedError

    try:
        return torch_trainer.fit()
    except TrainingFailedError as err:
        for failure in getattr(err, "worker_failures", {}).values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from err
        raise
