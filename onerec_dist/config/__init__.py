"""Config schemas and Hydra composition helpers. Each section's typed dataclass and its converter (``data_config``,
``sid_config``, ...) live next to the code it configures; this package holds the shared validation."""

from onerec_dist.config.schema import from_mapping, from_section, require

__all__ = ["from_mapping", "from_section", "require"]
