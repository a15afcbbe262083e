"""`onerec sid`: collision-free semantic IDs for every catalogue item -> ``<output_dir>/sid_table.json``.

How IDs are built (sid.source=kmeans from item text, or sid.source=file from an index) is library code,
onerec_dist/sid/build.py; this stage runs it, writes the table (format: onerec_dist/sid/table.py) and reports.
"""

from __future__ import annotations

import time
from pathlib import Path

from onerec_dist.data.config import data_config
from onerec_dist.data.splits import load_dataset
from onerec_dist.sid.build import PhaseTimer, build_ids
from onerec_dist.sid.config import sid_config
from onerec_dist.sid.quantize import bucket_statistics, code_statistics
from onerec_dist.sid.table import save_table


def run(cfg, output_dir: Path) -> dict:
    start = time.perf_counter()
    sid_cfg, data_cfg = sid_config(cfg), data_config(cfg)
    timer = PhaseTimer()
    with timer.phase("load"):
        data = load_dataset(data_cfg)
    codes, sizes, report = build_ids(data, data_cfg, sid_cfg, timer)
    final = bucket_statistics(codes)
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
