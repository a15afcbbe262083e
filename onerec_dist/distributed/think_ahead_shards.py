"""Shard `onerec think_ahead` over Ray workers: ``serving.num_workers`` actors each load the model once, then build
and write whole cache shards (onerec_dist.serving.think_ahead.build_shards) handed out by an ``ActorPool``; the
driver draws one progress bar. Every shard file is written by its worker atomically, so a re-run skips finished
shards whatever happened to the others. Data with several domains: the users' ``DomainRestriction`` and the domain
names travel to every worker (each shard takes its users' part), as in the single process."""

from __future__ import annotations

import numpy as np


def ensure_ray_with_retry(temp_dir: str | None = None, attempts: int = 3) -> bool:
    """ray_session.ensure_ray, retried when a local node times out during startup (a loaded machine: Ray waits a
    fixed 30 s for its raylet); returns what ensure_ray returns."""
    import ray

    from onerec_dist.distributed import ray_session

    for attempt in range(attempts):
        try:
            return ray_session.ensure_ray(temp_dir_path=temp_dir, include_dashboard=False, log_to_driver=False)
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts - 1:
                raise
            ray.shutdown()
    return False


class _ShardBuilder:
    def __init__(self, serve_cfg, model_dir: str, item_codes: np.ndarray, users, histories, cache_dir: str,
                 fingerprints, restriction=None, domain_names=None):
        import torch

        from onerec_dist.devices import resolve_device
        from onerec_dist.models import load_pretrained
        from onerec_dist.sid.tokens import ItemTokenizer

        torch.set_num_threads(1)
        self.model, self.tokenizer = load_pretrained(model_dir, "auto", "auto")
        self.model.eval().to(resolve_device("auto" if serve_cfg.use_gpu else "cpu"))
        self.item_tok = ItemTokenizer.from_tokenizer(self.tokenizer)
        self.args = (serve_cfg, item_codes, users, histories, cache_dir, fingerprints)
        self.domains = {"restriction": restriction, "domain_names": domain_names}

    def build(self, number: int) -> int:
        from onerec_dist.serving.think_ahead import build_shards

        serve_cfg, item_codes, users, histories, cache_dir, fingerprints = self.args
        return build_shards(self.model, self.tokenizer, self.item_tok, item_codes, users, histories, serve_cfg,
                            cache_dir, [number], fingerprints, **self.domains)


def build_sharded(serve_cfg, model_dir: str, item_codes: np.ndarray, users, histories, cache_dir: str,
                  numbers: list[int], fingerprints, restriction=None, domain_names=None) -> int:
    """Build the cache shards ``numbers`` on ``serve_cfg.num_workers`` Ray actors; returns the users written.
    ``restriction`` (decoding/domains.DomainRestriction over ``users``) and ``domain_names``: data with domains."""
    import ray
    from ray.util import ActorPool

    from onerec_dist.progress import Progress

    ensure_ray_with_retry()
    actor = ray.remote(num_cpus=1, num_gpus=1 if serve_cfg.use_gpu else 0)(_ShardBuilder)
    shared = [ray.put(x) for x in (item_codes, list(users), [list(h) for h in histories])]
    workers = [actor.remote(serve_cfg, model_dir, *shared, cache_dir, fingerprints, restriction,
                            list(domain_names) if domain_names is not None else None)
               for _ in range(min(serve_cfg.num_workers, len(numbers)))]
    written = 0
    with Progress(len(numbers), f"think_ahead x{len(workers)} workers", unit="shard") as bar:
        for count in ActorPool(workers).map_unordered(lambda w, n: w.build.remote(n), numbers):
            written += count
            bar.update(1)
    for worker in workers:
        ray.kill(worker)
    return written
