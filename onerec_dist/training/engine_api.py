"""The contract between training recipes and the distributed engine (onerec_dist.distributed).

A recipe is any object that has the methods of :class:`TrainJob` (a ``typing.Protocol``: recipes do not inherit
from the engine; the default behaviours are free functions here that a recipe's methods call). It says *what* is
trained: the model, which parameters (or rows of a parameter) move, where the micro-batches come from and the loss.
The engine owns *how*: Ray workers, DeepSpeed ZeRO, gradient accumulation, checkpoints, logging and export. A recipe
sees the engine's model (the DeepSpeed engine, called like the module) in ``loss``, ``final_metrics`` and
``StepContext.model``; it calls it forward, never steps or saves it.

A loop gets each optimizer step's micro-batches from a :class:`StepSource`: the sampler over a file-backed (or
in-memory) dataset (``sampler_step_source``), or a producer such as the RL recipe's rollouts. Its ``state_dict`` goes
into every checkpoint, so a resumed run continues with the micro-batches the uninterrupted run would have taken.

Loss normalisation. A job's ``loss`` returns the *sum* of per-token losses of one micro-batch; the engine divides by
the number of loss tokens of the whole global batch (all micro-batches of all ranks of the step, one all-reduce per
step before the forward passes). The gradient is then the gradient of

    L = sum over every loss token t of the global batch of loss_t / N_global,

whatever the split into ranks x accumulation x micro-batch size: 1 x 4 and 4 x 1 give the same update, and long
sequences weigh by their tokens, not by their example. (Averaging per micro-batch instead would weigh a token of a
short micro-batch more than one of a long micro-batch.)

Pure: torch only, no deepspeed / ray import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from onerec_dist.training.batching import (
    IGNORE_INDEX,
    DistributedBatchSampler,
    SamplerStepSource,
    example_lengths,
)
from onerec_dist.training.config import LossConfig, TrainerConfig
from onerec_dist.training.loss import causal_lm_loss_sums


@dataclass
class LossOutput:
    """One micro-batch's loss. ``loss_sum`` is the *sum* over loss units (tokens), with grad; the engine normalises."""

    loss_sum: torch.Tensor      # [] differentiable
    task_sums: torch.Tensor     # [T] summed loss per task (detached), T = len(batch["task_names"])
    task_counts: torch.Tensor   # [T] loss units per task


@dataclass(frozen=True)
class StepContext:
    """What the engine tells ``TrainJob.step_source`` on each rank (after the model was wrapped by DeepSpeed)."""

    rank: int
    world_size: int
    trainer: TrainerConfig
    pad_token_id: int
    model: Any          # the engine's model (a rollout producer generates with it; forward only)
    tokenizer: Any      # from build_model, or None


