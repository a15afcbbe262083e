"""``serving``: settings of `onerec think_ahead` (offline cache build) and `onerec serve` (online completion behind
Ray Serve). conf/serving/default.yaml documents every field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onerec_dist.config import from_section, require

THINK_AHEAD_ACTIONS = ("build",)
SERVE_ACTIONS = ("start", "stop")


@dataclass
class ServingConfig:
    cache_dir: str | None = None
    split: Literal["test", "valid"] = "test"
    users: list[str] | None = None
    max_users: int | None = None
    num_rationales: int = 4
    prefix_levels: int = 2
    prefix_beam: int = 8
    max_think_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    generate_batch_size: int = 16
    shard_size: int = 64
    num_workers: int = 1
    use_gpu: bool = False
    device: str = "auto"
    recent_items: int = 5
    use_rationale: bool = False
    beam_width: int = 20
    max_k: int = 20
    normalization: Literal["full", "valid"] = "full"
    step_impl: Literal["auto", "triton", "reference"] = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "onerec"
    num_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    blocking: bool = True

    def __post_init__(self) -> None:
        for name in ("num_rationales", "prefix_beam", "max_think_tokens", "generate_batch_size", "shard_size",
                     "num_workers", "recent_items", "beam_width", "max_k", "num_replicas", "max_batch_size"):
            require(getattr(self, name) >= 1, f"serving.{name}", "must be >= 1")
        require(self.prefix_levels >= 1, "serving.prefix_levels", "must be >= 1 (and < the ID length L)")
        require(self.max_users is None or self.max_users >= 1, "serving.max_users", "must be >= 1 or null")
        require(self.temperature > 0, "serving.temperature", "must be > 0")
        require(0 < self.top_p <= 1, "serving.top_p", "must be in (0, 1]")
        require(self.max_k <= self.beam_width, "serving.max_k", f"must be <= serving.beam_width={self.beam_width}")
        require(1 <= self.port <= 65535, "serving.port", "must be in [1, 65535]")
        require(self.batch_wait_timeout_s >= 0, "serving.batch_wait_timeout_s", "must be >= 0")


def serving_config(cfg) -> ServingConfig:
    """The validated ``serving`` section of a composed config."""
    return from_section(ServingConfig, cfg, "serving")


def resolve_action(cfg, allowed: tuple[str, ...]) -> str:
    """The root ``action`` (null: the first allowed one); ValueError naming the allowed values."""
    action = cfg.get("action") or allowed[0]
    require(action in allowed, "action", f"{action!r} is not allowed; allowed values: {', '.join(allowed)}")
    return action
