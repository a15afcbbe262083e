"""Settings of the baselines (torch-free, so that parsing ``eval.*`` does not import torch). Defaults and their
reasons: onerec_dist/baselines/sasrec.py and conf/eval/default.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onerec_dist.config import require


@dataclass
class SASRecConfig:
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 50
    dropout: float = 0.5
    loss: Literal["ce", "bce"] = "ce"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    eval_every_epochs: int = 1
    patience: int = 10
    valid_users: int | None = 5000
    max_seconds: float | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.hidden_size >= 1 and self.hidden_size % self.num_heads == 0, "sasrec.hidden_size",
                f"must be >= 1 and divisible by sasrec.num_heads={self.num_heads}")
        for name in ("num_blocks", "num_heads", "max_len", "batch_size", "max_epochs", "eval_every_epochs",
                     "patience"):
            require(getattr(self, name) >= 1, f"sasrec.{name}", "must be >= 1")
        require(0.0 <= self.dropout < 1.0, "sasrec.dropout", "must be in [0, 1)")
        require(self.loss in ("ce", "bce"), "sasrec.loss", f"{self.loss!r} is not allowed; allowed: ce, bce")
        require(self.valid_users is None or self.valid_users >= 1, "sasrec.valid_users", "must be >= 1 or null")
