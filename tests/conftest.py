"""Test-wide setup: offline environment, Triton interpreter (must precede the first `import triton`), data paths."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from onerec_dist.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ONEREC_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data, skipping the test with a reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (set ONEREC_SHARED_DATA or check out ../shared)")
    return path
