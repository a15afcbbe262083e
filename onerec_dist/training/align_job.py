"""The Itemic Alignment recipe (OneRec-Think, arXiv:2510.11639, Sec. 3.2) as a TrainJob for the engine.

Stage 1, *token warm-up*: only the item-token rows of the input embedding (and of the output layer when it is not
tied) train, on interleaved persona text; every other parameter stays bit-identical. Stage 2, *multi-task
integration*: all weights, or LoRA adapters plus the item-token rows (peft ``trainable_token_indices``), on the
four-task mixture. The driver builds the initial model once and saves it (``init_dir``), so every worker starts from
the same weights and the warm-up's "nothing else changed" check has a reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from onerec_dist.training.engine_api import TrainJob, default_param_groups, row_restricted_group


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class AlignJob(TrainJob):
    """``trainable``: item_rows (warm-up) | full | lora. ``examples_`` are built once by the driver."""

    init_dir: str
    trainable: str
    examples_: list
    item_token_ids: list[int]
    lora: LoraSettings | None = None

    def build_model(self):
        from onerec_dist.models import load_pretrained

        model, tokenizer = load_pretrained(self.init_dir, "auto", torch.float32)
        if self.trainable == "lora":
            model = self._wrap_lora(model)
        return model.train(), tokenizer

    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

        embed = model.get_input_embeddings()
        embed_name = next(name for name, module in model.named_modules() if module is embed).split(".")[-1]
        config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                            target_modules=list(self.lora.target_modules),
                            trainable_token_indices={embed_name: list(self.item_token_ids)})
        return get_peft_model(model, config)

    def examples(self):
        return self.examples_

    def configure_trainable(self, model, weight_decay: float) -> list[dict[str, Any]]:
        if self.trainable == "full":
            return default_param_groups(model, weight_decay)
        if self.trainable == "lora":  # peft already froze the base model
            return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        for param in model.parameters():
            param.requires_grad_(False)
        rows = torch.tensor(self.item_token_ids)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        groups = [row_restricted_group(embed, rows)]
        if head is not embed:  # untied: the output layer's item rows train too
            groups.append(row_restricted_group(head, rows))
        return groups


def changed_outside_rows(initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                         rows: torch.Tensor, row_params: set[str]) -> dict[str, int]:
    """Elements that differ between two state dicts, outside ``rows`` of the ``row_params`` matrices.
    {name: count}, only names with a difference; empty means the warm-up moved nothing else."""
    changed = {}
    for name, before in initial.items():
        diff = before != trained[name]  # bit comparison, same dtype
        if name in row_params:
            diff[rows] = False
        if bool(diff.any()):
            changed[name] = int(diff.sum())
    return changed
