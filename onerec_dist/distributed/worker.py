"""The per-worker training loop that Ray Train runs on every rank (``train_worker``; ``train_worker_sequence`` runs
several trainings in one worker group), as a plain function ``run_one`` of the configs.

One optimizer step of rank r:
  1. take this rank's ``grad_accum_steps`` collated micro-batches from the job's step source (the distributed
     sampler over a memory-mapped dataset, or a producer such as RL rollouts; engine_api.StepSource);
  2. all-reduce the number of loss tokens N of the *global* batch (one all-reduce);
  3. for each micro-batch: loss_sum = job.loss(...).loss_sum; backward(loss_sum * world_size / N) (DeepSpeed
     averages gradients over ranks, so the world_size factor makes the gradient that of sum(loss_t) / N);
     strategy.step() (the optimizer steps at the accumulation boundary);
  4. all-reduce the detached loss sums / per-task sums / token counts for logging.
Every step's wall time is split into phases (``PhaseTimer``: data, forward, backward, optimizer) for the summary's
``step_timings`` (benchmarks/bench_training.py reads them).
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from onerec_dist.distributed.checkpoint import find_checkpoint
from onerec_dist.distributed.strategy import DeepSpeedStrategy, count_parameters, seed_everything
from onerec_dist.progress import Progress, ProgressFile
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig, peak_flops_per_worker
from onerec_dist.training.engine_api import StepContext, StepSource, TrainJob
from onerec_dist.training.flops import training_flops_per_token
from onerec_dist.training.validation import ValidationTracker, mean_metrics, plot_learning_curve

EXPORT_DIR = "export"
BEST_DIR = "best"  # the best validated step's model (trainer.validate_every)
STAGING_DIR = "checkpoint_staging"
CHECKPOINTS_DIR = "checkpoints"  # run_sequence's checkpoints (run_training's live in Ray's storage_path)
SUMMARY_FILE = "train_summary.json"  # written by rank 0, read by run_training on the driver
PROGRESS_FILE = "progress.json"  # rank 0's step count, drawn as a bar by the driver when it has a terminal


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class PhaseTimer:
    """Seconds per phase of one optimizer step, summed over its micro-batches: ``start()``, ``mark(phase)`` after
    each phase, ``read()`` once the step is over.

    CPU: perf_counter at each mark. CUDA: an event recorded on the current stream at each mark, read after the step
    (one synchronisation per step, none inside it), so a phase is the GPU time between its boundaries; the step's
    host-side copy of the logging stats already synchronises, so the extra cost is one event wait.
    """

    PHASES = ("data", "forward", "backward", "optimizer")

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._marks: list[tuple[str | None, Any]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._marks = [(None, self._now())]

    def mark(self, phase: str) -> None:
        if phase not in self.PHASES:
            raise ValueError(f"PhaseTimer.mark: phase={phase!r}; allowed: {self.PHASES}")
        self._marks.append((phase, self._now()))

    def read(self) -> dict[str, float]:
        """{phase: seconds} of the marks since start(), plus "total" (their sum)."""
        out = dict.fromkeys(self.PHASES, 0.0)
        if self.cuda and len(self._marks) > 1:
            self._marks[-1][1].synchronize()
        for (_, begin), (phase, end) in zip(self._marks, self._marks[1:]):
            out[phase] += begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
        out["total"] = sum(out[p] for p in self.PHASES)
        return out


class RankZeroLogger:
    """Progress and wandb (offline by default) on rank 0; silent elsewhere.

    ``progress`` (the driver's choice, onerec_dist.progress.terminal_mode): "bar" relays the step count through
    output_dir/PROGRESS_FILE to the driver, which draws one live bar; "lines" writes at most ~20 lines per run.
    """

    def __init__(self, trainer: TrainerConfig, output_dir: Path, rank: int, initial_step: int, config: dict,
                 progress: str = "lines", total_steps: int | None = None):
        self.enabled = rank == 0
        self.bar = self.run = None
        if not self.enabled:
            return
        # the loop's budget (step_budget: max_epochs may end it long before trainer.max_steps)
        self.bar = _progress(progress, total_steps or trainer.max_steps, initial_step, output_dir)
        if trainer.wandb.mode != "disabled":
            import wandb

            self.run = wandb.init(project=trainer.wandb.project, name=trainer.wandb.run_name or trainer.run_name,
                                  mode=trainer.wandb.mode, dir=str(output_dir), config=config)

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1, loss=f"{loss:.4f}")

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()


def _progress(mode: str, total: int, initial: int, output_dir: Path):
    if mode == "bar":  # the driver has a terminal and draws the bar from this file (ray_job.run_training)
        return ProgressFile(output_dir / PROGRESS_FILE, total, initial)
    return Progress(total, "train", unit="step", mode=mode, initial=initial)


def _quiet_known_harmless_output() -> None:
    """Library output that says nothing about the run, silenced where it starts: transformers draws a tqdm bar per
    save_pretrained ("Writing model shards"), which in a worker's log is one more carriage-return line per export."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for one training (run_training): checkpoints are reported to Ray."""
    import ray.train

    resume = ray.train.get_checkpoint()  # set when Ray retries after a failure, or restores the same run
    if resume is None:
        run_one(config, publish="ray", resume_dir=config.get("resume_dir"))
        return
    with resume.as_directory() as ckpt_dir:  # a local path, or a download of remote storage
        run_one(config, publish="ray", resume_dir=ckpt_dir)


def train_worker_sequence(config: dict[str, Any]) -> None:
    """Several trainings back to back in one worker group (run_sequence); checkpoints go to output_dir/checkpoints."""
    for run in config["runs"]:
        trainer: TrainerConfig = run["trainer"]
        resume_dir = find_checkpoint(trainer.resume) if trainer.resume_mode == "path" else None
        run_one(run, publish="directory", resume_dir=resume_dir)
        gc.collect()


def run_one(config: dict[str, Any], publish: str, resume_dir: str | Path | None) -> None:
    """One training on this rank: build, (resume,) train, export, write the summary (rank 0).

    ``config``: job, trainer, deepspeed, output_dir. ``publish``: "ray" reports checkpoints to Ray Train,
    "directory" merges the ranks' checkpoints under output_dir/checkpoints (needs storage shared by the ranks).
    """
    job: TrainJob = config["job"]
    trainer: TrainerConfig = config["trainer"]
    job.loss_config = trainer.loss  # trainer.loss (full / chunked / liger) for the default TrainJob.loss
    ds: DeepSpeedConfig = config["deepspeed"]
    output_dir = Path(config["output_dir"])

    _quiet_known_harmless_output()
    strategy = DeepSpeedStrategy(trainer, ds)
    strategy.setup_distributed()
    seed_everything(trainer.seed)  # identical initial weights on every rank
    model, tokenizer = job.build_model()
    param_groups = job.configure_trainable(model, trainer.weight_decay)
    num_params, trainable_params = count_parameters(model)
    engine = strategy.prepare(model, param_groups)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    source: StepSource = job.step_source(StepContext(strategy.rank, strategy.world_size, trainer,
                                                     0 if pad_id is None else int(pad_id), engine, tokenizer))
    tasks = list(source.task_names)
    fingerprint = {"zero_stage": ds.zero_stage, "precision": trainer.precision, "num_params": num_params,
                   "trainable_params": trainable_params}

    state: dict[str, Any] = {"step": 0, "losses": [], "log": []}
    if resume_dir is not None:
        client_state = strategy.load_checkpoint(resume_dir, fingerprint)
        source.load_state_dict(client_state["step_source"])
        state = client_state["state"]

    loop = _Loop(job, trainer, strategy, engine, source, tasks, output_dir, num_params, fingerprint, publish)
    loop.tokenizer, loop.max_steps = tokenizer, step_budget(trainer, source)
    strategy.set_schedule_length(loop.max_steps)  # the LR decays over the steps that will run
    # 4N + 2N_train + attention; a producer without planned lengths counts no attention
    loop.flops_per_token = training_flops_per_token(model, getattr(source, "lengths", ()))
    logger = RankZeroLogger(trainer, output_dir, strategy.rank, state["step"],
                            {"trainer": asdict(trainer), "deepspeed": asdict(ds)}, config.get("progress", "lines"),
                            loop.max_steps)
    try:
        run_stats = loop.train(state, logger)
    finally:
        logger.close()

    export_dir = output_dir / EXPORT_DIR
    strategy.export_hf(engine, tokenizer, export_dir)
    validation = loop.finish_validation(state, export_dir)  # export/ = the best step's model when selected
    if strategy.is_rank0:
        job.save_model_extras(export_dir)
    engine.eval()
    with torch.no_grad():
        final_metrics = job.final_metrics(engine)
    losses = state["losses"]
    summary = {"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "losses": losses, "steps": state["step"], "world_size": strategy.world_size,
               "num_params": num_params, "trainable_params": trainable_params, "tasks": tasks, "log": state["log"],
               "export_dir": str(export_dir), "checkpoint_dir": loop.last_checkpoint, "final_metrics": final_metrics,
               **({"validation": validation} if validation else {}),
               **run_stats}
    if strategy.is_rank0:  # Ray Train V2 keeps only metrics reported with checkpoints, so the summary goes to a file
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
        tmp = output_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        tmp.replace(output_dir / SUMMARY_FILE)
    strategy.barrier()


def step_budget(trainer: TrainerConfig, source: StepSource) -> int:
    """trainer.max_steps, or fewer when trainer.max_epochs is set: epochs x the steps of the sampler's epoch 0."""
    if trainer.max_epochs is None:
        return trainer.max_steps
    sampler = getattr(source, "sampler", None)
    if sampler is None:
        raise ValueError("trainer.max_epochs needs a step source that has epochs (a dataset sampler); this job's "
                         "has none: use trainer.max_steps")
    return max(1, min(trainer.max_steps, math.ceil(trainer.max_epochs * sampler.steps_in_epoch(0))))


class _Loop:
    """Everything the step loop needs (kept as one object so train() stays short)."""

    def __init__(self, job, trainer, strategy, engine, source, tasks, output_dir, num_params, fingerprint, publish):
        self.job, self.trainer, self.strategy, self.engine = job, trainer, strategy, engine
        self.source, self.tasks = source, tasks
        self.output_dir, self.num_params, self.fingerprint = output_dir, num_params, fingerprint
        self.publish, self.last_checkpoint = publish, None
        device_name = torch.cuda.get_device_name(strategy.device) if trainer.use_gpu else None
        self.peak_flops = peak_flops_per_worker(trainer, device_name)
        self.timer = PhaseTimer(cuda=trainer.use_gpu)
        self.step_timings: list[dict[str, float]] = []  # this session's steps (not restored on resume)

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the all-reduced [loss_sum, loss_units, tokens, task_sums.., task_counts..]."""
        strategy, timer = self.strategy, self.timer
        timer.start()
        micro_batches = self.source.next_step()
        local_units = sum(self.job.loss_units(b) for b in micro_batches)
        global_units = float(strategy.all_reduce(torch.tensor([local_units]))[0])
        scale = strategy.world_size / max(global_units, 1.0)
        stats = torch.zeros(3 + 2 * len(self.tasks), dtype=torch.float64)
        for batch in micro_batches:
            batch = _to_device(batch, strategy.device)
            timer.mark("data")
            out = self.job.loss(self.engine, batch)
            timer.mark("forward")
            strategy.backward(out.loss_sum * scale)
            timer.mark("backward")
            strategy.step()
            timer.mark("optimizer")
            stats += torch.cat([out.loss_sum.detach().double().reshape(1).cpu(), torch.zeros(1, dtype=torch.float64),
                                batch["attention_mask"].sum().double().reshape(1).cpu(),
                                out.task_sums.detach().double().cpu(), out.task_counts.detach().double().cpu()])
        stats = strategy.all_reduce(stats)
        stats[1] = global_units
        timer.mark("data")
        self.step_timings.append({"tokens": float(stats[2]), **timer.read()})
        return stats

    def train(self, state: dict[str, Any], logger: RankZeroLogger) -> dict[str, Any]:
        t, strategy = self.trainer, self.strategy
        self.engine.train()
        start_step, num_tasks = state["step"], len(self.tasks)
        interval = torch.zeros(3 + 2 * num_tasks, dtype=torch.float64)
        tokens = 0.0
        started = interval_start = time.perf_counter()
        max_steps = self.max_steps
        while state["step"] < max_steps:
            stats = self.train_step()
            state["step"] += 1
            step = state["step"]
            loss = float(stats[0] / max(float(stats[1]), 1.0))
            state["losses"].append(loss)
            tokens += float(stats[2])
            interval += stats
            logger.step(loss)
            if step % t.log_every == 0 or step == max_steps:
                row = self._log_row(step, loss, interval, time.perf_counter() - interval_start)
                state["log"].append(row)
                logger.log(row)
                interval.zero_()
                interval_start = time.perf_counter()
            stop = self.validate(state, step, max_steps, time.perf_counter() - started)
            if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == max_steps or stop):
                self.save_and_report(state, loss)
            if stop:
                break
        seconds = time.perf_counter() - started
        per_worker = tokens / strategy.world_size / seconds if seconds > 0 else 0.0
        return {"resumed_from_step": start_step, "tokens": int(tokens), "seconds": round(seconds, 3),
                "tokens_per_s_per_worker": per_worker, "mfu": self.flops_per_token * per_worker / self.peak_flops,
                "peak_flops_per_worker": self.peak_flops, "step_timings": self.step_timings}

    def _log_row(self, step: int, loss: float, interval: torch.Tensor, seconds: float) -> dict[str, Any]:
        n = len(self.tasks)
        per_worker = float(interval[2]) / self.strategy.world_size / max(seconds, 1e-9)
        row = {"step": step, "loss": loss, "lr": self.strategy.lr(), "grad_norm": self.strategy.grad_norm(),
               "tokens_per_s_per_worker": per_worker, "mfu": self.flops_per_token * per_worker / self.peak_flops}
        for i, task in enumerate(self.tasks):
            count = float(interval[3 + n + i])
            row[f"loss/{task}"] = float(interval[3 + i]) / count if count else None
        return row

    def validate(self, state: dict[str, Any], step: int, max_steps: int, seconds: float) -> bool:
        """Every ``validate_every`` steps and at the last: the job's ``validate`` on every rank, sums all-reduced,
        the best step's model exported to output_dir/best (onerec_dist/training/validation.py). True = stop early."""
        t, validate = self.trainer, getattr(self.job, "validate", None)
        if not (t.validate_every and validate) or (step % t.validate_every and step != max_steps):
            return False
        tracker = ValidationTracker.from_state(state.get("validation"), t.select_metric, t.patience)
        self.engine.eval()
        with torch.no_grad():
            local = validate(self.engine, step)
        self.engine.train()
        names = sorted(local)
        totals = self.strategy.all_reduce(torch.tensor([float(local[n]) for n in names], dtype=torch.float64))
        metrics = mean_metrics(dict(zip(names, totals.tolist())))
        if tracker.record(step, seconds, metrics) and t.export_best:
            self.strategy.export_hf(self.engine, self.tokenizer, self.output_dir / BEST_DIR)
            if self.strategy.is_rank0:
                self.job.save_model_extras(self.output_dir / BEST_DIR)
        state["validation"] = tracker.as_state()
        if self.strategy.is_rank0:
            print(f"validate step {step}: {t.select_metric}={metrics[t.select_metric]:.4f} "
                  f"(best {tracker.best_value:.4f} at step {tracker.best_step})", flush=True)
        return tracker.should_stop

    def finish_validation(self, state: dict[str, Any], export_dir: Path) -> dict[str, Any] | None:
        """The validation summary and plot (rank 0); with export_best, the best step's model replaces export/."""
        if not state.get("validation"):
            return None
        t = self.trainer
        tracker = ValidationTracker.from_state(state["validation"], t.select_metric, t.patience)
        summary = tracker.summary()
        best = self.output_dir / BEST_DIR
        if self.strategy.is_rank0:
            plot = plot_learning_curve(tracker.curve, t.select_metric, self.output_dir / "learning_curve.png")
            summary["plot"] = str(plot) if plot else None
            if t.export_best and best.is_dir():
                shutil.rmtree(export_dir, ignore_errors=True)
                shutil.copytree(best, export_dir)
                summary["exported_step"] = tracker.best_step
        self.strategy.barrier()
        return summary

    def save_and_report(self, state: dict[str, Any], loss: float) -> None:
        """Every rank saves into its own staging directory, then publishes it: reported to Ray (which merges the
        ranks' directories into one checkpoint), or copied into output_dir/checkpoints/<name>."""
        step, rank = state["step"], self.strategy.rank
        name = f"checkpoint_step{step:08d}"
        staging = self.output_dir / STAGING_DIR / name / f"rank{rank}"
        shutil.rmtree(staging, ignore_errors=True)
        self.strategy.save_checkpoint(staging, f"step{step}", {"step_source": self.source.state_dict(), "state": state},
                                      {**self.fingerprint, "step": step})
        if self.publish == "ray":
            import ray.train

            ray.train.report({"step": step, "loss": loss}, checkpoint=ray.train.Checkpoint.from_directory(staging),
                             checkpoint_dir_name=name)
        else:
            final = self.output_dir / CHECKPOINTS_DIR / name
            shutil.copytree(staging, final, dirs_exist_ok=True)
            self.strategy.barrier()
            if self.strategy.is_rank0:
                _prune_checkpoints(self.output_dir / CHECKPOINTS_DIR, self.trainer.keep_checkpoints)
            self.last_checkpoint = str(final)
        shutil.rmtree(staging, ignore_errors=True)


def _prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in sorted(p for p in root.glob("checkpoint_step*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
