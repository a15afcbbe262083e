"""Readers for the on-disk dataset formats.

- LETTER / LC-Rec JSON: ``<Name>.inter.json`` ({user: [item, ...]} in time order), optional ``<Name>.item.json``
  ({item: {title, description, brand, categories}}) and ``<Name>.index.json`` ({item: ["<a_12>", ...]}).
- MiniOneRec CSV: ``train/ valid/ test/`` folders each holding one CSV with ``user_id, history_item_id, item_id``
  (lists as Python literals), plus ``index/<Name>.item.json`` and ``index/<Name>.index.json``.
- Plain interactions: a parquet or JSONL file of (user, item, timestamp) rows and an optional items file.

Every problem is either a ``DataError`` naming the file, line or key and what was expected, or a counted entry
in the ``DropReport`` when the matching ``data.on_*`` flag says to drop.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np

from onerec_dist.data.config import DataConfig
from onerec_dist.data.types import Catalogue, DropReport, Examples, InteractionData

SPLIT_NAMES = ("train", "valid", "test")
_SID_TOKEN = re.compile(r"<(?:\|)?([a-z])_(\d+)>")


class DataError(ValueError):
    """Bad input data: the message names the file and the line or key, and what was expected."""


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _reject_duplicate_keys(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DataError(f"{path}: duplicate key {key!r} (each id may appear once)")
            seen.add(key)
        return dict(pairs)

    return hook


def load_json(path: Path) -> dict:
    """json.load with the file named in errors, the line/column of syntax errors, and duplicate keys refused."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _as_int(value, path: Path, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{path}: {where}: expected an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataError(f"{path}: {where}: expected an integer id, got {value!r}")


def parse_semantic_id(tokens, path: Path, item: str) -> list[int]:
    """["<a_12>", "<b_7>"] or "<a_12><b_7>" -> [12, 7]; levels must come in order a, b, c, ..."""
    text = "".join(tokens) if isinstance(tokens, list) else str(tokens)
    found = _SID_TOKEN.findall(text)
    if not found or _SID_TOKEN.sub("", text).strip():
        raise DataError(f"{path}: item {item}: cannot parse semantic ID {tokens!r}; expected tokens like '<a_12>'")
    letters = [letter for letter, _ in found]
    expected = [chr(ord("a") + i) for i in range(len(found))]
    if letters != expected:
        raise DataError(f"{path}: item {item}: semantic ID levels {letters} are not in order {expected}")
    return [int(code) for _, code in found]


