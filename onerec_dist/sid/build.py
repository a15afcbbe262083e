"""Semantic IDs for every catalogue item, as library code: `onerec sid`, `align` and `eval` all call ``build_ids``.

sid.source=kmeans: item text -> sentence-transformers embeddings (cached; text-free items filled from their
sequence neighbours) -> residual k-means into L levels x K codes -> collision resolution (onerec_dist.sid.embed /
quantize). sid.source=file: IDs from the dataset's own ``<name>.index.json`` (``Catalogue.semantic_ids``) or from
``sid.index_path`` (a ``<Name>.index.json`` with "<a_12>" tokens, or an onerec-sid table), shared IDs resolved the
same way without embeddings, free IDs for items the index misses when sid.on_missing=assign.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onerec_dist.data.config import DataConfig
from onerec_dist.data.readers import DataError, load_json, parse_semantic_id
from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.sid.config import SidConfig
from onerec_dist.sid.embed import embed_catalogue
from onerec_dist.sid.quantize import (assign_free_ids, bucket_statistics, check_codebook_sizes, residual_kmeans,
                                      resolve_collisions, squared_distances)
from onerec_dist.sid.table import parse_table

TEXT_FREE_NOTE = ("items without text are embedded as the mean embedding of their co-interacted neighbours (items "
                  "adjacent to them in user sequences), or, without such neighbours, as the catalogue mean plus a "
                  "tiny deterministic per-item jitter")


class PhaseTimer:
    """Seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def build_from_text(data: InteractionData, cfg: SidConfig, timer: PhaseTimer) -> tuple[np.ndarray, list[int], dict]:
    catalogue = data.catalogue
    sizes, capped = check_codebook_sizes(cfg.level_sizes(), len(catalogue), cfg.on_small_catalogue)
    with timer.phase("embed"):
        embeddings, embed_report = embed_catalogue(catalogue, data.sequences, cfg)  # [N, d]
    minibatch = cfg.kmeans == "minibatch" or (cfg.kmeans == "auto" and len(catalogue) > cfg.minibatch_above)
    with timer.phase("quantize"):
        rq = residual_kmeans(embeddings, sizes, minibatch=minibatch, balanced=cfg.balanced,
                             balanced_iters=cfg.balanced_iters, n_init=cfg.kmeans_n_init,
                             max_iter=cfg.kmeans_max_iter, seed=cfg.seed)
    raw = bucket_statistics(rq.codes)
    with timer.phase("resolve"):
        codes, final_sizes, moves = resolve_collisions(
            rq.codes, sizes, keep_cost=rq.last_error,
            move_cost=lambda items: squared_distances(rq.last_input[items], rq.codebooks[-1]))
    report = {
        "num_items_without_text": embed_report["num_items_without_text"],
        "text_free_items": TEXT_FREE_NOTE if embed_report["num_items_without_text"] else "none",
        "embedding": embed_report,
        "quantization": {"method": "residual_kmeans", "kmeans": "minibatch" if minibatch else "full",
                         "balanced": cfg.balanced, "codebook_capped_to_num_items": capped,
                         "relative_residual_per_level": [round(r, 4) for r in rq.relative_residual]},
    }
    return codes, final_sizes, {"raw": raw, "moves": moves, **report}


def load_index(path: Path, catalogue: Catalogue) -> tuple[np.ndarray, np.ndarray, list[int] | None, dict]:
    """Codes of the catalogue items from a ``<Name>.index.json`` or an onerec-sid table.

    Returns (codes [N, L] with -1 rows for items the file lacks, missing [N] bool, the table's codebook sizes or
    None, report). Ragged IDs raise DataError.
    """
    if not path.is_file():
        raise DataError(f"sid.index_path: file not found: {path}")
    data = load_json(path)
    if "format" in data:
        table_codes, item_ids, sizes = parse_table(data, path, unique=False)
        rows = dict(zip(item_ids, table_codes.tolist()))
    else:
        rows, sizes = {key: parse_semantic_id(tokens, path, key) for key, tokens in data.items()}, None
        lengths: dict[int, list[str]] = {}
        for key, codes in rows.items():
            lengths.setdefault(len(codes), []).append(key)
        if len(lengths) > 1:
            usual = max(lengths, key=lambda n: len(lengths[n]))
            odd = [(key, n) for n, keys in lengths.items() if n != usual for key in keys[:3]]
            raise DataError(f"{path}: semantic IDs have different numbers of levels {sorted(lengths)}; most have "
                            f"{usual}, but e.g. items {odd[:5]} (item, levels) differ. Every ID must have the same "
                            "number of levels")
    if not rows:
        raise DataError(f"{path}: the index is empty; expected {{item_id: [\"<a_12>\", ...]}}")
    num_levels = len(next(iter(rows.values())))
    codes = np.full((len(catalogue), num_levels), -1, dtype=np.int64)
    unknown = []
    for key, row in rows.items():
        index = catalogue.index_of(key)
        if index is None:
            unknown.append(key)
        else:
            codes[index] = row
    if len(unknown) == len(rows):
        raise DataError(f"{path}: none of its {len(rows)} item ids is in the catalogue (e.g. {unknown[:3]}); is it "
                        "the index of another dataset?")
    report = {"num_index_items_not_in_catalogue": len(unknown), "examples_not_in_catalogue": unknown[:5]}
    return codes, codes[:, 0] < 0, sizes, report


