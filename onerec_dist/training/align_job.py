"""The Itemic Alignment recipe (OneRec-Think, arXiv:2510.11639, Sec. 3.2) as a TrainJob for the engine.

Stage 1, *token warm-up*: only the item-token rows of the input embedding (and of the output layer when it is not
tied) train, on interleaved persona text; every other parameter stays bit-identical. Stage 2, *multi-task
integration*: all weights, or LoRA adapters plus the item-token rows (peft ``trainable_token_indices``), on the
four-task mixture. The driver builds the initial model once and saves it (``init_dir``, with the item-ID table it is
trained on), so every worker starts from the same weights, the warm-up's "nothing else changed" check has a
reference, and the export carries the same IDs (``save_model_extras``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onerec_dist.training.config import LoraSettings
from onerec_dist.training.lora import lora_param_groups, wrap_lora
from onerec_dist.training.engine_api import (
    LossOutput,
    StepContext,
    StepSource,
    causal_lm_loss,
    count_loss_tokens,
    default_param_groups,
    row_restricted_group,
    sampler_step_source,
)


@dataclass
class AlignJob:
    """A TrainJob (engine_api). ``trainable``: item_rows (warm-up) | full | lora. ``data_dir``: the stage's examples,
    tokenized once by the driver into Arrow shards (onerec_dist.training.shards) that every rank memory-maps."""

    init_dir: str
    trainable: str
    data_dir: str
    item_token_ids: list[int]
    lora: LoraSettings | None = None
    validation_path: str = ""  # JSON of the validation sample (stages/align.py); "" = no validation data
    validation_beam: int = 20

    def build_model(self):
        from onerec_dist.models import load_pretrained

        model, tokenizer = load_pretrained(self.init_dir, "auto", torch.float32)
        if self.trainable == "lora":
            model = wrap_lora(model, self.lora, self.item_token_ids)
        self._tokenizer = tokenizer
        return model.train(), tokenizer

    def step_source(self, ctx: StepContext) -> StepSource:
        from onerec_dist.training.shards import ShardedExamples

        self._rank, self._world_size = ctx.rank, ctx.world_size
        return sampler_step_source(ShardedExamples(self.data_dir), ctx)

    def validate(self, model, step: int) -> dict[str, float]:
        """Recall@10 / NDCG@10 sums of this rank's share of the fixed validation sample, by constrained beam search
        (onerec_dist.training.validation; trainer.validate_every). ZeRO-3 is not supported here: ranks may decode
        different numbers of batches."""
        import json

        import numpy as np

        from onerec_dist.training.validation import domain_sample, validate_recommender

        if not self.validation_path:
            raise ValueError("trainer.validate_every is set but the dataset has no validation split to validate on")
        sample = json.loads(Path(self.validation_path).read_text())
        return validate_recommender(model, self._tokenizer, np.asarray(sample["item_codes"]), sample["histories"],
                                    sample["targets"], self._rank, self._world_size, beam_width=self.validation_beam,
                                    top_k=10, domains=domain_sample(sample))

    def loss_units(self, batch: dict[str, Any]) -> int:
        return count_loss_tokens(batch["labels"])

    def loss(self, model, batch: dict[str, Any]) -> LossOutput:
        return causal_lm_loss(model, batch, getattr(self, "loss_config", None))  # trainer.loss, set by the worker

    def final_metrics(self, model) -> dict[str, Any]:
        return {}

    def save_model_extras(self, model_dir: Path) -> None:
        """The export carries the initial model's item IDs (same tokenizer, so the same item-token layout)."""
        from onerec_dist.sid.model_ids import copy_model_ids

        copy_model_ids(self.init_dir, model_dir)

    def configure_trainable(self, model, weight_decay: float) -> list[dict[str, Any]]:
        if self.trainable == "full":
            return default_param_groups(model, weight_decay)
        if self.trainable == "lora":  # peft already froze the base model
            return lora_param_groups(model, weight_decay)
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
