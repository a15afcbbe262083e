"""Schema of the ``data`` config group (conf/data/*.yaml documents every field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from onerec_dist.config import from_section, require


DOMAIN_DYNAMICS = ("complement_prob", "drift_prob", "rule_prob")  # the generator settings a domain may override


@dataclass
class SyntheticDomainConfig:
    """``data.synthetic.domains[d]``: one domain's name and dynamics; null takes the default of
    onerec_dist/data/synthetic_domains.py (a name "Shop A", "Shop B", ...; the documented spread of the dynamics)."""

    name: str | None = None
    complement_prob: float | None = None
    drift_prob: float | None = None
    rule_prob: float | None = None

    def check(self, where: str) -> None:
        require(self.name is None or bool(self.name.strip()), f"{where}.name", "must be null or a non-empty name")
        for field_name in DOMAIN_DYNAMICS:
            value = getattr(self, field_name)
            require(value is None or 0 <= value <= 1, f"{where}.{field_name}", "must be null or in [0, 1]")


@dataclass
class SyntheticConfig:
    num_users: int = 600
    num_items: int = 300
    num_top_categories: int = 5
    subcategories_per_top: int = 4
    brands_per_top: int = 4
    interests_per_user: int = 2
    min_seq_len: int = 6
    max_seq_len: int = 16
    complement_prob: float = 0.6
    drift_prob: float = 0.15
    seed: int = 0
    # mode=reasoning: the next item follows a rule over the last items (onerec_dist/data/synthetic.py, step 10).
    mode: Literal["default", "reasoning"] = "default"
    rule_prob: float = 0.7
    rule_window: int = 4
    # D >= 2: D separate worlds with their own items, names and dynamics (onerec_dist/data/synthetic_domains.py).
    num_domains: int = 1
    domains: list[SyntheticDomainConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.domains = [SyntheticDomainConfig(**d) if isinstance(d, dict) else d for d in self.domains]
        require(self.num_domains >= 1, "data.synthetic.num_domains", "must be >= 1")
        require(not self.domains or len(self.domains) == self.num_domains, "data.synthetic.domains",
                f"has {len(self.domains)} entries; allowed: none (the default names and spread) or one per domain "
                f"(data.synthetic.num_domains={self.num_domains})")
        for d, domain in enumerate(self.domains):
            domain.check(f"data.synthetic.domains[{d}]")
        names = [d.name for d in self.domains if d.name is not None]
        require(len(names) == len(set(names)), "data.synthetic.domains", f"names must be distinct, got {names}")
        require(self.num_users >= 1, "data.synthetic.num_users", "must be >= 1")
        require(self.num_items >= 2, "data.synthetic.num_items", "must be >= 2")
        require(self.min_seq_len >= 3, "data.synthetic.min_seq_len", "must be >= 3 (leave-one-out needs 3 items)")
        require(self.max_seq_len >= self.min_seq_len, "data.synthetic.max_seq_len", "must be >= min_seq_len")
        require(0 <= self.complement_prob <= 1, "data.synthetic.complement_prob", "must be in [0, 1]")
        require(0 <= self.drift_prob <= 1, "data.synthetic.drift_prob", "must be in [0, 1]")
        require(self.interests_per_user >= 1, "data.synthetic.interests_per_user", "must be >= 1")
        require(0 <= self.rule_prob <= 1, "data.synthetic.rule_prob", "must be in [0, 1]")
        require(self.rule_window >= 1, "data.synthetic.rule_window", "must be >= 1")
        require(self.mode in ("default", "reasoning"), "data.synthetic.mode",
                f"{self.mode!r} is not allowed; allowed values: 'default', 'reasoning'")
        if self.mode == "reasoning":
            require(self.num_top_categories >= 2, "data.synthetic.num_top_categories",
                    "must be >= 2 with mode=reasoning (the rule's partner is in another top category)")


@dataclass
class DomainSplitConfig:
    """``data.domain_split``: one read dataset split into domains by an item attribute
    (onerec_dist/data/attribute_domains.py documents the rule; conf/schema/data.yaml each field)."""

    attribute: str | None = None  # "categories" | "brand" (checked against the items' attributes); None: off
    level: int = 0  # which component of the category path (0-based); brand has only level 0
    max_domains: int = 4  # keep the N values with most interactions
    other: Literal["merge", "drop"] = "merge"  # items of the other values: one more domain | removed (counted)
    other_name: str = "Other"  # name of that domain (other=merge)

    def __post_init__(self) -> None:
        require(self.level >= 0, "data.domain_split.level", f"must be >= 0, got {self.level}")
        require(self.max_domains >= 2, "data.domain_split.max_domains",
                f"must be >= 2 (one domain is no split), got {self.max_domains}")
        require(bool(self.other_name.strip()), "data.domain_split.other_name", "must be a non-empty name")


@dataclass
class DataConfig:
    format: Literal["synthetic", "letter", "minionerec", "interactions"] = "synthetic"
    name: str = "synthetic"
    dir: str | None = None
    split: Literal["leave_one_out", "given"] = "leave_one_out"
    max_history: int = 50
    min_seq_len: int = 3
    on_short_user: Literal["drop", "error"] = "drop"
    on_unknown_item: Literal["drop", "error"] = "error"
    on_duplicate_item: Literal["error", "keep_first"] = "error"
    on_bad_sid: Literal["error", "drop_sid"] = "error"
    on_duplicate_sid: Literal["report", "error", "drop_sid"] = "report"
    interactions_file: str | None = None
    items_file: str | None = None
    user_column: str = "user"
    item_column: str = "item"
    time_column: str | None = "timestamp"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    domain_split: DomainSplitConfig = field(default_factory=DomainSplitConfig)

    def __post_init__(self) -> None:
        if self.domain_split.attribute is not None and self.format == "synthetic":
            require(self.synthetic.num_domains == 1, "data.domain_split.attribute",
                    f"must be null with data.synthetic.num_domains={self.synthetic.num_domains} (the generator "
                    "already makes the domains); split by an attribute or generate domains, not both")
        require(self.max_history >= 1, "data.max_history", "must be >= 1")
        require(self.min_seq_len >= 3, "data.min_seq_len", "must be >= 3 (test + validation + one training target)")
        if self.format in ("letter", "minionerec"):
            require(self.dir is not None, "data.dir", f"is required for data.format={self.format}")
        if self.format == "interactions":
            require(self.interactions_file is not None, "data.interactions_file", "is required for format=interactions")
        if self.split == "given":
            require(self.format == "minionerec", "data.split", "'given' needs files with their own split "
                    "(format=minionerec); use 'leave_one_out'")


def data_config(cfg) -> DataConfig:
    """The validated ``data`` section of a composed config."""
    return from_section(DataConfig, cfg, "data")
