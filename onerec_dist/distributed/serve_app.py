"""`onerec serve`: the Think-Ahead online completion (onerec_dist.serving.think_ahead) as a Ray Serve application.

HTTP JSON (onerec_dist.serving.api): ``POST /recommend`` and ``GET /health``. Concurrent requests are decoded together
by Ray Serve's dynamic batching (``@serve.batch``: at most ``serving.max_batch_size`` requests, waiting at most
``serving.batch_wait_timeout_s`` for a batch to fill): one constrained decode per batch, cached users below their
prefixes and fallback users over the whole catalogue in the same call. A bad request gets a 4xx and a message; an
unexpected error in one request gets a 500 for that request only; the replica keeps serving.

The catalogue is the model's own ID table (``sid_table.json``), so the server needs no dataset: requests name items
by their dataset ids, and the cache (if any) must carry the fingerprints of this model and table.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from onerec_dist.serving.api import RecommendRequest, RequestError, parse_recommend


class RecommendServer:
    """One replica: the model, its ID table, the cache and the batched decoder."""

    def __init__(self, model_dir: str, serving: dict):
        import numpy as np

        from onerec_dist.devices import resolve_device
        from onerec_dist.models import load_pretrained
        from onerec_dist.serving.config import ServingConfig
        from onerec_dist.serving.think_ahead import Fingerprints, ThinkAheadService, load_cache
        from onerec_dist.sid.model_ids import TABLE_FILE
        from onerec_dist.sid.table import load_table
        from onerec_dist.sid.tokens import ItemTokenizer

        cfg = ServingConfig(**serving)
        model, tokenizer = load_pretrained(model_dir, "auto", "auto")
        model.eval().to(resolve_device(cfg.device))
        codes, self.item_ids, _ = load_table(Path(model_dir) / TABLE_FILE)
        self.rows = {item: row for row, item in enumerate(self.item_ids)}
        cache = load_cache(cfg.cache_dir, Fingerprints.of(model_dir)) if cfg.cache_dir else None
        self.service = ThinkAheadService(model, tokenizer, ItemTokenizer.from_tokenizer(tokenizer), np.asarray(codes),
                                         cache, cfg)
        self.cfg, self.cached_users = cfg, len(cache) if cache is not None else 0
        self.batches = 0
        self.recommend_batch.set_max_batch_size(cfg.max_batch_size)
        self.recommend_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> list[dict]:
        """One decode for the whole batch at the largest k asked; each answer cut to its own k."""
        start = time.perf_counter()
        answers = self.service.recommend([r.user for r in requests], [r.history for r in requests],
                                         k=max(r.k for r in requests), domains=[r.domain for r in requests])
        decode_ms = (time.perf_counter() - start) * 1e3
        self.batches += 1
        return [{"user": r.user, "path": a.path, "batch_size": len(requests), "decode_ms": decode_ms,
                 "items": [{"item": self.item_ids[i], "score": s} for i, s in zip(a.items[:r.k], a.scores[:r.k])]}
                for r, a in zip(requests, answers)]

    def health(self) -> dict:
        return {"status": "ok", "items": len(self.item_ids), "cached_users": self.cached_users,
                "requests": dict(self.service.counts), "batches": self.batches, "max_k": self.cfg.max_k}

    async def __call__(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if route == "health":
                return JSONResponse(self.health())
            if route != "recommend":
                raise RequestError(404, f"no route {request.url.path!r}; routes: POST /recommend, GET /health")
            if request.method != "POST":
                raise RequestError(405, "/recommend takes POST with a JSON body")
            parsed = parse_recommend(await request.body(), self.rows.get, self.cfg.max_k, self.service.domain_names)
            answer = await self.recommend_batch(parsed)
            return JSONResponse({**answer, "latency_ms": (time.perf_counter() - start) * 1e3})
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except Exception as err:  # one failed request must not take the replica down
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)


def build_app(model_dir: str, serving_cfg):
    """The bound Ray Serve application of ``serving_cfg`` (a ServingConfig)."""
    options = {"num_cpus": 1, "num_gpus": 1 if serving_cfg.use_gpu else 0}
    deployment = serve.deployment(RecommendServer, name="recommend", num_replicas=serving_cfg.num_replicas,
                                  ray_actor_options=options)
    return deployment.bind(str(model_dir), dataclasses.asdict(serving_cfg))


def start(model_dir: str, serving_cfg, temp_dir: str | None = None) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on serving.host:port and deploy the application; returns the
    endpoint's base URL once the replicas are ready."""
    from onerec_dist.distributed.think_ahead_shards import ensure_ray_with_retry

    ensure_ray_with_retry(temp_dir)
    serve.start(http_options={"host": serving_cfg.host, "port": serving_cfg.port})
    serve.run(build_app(model_dir, serving_cfg), name=serving_cfg.app_name, route_prefix="/")
    return f"http://{serving_cfg.host}:{serving_cfg.port}"


def stop(app_name: str, shutdown_serve: bool = True) -> None:
    """Delete the application (and, by default, shut Serve down on this Ray)."""
    serve.delete(app_name)
    if shutdown_serve:
        serve.shutdown()
