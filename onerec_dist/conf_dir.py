"""Where the Hydra configs (conf/) are: an override, the source tree, or the installed package data.

The repository keeps its configs in the top-level ``conf/`` folder; a wheel ships the same folder as the package
``onerec_conf`` (pyproject.toml maps conf/ to it, as kernels/ installs as onerec_kernels). Lookup order:
  1. ``$ONEREC_CONF_DIR`` (a directory of your own, laid out like conf/);
  2. ``conf/`` beside the ``onerec_dist`` package being run (a checkout, or the working_dir Ray Jobs uploaded);
  3. the installed ``onerec_conf`` package, found through its import spec.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV_VAR = "ONEREC_CONF_DIR"
PACKAGE = "onerec_conf"
SOURCE_TREE_CONF = Path(__file__).resolve().parents[1] / "conf"


def installed_conf_dir() -> Path | None:
    """The directory of the installed ``onerec_conf`` package data, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        return None
    # conf/ has no __init__.py, so onerec_conf is a namespace package. Its search locations may include entries
    # that are not directories (an editable install adds a path-hook marker), which importlib.resources.files()
    # refuses; Hydra needs a real directory anyway, so take the first location that holds config.yaml.
    for location in spec.submodule_search_locations or ():
        if (Path(location) / "config.yaml").is_file():
            return Path(location)
    return None


def find_conf_dir(environ: dict[str, str] | None = None) -> Path:
    """The config directory to use (see the module docstring). When none exists, the path that was expected is
    returned, and the caller's error message names it and ONEREC_CONF_DIR."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR]).expanduser()
    if (SOURCE_TREE_CONF / "config.yaml").is_file():
        return SOURCE_TREE_CONF
    return installed_conf_dir() or SOURCE_TREE_CONF