@runtime_checkable
class StepSource(Protocol):
    """This rank's micro-batches, one optimizer step at a time.

    ``next_step()`` returns the ``trainer.grad_accum_steps`` collated micro-batches (dicts of CPU tensors with at least
    what the job's ``loss`` / ``loss_units`` read, plus ``attention_mask`` [B, L] for token counts and ``task_ids``
    [B] indexing ``task_names``) of the next step. Every rank must take the same number of steps. ``state_dict``
    (plain Python / tensors) is saved in each checkpoint and given back to ``load_state_dict`` on resume.
    """

    task_names: Sequence[str]

    def next_step(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class TrainJob(Protocol):
    """What to train. Implement it in a module importable on every worker; instances are pickled to each Ray worker,
    so keep them light (paths, small configs; never the dataset: write it with onerec_dist.training.shards and keep
    the directory) and build heavy things in ``build_model`` / ``step_source``.

    Every method runs on every rank and must be deterministic across ranks (same seed => same model and data plan).

    Optional (not a Protocol member, so jobs without it still match): ``validate(model, step) -> dict[str, float]``,
    this rank's metric sums plus ``"users"``, called every ``trainer.validate_every`` steps for model selection,
    best-model export and early stopping (onerec_dist/training/validation.py).
    """

    def build_model(self) -> tuple[torch.nn.Module, Any]:
        """Return (model, tokenizer or None). Called after the engine seeded python/numpy/torch with trainer.seed."""
        ...

    def step_source(self, ctx: StepContext) -> StepSource:
        """This rank's micro-batches. Default for a dataset: ``sampler_step_source(examples, ctx)``."""
        ...

    def configure_trainable(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Set requires_grad and return optimizer param groups (torch style: params, optional weight_decay / lr).
        Default: ``default_param_groups``; row-restricted training: ``row_restricted_group``."""
        ...

    def loss_units(self, batch: dict[str, Any]) -> int:
        """Number of loss units (the normaliser) in a collated micro-batch, known before the forward pass.
        Default: ``count_loss_tokens(batch["labels"])``."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """The micro-batch's summed loss. Default: ``causal_lm_loss(model, batch, loss_config)``."""
        ...

    def final_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """Called on every rank after training, model in eval mode under no_grad (ZeRO-3: every rank must run the
        same forwards). Rank 0's JSON-able result lands in the run summary under ``final_metrics``."""
        ...

    def save_model_extras(self, model_dir: Path) -> None:
        """Write what an exported model directory carries besides weights and tokenizer (e.g. ``sid_table.json``);
        called on rank 0 after each export. A recipe with nothing to add does nothing."""
        ...


def sampler_step_source(examples: Sequence[Any], ctx: StepContext) -> SamplerStepSource:
    """The default step source: ``examples`` (a list, or memory-mapped ``ShardedExamples``) cut into micro-batches
    by the deterministic distributed sampler configured by ``ctx.trainer`` (batching, micro_batch_size / max_tokens,
    bucket_window, pad_to_multiple_of, grad_accum_steps, seed), collated with ``ctx.pad_token_id``."""
    t = ctx.trainer
    sampler = DistributedBatchSampler(
        example_lengths(examples), world_size=ctx.world_size, rank=ctx.rank, grad_accum_steps=t.grad_accum_steps,
        batch_size=t.micro_batch_size if t.batching == "examples" else None,
        max_tokens=t.max_tokens if t.batching == "tokens" else None,
        window=t.bucket_window, pad_to_multiple_of=t.pad_to_multiple_of, seed=t.seed)
    return SamplerStepSource(examples, sampler, ctx.pad_token_id, t.pad_to_multiple_of)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: label positions 1..L-1 that are not -100 (position 0 has no prefix to predict it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any], config: LossConfig | None = None) -> LossOutput:
    """Summed next-token cross-entropy of a right-padded batch, with per-task sums and counts.

    ``config`` (trainer.loss) picks full / chunked / Liger (onerec_dist.training.loss); None = auto."""
    sums = causal_lm_loss_sums(model, batch, config)
    return LossOutput(loss_sum=sums.loss_sum, task_sums=sums.task_sums, task_counts=sums.task_counts)


def default_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied weight once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def restrict_rows(param: torch.nn.Parameter, rows: Sequence[int] | torch.Tensor) -> Any:
    """Zero the gradient of every row of ``param`` except ``rows`` (a tensor hook, so it runs before the gradient is
    accumulated and before DeepSpeed reduces or partitions it). Returns the hook handle.

    Used e.g. for token warm-up: only the new itemic-token rows of the embedding (and of a tied LM head) train.
    """
    mask = torch.zeros(param.shape[0], dtype=torch.bool)
    mask[torch.as_tensor(rows, dtype=torch.long)] = True

    def zero_other_rows(grad: torch.Tensor) -> torch.Tensor:
        frozen = ~mask.to(grad.device).view(-1, *([1] * (grad.dim() - 1)))  # [rows, 1, ...]
        return grad.masked_fill(frozen, 0.0)  # masked_fill, not *0: an inf/nan gradient must not leak as nan

    param.requires_grad_(True)
    param.trainable_rows = int(mask.sum())  # read by onerec_dist.training.flops (MFU counts these rows' gradients)
    return param.register_hook(zero_other_rows)


def row_restricted_group(param: torch.nn.Parameter, rows: Sequence[int] | torch.Tensor,
                         lr: float | None = None) -> dict[str, Any]:
    """Param group training only ``rows`` of ``param``, with weight_decay=0.

    Zero gradients alone do not freeze a row under AdamW: decoupled weight decay updates p <- p - lr * wd * p for
    every element whatever its gradient, so frozen rows would shrink towards 0. Adam's own update is exactly 0 for a
    row whose gradient was always 0 (both moments stay 0, 0 / (sqrt(0) + eps) = 0), so with wd=0 the other rows stay
    bit-identical.
    """
    restrict_rows(param, rows)
    group: dict[str, Any] = {"params": [param], "weight_decay": 0.0}
    if lr is not None:
        group["lr"] = lr
    return group


class LRSchedule:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), for torch's LambdaLR.

    Linear warm-up to 1 over ``warmup_steps`` (step 0 gets 1/warmup), then constant, linear or cosine decay to
    ``min_ratio`` = min_lr / lr at ``total_steps``.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float):
        if schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule={schedule!r}; allowed: 'constant', 'cosine', 'linear'")
        self.schedule, self.warmup_steps = schedule, warmup_steps
        self.total_steps, self.min_ratio = total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.schedule == "linear":
            return 1.0 - (1.0 - self.min_ratio) * progress
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def warmup_warning(self) -> str | None:
        """A warning when the warm-up outlasts the budget: the lr then never reaches its peak (e.g. 12 RL steps under a
        run-wide trainer.warmup_steps of 50 train at 2 %..24 % of rl.lr); None otherwise."""
        if self.warmup_steps <= self.total_steps:
            return None
        return (f"warning: the lr warm-up ({self.warmup_steps} steps) is longer than this stage ({self.total_steps} "
                f"steps), so its lr rises only to {self.total_steps / self.warmup_steps:.0%} of the peak; set the "
                f"stage's own warmup_steps (align.warmup / align.multitask / reasoning.sft / rl .warmup_steps) or "
                f"trainer.warmup_steps")
