"""Config schemas and Hydra composition helpers."""

from onerec_dist.config.schema import from_mapping, require

__all__ = ["from_mapping", "require"]
