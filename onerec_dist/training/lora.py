"""LoRA (peft) as the recipes train it: adapters on ``LoraSettings.target_modules`` plus selected rows of the input
embedding (peft ``trainable_token_indices``: the item tokens, and for reasoning the think tokens, are new to the
base model, so a low-rank update of the projections alone cannot give them meaning). One definition for the
Itemic Alignment / CoT SFT job (training/align_job.py) and GRPO (distributed/rl_worker.py, and the rollout actors
that must hold the same adapters to receive them: distributed/rollout_pool.py). peft is imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from onerec_dist.training.config import LoraSettings


def input_embedding_name(model: torch.nn.Module) -> str:
    """The attribute name of the input embedding module (``embed_tokens`` for Qwen / Llama), as peft's
    ``trainable_token_indices`` keys it."""
    embed = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embed).split(".")[-1]


def wrap_lora(model: torch.nn.Module, settings: LoraSettings, trainable_token_ids: Sequence[int]):
    """``model`` as a peft LoRA model: rank-``settings.r`` adapters (scale alpha / r) on the target modules and the
    input-embedding rows ``trainable_token_ids`` trainable; every other weight frozen (peft sets requires_grad).
    A fresh adapter is the identity (peft starts lora_B at 0 and the trainable token rows as copies of the base
    rows, which its forward writes over them), so the wrapped model computes what ``model`` did."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules),
                        trainable_token_indices={input_embedding_name(model): [int(i) for i in trainable_token_ids]})
    return get_peft_model(model, config)


def lora_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One optimizer group of the parameters peft left trainable (adapters and token deltas)."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
