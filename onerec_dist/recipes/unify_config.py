"""``unify``: settings of `onerec unify method=rft|distill` (OneReason's specialise-then-unify; conf/unify/default.yaml
documents every field). The recipe is onerec_dist/recipes/unify.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from onerec_dist.config import require

UNIFY_METHODS = ("rft", "distill")


@dataclass
class RFTConfig:
    """``unify.rft``: rejection-sampling fine-tuning on the specialists' hit rationales."""

    samples_per_user: int = 4
    temperature: float = 1.0
    max_think_tokens: int = 128
    max_users_per_domain: int | None = None
    beam_width: int = 10
    top_k: int = 10
    keep_unclosed: bool = False
    batch_size: int = 64
    format: Literal["parquet", "jsonl"] = "parquet"
    max_epochs: float | None = None

    def __post_init__(self) -> None:
        require(self.max_epochs is None or self.max_epochs > 0, "unify.rft.max_epochs",
                f"{self.max_epochs}: allowed values: null or > 0")
        for name in ("samples_per_user", "max_think_tokens", "beam_width", "top_k", "batch_size"):
            require(getattr(self, name) >= 1, f"unify.rft.{name}", f"{getattr(self, name)}: allowed values: >= 1")
        require(self.temperature > 0, "unify.rft.temperature", f"{self.temperature}: allowed values: > 0")
        require(self.max_users_per_domain is None or self.max_users_per_domain >= 1, "unify.rft.max_users_per_domain",
                f"{self.max_users_per_domain}: allowed values: null (all) or >= 1")
        require(self.top_k <= self.beam_width, "unify.rft.top_k",
                f"{self.top_k}: allowed values: 1..unify.rft.beam_width ({self.beam_width})")
        require(self.format in ("parquet", "jsonl"), "unify.rft.format",
                f"{self.format!r} is not allowed; allowed values: 'parquet', 'jsonl'")


@dataclass
class DistillConfig:
    """``unify.distill``: on-policy distillation (single process, in the CLI process)."""

    steps: int = 100
    lr: float = 1.0e-5
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_new_tokens: int = 128
    temperature: float = 1.0
    importance_cap: float = 2.0
    max_users_per_domain: int | None = None
    kl_users: int = 16
    log_every: int = 10
    trainable: Literal["all", "no_embeddings"] = "all"

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "log_every"):
            require(getattr(self, name) >= 1, f"unify.distill.{name}", f"{getattr(self, name)}: allowed values: >= 1")
        require(self.lr > 0, "unify.distill.lr", f"{self.lr}: allowed values: > 0")
        require(self.temperature > 0, "unify.distill.temperature", f"{self.temperature}: allowed values: > 0")
        require(self.importance_cap > 0, "unify.distill.importance_cap",
                f"{self.importance_cap}: allowed values: > 0 (the truncation c of min(pi / pi_old, c))")
        require(self.max_users_per_domain is None or self.max_users_per_domain >= 1,
                "unify.distill.max_users_per_domain", f"{self.max_users_per_domain}: allowed values: null or >= 1")
        require(self.kl_users >= 0, "unify.distill.kl_users", f"{self.kl_users}: allowed values: >= 0")
        require(self.trainable in ("all", "no_embeddings"), "unify.distill.trainable",
                f"{self.trainable!r} is not allowed; allowed values: 'all', 'no_embeddings'")


@dataclass
class UnifyConfig:
    """``unify``: the method, the teachers (one export per domain), the student and each method's settings."""

    method: Literal["rft", "distill"] = "rft"
    teachers: dict[str, str] | None = None  # null in the YAML, so that a command line can set the whole mapping
    student: str | None = None
    max_prompt_length: int = 512
    seed: int = 0
    rft: RFTConfig = field(default_factory=RFTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rft, dict):
            self.rft = RFTConfig(**self.rft)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        self.teachers = dict(self.teachers or {})
        require(self.method in UNIFY_METHODS, "unify.method",
                f"{self.method!r} is not allowed; allowed values: {', '.join(UNIFY_METHODS)}")
        require(self.max_prompt_length >= 16, "unify.max_prompt_length",
                f"{self.max_prompt_length}: allowed values: >= 16")
        bad = [name for name, path in self.teachers.items() if not isinstance(path, str) or not path.strip()]
        require(not bad, "unify.teachers", f"domains {bad} have no export directory; each value must be the path "
                "of that domain's specialist export (`onerec rl rl.domain=<name>`)")

    def check_teachers(self, domain_names: list[str]) -> None:
        """ValueError naming unify.teachers unless the data has >= 2 domains and every one has exactly one teacher
        (no teacher for a domain the data lacks)."""
        if len(domain_names) < 2:
            raise ValueError("unify.teachers: `onerec unify` needs data with several domains (e.g. "
                             "experiment=domains, data.synthetic.num_domains=2, or a real dataset split by an item "
                             "attribute: data.domain_split.attribute=categories); this data has a single domain")
        missing = [d for d in domain_names if d not in self.teachers]
        unknown = [d for d in self.teachers if d not in domain_names]
        if missing or unknown:
            raise ValueError(f"unify.teachers must name one export per domain of the data; allowed (and required) "
                             f"keys: {', '.join(map(repr, domain_names))}"
                             + (f"; missing: {', '.join(map(repr, missing))}" if missing else "")
                             + (f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""))


def unify_config(mapping: dict | None) -> UnifyConfig:
    from onerec_dist.config import from_mapping

    return from_mapping(UnifyConfig, dict(mapping or {}), "unify")


def unify_section(cfg) -> UnifyConfig:
    """The validated ``unify`` section of a composed config."""
    from omegaconf import OmegaConf

    return unify_config(OmegaConf.to_container(cfg.unify, resolve=True) if "unify" in cfg else {})
