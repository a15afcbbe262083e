"""The item -> semantic ID table that `onerec sid` writes (``<output_dir>/sid_table.json``).

Format ``onerec-sid/1``: one UTF-8 JSON object

    {
      "format": "onerec-sid/1",
      "num_items": 3,
      "num_levels": 2,
      "codebook_sizes": [256, 256],          # K_l: codes of level l are integers in [0, K_l)
      "items": {"item_a": [12, 7], "item_b": [12, 8], "item_c": [3, 0]}
    }

``items`` maps the dataset's own item id (``Catalogue.item_ids``, a string) to its code list, one integer per
level, in catalogue order (JSON objects keep their order). Every list has ``num_levels`` entries. Tables written
by `onerec sid` are collision-free (no two items share a code list); ``load_table`` checks that unless
``unique=False`` (used when loading an index whose collisions are still to be resolved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from onerec_dist.data.readers import DataError, load_json

TABLE_FORMAT = "onerec-sid/1"


def save_table(path: str | Path, codes: np.ndarray, item_ids: list[str], codebook_sizes: list[int]) -> Path:
    """Write the table atomically (tmp file + rename). ``codes`` is [N, L] with codes[i, l] in [0, K_l)."""
    codes = np.asarray(codes)
    _check_codes(codes, list(item_ids), list(codebook_sizes), str(path))
    payload = {
        "format": TABLE_FORMAT,
        "num_items": int(codes.shape[0]),
        "num_levels": int(codes.shape[1]),
        "codebook_sizes": [int(k) for k in codebook_sizes],
        "items": {item: [int(c) for c in row] for item, row in zip(item_ids, codes.tolist())},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # One item per line keeps a 100k-item table diffable and greppable.
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in payload["items"].items()]
    head = {k: v for k, v in payload.items() if k != "items"}
    text = json.dumps(head)[:-1] + ', "items": {\n' + ",\n".join(lines) + "\n}}\n"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_table(path: str | Path, unique: bool = True) -> tuple[np.ndarray, list[str], list[int]]:
    """Read a table: (codes [N, L] int64, item_ids, codebook_sizes). Bad content raises DataError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"semantic ID table not found: {path}")
    return parse_table(load_json(path), path, unique)


def parse_table(data: dict, path: Path, unique: bool = True) -> tuple[np.ndarray, list[str], list[int]]:
    """The checks of ``load_table`` on an already-parsed JSON object (``path`` only names it in errors)."""
    if data.get("format") != TABLE_FORMAT:
        raise DataError(f"{path}: 'format' is {data.get('format')!r}, expected {TABLE_FORMAT!r}")
    for key in ("num_levels", "codebook_sizes", "items"):
        if key not in data:
            raise DataError(f"{path}: missing key {key!r}; expected keys format, num_levels, codebook_sizes, items")
    num_levels, sizes, items = data["num_levels"], data["codebook_sizes"], data["items"]
    if not isinstance(num_levels, int) or num_levels < 1:
        raise DataError(f"{path}: 'num_levels' must be a positive integer, got {num_levels!r}")
    if not isinstance(sizes, list) or len(sizes) != num_levels or not all(isinstance(k, int) for k in sizes):
        raise DataError(f"{path}: 'codebook_sizes' must be a list of {num_levels} integers, got {sizes!r}")
    if not isinstance(items, dict) or not items:
        raise DataError(f"{path}: 'items' must be a non-empty object {{item_id: [code, ...]}}")
    for item, row in items.items():
        if not isinstance(row, list) or len(row) != num_levels:
            raise DataError(f"{path}: item {item!r}: expected a list of {num_levels} codes, got {row!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in row):
            raise DataError(f"{path}: item {item!r}: codes must be integers, got {row!r}")
    item_ids = list(items)
    codes = np.array([items[i] for i in item_ids], dtype=np.int64).reshape(len(item_ids), num_levels)
    _check_codes(codes, item_ids, sizes, str(path))
    if unique:
        _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
        if shared.size:
            raise DataError(f"{path}: {shared.size} items share a semantic ID, e.g. items "
                            f"{[item_ids[i] for i in shared[:3]]}; a table must be collision-free "
                            "(load it with `onerec sid sid=file sid.index_path=...` to resolve collisions)")
    return codes, item_ids, [int(k) for k in sizes]


def _check_codes(codes: np.ndarray, item_ids: list[str], sizes: list[int], where: str) -> None:
    if codes.ndim != 2:
        raise ValueError(f"{where}: codes must be a 2-D [num_items, num_levels] array, got shape {codes.shape}")
    if len(item_ids) != codes.shape[0]:
        raise ValueError(f"{where}: {len(item_ids)} item ids for {codes.shape[0]} code rows")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError(f"{where}: item ids must be unique")
    if len(sizes) != codes.shape[1]:
        raise ValueError(f"{where}: {len(sizes)} codebook sizes for {codes.shape[1]} levels")
    for level, size in enumerate(sizes):
        column = codes[:, level]
        bad = np.flatnonzero((column < 0) | (column >= size))
        if bad.size:
            raise DataError(f"{where}: level {level} code {int(column[bad[0]])} of item {item_ids[bad[0]]!r} is "
                            f"outside [0, {size}) (codebook_sizes[{level}]={size}); {bad.size} such items")
