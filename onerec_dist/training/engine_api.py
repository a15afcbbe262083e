"""The contract between training recipes and the distributed engine (onerec_dist.distributed).

A recipe subclasses :class:`TrainJob` and says *what* is trained: the model, which parameters (or rows of a
parameter) move, the examples and the loss. The engine owns *how*: Ray workers, DeepSpeed ZeRO, micro-batching,
gradient accumulation, checkpoints, logging and export. Recipes never touch the DeepSpeed engine.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from onerec_dist.training.batching import IGNORE_INDEX, collate
from onerec_dist.training.config import LossConfig
from onerec_dist.training.loss import causal_lm_loss_sums


@dataclass
class LossOutput:
    """One micro-batch's loss. ``loss_sum`` is the *sum* over loss units (tokens), with grad; the engine normalises."""

    loss_sum: torch.Tensor      # [] differentiable
    task_sums: torch.Tensor     # [T] summed loss per task (detached), T = len(batch["task_names"])
    task_counts: torch.Tensor   # [T] loss units per task


class TrainJob:
    """What to train. Subclass it in a module importable on every worker; instances are pickled to each Ray worker,
    so keep them light (paths, small configs) and build heavy things in ``build_model`` / ``examples``.

    Every method runs on every rank and must be deterministic across ranks (same seed => same model and examples).
    """

    def build_model(self) -> tuple[torch.nn.Module, Any]:
        """Return (model, tokenizer or None). Called after the engine seeded python/numpy/torch with trainer.seed."""
        raise NotImplementedError

    def examples(self) -> Sequence[Any]:
        """Training examples: mappings/records with input_ids, labels (-100 = no loss) and task (batching module)."""
        raise NotImplementedError

    def configure_trainable(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Set requires_grad and return optimizer param groups (torch style: params, optional weight_decay / lr).

        Default: every parameter trains; matrices decay, vectors (norms, biases) do not (nanoGPT's grouping).
        For row-restricted training use :func:`row_restricted_group`.
        """
        return default_param_groups(model, weight_decay)

    def collate(self, examples: Sequence[Any], task_names: Sequence[str], pad_token_id: int,
                pad_to_multiple_of: int) -> dict[str, Any]:
        return collate(examples, task_names, pad_token_id, pad_to_multiple_of)

    def loss_units(self, batch: dict[str, Any]) -> int:
        """Number of loss units (the normaliser) in a collated micro-batch, known before the forward pass."""
        return count_loss_tokens(batch["labels"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """Default: next-token cross-entropy summed over label tokens (``loss_config``: trainer.loss, set by the
        engine's worker; None = auto)."""
        return causal_lm_loss(model, batch, getattr(self, "loss_config", None))

    def final_metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """Called on every rank after training, model in eval mode under no_grad (ZeRO-3: every rank must run the
        same forwards). Rank 0's JSON-able result lands in the run summary under ``final_metrics``."""
        return {}


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