def build_semantic_ids(
    raw: dict[int, list[int]], num_items: int, path: Path, cfg: DataConfig, report: DropReport
) -> np.ndarray | None:
    """Stack per-item code lists into [N, L]; ragged lengths and duplicate IDs follow cfg.on_bad_sid / on_duplicate_sid.

    Items without an ID (or whose ID was dropped) get -1 in every level.
    """
    if not raw:
        return None
    lengths: dict[int, int] = {}
    for codes in raw.values():
        lengths[len(codes)] = lengths.get(len(codes), 0) + 1
    num_levels = max(lengths, key=lengths.get)  # the majority length is the intended one
    sids = np.full((num_items, num_levels), -1, dtype=np.int64)
    for item, codes in raw.items():
        if len(codes) != num_levels:
            if cfg.on_bad_sid == "error":
                raise DataError(
                    f"{path}: item {item}: semantic ID has {len(codes)} levels, expected {num_levels} like the "
                    "other items (set data.on_bad_sid=drop_sid to drop such IDs)")
            report.add("semantic ID with a different number of levels (ID dropped)", f"item {item}")
            continue
        sids[item] = codes
    has_sid = sids[:, 0] >= 0
    missing = int((~has_sid).sum()) - report.counts.get("semantic ID with a different number of levels (ID dropped)", 0)
    if missing > 0:
        report.add("item without a semantic ID in the index file", count=missing)
    _, inverse, counts = np.unique(sids[has_sid], axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    if shared.any():
        rows = np.flatnonzero(has_sid)[shared]
        msg = f"{int(shared.sum())} items share a semantic ID with another item ({int((counts > 1).sum())} IDs)"
        if cfg.on_duplicate_sid == "error":
            raise DataError(f"{path}: {msg}, e.g. items {rows[:3].tolist()} (set data.on_duplicate_sid=report or "
                            "drop_sid, or rebuild IDs with `onerec sid`)")
        reason = "item sharing its semantic ID with another item"
        if cfg.on_duplicate_sid == "drop_sid":
            sids[rows] = -1
            reason += " (ID dropped)"
        else:
            reason += " (kept; `onerec sid` resolves collisions)"
        report.add(reason, f"items {rows[:3].tolist()}", count=int(shared.sum()))
    return sids


def _catalogue_from_item_json(path: Path, num_items: int, cfg: DataConfig, report: DropReport) -> Catalogue:
    items = load_json(path)
    titles, descs, brands, cats = [""] * num_items, [""] * num_items, [""] * num_items, [[] for _ in range(num_items)]
    for key, meta in items.items():
        index = _as_int(key, path, f"item key {key!r}")
        if not 0 <= index < num_items:
            report.add("item.json entry for an item id outside the catalogue (ignored)", f"item {key}")
            continue
        if not isinstance(meta, dict):
            raise DataError(f"{path}: item {key}: expected an object with title/description/brand/categories")
        titles[index] = str(meta.get("title") or "").strip()
        descs[index] = _clean_text(meta.get("description"))
        brands[index] = str(meta.get("brand") or "").strip()
        raw_cats = meta.get("categories") or ""
        cats[index] = [c.strip() for c in (raw_cats.split(",") if isinstance(raw_cats, str) else raw_cats) if c.strip()]
    missing = sum(1 for t, d in zip(titles, descs) if not t and not d)
    if missing:
        report.add("item without title or description (kept; text-free items are handled by `onerec sid`)",
                   count=missing)
    return Catalogue([str(i) for i in range(num_items)], titles, descs, brands, cats)


def _clean_text(value) -> str:
    """Descriptions are sometimes a list, or a list written as a Python literal ("['...']")."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value).strip()
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
            if isinstance(parsed, list):
                return " ".join(str(v) for v in parsed).strip()
        except (ValueError, SyntaxError):
            pass
    return text


def read_letter(cfg: DataConfig) -> InteractionData:
    """LETTER / LC-Rec JSON layout. Item ids are 0-based integers; the catalogue spans 0..max id seen anywhere."""
    root = Path(cfg.dir)
    report = DropReport()
    inter_path = _require_file(root / f"{cfg.name}.inter.json", "interactions file")
    item_path, index_path = root / f"{cfg.name}.item.json", root / f"{cfg.name}.index.json"
    inter = load_json(inter_path)
    raw_sequences: dict[str, list[int]] = {}
    for user, seq in inter.items():
        if not isinstance(seq, list):
            raise DataError(f"{inter_path}: user {user!r}: expected a list of item ids, got {type(seq).__name__}")
        raw_sequences[str(user)] = [_as_int(v, inter_path, f"user {user!r}, position {i}") for i, v in enumerate(seq)]
    index_raw = {}
    if index_path.is_file():
        for key, tokens in load_json(index_path).items():
            index_raw[_as_int(key, index_path, f"item key {key!r}")] = parse_semantic_id(tokens, index_path, key)
    item_ids_seen = {i for s in raw_sequences.values() for i in s}
    if item_path.is_file():
        num_items = max(_as_int(k, item_path, f"item key {k!r}") for k in load_json(item_path)) + 1
        catalogue = _catalogue_from_item_json(item_path, num_items, cfg, report)
    else:
        num_items = max(item_ids_seen | set(index_raw)) + 1
        catalogue = Catalogue.ids_only([str(i) for i in range(num_items)])
    if any(i < 0 for i in item_ids_seen):
        raise DataError(f"{inter_path}: negative item id {min(item_ids_seen)}; ids must be 0-based")
    sequences = _filter_unknown_items(raw_sequences, num_items, inter_path, cfg, report)
    catalogue.semantic_ids = build_semantic_ids(
        {k: v for k, v in index_raw.items() if k < num_items}, num_items, index_path, cfg, report)
    return InteractionData(cfg.name, catalogue, sequences, report=report)


def _filter_unknown_items(raw_sequences, num_items, path, cfg: DataConfig, report: DropReport):
    sequences = {}
    for user, seq in raw_sequences.items():
        kept = [i for i in seq if 0 <= i < num_items]
        if len(kept) != len(seq):
            bad = [i for i in seq if not 0 <= i < num_items]
            if cfg.on_unknown_item == "error":
                raise DataError(f"{path}: user {user!r} references item {bad[0]} which is not in the catalogue "
                                f"({num_items} items; set data.on_unknown_item=drop to drop such interactions)")
            report.add("interaction with an item absent from the catalogue", f"user {user}: item {bad[0]}", len(bad))
        sequences[user] = kept
    return sequences


def _read_csv_split(path: Path, num_items: int, cfg: DataConfig, report: DropReport) -> Examples:
    examples = Examples()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"history_item_id", "item_id"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DataError(f"{path}: expected CSV columns {sorted(needed)} (and user_id), got {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}: line {line}: wrong number of fields")
            try:
                history = ast.literal_eval(row["history_item_id"])
            except (ValueError, SyntaxError):
                raise DataError(f"{path}: line {line}: history_item_id {row['history_item_id'][:60]!r} is not a "
                                "list literal like [1, 2, 3]") from None
            if not isinstance(history, list):
                raise DataError(f"{path}: line {line}: history_item_id must be a list, got {history!r}")
            history = [_as_int(v, path, f"line {line}, history_item_id") for v in history]
            target = _as_int(row["item_id"], path, f"line {line}, item_id")
            unknown = [i for i in history + [target] if not 0 <= i < num_items]
            if unknown:
                if cfg.on_unknown_item == "error":
                    raise DataError(f"{path}: line {line}: item {unknown[0]} is not in the catalogue ({num_items} "
                                    "items; set data.on_unknown_item=drop)")
                report.add("CSV row referencing an item absent from the catalogue (row dropped)", f"line {line}")
                continue
            examples.append(str(row.get("user_id", line)), history[-cfg.max_history:], target)
    return examples


def read_minionerec(cfg: DataConfig) -> InteractionData:
    """MiniOneRec CSV release. Keeps the files' own split; a split folder that is absent stays None (reported)."""
    root = Path(cfg.dir)
    report = DropReport()
    item_path = _require_file(root / "index" / f"{cfg.name}.item.json", "item file")
    index_path = root / "index" / f"{cfg.name}.index.json"
    num_items = max(_as_int(k, item_path, f"item key {k!r}") for k in load_json(item_path)) + 1
    catalogue = _catalogue_from_item_json(item_path, num_items, cfg, report)
    if index_path.is_file():
        raw = {_as_int(k, index_path, f"item key {k!r}"): parse_semantic_id(v, index_path, k)
               for k, v in load_json(index_path).items()}
        catalogue.semantic_ids = build_semantic_ids(raw, num_items, index_path, cfg, report)
    splits: dict[str, Examples | None] = {}
    for split in SPLIT_NAMES:
        files = sorted((root / split).glob("*.csv")) if (root / split).is_dir() else []
        if not files:
            splits[split] = None
            continue
        if len(files) > 1:
            raise DataError(f"{root / split}: expected one CSV file, found {[f.name for f in files]}")
        splits[split] = _read_csv_split(files[0], num_items, cfg, report)
    if all(s is None for s in splits.values()):
        raise DataError(f"{root}: no split folder with a CSV file; expected {', '.join(s + '/' for s in SPLIT_NAMES)}")
    sequences = _sequences_from_examples(splits)
    return InteractionData(cfg.name, catalogue, sequences, given_splits=splits, report=report)


def _sequences_from_examples(splits: dict[str, Examples | None]) -> dict[str, list[int]]:
    """Longest known sequence per user (history + target), for statistics: the CSV rows overlap by design."""
    sequences: dict[str, list[int]] = {}
    for examples in splits.values():
        if examples is None:
            continue
        for user, history, target in zip(examples.users, examples.histories, examples.targets):
            seq = history + [target]
            if len(seq) > len(sequences.get(user, [])):
                sequences[user] = seq
    return sequences


def _read_table(path: Path) -> list[dict]:
    """Rows of a parquet or JSONL file as dicts."""
    _require_file(path, "file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet: {err}") from None
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_no}: malformed JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {line_no}: expected a JSON object per line")
                row["__line__"] = line_no
                rows.append(row)
        return rows
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .parquet or .jsonl")


