"""Next-token cross-entropy without materialising [batch, length, vocabulary] logits.

Today's loss (``impl=full``) runs the LM head over every position and upcasts the logits to fp32: with Qwen3's
151,936-token vocabulary and a 2,048-token sequence that is 151,936 x 2,048 x 4 bytes = 1.24 GB per sequence for the
fp32 copy alone, plus the bf16 logits and the log-softmax kept for backward. Two alternatives give the same loss:

``chunked`` (PyTorch, any device). The model runs with ``output_hidden_states=True, logits_to_keep=1``, so the HF
    model computes the logits of the last position only and we take the final (post-norm) hidden states. Only label
    positions are gathered ([N, H], N = loss tokens), and the LM head + cross-entropy run over chunks of
    ``chunk_size`` tokens: the forward keeps no chunk's logits, the backward recomputes one chunk's logits at a time
    (a custom autograd Function for a plain ``nn.Linear`` head; per-chunk activation checkpointing for any other
    head, e.g. LoRA-wrapped). Peak extra memory is O(chunk_size x V) instead of O(B x L x V). The head is entered
    through its module call, so tied embeddings and ZeRO-3's parameter gathering (module hooks) work, and a plain
    head is called once per micro-batch whatever N (every ZeRO-3 rank runs the same collectives).
``liger`` (CUDA). Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989): the head
    matmul, the softmax and the gradient are fused chunk by chunk in Triton kernels; install the ``gpu`` extra.
``auto`` (default) picks liger on CUDA when it is installed and the head is a plain, unpartitioned ``nn.Linear``,
    else chunked; and full only when the model cannot give its hidden states cheaply (no ``logits_to_keep``) or
    transforms its logits after the head (soft-capping, logit scaling), which the chunked path would skip.

Every path returns the *sum* of per-token losses (the engine divides by the global token count, engine_api.py)
and detached per-task sums and counts for logging.

Pure: torch only (liger_kernel imported lazily), no deepspeed / ray import.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onerec_dist.training.batching import IGNORE_INDEX
from onerec_dist.training.config import LOSS_IMPLS, LossConfig

# Config fields of HF models that change logits after the LM head (Gemma-2 soft-capping, Cohere / Granite scaling).
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LossSums:
    """One micro-batch's summed loss (with grad) and per-task sums (detached) / counts, T = number of tasks."""

    loss_sum: torch.Tensor      # [] differentiable, fp32
    task_sums: torch.Tensor     # [T] fp32
    task_counts: torch.Tensor   # [T] fp32


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF PreTrainedModel inside DeepSpeed / DDP (``.module``) and peft (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def chunked_path_unsupported(hf_model: torch.nn.Module) -> str | None:
    """Why the hidden-state paths (chunked, liger) would not equal the model's own logits, or None when they do."""
    if "logits_to_keep" not in inspect.signature(type(hf_model).forward).parameters:
        return f"{type(hf_model).__name__}.forward has no logits_to_keep argument (it would compute all logits)"
    config = getattr(hf_model, "config", None)
    for name in LOGIT_TRANSFORM_FIELDS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            return f"the model transforms its logits after the LM head (config.{name}={value})"
    return None


def liger_unsupported(head: torch.nn.Module, hidden: torch.Tensor) -> str | None:
    """Why Liger's fused kernel cannot run on this head / device, or None when it can."""
    if not liger_available():
        return "liger-kernel is not installed (pip install 'onerec-dist[gpu]')"
    if hidden.device.type != "cuda":
        return f"liger-kernel needs CUDA tensors, the hidden states are on {hidden.device.type}"
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__} (e.g. LoRA-wrapped), not a plain nn.Linear"
    if hasattr(head.weight, "ds_id"):
        return "the LM head weight is ZeRO-3 partitioned (liger reads .weight directly, outside the module's hooks)"
    return None


