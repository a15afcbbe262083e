"""Thinking vs non-thinking evaluation (OneRec-Think, arXiv:2510.11639, Sec. 4.2 "inference with thinking"):
`onerec eval eval.reasoning.mode=none|think|both|auto`.

Per user, from the one answer format (onerec_dist.reasoning.cot_format):
  * think: ``inference_prompt`` (history prompt + <think>) -> the model writes the rationale (greedy, or sampled with
    ``eval.reasoning.do_sample``; batched ``generate`` with its KV cache), stopping at </think> or after
    ``eval.reasoning.max_think_tokens`` tokens; a rationale that runs over is force-closed and counted
    (``unclosed_share``) -> ``close_think`` -> constrained beam search over the whole catalogue after it;
  * nothink: the same prompt with an empty think block (``close_think(prompt, None)``) -> the same beam search.
Both modes use the same users, the same decoder (beam width, top-K, normalisation, catalogue, exclusion).

With ``both``:
  * ``paired.delta_recall@10``: the mean over users of hit_think - hit_nothink (hit = target in the top 10), and the
    95 % percentile interval of a paired bootstrap over users (``paired_bootstrap``: resample users with
    replacement, ``num_resamples`` times, seeded; the two modes of a user stay together, Efron & Tibshirani 1993,
    Ch. 13);
  * ``delta_ll``: mean over users of log p(target | own rationale) - log p(target | empty think block), the
    teacher-forced log-prob of the target's ID tokens from the decoder's item-scoring mode (``score_items``);
  * ``unclosed_share``: share of users whose rationale hit the token cap.

This module never imports a teacher (onerec_dist.reasoning.teachers): evaluation sees only the model under test.
``think_decode_batches`` is the per-batch core shared by the single process and the Ray shards
(onerec_dist.distributed.eval_shards.think_sharded); the shards return per-user items, log-likelihoods and cap
flags, so hits and the paired bootstrap are computed on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from onerec_dist.config import require

THINK_MODES = ("auto", "none", "think", "both")
PAIRED_K = 10  # the K of paired.delta_recall@K


@dataclass
class ThinkEvalConfig:
    """``eval.reasoning`` (conf/eval/default.yaml documents every field)."""

    mode: Literal["auto", "none", "think", "both"] = "auto"
    max_think_tokens: int = 264
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    num_resamples: int = 1000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        require(self.mode in THINK_MODES, "eval.reasoning.mode",
                f"{self.mode!r} is not allowed; allowed values: {', '.join(THINK_MODES)}")
        require(self.max_think_tokens >= 1, "eval.reasoning.max_think_tokens", "must be >= 1")
        require(self.temperature > 0, "eval.reasoning.temperature", "must be > 0")
        require(0 < self.top_p <= 1, "eval.reasoning.top_p", "must be in (0, 1]")
        require(self.num_resamples >= 1, "eval.reasoning.num_resamples", "must be >= 1")


def has_think_tokens(tokenizer) -> bool:
    from onerec_dist.reasoning.cot_format import THINK_BEGIN, THINK_END

    vocab = tokenizer.get_vocab()
    return THINK_BEGIN in vocab and THINK_END in vocab


def resolve_mode(mode: str, tokenizer) -> str:
    """``auto``: both when the model has <think> / </think> (a CoT-trained export), none otherwise."""
    if mode == "auto":
        return "both" if has_think_tokens(tokenizer) else "none"
    if mode != "none" and not has_think_tokens(tokenizer):
        raise ValueError(f"eval.reasoning.mode={mode} needs a model with <think> / </think> (the reason_sft export); "
                         "this model has none: use eval.reasoning.mode=none")
    return mode


# ---------------------------------------------------------------------------------------------- statistics


def hits_at_k(items: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """[U] 1.0 where the target is among the first k of ``items`` [U, K], else 0.0."""
    return (np.asarray(items)[:, :k] == np.asarray(targets)[:, None]).any(1).astype(np.float64)


def paired_bootstrap(values_a: np.ndarray, values_b: np.ndarray, num_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of a - b over users and its percentile bootstrap interval: resample the U users with replacement
    ``num_resamples`` times (the pair (a_u, b_u) stays together), take each resample's mean difference, and report
    the (1 - level) / 2 and (1 + level) / 2 quantiles. {"mean", "ci95": [low, high], "num_users", "num_resamples"}."""
    diff = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)  # [U]
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty vectors, got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    step = max(1, 4_000_000 // diff.size)  # resamples per chunk: bounds the [chunk, U] index matrix
    for lo in range(0, num_resamples, step):
        n = min(step, num_resamples - lo)
        means[lo:lo + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)], "num_users": int(diff.size),
            "num_resamples": int(num_resamples)}


