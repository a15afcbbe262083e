"""Model selection during training, as recommenders are trained: validation Recall@10 every ``trainer.validate_every``
steps on a fixed sample of validation users, the best step's model exported, early stopping by patience, and the
learning curve (metric against step and wall time) in the summary and as a plot.

Contract with the engine (onerec_dist/distributed/worker.py): a TrainJob MAY have ``validate(model, step) ->
dict[str, float]``; every rank calls it (model in eval mode, under no_grad) and returns *sums* over the validation
users it scored plus their number under ``"users"`` (a rank may score none). The loop all-reduces the sums, divides
by the users and hands the means to :class:`ValidationTracker` — so every rank takes the same keep / stop decision.
``validate_recommender`` is such a function for item recommendation (constrained beam search over the catalogue,
users sharded over ranks by position).

Pure: torch only, no deepspeed / ray import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ValidationTracker:
    """The learning curve and the best point of ``metric`` (higher is better). Kept in the loop's checkpointed
    state (``as_state`` / ``from_state``), so a resumed run continues the same curve and patience count."""

    metric: str = "recall@10"
    patience: int | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float = float("-inf")
    evaluations_since_best: int = 0

    def record(self, step: int, seconds: float, metrics: dict[str, float]) -> bool:
        """Add a point; True when it is strictly better than every earlier one (ties keep the earlier step)."""
        if self.metric not in metrics:
            raise ValueError(f"validation returned {sorted(metrics)} but trainer.select_metric={self.metric!r}")
        self.curve.append({"step": step, "seconds": round(seconds, 3), **metrics})
        if metrics[self.metric] > self.best_value:
            self.best_step, self.best_value, self.evaluations_since_best = step, float(metrics[self.metric]), 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Patience exhausted: ``patience`` evaluations in a row without a new best."""
        return self.patience is not None and self.evaluations_since_best >= self.patience

    def as_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, metric: str, patience: int | None) -> "ValidationTracker":
        if not state:
            return cls(metric, patience)
        return cls(**{**state, "metric": metric, "patience": patience})

    def summary(self) -> dict[str, Any]:
        return {"metric": self.metric, "best_step": self.best_step,
                "best_value": None if self.best_step is None else self.best_value, "curve": self.curve,
                "stopped_early": self.should_stop}


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{name: sum} with ``users`` -> {name: sum / users} (the all-reduced result of every rank's ``validate``)."""
    users = sums.get("users", 0.0)
    if users <= 0:
        raise ValueError("validation scored no user on any rank")
    return {k: v / users for k, v in sums.items() if k != "users"}


def plot_learning_curve(curve: list[dict[str, float]], metric: str, path: str | Path) -> Path | None:
    """``metric`` against step (bottom axis) and wall time (top axis) as a PNG; None without matplotlib or points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not curve:
        return None
    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [p[metric] for p in curve], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    if len(curve) > 1:
        seconds = [p["seconds"] for p in curve]
        top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, seconds),
                                                   lambda t: np.interp(t, seconds, steps)))
        top.set_xlabel("wall time (s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_users(num_users: int, limit: int | None, seed: int) -> np.ndarray:
    """Fixed, sorted sample of ``limit`` user positions out of ``num_users`` (all when limit is None or larger)."""
    if limit is None or limit >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng([seed, 7]).choice(num_users, size=limit, replace=False))


def domain_sample(sample: dict) -> dict | None:
    """The domain part of a validation sample (stages/align.write_validation_sample): {"names": [D],
    "item_domains": [N], "user_domains": [U]}, or None for single-domain data."""
    if "domain_names" not in sample:
        return None
    return {"names": sample["domain_names"], "item_domains": sample["item_domains"],
            "user_domains": sample["user_domains"]}


def validate_recommender(model, tokenizer, item_codes: np.ndarray, histories: list[list[int]], targets: list[int],
                         rank: int, world_size: int, beam_width: int = 20, top_k: int = 10,
                         batch_size: int = 64, ks: tuple[int, ...] = (10,), domains: dict | None = None
                         ) -> dict[str, float]:
    """This rank's share of the validation users (positions rank, rank + W, ...): constrained beam search over the
    catalogue, returning sums {recall@k, ndcg@k for k in ks, users} for ``mean_metrics`` after the all-reduce.
    ``domains`` (``domain_sample``): prompts name each user's domain and decoding stays inside its catalogue."""
    from onerec_dist.data.types import Examples
    from onerec_dist.evaluation import build_decoder, build_prompts, decode_batches, length_batches, merge_batches
    from onerec_dist.evaluation import EvalConfig
    from onerec_dist.metrics import target_ranks
    from onerec_dist.sid.tokens import ItemTokenizer

    mine = list(range(rank, len(targets), world_size))
    sums: dict[str, float] = {"users": float(len(mine))}
    for k in ks:
        sums[f"recall@{k}"] = sums[f"ndcg@{k}"] = 0.0
    if not mine:
        return sums
    examples = Examples([""] * len(mine), [histories[i] for i in mine], [targets[i] for i in mine])
    eval_cfg = EvalConfig(beam_width=beam_width, top_k=top_k, ks=[top_k], ndcg_ks=[top_k], baseline=[])
    decoder = build_decoder(model, ItemTokenizer.from_tokenizer(tokenizer), item_codes, eval_cfg,
                            tokenizer.pad_token_id or 0)
    restriction, names = None, None
    if domains is not None:
        from onerec_dist.decoding.domains import DomainPrefixes, DomainRestriction

        user_domains = np.asarray(domains["user_domains"], dtype=np.int64)[mine]  # [u] of this rank's users
        names = [domains["names"][d] for d in user_domains.tolist()]
        restriction = DomainRestriction(DomainPrefixes.build(item_codes, domains["item_domains"],
                                                             len(domains["names"])), user_domains)
    prompts = build_prompts(tokenizer, examples, item_codes, names)
    batches = length_batches(prompts, batch_size)
    results = decode_batches(decoder, prompts, examples.histories, batches, False, progress=False,
                             restriction=restriction)
    items, _ = merge_batches(results, batches, len(prompts), top_k)
    ranks = target_ranks(items, examples.targets)  # [U] 1-based, 0 = miss
    for k in ks:
        hit = (ranks >= 1) & (ranks <= k)
        sums[f"recall@{k}"] = float(hit.sum())
        sums[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1), 0.0).sum())
    return sums