def resolve_impl(requested: str, hf_model: torch.nn.Module, head: torch.nn.Module,
                 hidden: torch.Tensor | None = None) -> str:
    """The implementation that runs for ``requested`` (``loss.impl``). ``auto`` falls back silently (liger ->
    chunked -> full); an explicit choice that cannot run raises a ValueError saying why."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"trainer.loss.impl={requested!r} is not allowed; allowed values: {LOSS_IMPLS}")
    if requested == "full":
        return "full"
    no_hidden = chunked_path_unsupported(hf_model)
    if no_hidden is not None:
        if requested == "auto":
            return "full"
        raise ValueError(f"trainer.loss.impl={requested!r} cannot run: {no_hidden}; use 'full' or 'auto'")
    if requested == "chunked":
        return "chunked"
    device_probe = hidden if hidden is not None else next(head.parameters())
    no_liger = liger_unsupported(head, device_probe)
    if no_liger is None:
        return "liger"
    if requested == "auto":
        return "chunked"
    raise ValueError(f"trainer.loss.impl='liger' cannot run: {no_liger}; use 'chunked' or 'auto'")


# ------------------------------------------------------------------------------------------------ token losses
class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy [N] of ``hidden @ weight.T + bias`` against ``targets``, chunk_size rows at a time.

    Forward keeps only the [N] losses (saves hidden, weight, targets: no logits); backward recomputes each chunk's
    logits and forms d loss / d logits = (softmax - onehot) x upstream grad, then the chunk's hidden gradient and
    its share of the weight / bias gradient, accumulated in fp32 (one rounding at the end, as the full path's
    single matmul). Peak extra memory: one chunk's [chunk, V] logits (+ softmax) and the fp32 weight accumulator.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)      # [N]
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start:start + chunk_size], weight, bias).float()       # [c, V]
            losses[start:start + chunk_size] = F.cross_entropy(logits, targets[start:start + chunk_size],
                                                               reduction="none")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None                # [N, H]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None                                                       # [V, H]
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None                                  # [V]
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop]                                                          # [c, H]
            grad_logits = torch.softmax(F.linear(hidden_chunk, weight, bias).float(), dim=-1)         # [c, V]
            grad_logits[torch.arange(stop - start, device=grad_logits.device), targets[start:stop]] -= 1.0
            grad_logits *= grad_losses[start:stop].unsqueeze(-1)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ hidden_chunk.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _head_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()                                   # [c, V]: the only vocabulary-sized tensor
    return F.cross_entropy(logits, targets, reduction="none")       # [c]


def _through_module_call(module: torch.nn.Module, function, inputs: torch.Tensor) -> torch.Tensor:
    """``function(inputs)`` run as ``module``'s forward, so that the module's hooks (ZeRO-3 gathers its parameters
    before and releases them after; and before its backward) fire exactly once, whatever the number of chunks:
    every rank then runs the same collectives even when their micro-batches hold different token counts."""
    previous = module.__dict__.get("forward")
    module.forward = function
    try:
        return module(inputs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def chunked_token_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int) -> torch.Tensor:
    """Per-token cross-entropy [N] of ``head(hidden)`` against ``targets`` (no ignored entries), chunk by chunk.

    A plain ``nn.Linear`` head (Qwen3, tied or not) runs :class:`ChunkedLinearCrossEntropy` inside one call of the
    head. Any other head (e.g. LoRA-wrapped) is called per chunk under non-reentrant activation checkpointing
    (nothing vocabulary-sized is saved; the backward recomputes one chunk at a time); under ZeRO-3 that path calls
    the head a number of times that depends on the rank's token count, so keep such heads out of ZeRO-3.
    """
    if type(head) is torch.nn.Linear:  # also with N = 0 tokens: the head call (a ZeRO-3 collective) must happen
        return _through_module_call(
            head, lambda x: ChunkedLinearCrossEntropy.apply(x, head.weight, head.bias, targets, chunk_size), hidden)
    if hidden.shape[0] == 0:
        return hidden.float().sum(dim=-1) * 0.0                     # [0], still connected to the graph
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        hidden_chunk, target_chunk = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_head_cross_entropy, head, hidden_chunk, target_chunk,
                                     use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_head_cross_entropy(head, hidden_chunk, target_chunk))
    return torch.cat(pieces)


def _task_sums_from_examples(per_example_sum: torch.Tensor, per_example_count: torch.Tensor,
                             task_ids: torch.Tensor, num_tasks: int) -> LossSums:
    zeros = torch.zeros(num_tasks, dtype=torch.float32, device=per_example_sum.device)
    return LossSums(loss_sum=per_example_sum.sum(),
                    task_sums=zeros.index_add(0, task_ids, per_example_sum.detach()),
                    task_counts=zeros.index_add(0, task_ids, per_example_count.float()))


def full_loss(model: torch.nn.Module, batch: dict[str, Any]) -> LossSums:
    """Today's loss: all logits [B, L, V] in fp32. The reference the other paths are tested against."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]                                                   # [B, L-1]
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)  # [B, L-1], 0 if ignored
    per_example_count = (labels != IGNORE_INDEX).sum(dim=1)                          # [B]
    return _task_sums_from_examples(token_loss.sum(dim=1), per_example_count, batch["task_ids"],
                                    len(batch["task_names"]))


