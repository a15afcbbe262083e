"""`onerec think_ahead action=build`: Think-Ahead's offline part (OneRec-Think, arXiv:2510.11639, Sec. 4.4).

For every user of ``serving.split`` (or ``serving.users``): T sampled rationales -> partial beam search of the first m
ID levels with width b -> the union of the prefixes and the rationale texts, written as Parquet shards with the
model's and the ID table's fingerprints into ``serving.cache_dir`` (default ``<output_dir>/cache``). Shards run in
this process or on ``serving.num_workers`` Ray workers (onerec_dist/distributed/think_ahead_shards.py); a re-run
skips the finished shards. The core is onerec_dist/serving/think_ahead.py. Data with several domains: each user's
prompt names its domain and its prefixes stay inside it (decoding/domains.py); the manifest records the domains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def select_users(examples, users: list[str] | None, max_users: int | None) -> tuple[list[str], list[list[int]]]:
    """(users, histories) of the split, restricted to ``users`` (in that order) and cut to ``max_users``."""
    by_user = {str(u): list(h) for u, h in zip(examples.users, examples.histories)}
    if users is not None:
        missing = [u for u in users if str(u) not in by_user]
        if missing:
            raise ValueError(f"serving.users: {len(missing)} users are not in the split (e.g. {missing[:3]})")
        chosen = [str(u) for u in users]
    else:
        chosen = list(by_user)
    chosen = chosen[:max_users] if max_users is not None else chosen
    return chosen, [by_user[u] for u in chosen]


def run(cfg, output_dir: Path) -> dict:
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.decoding.domains import domain_restriction
    from onerec_dist.devices import resolve_device
    from onerec_dist.model_setup import model_config, semantic_ids_for_run
    from onerec_dist.models import load_pretrained
    from onerec_dist.progress import Progress
    from onerec_dist.serving.config import THINK_AHEAD_ACTIONS, resolve_action, serving_config
    from onerec_dist.serving.think_ahead import (CatalogueDomains, Fingerprints, build_shards, load_cache,
                                                 prepare_cache_dir)
    from onerec_dist.sid.tokens import ItemTokenizer

    resolve_action(cfg, THINK_AHEAD_ACTIONS)
    serve_cfg, data_cfg = serving_config(cfg), data_config(cfg)
    model_dir = model_config(cfg).name_or_path
    if not model_dir or not Path(model_dir).is_dir():
        raise ValueError(f"model.name_or_path={model_dir!r}: Think-Ahead needs a local model directory (the "
                         "reason_sft export, carrying its sid_table.json)")
    data = load_dataset(data_cfg)
    examples = make_splits(data, data_cfg).get(serve_cfg.split)
    if examples is None:
        raise ValueError(f"serving.split={serve_cfg.split}: dataset {data.name!r} has no such split")
    users, histories = select_users(examples, serve_cfg.users, serve_cfg.max_users)
    item_codes, _, ids_source = semantic_ids_for_run(cfg, data, model_dir)
    fingerprints = Fingerprints.of(model_dir)
    cache_dir = Path(serve_cfg.cache_dir) if serve_cfg.cache_dir else output_dir / "cache"
    restriction = domain_restriction(data, users, item_codes)  # None: single domain
    domains = CatalogueDomains(tuple(data.domain_names), restriction.prefixes) if restriction is not None else None
    todo = prepare_cache_dir(cache_dir, fingerprints, serve_cfg, users, domains)
    total = -(-len(users) // serve_cfg.shard_size)
    print(f"think_ahead: {len(users)} users in {total} shards, {total - len(todo)} already built -> {cache_dir}")
    if todo and serve_cfg.num_workers > 1:
        from onerec_dist.distributed.think_ahead_shards import build_sharded

        build_sharded(serve_cfg, str(model_dir), np.asarray(item_codes), users, histories, str(cache_dir), todo,
                      fingerprints, restriction, data.domain_names)
    elif todo:
        model, tokenizer = load_pretrained(str(model_dir), "auto", "auto")
        model.eval().to(resolve_device(serve_cfg.device))
        item_tok = ItemTokenizer.from_tokenizer(tokenizer)
        with Progress(len(todo), "think_ahead", unit="shard") as bar:
            build_shards(model, tokenizer, item_tok, np.asarray(item_codes), users, histories, serve_cfg, cache_dir,
                         todo, fingerprints, progress=bar.update, restriction=restriction,
                         domain_names=data.domain_names)
    cache = load_cache(cache_dir, fingerprints)
    sizes = cache.sizes()
    return {"action": "build", "cache_dir": str(cache_dir), "num_users": len(cache), "shards_total": total,
            "shards_built": len(todo), "shards_skipped": total - len(todo), "semantic_ids": ids_source,
            "model_fingerprint": fingerprints.model, "table_fingerprint": fingerprints.table,
            "num_rationales": serve_cfg.num_rationales, "prefix_levels": serve_cfg.prefix_levels,
            "prefix_beam": serve_cfg.prefix_beam,
            "prefixes_per_user": {"mean": float(sizes.mean()) if sizes.size else 0.0,
                                  "median": float(np.median(sizes)) if sizes.size else 0.0,
                                  "max": int(sizes.max()) if sizes.size else 0}}
