"""Shard `onerec eval` over Ray workers. Whole length-sorted batches are dealt round-robin to workers, each
worker decodes its batches exactly as the single process would, and the driver merges by batch number, so the
sharded result equals the single-process one."""

from __future__ import annotations

import numpy as np



def ensure_ray() -> None:
    """Use, join or start Ray through the one session helper (ray_session); a local one runs without dashboard."""
    from onerec_dist.distributed import ray_session

    ray_session.ensure_ray(include_dashboard=False, log_to_driver=False)


def _decode_shard(eval_cfg, model_dir: str, item_codes: np.ndarray, prompts, histories, batches, restriction,
                  numbers):
    import torch

    from onerec_dist.devices import resolve_device
    from onerec_dist.evaluation import build_decoder, decode_batches
    from onerec_dist.models import load_pretrained
    from onerec_dist.sid.tokens import ItemTokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(model_dir, "sdpa", "auto")
    device = resolve_device("auto" if eval_cfg.use_gpu else "cpu")
    model.eval().to(device)
    item_tok = ItemTokenizer.from_tokenizer(tokenizer)
    decoder = build_decoder(model, item_tok, item_codes, eval_cfg, tokenizer.pad_token_id or 0)
    mine = [batches[n] for n in numbers]
    local = decode_batches(decoder, prompts, histories, mine, eval_cfg.exclude_history, progress=False,
                           restriction=restriction)
    return {numbers[i]: result for i, result in local.items()}


def _run_round_robin(eval_cfg, shard_fn, leading_args: tuple, shared_values: tuple, num_batches: int,
                     desc: str) -> dict:
    """Deal batch numbers round-robin to eval_cfg.num_workers Ray tasks of ``shard_fn(*leading_args, *shared,
    numbers)`` (the large inputs go to the object store once) and merge their {batch number: result} dicts, with a
    progress bar over finished batches."""
    import ray

    from onerec_dist.progress import Progress

    ensure_ray()
    remote = ray.remote(num_cpus=1, num_gpus=1 if eval_cfg.use_gpu else 0)(shard_fn)
    shared = [ray.put(x) for x in shared_values]
    numbers = [list(range(w, num_batches, eval_cfg.num_workers)) for w in range(eval_cfg.num_workers)]
    pending = [remote.remote(*leading_args, *shared, n) for n in numbers if n]
    merged: dict = {}
    with Progress(num_batches, desc, unit="batch") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = ray.get(done[0])
            merged.update(part)
            bar.update(len(part))
    return merged


def decode_sharded(eval_cfg, model_dir: str, item_codes, prompts, histories, batches, restriction=None) -> dict:
    """{batch number: (items, scores)} for every batch, computed on eval_cfg.num_workers Ray workers;
    ``restriction``: each user only in its domain's catalogue (decoding/domains.py; None: the whole catalogue)."""
    return _run_round_robin(eval_cfg, _decode_shard, (eval_cfg, model_dir),
                            (item_codes, prompts, histories, batches, restriction), len(batches),
                            f"eval x{eval_cfg.num_workers} workers")


def _think_shard(eval_cfg, mode: str, model_dir: str, item_codes: np.ndarray, histories, targets, batches, domains,
                 restriction, numbers):
    import torch

    from onerec_dist.devices import resolve_device
    from onerec_dist.evaluation import build_decoder
    from onerec_dist.models import load_pretrained
    from onerec_dist.reasoning.think_eval import think_decode_batches
    from onerec_dist.sid.tokens import ItemTokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(model_dir, "sdpa", "auto")
    model.eval().to(resolve_device("auto" if eval_cfg.use_gpu else "cpu"))
    decoder = build_decoder(model, ItemTokenizer.from_tokenizer(tokenizer), item_codes, eval_cfg,
                            tokenizer.pad_token_id or 0)
    return think_decode_batches(decoder, model, tokenizer, item_codes, histories, targets, batches, numbers, eval_cfg,
                                mode, progress=False, domains=domains, restriction=restriction)


def think_sharded(eval_cfg, mode: str, model_dir: str, item_codes, histories, targets, batches, domains=None,
                  restriction=None) -> dict:
    """{batch number: per-user arrays} of the thinking evaluation (onerec_dist.reasoning.think_eval), batches dealt
    round-robin to eval_cfg.num_workers Ray workers; per-user items and log-likelihoods come back, so the paired
    bootstrap runs on the driver over all users."""
    return _run_round_robin(eval_cfg, _think_shard, (eval_cfg, mode, model_dir),
                            (item_codes, histories, targets, batches, domains, restriction), len(batches),
                            f"eval ({mode}) x{eval_cfg.num_workers} workers")
