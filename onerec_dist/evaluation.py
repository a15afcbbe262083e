"""Evaluation pieces shared by `onerec eval` and its Ray shards: prompts, length batching, decoding, baselines.

Pure and single-device; onerec_dist/distributed/eval_shards.py deals whole batches to Ray workers.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from onerec_dist.baselines.config import SASRecConfig
from onerec_dist.config import from_section, require
from onerec_dist.data.types import Examples
from onerec_dist.reasoning.think_eval import ThinkEvalConfig

BASELINES = ("popular", "hf_generate", "sasrec")


@dataclass
class EvalConfig:
    split: Literal["test", "valid"] = "test"
    beam_width: int = 20
    top_k: int = 20
    normalization: Literal["full", "valid"] = "full"
    batch_size: int = 32
    max_users: int | None = None
    user_sample: Literal["first", "random"] = "first"
    exclude_history: bool = False
    baseline: str | list[str] = "popular"
    model: bool = True
    num_workers: int = 1
    use_gpu: bool = False
    device: str = "auto"
    step_impl: Literal["auto", "triton", "reference"] = "auto"
    ks: list[int] = (1, 5, 10, 20)
    ndcg_ks: list[int] = (5, 10, 20)
    save_predictions: bool = True
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    reasoning: ThinkEvalConfig = field(default_factory=ThinkEvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.baseline, str):
            self.baseline = [] if self.baseline in ("none", "") else [self.baseline]
        for name in self.baseline:
            require(name in BASELINES, "eval.baseline", f"{name!r} is not allowed; allowed values: "
                    f"{', '.join(BASELINES)} (a list, a single name, or none)")
        require(self.top_k >= 1, "eval.top_k", "must be >= 1")
        require(self.beam_width >= self.top_k, "eval.beam_width", f"must be >= eval.top_k={self.top_k}")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        require(self.num_workers >= 1, "eval.num_workers", "must be >= 1")
        require(self.max_users is None or self.max_users >= 1, "eval.max_users", "must be >= 1 or null")
        require(max(self.ks) <= self.top_k, "eval.ks", f"largest K {max(self.ks)} exceeds eval.top_k={self.top_k}")
        require(max(self.ndcg_ks) <= self.top_k, "eval.ndcg_ks", f"largest K exceeds eval.top_k={self.top_k}")
        require(self.model or bool(self.baseline), "eval.model", "false with no baseline: nothing to evaluate")


def select_users(examples: Examples, max_users: int | None, how: str, seed: int) -> Examples:
    """At most ``max_users`` of the split's users: the first ones (dataset order), or a seeded random sample kept
    in dataset order ("random": on data with domains, the first users are all of one domain)."""
    from onerec_dist.training.validation import sample_users  # the validation sample's draw: one sampler

    if max_users is None or max_users >= len(examples):
        return examples
    keep = np.arange(max_users) if how == "first" else sample_users(len(examples), max_users, seed)
    return examples.take(keep)


def eval_config(cfg) -> EvalConfig:
    """The validated ``eval`` section of a composed config."""
    return from_section(EvalConfig, cfg, "eval")


def build_decoder(model, item_tok, item_codes: np.ndarray, eval_cfg: EvalConfig, pad_token_id: int):
    """The constrained beam-search decoder of ``eval_cfg`` over the catalogue's item codes [N, L]: the one place
    decoders are built for evaluation (single process and Ray shards)."""
    import torch

    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.sid.prefix_index import PrefixIndex

    codes = torch.as_tensor(item_codes)  # [N, L]
    return ConstrainedDecoder(model, item_tok, PrefixIndex.build(codes, item_tok.codebook_sizes), eval_cfg.beam_width,
                              eval_cfg.top_k, eval_cfg.normalization, eval_cfg.step_impl, pad_token_id,
                              item_codes=codes)


def build_prompts(tokenizer, examples: Examples, item_codes: np.ndarray,
                  domains: list[str] | None = None) -> list[list[int]]:
    """Token ids of the next-item prompt of every user (the same rendering training uses); ``domains`` [U]: each
    user's domain name, named in the prompt (data with several domains; None: single domain)."""
    from onerec_dist.prompts import next_item_question, render_prompt

    names = domains if domains is not None else [None] * len(examples.histories)
    return [render_prompt(tokenizer, next_item_question([item_codes[i] for i in history], domain))
            for history, domain in zip(examples.histories, names)]


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """User positions grouped into batches of similar prompt length (stable sort: deterministic)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def decode_batches(decoder, prompts, histories, batches, exclude_history: bool, progress: bool = True,
                   restriction=None):
    """Run the decoder over ``batches``; returns {batch index: (items [b, K], scores [b, K])} as numpy.
    ``restriction`` (decoding/domains.DomainRestriction over the user positions): each user decodes only its
    domain's items."""
    from onerec_dist.progress import Progress

    results = {}
    with Progress(len(batches), "eval", unit="batch", mode=None if progress else "off") as bar:
        for number, batch in enumerate(batches):
            exclude = [histories[i] for i in batch] if exclude_history else None
            allowed = restriction.allowed(batch) if restriction is not None else None
            out = decoder.decode([prompts[i] for i in batch], exclude=exclude, allowed_prefixes=allowed)
            results[number] = (out.items.cpu().numpy(), out.scores.float().cpu().numpy())
            bar.update(1)
    return results


def merge_batches(results: dict, batches: list[list[int]], num_users: int, top_k: int):
    """Scatter per-batch results back to user order: items [U, K], scores [U, K]."""
    items = np.full((num_users, top_k), -1, dtype=np.int64)
    scores = np.full((num_users, top_k), -np.inf, dtype=np.float32)
    for number, batch in enumerate(batches):
        batch_items, batch_scores = results[number]
        items[batch] = batch_items
        scores[batch] = batch_scores
    return items, scores


def training_item_counts(sequences: dict[str, list[int]], given_train: Examples | None, leave_one_out: bool) -> Counter:
    """Interactions the popularity baseline may see: training interactions only (never the held-out targets)."""
    counts: Counter = Counter()
    if leave_one_out:
        for seq in sequences.values():
            counts.update(seq[:-2])
    elif given_train is not None:
        for history, target in zip(given_train.histories, given_train.targets):
            counts.update(history + [target])
    return counts


def most_popular(counts: Counter, num_items: int, top_k: int, num_users: int, item_domains: np.ndarray | None = None,
                 user_domains: np.ndarray | None = None) -> np.ndarray:
    """The K most frequent training items (ties: lower index first) for every user: [U, K]. With ``item_domains``
    [N] and ``user_domains`` [U] (data with several domains): the K most frequent items of each user's domain
    (-1 past a domain's item count)."""
    frequency = np.zeros(num_items, dtype=np.int64)
    for item, count in counts.items():
        frequency[item] = count
    ranked = np.lexsort((np.arange(num_items), -frequency))  # [N] best first
    if item_domains is None or user_domains is None:
        return np.tile(ranked[:top_k], (num_users, 1))
    items = np.full((num_users, top_k), -1, dtype=np.int64)
    for domain in np.unique(user_domains):
        own = ranked[np.asarray(item_domains)[ranked] == domain][:top_k]  # the domain's items, best first
        items[np.asarray(user_domains) == domain, :len(own)] = own
    return items


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
