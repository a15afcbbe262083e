"""`onerec sid`: collision-free semantic IDs for every catalogue item -> ``<output_dir>/sid_table.json``.

sid.source=kmeans (default): item text -> sentence-transformers embeddings (cached; text-free items filled from
their sequence neighbours) -> residual k-means into L levels x K codes -> collision resolution
(onerec_dist.sid.embed / quantize). sid.source=file: load IDs from the dataset's own ``<name>.index.json``
(``Catalogue.semantic_ids``) or from ``sid.index_path`` (a ``<Name>.index.json`` with "<a_12>" tokens, or a table
written by this stage), resolve shared IDs the same way without embeddings, and give free IDs to items the index
misses when sid.on_missing=assign. The table format is documented in onerec_dist/sid/table.py.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onerec_dist.config import from_mapping
from onerec_dist.data.config import DataConfig
from onerec_dist.data.readers import DataError, load_json, parse_semantic_id
from onerec_dist.data.splits import load_dataset
from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.sid.config import SidConfig
from onerec_dist.sid.embed import embed_catalogue
from onerec_dist.sid.quantize import (assign_free_ids, bucket_statistics, check_codebook_sizes, code_statistics,
                                      residual_kmeans, resolve_collisions, squared_distances)
from onerec_dist.sid.table import parse_table, save_table
from onerec_dist.stages.prepare import data_config

TEXT_FREE_NOTE = ("items without text are embedded as the mean embedding of their co-interacted neighbours (items "
                  "adjacent to them in user sequences), or, without such neighbours, as the catalogue mean plus a "
                  "tiny deterministic per-item jitter")


def sid_config(cfg) -> SidConfig:
    from omegaconf import OmegaConf

    return from_mapping(SidConfig, OmegaConf.to_container(cfg.sid, resolve=True), "sid")


class _Timer:
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


def build_from_text(data: InteractionData, cfg: SidConfig, timer: _Timer) -> tuple[np.ndarray, list[int], dict]:
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
                    timer: _Timer) -> tuple[np.ndarray, list[int], dict]:
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


def run(cfg, output_dir: Path) -> dict:
    start = time.perf_counter()
    sid_cfg = sid_config(cfg)
    data_cfg = data_config(cfg)
    timer = _Timer()
    with timer.phase("load"):
        data = load_dataset(data_cfg)
    if sid_cfg.source == "kmeans":
        codes, sizes, report = build_from_text(data, sid_cfg, timer)
    else:
        codes, sizes, report = build_from_file(data, data_cfg, sid_cfg, timer)
    final = bucket_statistics(codes)
    if final["collision_rate"] != 0.0:  # resolve_collisions guarantees this; never write a table that breaks it
        raise RuntimeError(f"internal error: {final['num_shared_ids']} semantic IDs still shared after resolution")
    with timer.phase("write"):
        table_path = save_table(output_dir / "sid_table.json", codes, data.catalogue.item_ids, sizes)
    raw, moves = report.pop("raw"), report.pop("moves")
    summary = {
        "source": sid_cfg.source,
        "dataset": data.name,
        "num_items": len(data.catalogue),
        "num_levels": int(codes.shape[1]),
        "codebook_size": sizes[0] if len(set(sizes)) == 1 else max(sizes),
        "codebook_sizes": sizes,
        "collision_rate_raw": raw["collision_rate"],
        "collision_rate_final": final["collision_rate"],
        "num_shared_ids_raw": raw["num_shared_ids"],
        "num_items_moved": moves["num_moved"],
        "extra_level_added": moves["extra_level_added"],
        **code_statistics(codes, sizes),
        "largest_bucket": {"full_id_before_resolution": raw["largest_bucket_full_id"],
                           "first_level_code": final["largest_bucket_first_level"]},
        **report,
        "table_path": str(table_path),
        "seconds_per_phase": timer.seconds,
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"sid ({s['source']}): {s['num_items']} items -> {s['num_levels']} levels x {s['codebook_sizes']} codes",
             f"  collisions: {s['collision_rate_raw']:.4%} of items before resolution ({s['num_shared_ids_raw']} "
             f"shared IDs, largest {s['largest_bucket']['full_id_before_resolution']}), {s['num_items_moved']} items "
             f"moved, {s['collision_rate_final']:.0%} after" + (" (extra level added)" if s["extra_level_added"]
                                                                 else ""),
             f"  codes used per level: {s['codes_used_per_level']}; entropy (bits): {s['entropy_per_level']}",
             f"  items without text: {s['num_items_without_text']}; seconds: {s['seconds_per_phase']}",
             f"  table: {s['table_path']}"]
    return "\n".join(lines)
