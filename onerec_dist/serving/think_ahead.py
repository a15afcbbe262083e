"""Think-Ahead (OneRec-Think, arXiv:2510.11639, Sec. 4.4): reasoning is split into an offline and an online part.

Offline (``build_shard``): per user, T sampled rationales after the user's inference prompt (``cot_format``), each
closed with </think>, then a partial beam search over the first m ID levels with beam width b
(``ConstrainedDecoder.decode_prefixes``); the user's cache entry is the union of the T * b prefixes
(``AllowedPrefixes.union_of_groups``: sorted, unique, at most T * b of them) and the rationale texts.

Online (``ThinkAheadService.recommend``): from a short prompt (the latest ``recent_items`` items, with an empty think
block, or the cached rationale with the best prefix score), decode the remaining L - m levels below the user's cached
prefixes (``decode(allowed_prefixes=...)``). A user without a cache entry is decoded over the whole catalogue in the
same batch (an unrestricted row): the fallback, counted in ``ThinkAheadService.counts``.

Cache on disk (``cache_dir``): ``manifest.json`` (fingerprints, settings, shard count) and one Parquet file per shard
``shard-00000.parquet`` (columns user, prefixes [P, m], rationales [T], rationale_scores [T]; the fingerprints
again in the schema metadata). A shard file is written atomically, so a re-run skips exactly the finished shards.
The fingerprints bind the cache to one model and one ID table: ``load_cache`` refuses a cache built for another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE_FORMAT = "onerec-think-ahead/1"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
PATHS = ("cached", "fallback")


# ---------------------------------------------------------------------------------------------- fingerprints


def _sha256_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def table_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the model's ``sid_table.json``: the item IDs the cached prefixes are written in."""
    from onerec_dist.sid.model_ids import TABLE_FILE

    path = Path(model_dir) / TABLE_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: Think-Ahead needs a model directory that carries its item IDs")
    return _sha256_files([path])


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of config.json, item_tokens.json and every weight file of ``model_dir``: the model that wrote the
    rationales and scored the prefixes."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not (model_dir / "config.json").is_file() or not weights:
        raise ValueError(f"{model_dir} is not a saved model directory (config.json and weights)")
    extra = [model_dir / "item_tokens.json"] if (model_dir / "item_tokens.json").is_file() else []
    return _sha256_files([model_dir / "config.json", *extra, *weights])


@dataclass(frozen=True)
class Fingerprints:
    model: str
    table: str

    @classmethod
    def of(cls, model_dir: str | Path) -> "Fingerprints":
        return cls(model_fingerprint(model_dir), table_fingerprint(model_dir))


# ---------------------------------------------------------------------------------------------- offline build


def cache_settings(cfg) -> dict:
    """The settings that shape a cache entry; a re-run with other settings must not mix shards."""
    return {"num_rationales": cfg.num_rationales, "prefix_levels": cfg.prefix_levels, "prefix_beam": cfg.prefix_beam,
            "max_think_tokens": cfg.max_think_tokens, "do_sample": cfg.do_sample, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "seed": cfg.seed, "normalization": cfg.normalization}


def prefix_decoder(model, item_tok, item_codes: np.ndarray, cfg, pad_token_id: int):
    """The partial decoder of the offline part: beam width = top-K = b (evaluation.build_decoder)."""
    from onerec_dist.evaluation import EvalConfig, build_decoder

    width = min(cfg.prefix_beam, len(item_codes))
    eval_cfg = EvalConfig(beam_width=width, top_k=width, normalization=cfg.normalization, step_impl=cfg.step_impl,
                          ks=[1], ndcg_ks=[1], baseline=[])
    return build_decoder(model, item_tok, item_codes, eval_cfg, pad_token_id)


