"""``reasoning.stage`` and ``reasoning.sft``: settings of `onerec reason stage=sft` (CoT SFT, OneRec-Think Sec. 4.2).
conf/reasoning/default.yaml documents every field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from onerec_dist.config import require
from onerec_dist.training.config import LoraSettings, check_stage_warmup

REASON_STAGES = ("bootstrap", "sft")


@dataclass
class SFTConfig:
    """``reasoning.sft``."""

    rationales_path: str | None = None
    trainable: Literal["full", "lora"] = "full"
    lr: float | None = None
    max_steps: int | None = None
    warmup_steps: int | None = None
    max_length: int = 768
    nothink_ratio: float = 0.3
    shuffle_rationales: bool = False
    think_init_noise: float = 0.02
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        require(self.trainable in ("full", "lora"), "reasoning.sft.trainable",
                f"{self.trainable!r} is not allowed; allowed values: 'full', 'lora'")
        require(0.0 <= self.nothink_ratio <= 1.0, "reasoning.sft.nothink_ratio",
                f"must be in [0, 1], got {self.nothink_ratio}")
        require(self.max_length >= 16, "reasoning.sft.max_length", f"must be >= 16, got {self.max_length}")
        require(self.max_steps is None or self.max_steps >= 1, "reasoning.sft.max_steps",
                f"must be null or >= 1, got {self.max_steps}")
        require(self.lr is None or self.lr > 0, "reasoning.sft.lr", f"must be null or > 0, got {self.lr}")
        check_stage_warmup(self.warmup_steps, "reasoning.sft.warmup_steps")
        require(self.think_init_noise >= 0, "reasoning.sft.think_init_noise",
                f"must be >= 0, got {self.think_init_noise}")