# ---------------------------------------------------------------------------------------------- generation


def generate_rationales(model, think, prompts: list[list[int]], max_think_tokens: int, pad_token_id: int, *,
                        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0
                        ) -> tuple[list[list[int]], np.ndarray]:
    """Rationale body ids after each prompt (each ends with <think>) and [b] bool ``closed``: one batched
    ``generate`` (left padding, KV cache) that stops a row at </think> or after ``max_think_tokens``. A row that
    never wrote </think> keeps all its tokens as the body (force-closed later by ``close_think``)."""
    import torch

    device = model.get_output_embeddings().weight.device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # [b, W]
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [b, W]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if do_sample:
        torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_think_tokens,
                         pad_token_id=pad_token_id, eos_token_id=think.end_id, use_cache=True, **sampling)  # [b, W+T]
    bodies, closed = [], np.zeros(len(prompts), dtype=bool)
    for row, generated in enumerate(out[:, width:].tolist()):
        if think.end_id in generated:
            closed[row] = True
            generated = generated[:generated.index(think.end_id)]
        bodies.append(generated)
    return bodies, closed


def think_decode_batches(decoder, model, tokenizer, item_codes: np.ndarray, histories, targets, batches,
                         numbers: list[int], eval_cfg, mode: str, progress: bool = True, domains=None,
                         restriction=None) -> dict:
    """{batch number: per-user arrays of that batch} for ``numbers`` of ``batches`` (lists of user positions):
    items_think / items_nothink [b, K], ll_think / ll_nothink [b] (mode both), closed [b], think_tokens [b].
    Data with several domains: ``domains`` [U] names each user's domain in the prompt, ``restriction``
    (decoding/domains.DomainRestriction over the user positions) keeps both decodes in the user's catalogue."""
    import torch

    from onerec_dist.progress import Progress
    from onerec_dist.reasoning.cot_format import ThinkTokens, close_think, inference_prompt

    think = ThinkTokens.from_tokenizer(tokenizer)
    cfg = eval_cfg.reasoning
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), Progress(len(numbers), f"eval ({mode})", unit="batch",
                                   mode=None if progress else "off") as bar:
        for number in numbers:
            users = batches[number]
            prompts = [inference_prompt(tokenizer, think, item_codes, histories[u],
                                        domain=domains[u] if domains is not None else None) for u in users]
            exclude = [list(histories[u]) for u in users] if eval_cfg.exclude_history else None
            allowed = restriction.allowed(users) if restriction is not None else None
            bodies, closed = generate_rationales(model, think, prompts, cfg.max_think_tokens, pad,
                                                 do_sample=cfg.do_sample, temperature=cfg.temperature,
                                                 top_p=cfg.top_p, seed=cfg.seed + number)
            think_prefixes = [close_think(think, p, b) for p, b in zip(prompts, bodies)]
            empty_prefixes = [close_think(think, p, None) for p in prompts]
            out = {"closed": closed, "think_tokens": np.array([len(b) for b in bodies])}
            out["items_think"] = decoder.decode(think_prefixes, exclude=exclude,
                                                allowed_prefixes=allowed).items.cpu().numpy()
            if mode == "both":
                out["items_nothink"] = decoder.decode(empty_prefixes, exclude=exclude,
                                                      allowed_prefixes=allowed).items.cpu().numpy()
                target = torch.as_tensor([[int(targets[u])] for u in users])  # [b, 1]
                out["ll_think"] = decoder.score_items(think_prefixes, items=target).scores[:, 0].float().cpu().numpy()
                out["ll_nothink"] = decoder.score_items(empty_prefixes, items=target).scores[:, 0].float().cpu().numpy()
            results[number] = out
            bar.update(1)
    model.train(was_training)
    return results