def build_shard(model, tokenizer, decoder, item_codes: np.ndarray, users: Sequence[str],
                histories: Sequence[Sequence[int]], cfg, seed: int) -> dict[str, list]:
    """Cache rows of ``users``: {"user", "prefixes" [P_u, m], "rationales" [T], "rationale_scores" [T]} columns.

    ``decoder`` is a ``prefix_decoder``; ``seed`` makes the sampled rationales repeatable per shard."""
    import torch

    from onerec_dist.decoding.constraints import AllowedPrefixes
    from onerec_dist.reasoning.cot_format import ThinkTokens, close_think, inference_prompt
    from onerec_dist.reasoning.think_eval import generate_rationales

    think = ThinkTokens.from_tokenizer(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    T = cfg.num_rationales
    prompts = [inference_prompt(tokenizer, think, item_codes, h) for h in histories]
    repeated = [p for p in prompts for _ in range(T)]  # [U*T] user u's rationales are rows u*T .. u*T+T-1
    bodies: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for number, lo in enumerate(range(0, len(repeated), cfg.generate_batch_size)):
            chunk_bodies, _ = generate_rationales(model, think, repeated[lo:lo + cfg.generate_batch_size],
                                                  cfg.max_think_tokens, pad, do_sample=cfg.do_sample,
                                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                                  seed=seed * 100_003 + number)
            bodies.extend(chunk_bodies)
        closed = [close_think(think, p, b) for p, b in zip(repeated, bodies)]
        result = decoder.decode_prefixes(closed, cfg.prefix_levels)  # prefixes [U*T, b, m]
    model.train(was_training)
    union = AllowedPrefixes.union_of_groups(result.prefixes, T)  # U rows, sorted unique prefixes
    ends = union.offsets.tolist()
    codes = union.codes.tolist()
    best = result.scores[:, 0].float().view(len(users), T).cpu().numpy()  # [U, T] best prefix score per rationale
    texts = [tokenizer.decode(b, skip_special_tokens=True).strip() for b in bodies]
    return {"user": [str(u) for u in users],
            "prefixes": [codes[ends[u]:ends[u + 1]] for u in range(len(users))],
            "rationales": [texts[u * T:(u + 1) * T] for u in range(len(users))],
            "rationale_scores": [best[u].tolist() for u in range(len(users))]}


def shard_path(cache_dir: str | Path, number: int) -> Path:
    return Path(cache_dir) / f"shard-{number:05d}.parquet"


def shard_ranges(num_users: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) user positions of each shard."""
    return [(lo, min(lo + shard_size, num_users)) for lo in range(0, num_users, shard_size)]


def write_shard(path: Path, columns: dict[str, list], fingerprints: Fingerprints, prefix_levels: int) -> Path:
    """Atomically write one shard (a crash leaves no half file, so a re-run redoes only unfinished shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("user", pa.string()), ("prefixes", pa.list_(pa.list_(pa.int64()))),
                        ("rationales", pa.list_(pa.string())), ("rationale_scores", pa.list_(pa.float64()))],
                       metadata={"format": CACHE_FORMAT, "model_fingerprint": fingerprints.model,
                                 "table_fingerprint": fingerprints.table, "prefix_levels": str(prefix_levels)})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def prepare_cache_dir(cache_dir: str | Path, fingerprints: Fingerprints, cfg, users: Sequence[str]) -> list[int]:
    """Write (or check) the manifest; returns the shard numbers still to build. A cache dir holding a cache of
    another model, ID table, user list or settings is refused (build into a new directory)."""
    cache_dir, shard_size = Path(cache_dir), cfg.shard_size
    cache_dir.mkdir(parents=True, exist_ok=True)
    users_digest = hashlib.sha256("\n".join(map(str, users)).encode()).hexdigest()
    manifest = {"format": CACHE_FORMAT, "model_fingerprint": fingerprints.model,
                "table_fingerprint": fingerprints.table, "settings": cache_settings(cfg), "num_users": len(users),
                "users_sha256": users_digest, "shard_size": shard_size,
                "num_shards": len(shard_ranges(len(users), shard_size))}
    path = cache_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in manifest if old.get(k) != manifest[k])
        if differ:
            raise ValueError(f"{cache_dir} holds a Think-Ahead cache with other {', '.join(differ)}; build into a new "
                             "serving.cache_dir (or delete the old one)")
    else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
    return [n for n in range(manifest["num_shards"]) if not shard_path(cache_dir, n).is_file()]


# ---------------------------------------------------------------------------------------------- the cache


@dataclass
class ThinkAheadCache:
    """user -> sorted unique m-level prefixes and the T rationale texts (best prefix score first)."""

    fingerprints: Fingerprints
    prefix_levels: int
    prefixes: dict[str, list[list[int]]] = field(default_factory=dict)
    rationales: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prefixes)

    def get(self, user: str) -> list[list[int]] | None:
        found = self.prefixes.get(str(user))
        return found if found else None

    def best_rationale(self, user: str) -> str | None:
        texts = self.rationales.get(str(user))
        return texts[0] if texts else None

    def sizes(self) -> np.ndarray:
        """[U] number of cached prefixes per user."""
        return np.array([len(p) for p in self.prefixes.values()], dtype=np.int64)


def load_cache(cache_dir: str | Path, expected: Fingerprints | None = None) -> ThinkAheadCache:
    """Read every finished shard of ``cache_dir``. With ``expected`` (the serving model's fingerprints), a cache
    written for another model or another ID table is refused with a ValueError that says which."""
    import pyarrow.parquet as pq

    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} not found: not a Think-Ahead cache (build one with `onerec think_ahead`)")
    manifest = json.loads(path.read_text())
    found = Fingerprints(manifest["model_fingerprint"], manifest["table_fingerprint"])
    if expected is not None:
        check_fingerprints(found, expected, cache_dir)
    cache = ThinkAheadCache(found, int(manifest["settings"]["prefix_levels"]))
    for shard in sorted(cache_dir.glob("shard-*.parquet")):
        table = pq.read_table(shard)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if (meta.get("model_fingerprint"), meta.get("table_fingerprint")) != (found.model, found.table):
            raise ValueError(f"{shard} was written for another model or ID table than {path} records")
        columns = table.to_pydict()
        for user, prefixes, texts, scores in zip(columns["user"], columns["prefixes"], columns["rationales"],
                                                 columns["rationale_scores"]):
            order = np.argsort(-np.asarray(scores), kind="stable")
            cache.prefixes[user] = prefixes
            cache.rationales[user] = [texts[i] for i in order]
    return cache