def file_codebook_sizes(codes: np.ndarray, cfg: SidConfig) -> list[int]:
    """Per level max(configured K_l, largest code + 1): the file decides how many levels there are."""
    levels = codes.shape[1]
    if cfg.codebook_sizes is not None and len(cfg.codebook_sizes) != levels:
        raise ValueError(f"sid.codebook_sizes has {len(cfg.codebook_sizes)} entries but the loaded IDs have {levels} "
                         "levels; set sid.codebook_sizes=null or give one size per level")
    configured = cfg.codebook_sizes or [cfg.codebook_size] * levels
    top = codes.max(axis=0) + 1 if len(codes) else np.zeros(levels, dtype=np.int64)
    return [max(int(k), int(t)) for k, t in zip(configured, top)]


def build_from_file(data: InteractionData, data_cfg: DataConfig, cfg: SidConfig,
                    timer: PhaseTimer) -> tuple[np.ndarray, list[int], dict]:
    catalogue = data.catalogue
    report: dict = {}
    if cfg.index_path is None:
        own = Path(data_cfg.dir or ".") / ("index" if data_cfg.format == "minionerec" else "") / \
            f"{data_cfg.name}.index.json"
        if catalogue.semantic_ids is None:
            raise ValueError(f"sid.source=file: dataset {data.name!r} has no index file of its own ({own}); set "
                             "sid.index_path=<file> or use sid.source=kmeans")
        source = f"{own} (dataset index)"
        codes, sizes = catalogue.semantic_ids.copy(), None
        missing = codes[:, 0] < 0
    else:
        source = cfg.index_path
        codes, missing, sizes, report = load_index(Path(cfg.index_path), catalogue)
    known = np.flatnonzero(~missing)
    sizes = sizes or file_codebook_sizes(codes[known], cfg)
    if missing.any() and cfg.on_missing == "error":
        ids = [catalogue.item_ids[i] for i in np.flatnonzero(missing)[:5]]
        raise ValueError(f"{source}: no semantic ID for {int(missing.sum())} of {len(catalogue)} catalogue items, "
                         f"e.g. item ids {ids}; set sid.on_missing=assign to give them free IDs, or rebuild all IDs "
                         "with sid.source=kmeans")
    raw = bucket_statistics(codes[known])
    with timer.phase("resolve"):
        resolved, final_sizes, moves = resolve_collisions(codes[known], sizes)
        final = np.full((len(catalogue), resolved.shape[1]), -1, dtype=np.int64)
        final[known] = resolved
        if missing.any():
            final = assign_free_ids(final, missing, final_sizes)
    report.update({"index": source, "num_missing_assigned": int(missing.sum())})
    texts_empty = sum(1 for i in range(len(catalogue)) if not catalogue.text(i).strip())
    return final, final_sizes, {"raw": raw, "moves": moves, "num_items_without_text": texts_empty,
                                "file": report}


def build_ids(data: InteractionData, data_cfg: DataConfig, cfg: SidConfig,
              timer: PhaseTimer | None = None) -> tuple[np.ndarray, list[int], dict]:
    """(codes [N, L] collision-free, codebook sizes, report with "raw" and "moves" statistics) per ``cfg.source``."""
    timer = timer or PhaseTimer()
    if cfg.source == "kmeans":
        codes, sizes, report = build_from_text(data, cfg, timer)
    else:
        codes, sizes, report = build_from_file(data, data_cfg, cfg, timer)
    if bucket_statistics(codes)["collision_rate"] != 0.0:  # resolve_collisions guarantees this
        raise RuntimeError("internal error: semantic IDs still shared after collision resolution")
    return codes, list(sizes), report


def describe_source(cfg: SidConfig, data_cfg: DataConfig) -> str:
    """Where ``build_ids`` takes IDs from, in words (for error messages naming two ID sources)."""
    if cfg.source == "kmeans":
        return (f"k-means over item text (sid.source=kmeans, sid.seed={cfg.seed}, sid.num_levels={cfg.num_levels}, "
                f"sid.codebook_size(s)={cfg.codebook_sizes or cfg.codebook_size})")
    if cfg.index_path:
        return f"the index file sid.index_path={cfg.index_path}"
    return f"the dataset's own index of {data_cfg.name!r} (sid.source=file)"
