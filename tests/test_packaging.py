"""Packaging: the package list in pyproject.toml is complete, and our kernels/ never shadows PyPI's `kernels`."""

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: REPO / path for name, path in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
        if not (root / "__init__.py").exists():
            found.add(name)  # kernels/ is a namespace root on purpose
    assert found == listed, f"pyproject packages out of date: missing {found - listed}, stale {listed - found}"


def test_kernels_folder_does_not_shadow_pypi_kernels():
    # Run from the repository root, where '' on sys.path would expose a regular package named `kernels`.
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace portion"
    code = ("from transformers.utils import is_kernels_available; import importlib, sys; "
            "assert not is_kernels_available(); "
            "m = importlib.import_module('kernels') if importlib.util.find_spec('kernels') else None; "
            "assert m is None or getattr(m, '__file__', None) is None, m; "
            "import onerec_kernels.constrained_step")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