def _items_from_rows(path: Path, rows: list[dict], cfg: DataConfig, report: DropReport) -> Catalogue:
    ids, titles, descs, brands, cats = [], [], [], [], []
    seen = set()
    for n, row in enumerate(rows, 1):
        where = f"line {row.get('__line__', n)}"
        if cfg.item_column not in row:
            raise DataError(f"{path}: {where}: missing column {cfg.item_column!r} (data.item_column)")
        item_id = str(row[cfg.item_column])
        if item_id in seen:
            if cfg.on_duplicate_item == "error":
                raise DataError(f"{path}: {where}: duplicate item id {item_id!r} "
                                "(set data.on_duplicate_item=keep_first to keep the first)")
            report.add("duplicate item id in the items file (first kept)", item_id)
            continue
        seen.add(item_id)
        ids.append(item_id)
        titles.append(str(row.get("title") or ""))
        descs.append(_clean_text(row.get("description")))
        brands.append(str(row.get("brand") or ""))
        raw = row.get("categories") or []
        cats.append([c.strip() for c in (raw.split(",") if isinstance(raw, str) else raw) if str(c).strip()])
    return Catalogue(ids, titles, descs, brands, cats)


def read_interactions(cfg: DataConfig) -> InteractionData:
    """Plain (user, item, timestamp) rows. Sequences are ordered by timestamp (stable: ties keep file order)."""
    base = Path(cfg.dir) if cfg.dir else Path(".")
    inter_path = base / cfg.interactions_file
    report = DropReport()
    rows = _read_table(inter_path)
    needed = [cfg.user_column, cfg.item_column] + ([cfg.time_column] if cfg.time_column else [])
    events: dict[str, list[tuple[float, int, str]]] = {}
    for n, row in enumerate(rows, 1):
        where = f"line {row.get('__line__', n)}"
        for col in needed:
            if col not in row or row[col] is None:
                raise DataError(f"{inter_path}: {where}: missing column {col!r}; expected columns {needed}")
        stamp = 0.0
        if cfg.time_column:
            try:
                stamp = float(row[cfg.time_column])
            except (TypeError, ValueError):
                raise DataError(f"{inter_path}: {where}: {cfg.time_column}={row[cfg.time_column]!r} is not a number") \
                    from None
        events.setdefault(str(row[cfg.user_column]), []).append((stamp, n, str(row[cfg.item_column])))
    if cfg.items_file:
        catalogue = _items_from_rows(base / cfg.items_file, _read_table(base / cfg.items_file), cfg, report)
    else:
        seen_ids = sorted({item for evs in events.values() for _, _, item in evs}, key=_natural_key)
        catalogue = Catalogue.ids_only(seen_ids)
    sequences = {}
    for user, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))
        seq = []
        for _, n, item in evs:
            index = catalogue.index_of(item)
            if index is None:
                if cfg.on_unknown_item == "error":
                    raise DataError(f"{inter_path}: row {n}: item {item!r} is not in the items file "
                                    f"{cfg.items_file} (set data.on_unknown_item=drop)")
                report.add("interaction with an item absent from the catalogue", f"user {user}: item {item}")
                continue
            seq.append(index)
        sequences[user] = seq
    return InteractionData(cfg.name, catalogue, sequences, report=report)


def _natural_key(item_id: str):
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)
