"""Dataset loading entry point, train/valid/test splits and statistics.

Leave-one-out (the protocol of TIGER, LC-Rec, OneRec-Think): for a user with items s_0 .. s_{n-1} in time order,
the test example is (s_0..s_{n-2} -> s_{n-1}), validation is (s_0..s_{n-3} -> s_{n-2}), and training uses a sliding
window over the rest: (s_0..s_{t-1} -> s_t) for t = 1 .. n-3. Every history keeps its last ``max_history`` items.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from onerec_dist.data.attribute_domains import split_by_attribute
from onerec_dist.data.config import DataConfig
from onerec_dist.data.domains import check_domains
from onerec_dist.data.readers import DataError, read_interactions, read_letter, read_minionerec
from onerec_dist.data.types import DropReport, Examples, InteractionData


def load_dataset(cfg: DataConfig) -> InteractionData:
    """Read the dataset that ``cfg.format`` names; with ``data.domain_split.attribute`` set, split it into domains
    by that item attribute (data/attribute_domains.py) before any split or semantic ID sees it."""
    if cfg.format == "synthetic":
        from onerec_dist.data.synthetic import generate_synthetic

        data = generate_synthetic(cfg.synthetic, name=cfg.name)
    else:
        readers = {"letter": read_letter, "minionerec": read_minionerec, "interactions": read_interactions}
        data = readers[cfg.format](cfg)
    if cfg.domain_split.attribute is not None:
        data = split_by_attribute(data, cfg.domain_split)
    check_domains(data)
    return data


def drop_short_users(data: InteractionData, cfg: DataConfig) -> None:
    """Users with fewer than ``min_seq_len`` items cannot give test + validation + a training target."""
    short = [u for u, s in data.sequences.items() if len(s) < cfg.min_seq_len]
    if not short:
        return
    if cfg.on_short_user == "error":
        u = short[0]
        raise DataError(
            f"{len(short)} users have fewer than data.min_seq_len={cfg.min_seq_len} interactions, e.g. user {u!r} "
            f"with {len(data.sequences[u])}; set data.on_short_user=drop to drop them")
    for u in short:
        del data.sequences[u]
    data.report.add(f"user with fewer than {cfg.min_seq_len} interactions (user dropped)",
                    f"user {short[0]}", count=len(short))


def leave_one_out(sequences: dict[str, list[int]], max_history: int) -> dict[str, Examples]:
    splits = {"train": Examples(), "valid": Examples(), "test": Examples()}
    for user, seq in sequences.items():
        n = len(seq)
        for t in range(1, n - 2):
            splits["train"].append(user, seq[max(0, t - max_history):t], seq[t])
        splits["valid"].append(user, seq[max(0, n - 2 - max_history):n - 2], seq[n - 2])
        splits["test"].append(user, seq[max(0, n - 1 - max_history):n - 1], seq[n - 1])
    return splits


def make_splits(data: InteractionData, cfg: DataConfig) -> dict[str, Examples | None]:
    """Splits per ``cfg.split``. A split a release lacks stays None; callers must say so, never invent one."""
    if cfg.split == "given" or data.given_splits is not None:
        if data.given_splits is None:
            raise DataError(f"data.split=given but dataset {data.name!r} has no split of its own; use leave_one_out")
        return data.given_splits
    drop_short_users(data, cfg)
    if not data.sequences:
        raise DataError(f"dataset {data.name!r} has no user with at least {cfg.min_seq_len} interactions")
    return leave_one_out(data.sequences, cfg.max_history)


def statistics(data: InteractionData, splits: dict[str, Examples | None]) -> dict:
    lengths = [len(s) for s in data.sequences.values()]
    used_items = {i for s in data.sequences.values() for i in s}
    stats = {
        "dataset": data.name,
        "num_users": len(data.sequences),
        "num_items": len(data.catalogue),
        "num_items_with_interactions": len(used_items),
        "num_interactions": sum(lengths),
        "avg_seq_len": round(sum(lengths) / max(len(lengths), 1), 4),
        "splits": {name: (len(ex) if ex is not None else None) for name, ex in splits.items()},
        "missing_splits": [name for name, ex in splits.items() if ex is None],
        "has_item_text": any(data.catalogue.titles) or any(data.catalogue.descriptions),
        "has_semantic_ids": data.catalogue.semantic_ids is not None,
        "dropped_or_repaired": data.report.as_dict(),
    }
    if data.catalogue.semantic_ids is not None:
        stats["semantic_id_levels"] = int(data.catalogue.semantic_ids.shape[1])
    if len(data.domain_names) > 1:  # {name: {users, items}} of data with several domains
        users = Counter(data.user_domains[u] for u in data.sequences)
        items = Counter(np.asarray(data.item_domains).tolist())
        stats["domains"] = {name: {"users": users.get(d, 0), "items": items.get(d, 0)}
                            for d, name in enumerate(data.domain_names)}
    return stats


def format_statistics(stats: dict) -> str:
    lines = [f"dataset {stats['dataset']}: {stats['num_users']} users, {stats['num_items']} items, "
             f"{stats['num_interactions']} interactions, {stats['avg_seq_len']:.2f} items per user"]
    for name, entry in stats.get("domains", {}).items():
        lines.append(f"  domain {name}: {entry['users']} users, {entry['items']} items")
    for name, size in stats["splits"].items():
        lines.append(f"  split {name:5s}: " + (f"{size} examples" if size is not None else
                                                "ABSENT in this release (not invented)"))
    for reason, entry in stats["dropped_or_repaired"].items():
        shown = f" (e.g. {'; '.join(entry['examples'])})" if entry["examples"] else ""
        lines.append(f"  dropped/repaired {entry['count']}: {reason}{shown}")
    return "\n".join(lines)


__all__ = ["DataError", "DropReport", "load_dataset", "make_splits", "statistics", "format_statistics",
           "leave_one_out"]
