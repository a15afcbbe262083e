"""Think-Ahead (OneRec-Think, arXiv:2510.11639, Sec. 4.4): reasoning is split into an offline and an online part.

Offline (``build_shard``): per user, T sampled rationales after the user's inference prompt (``cot_format``), each
closed with </think>, then a partial beam search over the first m ID levels with beam width b
(``ConstrainedDecoder.decode_prefixes``); the user's cache entry is the union of the T * b prefixes
(``AllowedPrefixes.union_of_groups``: sorted, unique, at most T * b of them) and the rationale texts.

Online (``ThinkAheadService.recommend``): from a short prompt (the latest ``recent_items`` items, with an empty think
block, or the cached rationale with the best prefix score), decode the remaining L - m levels below the user's cached
prefixes (``decode(allowed_prefixes=...)``). A user without a cache entry is decoded over the whole catalogue in the
same batch (an unrestricted row): the fallback, counted in ``ThinkAheadService.counts``.

Data with several domains (OneReason; onerec_dist/data/domains.py, decoding/domains.py): both parts stay inside the
user's domain. Offline, the prompts name the domain and the partial search runs under the user's
``DomainRestriction`` (its pure m_d-level prefixes). Online, a row's prefixes are the cached ones that lie inside the
domain, at level M = max(m, m_d) (an m-level prefix with m < m_d can be shared by two domains, so it is refined to
the domain's m_d-level prefixes below it); a user without a cache entry (or none inside the domain) is decoded over
the domain's catalogue: the fallback is restricted too. The user's domain comes from the request, else the cache,
else the domain of the latest history item (each item lies in one domain). ``CatalogueDomains`` (names + pure
prefixes, codes only) is written into the manifest, so the server needs no dataset.

Cache on disk (``cache_dir``): ``manifest.json`` (fingerprints, settings, shard count, domains or null) and one
Parquet file per shard ``shard-00000.parquet`` (columns user, prefixes [P, m], rationales [T], rationale_scores [T],
domain (index, -1: none); the fingerprints again in the schema metadata). A shard file is written atomically, so a
re-run skips exactly the finished shards. The fingerprints bind the cache to one model and one ID table:
``load_cache`` refuses a cache built for another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class CatalogueDomains:
    """The domains a cache was built for: names and their pure prefixes (decoding/domains.DomainPrefixes)."""

    names: tuple[str, ...]
    prefixes: Any  # decoding/domains.DomainPrefixes

    def to_json(self) -> dict:
        return {"names": list(self.names), "prefix_levels": self.prefixes.num_levels,
                "prefixes": [p.tolist() for p in self.prefixes.prefixes]}

    @classmethod
    def from_json(cls, found: dict | None) -> CatalogueDomains | None:
        import torch

        from onerec_dist.decoding.domains import DomainPrefixes

        if not found:
            return None
        m = int(found["prefix_levels"])
        sets = tuple(torch.tensor(p, dtype=torch.long).reshape(-1, m) for p in found["prefixes"])
        return cls(tuple(found["names"]), DomainPrefixes(m, sets))

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"domain {name!r} is unknown; allowed values: {', '.join(self.names)}")
        return self.names.index(name)


def group_by_prefix(rows: np.ndarray, s: int) -> dict[tuple[int, ...], list[list[int]]]:
    """``rows`` [A, M] grouped by their first ``s`` codes (s <= M), order kept: built once, so the rows below a set
    of s-prefixes are one dict lookup per prefix (``rows_below``), not a scan of all A rows per request."""
    groups: dict[tuple[int, ...], list[list[int]]] = {}
    for row in np.asarray(rows).tolist():
        groups.setdefault(tuple(row[:s]), []).append(row)
    return groups


def rows_below(groups: dict[tuple[int, ...], list[list[int]]], shallower) -> list[list[int]]:
    """The grouped rows whose first s codes are a row of ``shallower`` [B, s]: with both sets made of catalogue
    prefixes, the items below the result are the items below both sets (sorted when both inputs are)."""
    return [row for prefix in np.asarray(shallower).tolist() for row in groups.get(tuple(prefix), ())]


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
                histories: Sequence[Sequence[int]], cfg, seed: int, restriction=None,
                domain_names: Sequence[str] | None = None) -> dict[str, list]:
    """Cache rows of ``users``: {"user", "prefixes" [P_u, m], "rationales" [T], "rationale_scores" [T], "domain"}
    columns.

    ``decoder`` is a ``prefix_decoder``; ``seed`` makes the sampled rationales repeatable per shard. Data with
    several domains: ``restriction`` (decoding/domains.DomainRestriction over ``users``) keeps each user's prefixes
    inside its domain and ``domain_names`` (the D names) names the domain in the prompt."""
    import torch

    from onerec_dist.decoding.constraints import AllowedPrefixes
    from onerec_dist.reasoning.cot_format import ThinkTokens, close_think, inference_prompt
    from onerec_dist.reasoning.think_eval import generate_rationales

    think = ThinkTokens.from_tokenizer(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    T = cfg.num_rationales
    own = restriction.user_domains.tolist() if restriction is not None else [-1] * len(users)  # [U]
    names = [domain_names[d] if d >= 0 and domain_names is not None else None for d in own]
    prompts = [inference_prompt(tokenizer, think, item_codes, h, domain=name) for h, name in zip(histories, names)]
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
        allowed = restriction.repeat(T).allowed(range(len(repeated))) if restriction is not None else None
        result = decoder.decode_prefixes(closed, cfg.prefix_levels, allowed_prefixes=allowed)  # [U*T, b, m]
    model.train(was_training)
    union = AllowedPrefixes.union_of_groups(result.prefixes, T)  # U rows, sorted unique prefixes
    ends = union.offsets.tolist()
    codes = union.codes.tolist()
    best = result.scores[:, 0].float().view(len(users), T).cpu().numpy()  # [U, T] best prefix score per rationale
    texts = [tokenizer.decode(b, skip_special_tokens=True).strip() for b in bodies]
    return {"user": [str(u) for u in users],
            "prefixes": [codes[ends[u]:ends[u + 1]] for u in range(len(users))],
            "rationales": [texts[u * T:(u + 1) * T] for u in range(len(users))],
            "rationale_scores": [best[u].tolist() for u in range(len(users))], "domain": own}


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
                        ("rationales", pa.list_(pa.string())), ("rationale_scores", pa.list_(pa.float64())),
                        ("domain", pa.int64())],
                       metadata={"format": CACHE_FORMAT, "model_fingerprint": fingerprints.model,
                                 "table_fingerprint": fingerprints.table, "prefix_levels": str(prefix_levels)})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def prepare_cache_dir(cache_dir: str | Path, fingerprints: Fingerprints, cfg, users: Sequence[str],
                      domains: CatalogueDomains | None = None) -> list[int]:
    """Write (or check) the manifest; returns the shard numbers still to build. A cache dir holding a cache of
    another model, ID table, user list, settings or domains is refused (build into a new directory)."""
    cache_dir, shard_size = Path(cache_dir), cfg.shard_size
    cache_dir.mkdir(parents=True, exist_ok=True)
    users_digest = hashlib.sha256("\n".join(map(str, users)).encode()).hexdigest()
    manifest = {"format": CACHE_FORMAT, "model_fingerprint": fingerprints.model,
                "table_fingerprint": fingerprints.table, "settings": cache_settings(cfg), "num_users": len(users),
                "users_sha256": users_digest, "shard_size": shard_size,
                "num_shards": len(shard_ranges(len(users), shard_size)),
                "domains": domains.to_json() if domains is not None else None}
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
    domains: CatalogueDomains | None = None  # data with several domains; None: one
    user_domains: dict[str, int] = field(default_factory=dict)  # user -> domain index (domains only)

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
    cache = ThinkAheadCache(found, int(manifest["settings"]["prefix_levels"]),
                            domains=CatalogueDomains.from_json(manifest.get("domains")))
    for shard in sorted(cache_dir.glob("shard-*.parquet")):
        table = pq.read_table(shard)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if (meta.get("model_fingerprint"), meta.get("table_fingerprint")) != (found.model, found.table):
            raise ValueError(f"{shard} was written for another model or ID table than {path} records")
        columns = table.to_pydict()
        own = columns.get("domain") or [-1] * len(columns["user"])  # caches written before domains have none
        for user, prefixes, texts, scores, domain in zip(columns["user"], columns["prefixes"], columns["rationales"],
                                                         columns["rationale_scores"], own):
            order = np.argsort(-np.asarray(scores), kind="stable")
            cache.prefixes[user] = prefixes
            cache.rationales[user] = [texts[i] for i in order]
            if domain is not None and domain >= 0:
                cache.user_domains[user] = int(domain)
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
    """Online completion over one model and its cache. ``recommend`` decodes a batch of requests in one call.
    ``domains`` (data with several domains; default: the cache's) keeps every answer inside the user's domain."""

    def __init__(self, model, tokenizer, item_tok, item_codes: np.ndarray, cache: ThinkAheadCache | None, cfg,
                 domains: CatalogueDomains | None = None):
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
        self.domains = domains if domains is not None else (cache.domains if cache is not None else None)
        if self.domains is not None:
            self._init_domains()
        self.counts = {path: 0 for path in PATHS}

    def _init_domains(self) -> None:
        """Per domain, its prefixes at level M = max(m, m_d) (the level of every row of a decode), and the domain of
        each pure m_d-level prefix (to read a user's domain off an item of its history). Everything a request's row
        needs is indexed here once (``_domain_row`` only looks up)."""
        pure = self.domains.prefixes  # DomainPrefixes, level m_d
        cached = self.cache.prefix_levels if self.cache is not None else pure.num_levels  # m
        self.levels = max(cached, pure.num_levels)  # M
        by_pure = group_by_prefix(np.unique(self.item_codes[:, :self.levels], axis=0), pure.num_levels)
        self.domain_sets = [rows_below(by_pure, p.numpy()) for p in pure.prefixes]  # [D] each [P_d, M] lists
        # m < m_d: the M-level rows of each domain (and of the catalogue) under each cached m-level prefix
        self.domain_below = [group_by_prefix(rows, cached) for rows in self.domain_sets]
        self.catalogue_below = group_by_prefix([r for rows in self.domain_sets for r in rows], cached)
        self.domain_of_prefix = {tuple(p): d for d, ps in enumerate(pure.prefixes) for p in ps.tolist()}

    @property
    def domain_names(self) -> tuple[str, ...]:
        return self.domains.names if self.domains is not None else ()

    def user_domain(self, user: str, history: Sequence[int], name: str | None = None) -> int:
        """The request's domain (``name``), else the cache's, else the latest history item's; -1: no domains."""
        if self.domains is None:
            if name is not None:
                raise ValueError(f"domain {name!r} given, but the catalogue has a single domain")
            return -1
        if name is not None:
            return self.domains.index(name)
        if self.cache is not None and str(user) in self.cache.user_domains:
            return self.cache.user_domains[str(user)]
        if history:
            code = self.item_codes[int(list(history)[-1])][:self.domains.prefixes.num_levels]
            return self.domain_of_prefix.get(tuple(int(c) for c in code), -1)
        return -1

    def prompt(self, user: str, history: Sequence[int], domain: str | None = None) -> list[int]:
        """The short online prompt: the latest ``recent_items`` items (and the domain's name), then the (cached or
        empty) think block."""
        from onerec_dist.reasoning.cot_format import close_think, inference_prompt

        recent = list(history)[-self.cfg.recent_items:]
        prefix = inference_prompt(self.tokenizer, self.think, self.item_codes, recent, domain=domain)
        text = self.cache.best_rationale(user) if (self.cfg.use_rationale and self.cache is not None) else None
        body = self.think.body_ids(self.tokenizer, text) if text else None
        return close_think(self.think, prefix, body)

    def _domain_row(self, cached: list[list[int]] | None, domain: int):
        """(the row's prefixes at level M or None = unrestricted, path) on data with domains (module docstring)."""
        inside: list[list[int]] = []
        if cached is not None and len(cached):
            m = len(cached[0])
            if domain < 0:  # unknown domain: the cached set as it is, at level M
                inside = [list(p) for p in cached] if m == self.levels else rows_below(self.catalogue_below, cached)
            elif m == self.levels:  # m >= m_d: the cached prefixes that lie below one of the domain's pure prefixes
                pure_m = self.domains.prefixes.num_levels
                inside = [list(p) for p in cached if self.domain_of_prefix.get(tuple(p[:pure_m])) == domain]
            else:  # m < m_d = M: the domain's pure prefixes below the cached (possibly shared) prefixes
                inside = rows_below(self.domain_below[domain], cached)
        if inside:
            return inside, "cached"
        return (None, "fallback") if domain < 0 else (self.domain_sets[domain], "fallback")

    def recommend(self, users: Sequence[str], histories: Sequence[Sequence[int]], k: int | None = None,
                  domains: Sequence[str | None] | None = None) -> list[Recommendation]:
        """Top-k (default max_k) items per request; cached users below their prefixes, others over the whole
        catalogue (fallback), all in one decode. Data with several domains: every row inside its user's domain;
        ``domains`` [B] names each request's domain (None: the cache's, else the latest history item's)."""
        from onerec_dist.decoding.constraints import AllowedPrefixes

        if len(users) != len(histories) or not users:
            raise ValueError(f"recommend needs one history per user, got {len(users)} users, {len(histories)} "
                             "histories")
        k = self.cfg.max_k if k is None else k
        rows = [self.cache.get(u) if self.cache is not None else None for u in users]
        names = list(domains) if domains is not None else [None] * len(users)
        if self.domains is None:
            prompts = [self.prompt(str(u), h) for u, h in zip(users, histories)]
            paths = ["cached" if row is not None else "fallback" for row in rows]
            allowed = None
            if any(r is not None for r in rows):
                allowed = AllowedPrefixes.from_lists(rows, num_levels=self.cache.prefix_levels)
        else:
            own = [self.user_domain(str(u), h, n) for u, h, n in zip(users, histories, names)]
            prompts = [self.prompt(str(u), h, self.domains.names[d] if d >= 0 else None)
                       for u, h, d in zip(users, histories, own)]
            rows, paths = zip(*[self._domain_row(row, d) for row, d in zip(rows, own)])
            allowed = AllowedPrefixes.from_lists(list(rows), num_levels=self.levels)
        out = self.decoder.decode(prompts, allowed_prefixes=allowed)
        items, scores = out.items[:, :k].cpu().tolist(), out.scores[:, :k].float().cpu().tolist()
        result = []
        for path, its, scs in zip(paths, items, scores):
            self.counts[path] += 1
            keep = [j for j, item in enumerate(its) if item >= 0]  # fewer reachable items than k: drop dead slots
            result.append(Recommendation([its[j] for j in keep], [scs[j] for j in keep], path))
        return result


def build_shards(model, tokenizer, item_tok, item_codes: np.ndarray, users: Sequence[str],
                 histories: Sequence[Sequence[int]], cfg, cache_dir: str | Path, numbers: Sequence[int],
                 fingerprints: Fingerprints, progress=None, restriction=None,
                 domain_names: Sequence[str] | None = None) -> int:
    """Build and write shards ``numbers`` (of ``shard_ranges(len(users), cfg.shard_size)``) in this process; the
    per-shard core of both the single process and the Ray workers. Returns the number of users written. Data with
    several domains: ``restriction`` (decoding/domains.DomainRestriction over ``users``) and ``domain_names`` (the
    D names), as in ``build_shard``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = prefix_decoder(model, item_tok, item_codes, cfg, pad)
    ranges = shard_ranges(len(users), cfg.shard_size)
    written = 0
    for number in numbers:
        lo, hi = ranges[number]
        part = restriction.take(range(lo, hi)) if restriction is not None else None
        columns = build_shard(model, tokenizer, decoder, item_codes, users[lo:hi], histories[lo:hi], cfg,
                              seed=cfg.seed + number, restriction=part, domain_names=domain_names)
        write_shard(shard_path(cache_dir, number), columns, fingerprints, cfg.prefix_levels)
        written += hi - lo
        if progress is not None:
            progress(1)
    return written
