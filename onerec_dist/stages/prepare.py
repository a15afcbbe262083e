"""`onerec prepare`: read the dataset, split it, print and save the statistics (and the splits as parquet)."""

from __future__ import annotations

from pathlib import Path

from onerec_dist.data.config import data_config
from onerec_dist.data.splits import format_statistics, load_dataset, make_splits, statistics


def write_splits(splits, output_dir: Path) -> dict[str, str]:
    """One parquet per present split: user, history (list of item indices), target."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    for name, examples in splits.items():
        if examples is None:
            continue
        table = pa.table({"user": examples.users, "history": examples.histories, "target": examples.targets})
        path = output_dir / f"{name}.parquet"
        pq.write_table(table, path)
        paths[name] = str(path)
    return paths


def run(cfg, output_dir: Path) -> dict:
    data_cfg = data_config(cfg)
    data = load_dataset(data_cfg)
    splits = make_splits(data, data_cfg)
    stats = statistics(data, splits)
    print(format_statistics(stats))
    for name in stats["missing_splits"]:
        print(f"note: the {name} split is absent from {data_cfg.dir}; stages that need it will say so.")
    stats["split_files"] = write_splits(splits, output_dir)
    return stats
