"""Checkpoint layout and checks (no deepspeed / ray import: the driver checks a resume path before starting Ray).

A checkpoint directory is the merge of what every rank wrote (Ray Train merges the workers' reported directories)::

    onerec_checkpoint.json        rank 0: format, tag, step, world_size, zero_stage, precision, parameter counts
    latest, <tag>/...             DeepSpeed's model / ZeRO optimizer shards (engine.save_checkpoint)
    client_state/rank<r>.pt       rank r: step, step-source state (the sampler's position), python/numpy/torch RNG
                                  states, loss history
    manifest/rank<r>.json         rank r: every file it wrote, with its size (detects truncated or missing files)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = 1
META_FILE = "onerec_checkpoint.json"
MANIFEST_DIR = "manifest"
CLIENT_STATE_DIR = "client_state"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match this run."""


def client_state_path(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / CLIENT_STATE_DIR / f"rank{rank}.pt"


def write_manifest(ckpt_dir: Path, rank: int) -> None:
    """List every file under this rank's ``ckpt_dir`` (its own staging directory) with its size."""
    ckpt_dir = Path(ckpt_dir)
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}
    out = ckpt_dir / MANIFEST_DIR / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "files": files}, indent=1))


def write_metadata(ckpt_dir: Path, meta: dict[str, Any]) -> None:
    (Path(ckpt_dir) / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=1))


def read_metadata(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist or is not a directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {META_FILE}: not an onerec checkpoint, or corrupt")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} is unreadable ({err}); the checkpoint is corrupt")
    missing = [k for k in ("format", "tag", "step", "world_size", "zero_stage") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {META_FILE} lacks {missing} or has format "
                              f"{meta.get('format')!r} (expected {FORMAT}); the checkpoint is corrupt")
    return meta


def verify_checkpoint(ckpt_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Check metadata against ``expected`` (e.g. world_size, zero_stage, num_params) and every rank's files.

    Returns the metadata; raises CheckpointError naming the mismatch or the missing / truncated file.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    mismatched = [f"{k}: checkpoint {meta.get(k)!r}, this run {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if mismatched:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match this run ({'; '.join(mismatched)}); resume with "
                              "the same trainer.num_workers, deepspeed.zero_stage, precision and model, or start "
                              "fresh with trainer.resume=never")
    for rank in range(int(meta["world_size"])):
        manifest = ckpt_dir / MANIFEST_DIR / f"rank{rank}.json"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {ckpt_dir}: manifest of rank {rank} is missing or unreadable ({err})")
        for rel, size in files.items():
            path = ckpt_dir / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {rel} (written by rank {rank}) is missing")
            if path.stat().st_size != size:
                raise CheckpointError(f"checkpoint {ckpt_dir} is corrupt: {rel} has {path.stat().st_size} bytes, "
                                      f"rank {rank} wrote {size}")
    return meta


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest checkpoint sub-directory (e.g. a Ray run directory)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"trainer.resume={str(path)!r}: no such file or directory")
    if (path / META_FILE).is_file():
        return path
    found = []
    for meta_file in path.glob(f"*/{META_FILE}"):
        try:
            found.append((int(json.loads(meta_file.read_text())["step"]), meta_file.parent))
        except (OSError, ValueError, KeyError):
            continue
    if not found:
        raise CheckpointError(f"trainer.resume={str(path)!r} is neither a checkpoint (no {META_FILE}) nor a directory "
                              "holding checkpoints")
    return max(found)[1]
