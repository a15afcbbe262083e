"""Settings of `onerec ablation` (conf/ablation/default.yaml documents every field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onerec_dist.config import from_section, require


@dataclass
class AblationConfig:
    num_resamples: int = 1000
    bootstrap_seed: int = 0
    plot: bool = True
    published: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        require(self.num_resamples >= 1, "ablation.num_resamples", "must be >= 1")


def ablation_config(cfg) -> AblationConfig:
    return from_section(AblationConfig, cfg, "ablation")


def row_choice(cfg) -> str | None:
    """The validated top-level ``row``: a name of onerec_dist.ablation.rows.ROWS, or None (render only)."""
    from onerec_dist.ablation.rows import ROWS

    row = cfg.get("row")
    require(row is None or row in ROWS, "row", f"{row!r} is not allowed; allowed values: {', '.join(ROWS)} "
                                               "(or null: only re-render the table)")
    return row