def check_fingerprints(found: Fingerprints, expected: Fingerprints, where) -> None:
    if found.table != expected.table:
        raise ValueError(f"the Think-Ahead cache {where} was built for another ID table (sid_table.json sha256 "
                         f"{found.table[:12]}..., the serving model's is {expected.table[:12]}...): its prefixes "
                         "name other items; rebuild it with `onerec think_ahead` for this model")
    if found.model != expected.model:
        raise ValueError(f"the Think-Ahead cache {where} was built by another model (fingerprint {found.model[:12]}"
                         f"..., the serving model's is {expected.model[:12]}...); rebuild it with `onerec "
                         "think_ahead` for this model")


# ---------------------------------------------------------------------------------------------- online completion


@dataclass
class Recommendation:
    items: list[int]  # catalogue rows, best first
    scores: list[float]  # total log-probs of the decoded levels
    path: str  # "cached" | "fallback"


class ThinkAheadService:
    """Online completion over one model and its cache. ``recommend`` decodes a batch of requests in one call."""

    def __init__(self, model, tokenizer, item_tok, item_codes: np.ndarray, cache: ThinkAheadCache | None, cfg):
        from onerec_dist.evaluation import EvalConfig, build_decoder
        from onerec_dist.reasoning.cot_format import ThinkTokens

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.item_codes = np.asarray(item_codes)
        self.think = ThinkTokens.from_tokenizer(tokenizer)
        eval_cfg = EvalConfig(beam_width=cfg.beam_width, top_k=cfg.max_k, normalization=cfg.normalization,
                              step_impl=cfg.step_impl, ks=[1], ndcg_ks=[1], baseline=[])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder = build_decoder(model, item_tok, self.item_codes, eval_cfg, pad)
        self.cache = cache
        if cache is not None and cache.prefix_levels >= self.decoder.index.num_levels:
            raise ValueError(f"the cache holds {cache.prefix_levels}-level prefixes of {self.decoder.index.num_levels}"
                             "-level IDs: nothing is left to complete online")
        self.counts = {path: 0 for path in PATHS}

    def prompt(self, user: str, history: Sequence[int]) -> list[int]:
        """The short online prompt: the latest ``recent_items`` items, then the (cached or empty) think block."""
        from onerec_dist.reasoning.cot_format import close_think, inference_prompt

        recent = list(history)[-self.cfg.recent_items:]
        prefix = inference_prompt(self.tokenizer, self.think, self.item_codes, recent)
        text = self.cache.best_rationale(user) if (self.cfg.use_rationale and self.cache is not None) else None
        body = self.think.body_ids(self.tokenizer, text) if text else None
        return close_think(self.think, prefix, body)

    def recommend(self, users: Sequence[str], histories: Sequence[Sequence[int]], k: int | None = None
                  ) -> list[Recommendation]:
        """Top-k (default max_k) items per request; cached users below their prefixes, others over the whole
        catalogue (fallback), all in one decode."""
        from onerec_dist.decoding.constraints import AllowedPrefixes

        if len(users) != len(histories) or not users:
            raise ValueError(f"recommend needs one history per user, got {len(users)} users, {len(histories)} "
                             "histories")
        k = self.cfg.max_k if k is None else k
        rows = [self.cache.get(u) if self.cache is not None else None for u in users]
        prompts = [self.prompt(str(u), h) for u, h in zip(users, histories)]
        allowed = None
        if any(r is not None for r in rows):
            allowed = AllowedPrefixes.from_lists(rows, num_levels=self.cache.prefix_levels)
        out = self.decoder.decode(prompts, allowed_prefixes=allowed)
        items, scores = out.items[:, :k].cpu().tolist(), out.scores[:, :k].float().cpu().tolist()
        result = []
        for row, its, scs in zip(rows, items, scores):
            path = "cached" if row is not None else "fallback"
            self.counts[path] += 1
            keep = [j for j, item in enumerate(its) if item >= 0]  # fewer reachable items than k: drop dead slots
            result.append(Recommendation([its[j] for j in keep], [scs[j] for j in keep], path))
        return result


def build_shards(model, tokenizer, item_tok, item_codes: np.ndarray, users: Sequence[str],
                 histories: Sequence[Sequence[int]], cfg, cache_dir: str | Path, numbers: Sequence[int],
                 fingerprints: Fingerprints, progress=None) -> int:
    """Build and write shards ``numbers`` (of ``shard_ranges(len(users), cfg.shard_size)``) in this process; the
    per-shard core of both the single process and the Ray workers. Returns the number of users written."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = prefix_decoder(model, item_tok, item_codes, cfg, pad)
    ranges = shard_ranges(len(users), cfg.shard_size)
    written = 0
    for number in numbers:
        lo, hi = ranges[number]
        columns = build_shard(model, tokenizer, decoder, item_codes, users[lo:hi], histories[lo:hi], cfg,
                              seed=cfg.seed + number)
        write_shard(shard_path(cache_dir, number), columns, fingerprints, cfg.prefix_levels)
        written += hi - lo
        if progress is not None:
            progress(1)
    return written