def final_hidden_states(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """[B, L, H] post-norm hidden states through the wrappers' own forward (DeepSpeed, peft hooks all run); the
    model computes the logits of the last position only. Checked against those logits, so a model whose last
    hidden state is not the head's input fails loudly instead of training on a wrong loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]                                                    # [B, L, H]
    with torch.no_grad():
        expected = out.logits[:, -1].float()                                          # [B, V]
        recomputed = head(hidden[:, -1]).float()                                      # [B, V]
        # relative error of the whole [B, V] block: a wrong hidden state is off by O(1), rounding by a few eps
        tolerance = max(1e-3, 8 * torch.finfo(hidden.dtype).eps)
        relative = (expected - recomputed).norm() / expected.norm().clamp(min=1e-6)
        if expected.shape != recomputed.shape or relative > tolerance:
            raise ValueError(f"{type(unwrap_model(model)).__name__}: hidden_states[-1] is not the LM head's input "
                             "(logits differ); set trainer.loss.impl=full for this model")
    return hidden


def hidden_state_loss(model: torch.nn.Module, batch: dict[str, Any], head: torch.nn.Module, impl: str,
                      chunk_size: int) -> LossSums:
    """chunked / liger: the loss from the final hidden states of the label positions only."""
    hidden = final_hidden_states(model, head, batch)                                  # [B, L, H]
    labels = batch["labels"][:, 1:]                                                   # [B, L-1]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)                      # [N], [N]
    token_hidden = hidden[:, :-1][rows, cols]                                         # [N, H]
    targets = labels[rows, cols]                                                      # [N]
    num_tasks, task_ids = len(batch["task_names"]), batch["task_ids"]
    if impl == "chunked":
        token_loss = chunked_token_losses(head, token_hidden, targets, chunk_size)    # [N]
        batch_size = labels.shape[0]
        per_example_sum = token_loss.new_zeros(batch_size).index_add(0, rows, token_loss)  # [B]
        per_example_count = torch.bincount(rows, minlength=batch_size)                     # [B]
        return _task_sums_from_examples(per_example_sum, per_example_count, task_ids, num_tasks)
    return liger_loss(head, token_hidden, targets, task_ids[rows], num_tasks)


def liger_loss(head: torch.nn.Linear, token_hidden: torch.Tensor, targets: torch.Tensor,
               token_task: torch.Tensor, num_tasks: int) -> LossSums:
    """One fused call (reduction=sum) for the differentiable total. Per-task sums for logging: when the micro-batch
    holds several tasks, extra no-grad fused passes over all tasks but one (the last one is total - others), since
    liger's per-token output (reduction=none) is not reliable across versions."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss_sum = fused(head.weight, token_hidden.contiguous(), targets, head.bias).float()   # []
    task_counts = torch.bincount(token_task, minlength=num_tasks).float()                  # [T]
    task_sums = torch.zeros(num_tasks, dtype=torch.float32, device=loss_sum.device)        # [T]
    present = task_counts.nonzero().flatten().tolist()
    with torch.no_grad():
        for task in present[:-1]:
            selected = token_task == task
            task_sums[task] = fused(head.weight, token_hidden[selected].contiguous(), targets[selected],
                                    head.bias).float()
        if present:
            task_sums[present[-1]] = loss_sum.detach() - task_sums.sum()
    return LossSums(loss_sum=loss_sum, task_sums=task_sums, task_counts=task_counts)


def causal_lm_loss_sums(model: torch.nn.Module, batch: dict[str, Any], config: LossConfig | None = None) -> LossSums:
    """Summed next-token cross-entropy of a right-padded batch by ``config.impl`` (see the module docstring).

    ``batch``: input_ids / attention_mask / labels [B, L] (labels -100 = no loss), task_ids [B], task_names.
    ``model``: an HF causal LM, possibly wrapped by peft and / or DeepSpeed.
    """
    config = config if config is not None else LossConfig()
    hf_model = unwrap_model(model)
    head = hf_model.get_output_embeddings()
    impl = resolve_impl(config.impl, hf_model, head)
    if impl == "full":
        return full_loss(model, batch)
    return hidden_state_loss(model, batch, head, impl, config.chunk_size)
