"""`onerec eval`: Recall@K / NDCG@K / validity / users/s of the model and the selected baselines on the test (or
validation) users, by constrained beam search over the whole catalogue; per-user predictions to parquet.

The item IDs are those the model carries (``<model>/sid_table.json``, onerec_dist.sid.model_ids): ``sid.*`` settings
given explicitly must give the same IDs, or the stage stops naming both sources.

Data with several domains (onerec_dist/data/domains.py): prompts name the user's domain, the model and every baseline
(popular, sasrec, hf_generate) recommend only items of the user's domain (decoding/domains.py), and every method's
report gains
``per_domain: {name: {recall@k, ndcg@k, validity, users}}`` (metrics.per_domain_report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec_dist.data.config import data_config
from onerec_dist.data.domains import user_domain_indices, user_domain_names
from onerec_dist.data.splits import load_dataset, make_splits
from onerec_dist.devices import resolve_device
from onerec_dist.evaluation import (
    Stopwatch,
    build_decoder,
    build_prompts,
    decode_batches,
    eval_config,
    length_batches,
    merge_batches,
    most_popular,
    select_users,
    training_item_counts,
)
from onerec_dist.metrics import per_domain_report, ranking_report
from onerec_dist.model_setup import build_recommender, model_config, semantic_ids_for_run
from onerec_dist.reasoning.think_eval import evaluate_thinking, format_think_report, resolve_mode
from onerec_dist.sid.model_ids import save_model_ids


def run(cfg, output_dir: Path) -> dict:
    eval_cfg, data_cfg = eval_config(cfg), data_config(cfg)
    data = load_dataset(data_cfg)
    splits = make_splits(data, data_cfg)
    examples = splits.get(eval_cfg.split)
    if examples is None:
        raise ValueError(f"eval.split={eval_cfg.split}: dataset {data.name!r} has no {eval_cfg.split} split")
    examples = select_users(examples, eval_cfg.max_users, eval_cfg.user_sample, cfg.seed)
    model_cfg = model_config(cfg)
    item_codes, sizes, ids_source = semantic_ids_for_run(cfg, data, model_cfg.name_or_path)
    targets = np.asarray(examples.targets)
    summary: dict = {"dataset": data.name, "split": eval_cfg.split, "num_users": len(examples),
                     "num_items": len(data.catalogue), "beam_width": eval_cfg.beam_width,
                     "normalization": eval_cfg.normalization, "semantic_ids": ids_source}
    report_args = dict(num_items=len(data.catalogue), ks=eval_cfg.ks, ndcg_ks=eval_cfg.ndcg_ks)
    domains = user_domain_indices(data, examples.users)  # [U] domain of each user; None: single domain

    def report(items) -> dict:
        out = ranking_report(items, targets, **report_args)
        if domains is not None:
            out["per_domain"] = per_domain_report(items, targets, domains, data.domain_names, **report_args)
        return out

    if domains is not None:
        summary["domains"] = {name: int((domains == d).sum()) for d, name in enumerate(data.domain_names)}
    predictions = {}
    if "popular" in eval_cfg.baseline:
        counts = training_item_counts(data.sequences, splits.get("train"), data.given_splits is None)
        clock = Stopwatch()
        items = most_popular(counts, len(data.catalogue), eval_cfg.top_k, len(examples),
                             data.item_domains if domains is not None else None, domains)
        summary["popular"] = {**report(items), "users_per_s": len(examples) / max(clock.seconds(), 1e-9)}
        predictions["popular"] = items
    if "sasrec" in eval_cfg.baseline:  # trained here on the training interactions, selected on validation
        from onerec_dist.baselines.sasrec import sasrec_baseline

        items, info = sasrec_baseline(data, splits, examples, eval_cfg.sasrec, eval_cfg.top_k, eval_cfg.exclude_history)
        summary["sasrec"] = {**report(items), **info}
        predictions["sasrec"] = items
    if eval_cfg.model or "hf_generate" in eval_cfg.baseline:
        from onerec_dist.decoding.domains import domain_restriction

        model, tokenizer, item_tok = build_recommender(model_cfg, data, sizes, item_codes, seed=cfg.seed)
        model.eval().to(resolve_device(eval_cfg.device))
        names = user_domain_names(data, examples.users)
        restriction = domain_restriction(data, examples.users, item_codes)  # None: single domain
        prompts = build_prompts(tokenizer, examples, item_codes, names)
        batches = length_batches(prompts, eval_cfg.batch_size)
        summary["avg_prompt_tokens"] = float(np.mean([len(p) for p in prompts]))
        think_mode = resolve_mode(eval_cfg.reasoning.mode, tokenizer) if eval_cfg.model else "none"
        if think_mode != "none":  # thinking vs non-thinking, same users and beams (reasoning/think_eval.py)
            think, think_predictions = evaluate_thinking(eval_cfg, think_mode, model, tokenizer, item_tok,
                                                         item_codes, data.catalogue, examples, batches, report_args,
                                                         output_dir, domains=names, restriction=restriction)
            for name, items in think_predictions.items():
                if domains is not None:
                    think[name]["per_domain"] = per_domain_report(items, targets, domains, data.domain_names,
                                                                  **report_args)
            summary.update(think)
            predictions.update(think_predictions)
            print(format_think_report(think))
        elif eval_cfg.model:
            items, scores, seconds = decode_model(eval_cfg, model, tokenizer, item_tok, item_codes, data.catalogue,
                                                  prompts, examples.histories, batches, output_dir, restriction)
            summary["model"] = {**report(items), "users_per_s": len(examples) / max(seconds, 1e-9),
                                "seconds": seconds}
            predictions["model"] = items
            predictions["model_scores"] = scores
        if "hf_generate" in eval_cfg.baseline:
            items, seconds = decode_hf(eval_cfg, model, tokenizer, item_tok, item_codes, prompts, batches,
                                       data.item_domains if domains is not None else None, domains)
            summary["hf_generate"] = {**report(items),
                                      "users_per_s": len(examples) / max(seconds, 1e-9), "seconds": seconds}
            predictions["hf_generate"] = items
    print_reports(summary)
    main = (summary.get("model") or summary.get("think") or summary.get("hf_generate") or summary.get("sasrec")
            or summary["popular"])
    summary.update({k: v for k, v in main.items() if k.startswith(("recall@", "ndcg@", "validity"))})
    if eval_cfg.save_predictions:
        summary["predictions_path"] = str(save_predictions(output_dir, examples, predictions))
    return summary


def print_reports(summary: dict) -> None:
    """One line per method (think / nothink: format_think_report prints those), then one per domain of each."""
    for name in ("model", "popular", "sasrec", "hf_generate", "think", "nothink"):
        if name not in summary:
            continue
        rows = [("", summary[name])] if name not in ("think", "nothink") else []
        rows += [(f" [{d}]", values) for d, values in summary[name].get("per_domain", {}).items()]
        for label, values in rows:
            print(f"eval {name + label:12s} " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()
                                                          if k.startswith(("recall@", "ndcg@", "validity"))))


def decode_model(eval_cfg, model, tokenizer, item_tok, item_codes, catalogue, prompts, histories, batches,
                 output_dir, restriction=None):
    """(items [U, K], scores [U, K], seconds) of the model; ``restriction``: each user only in its domain's
    catalogue (decoding/domains.DomainRestriction, None: the whole catalogue)."""
    clock = Stopwatch()
    if eval_cfg.num_workers > 1:
        from onerec_dist.distributed.eval_shards import decode_sharded

        model_dir = output_dir / "eval_model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        save_model_ids(model_dir, item_codes, catalogue.item_ids, item_tok.codebook_sizes, item_tok)
        results = decode_sharded(eval_cfg, str(model_dir), item_codes, prompts, histories, batches, restriction)
    else:
        decoder = build_decoder(model, item_tok, item_codes, eval_cfg, tokenizer.pad_token_id or 0)
        results = decode_batches(decoder, prompts, histories, batches, eval_cfg.exclude_history,
                                 restriction=restriction)
    items, scores = merge_batches(results, batches, len(prompts), eval_cfg.top_k)
    return items, scores, clock.seconds()


def decode_hf(eval_cfg, model, tokenizer, item_tok, item_codes, prompts, batches, item_domains=None,
              user_domains=None):
    """(items [U, K], seconds) of HF generate + trie. With ``item_domains`` [N] and ``user_domains`` [U] (data with
    several domains): each batch is decoded per domain with a trie of that domain's items only (the lookup stays
    the whole catalogue's, so items come back as catalogue rows)."""
    from onerec_dist.decoding.hf_baseline import build_trie, hf_beam_search
    from onerec_dist.progress import Progress

    clock = Stopwatch()
    pad, results = tokenizer.pad_token_id or 0, {}
    tries = None
    if user_domains is not None:
        _, lookup, levels = build_trie(item_tok, item_codes)  # token row -> catalogue row
        codes = np.asarray(item_codes)
        tries = {d: (build_trie(item_tok, codes[np.asarray(item_domains) == d])[0], lookup, levels)
                 for d in np.unique(user_domains).tolist()}
    for number, batch in enumerate(Progress.iterate(batches, "eval hf_generate", unit="batch")):
        if tries is None:
            items, scores = hf_beam_search(model, item_tok, item_codes, [prompts[i] for i in batch],
                                           eval_cfg.beam_width, eval_cfg.top_k, pad)
            results[number] = (items.numpy(), scores.numpy())
            continue
        items = np.full((len(batch), eval_cfg.top_k), -1, dtype=np.int64)
        scores = np.full((len(batch), eval_cfg.top_k), -np.inf, dtype=np.float32)
        for domain, trie in tries.items():  # one generate per domain present in the batch
            rows = [j for j, i in enumerate(batch) if user_domains[i] == domain]
            if rows:
                got, got_scores = hf_beam_search(model, item_tok, item_codes, [prompts[batch[j]] for j in rows],
                                                 eval_cfg.beam_width, eval_cfg.top_k, pad, trie=trie)
                got = got.numpy()
                # A domain with fewer items than beams leaves -inf beams, whose tokens HF picks arbitrarily: such a
                # sequence is no item of the domain, so its slot is empty (-1), never another domain's item.
                stray = (got >= 0) & (np.asarray(item_domains)[got] != domain)
                items[rows], scores[rows] = np.where(stray, -1, got), got_scores.numpy()
        results[number] = (items, scores)
    items, _ = merge_batches(results, batches, len(prompts), eval_cfg.top_k)
    return items, clock.seconds()


def save_predictions(output_dir: Path, examples, predictions: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"user": examples.users, "target": examples.targets}
    for name, values in predictions.items():
        columns[name] = [row.tolist() for row in values]
    path = output_dir / "predictions.parquet"
    pq.write_table(pa.table(columns), path)
    return path