def merge_think_batches(results: dict, batches: list[list[int]], num_users: int) -> dict:
    """Scatter per-batch arrays back to user order: {name: [U, ...]}."""
    merged = {}
    for number, batch in enumerate(batches):
        for name, values in results[number].items():
            if name not in merged:
                merged[name] = np.zeros((num_users,) + values.shape[1:], dtype=values.dtype)
            merged[name][batch] = values
    return merged


def think_report(merged: dict, targets: np.ndarray, mode: str, cfg: ThinkEvalConfig, report_args: dict) -> dict:
    """The summary entries: think (and nothink) ranking reports, paired.delta_recall@10, delta_ll,
    unclosed_share."""
    from onerec_dist.metrics import ranking_report

    targets = np.asarray(targets)
    unclosed = float(1.0 - merged["closed"].mean())
    out = {"reasoning_mode": mode, "unclosed_share": unclosed,
           "think": {**ranking_report(merged["items_think"], targets, **report_args), "unclosed_share": unclosed,
                     "mean_think_tokens": float(merged["think_tokens"].mean())}}
    if mode == "both":
        out["nothink"] = ranking_report(merged["items_nothink"], targets, **report_args)
        k = min(PAIRED_K, merged["items_think"].shape[1])
        out["paired"] = {f"delta_recall@{k}": paired_bootstrap(
            hits_at_k(merged["items_think"], targets, k), hits_at_k(merged["items_nothink"], targets, k),
            cfg.num_resamples, cfg.bootstrap_seed)}
        out["delta_ll"] = float(np.mean(merged["ll_think"] - merged["ll_nothink"]))
    return out


def evaluate_thinking(eval_cfg, mode: str, model, tokenizer, item_tok, item_codes: np.ndarray, catalogue,
                      examples, batches, report_args: dict, output_dir, domains=None,
                      restriction=None) -> tuple[dict, dict]:
    """Run the think (and nothink) evaluation in this process or on ``eval.num_workers`` Ray shards; returns the
    summary entries (``think_report``, plus users_per_s) and the per-user predictions. ``domains`` /
    ``restriction``: as in ``think_decode_batches`` (None: single-domain data)."""
    from onerec_dist.evaluation import Stopwatch, build_decoder

    clock = Stopwatch()
    histories, targets = examples.histories, np.asarray(examples.targets)
    if eval_cfg.num_workers > 1:
        from onerec_dist.distributed.eval_shards import think_sharded
        from onerec_dist.sid.model_ids import save_model_ids

        model_dir = output_dir / "eval_model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        save_model_ids(model_dir, item_codes, catalogue.item_ids, item_tok.codebook_sizes, item_tok)
        results = think_sharded(eval_cfg, mode, str(model_dir), item_codes, histories, targets, batches, domains,
                                restriction)
    else:
        decoder = build_decoder(model, item_tok, item_codes, eval_cfg, tokenizer.pad_token_id or 0)
        results = think_decode_batches(decoder, model, tokenizer, item_codes, histories, targets, batches,
                                       list(range(len(batches))), eval_cfg, mode, domains=domains,
                                       restriction=restriction)
    merged = merge_think_batches(results, batches, len(targets))
    seconds = clock.seconds()
    report = think_report(merged, targets, mode, eval_cfg.reasoning, report_args)
    report["think"].update({"users_per_s": len(targets) / max(seconds, 1e-9), "seconds": seconds})
    predictions = {"think": merged["items_think"]}
    if mode == "both":
        predictions["nothink"] = merged["items_nothink"]
    return report, predictions


def format_think_report(report: dict) -> str:
    lines = []
    for name in ("think", "nothink"):
        if name in report:
            lines.append(f"eval {name:12s} " + "  ".join(f"{k}={v:.4f}" for k, v in report[name].items()
                                                         if k.startswith(("recall@", "ndcg@", "validity"))))
    for key, value in report.get("paired", {}).items():
        lines.append(f"eval paired {key}: {value['mean']:+.4f}, 95% CI [{value['ci95'][0]:+.4f}, "
                     f"{value['ci95'][1]:+.4f}] ({value['num_users']} users)")
    if "delta_ll" in report:
        lines.append(f"eval delta_ll {report['delta_ll']:+.4f}; unclosed rationales {report['unclosed_share']:.2%}")
    return "\n".join(lines)
