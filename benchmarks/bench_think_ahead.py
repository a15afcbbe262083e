"""Think-Ahead serving latency (OneRec-Think, arXiv:2510.11639, Sec. 4.4): what splitting reasoning into an offline
cache and an online completion buys, and what it costs in Recall@10.

Three ways to answer one request, on the same users, the same decoder settings (beam width, top-K, normalisation):
  * ``full_reasoning``: the model writes the rationale now (greedy, <= --think-tokens tokens, batched ``generate``)
    and the whole ID is decoded after it (onerec_dist.reasoning.think_eval's path);
  * ``think_ahead``: the cached prefixes of the user (built offline here from T sampled rationales, width-b partial
    decode of the first m levels) and a short prompt of the latest N items; only the last L - m levels are decoded
    (onerec_dist.serving.think_ahead.ThinkAheadService);
  * ``no_thinking``: the whole ID decoded after an empty think block, full history prompt.

Reported per mode: p50 / p99 latency per request at batch 1 and per batch at batch 16 (interleaved repeats), the
requests/s of serving all users in batches of 16 (a closed loop at concurrency 16 with dynamic batching of 16), and
Recall@10; for Think-Ahead also the share of targets whose m-level prefix is in the user's cache and the offline
build time per user. ``p50_speedup_vs_full_reasoning`` = p50(full, batch 1) / p50(think_ahead, batch 1);
``recall_ratio_vs_full_reasoning`` = Recall@10(think_ahead) / Recall@10(full) (null when the full recall is 0).
``cache_growth`` records the mean prefixes per user for every T x b of --growth-t x --growth-b.

Recall-keeping setting (measured on the synthetic reasoning task, README "Think-Ahead serving"): ``--greedy
--rationales 1 --use-rationale --recent-items <longest history>``: the offline rationale is the one full reasoning
would write, and the online prompt is full reasoning's prompt with that rationale, so the completion below the cached
prefixes ranks as full reasoning does. Sampled rationales (the default) and a short prompt trade recall for cache
diversity and a shorter prefill.

Model: ``--model-dir`` (a reason_sft export; the data and split come from --overrides, Hydra syntax) gives the real
recall ratio; without it a random tiny model with think tokens over a random catalogue is built here: latency only,
its recalls are at chance level (``recall_at_chance_level`` in the JSON).

    .venv/bin/python benchmarks/bench_think_ahead.py --quick            # CPU, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_think_ahead.py --device cuda      # the GPU variant (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # _common sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_common_args,
    device_suffix,
    format_table,
    ratio,
    repeats,
    start_run,
    summarize,
)

RECALL_K = 10


def random_world(args, out_dir: Path):
    """A random tiny model with item + think tokens over a random catalogue, saved as a model directory; random
    user histories and targets. Returns (model_dir, item_codes [N, L], histories, targets)."""
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.reasoning.cot_format import add_think_tokens
    from onerec_dist.sid.model_ids import save_model_ids
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    sizes = [int(s) for s in args.codebooks.split("x")]
    rng = np.random.default_rng(0)
    space = np.array(list(itertools.product(*[range(k) for k in sizes])))  # every possible ID
    codes = space[rng.choice(len(space), size=args.items, replace=False)]  # [N, L] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair, then a book"] * 4,
                                            vocab_size=300)
    model = build_tiny_model(tokenizer, args.preset, seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(len(sizes), sizes), seed=0)
    add_think_tokens(model, tokenizer, seed=0)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_model_ids(model_dir, codes, [f"i{i}" for i in range(args.items)], sizes, item_tok)
    histories = [rng.integers(0, args.items, size=rng.integers(args.history // 2, args.history + 1)).tolist()
                 for _ in range(args.users)]
    return str(model_dir), codes, histories, rng.integers(0, args.items, size=args.users)


def data_world(args):
    """The test users of the data given by --overrides, with the IDs the model carries."""
    from onerec_dist.cli import compose
    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.model_setup import semantic_ids_for_run

    cfg = compose([f"model.name_or_path={args.model_dir}", *args.overrides])
    data = load_dataset(data_config(cfg))
    examples = make_splits(data, data_config(cfg))["test"]
    codes, _, _ = semantic_ids_for_run(cfg, data, args.model_dir)
    n = min(args.users, len(examples))
    return args.model_dir, np.asarray(codes), [list(h) for h in examples.histories[:n]], np.asarray(
        examples.targets[:n])


def recall(items: list[list[int]], targets) -> float:
    return float(np.mean([t in row[:RECALL_K] for row, t in zip(items, targets)]))


class Modes:
    """The three ways to answer a batch of requests (users as positions into the world's lists)."""

    def __init__(self, model, tokenizer, service, codes, histories, cfg, think_tokens: int):
        from onerec_dist.reasoning.cot_format import ThinkTokens, inference_prompt

        self.model, self.tokenizer, self.service, self.cfg = model, tokenizer, service, cfg
        self.think = ThinkTokens.from_tokenizer(tokenizer)
        self.prompts = [inference_prompt(tokenizer, self.think, codes, h) for h in histories]
        self.histories, self.think_tokens = histories, think_tokens
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def full_reasoning(self, users):
        from onerec_dist.reasoning.cot_format import close_think
        from onerec_dist.reasoning.think_eval import generate_rationales

        prompts = [self.prompts[u] for u in users]
        bodies, _ = generate_rationales(self.model, self.think, prompts, self.think_tokens, self.pad)
        out = self.service.decoder.decode([close_think(self.think, p, b) for p, b in zip(prompts, bodies)])
        return out.items.cpu().tolist()

    def think_ahead(self, users):
        answers = self.service.recommend([f"user{u}" for u in users], [self.histories[u] for u in users])
        return [a.items for a in answers]

    def no_thinking(self, users):
        from onerec_dist.reasoning.cot_format import close_think

        out = self.service.decoder.decode([close_think(self.think, self.prompts[u], None) for u in users])
        return out.items.cpu().tolist()


def latencies(fn, users: list[int], batch: int, rounds: int, sync) -> list[float]:
    """Seconds of every call of ``fn`` on consecutive batches of ``batch`` users, ``rounds`` times over."""
    samples, batch = [], min(batch, len(users))
    for _ in range(rounds):
        for lo in range(0, len(users) - batch + 1, batch):
            sync()
            start = time.perf_counter()
            fn(users[lo:lo + batch])
            sync()
            samples.append(time.perf_counter() - start)
    return samples


def p99(samples: list[float]) -> float:
    return float(np.percentile(samples, 99))


def cache_growth(model, tokenizer, item_tok, codes, histories, cfg, ts, bs) -> list[dict]:
    """Mean / max prefixes per user for every T in ``ts`` and b in ``bs``: rationales are written once (max T),
    the partial decode runs once per b, and the union is taken over each user's first T rationales."""
    from onerec_dist.decoding.constraints import AllowedPrefixes
    from onerec_dist.reasoning.cot_format import ThinkTokens, close_think, inference_prompt
    from onerec_dist.reasoning.think_eval import generate_rationales
    from onerec_dist.serving.think_ahead import prefix_decoder

    think = ThinkTokens.from_tokenizer(tokenizer)
    t_max = max(ts)
    prompts = [inference_prompt(tokenizer, think, codes, h) for h in histories for _ in range(t_max)]
    bodies, _ = generate_rationales(model, think, prompts, cfg.max_think_tokens, tokenizer.pad_token_id or 0,
                                    do_sample=True, temperature=cfg.temperature, seed=cfg.seed)
    closed = [close_think(think, p, b) for p, b in zip(prompts, bodies)]
    rows = []
    for b in bs:
        cfg = dataclasses.replace(cfg, prefix_beam=b)
        found = prefix_decoder(model, item_tok, codes, cfg, tokenizer.pad_token_id or 0).decode_prefixes(
            closed, cfg.prefix_levels).prefixes  # [U*Tmax, b, m]
        grouped = found.view(len(histories), t_max, *found.shape[1:])
        for t in ts:
            counts = AllowedPrefixes.union_of_groups(grouped[:, :t].reshape(-1, *found.shape[1:]), t).counts()
            rows.append({"T": t, "b": b, "mean_prefixes": float(counts.float().mean()), "max_prefixes":
                         int(counts.max()), "bound_T_times_b": t * b})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model-dir", default=None, help="a reason_sft export; else a random tiny model")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides naming the data (--model-dir)")
    parser.add_argument("--preset", default="tiny", help="model preset of the random model")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--codebooks", default="16x16x16", help="codebook sizes of the random catalogue's IDs")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--history", type=int, default=20, help="longest random history")
    parser.add_argument("--think-tokens", type=int, default=64)
    parser.add_argument("--rationales", type=int, default=4, help="T")
    parser.add_argument("--prefix-beam", type=int, default=8, help="b")
    parser.add_argument("--prefix-levels", type=int, default=2, help="m")
    parser.add_argument("--recent-items", type=int, default=5, help="N of the short online prompt")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of the offline rationales (serving.temperature)")
    parser.add_argument("--tag", default="", help="results file think_ahead_<device>_<tag>.json (default: no tag)")
    parser.add_argument("--greedy", action="store_true",
                        help="write the offline rationales greedily (serving.do_sample=false; use with --rationales 1)")
    parser.add_argument("--use-rationale", action="store_true",
                        help="the online prompt's think block holds the cached rationale (serving.use_rationale)")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--growth-t", default="1,2,4")
    parser.add_argument("--growth-b", default="2,4,8")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.codebooks, args.users, args.history = 300, "8x8x8", 16, 12
        args.think_tokens, args.rationales, args.growth_t, args.growth_b = 16, 2, "1,2", "2,4"
    rounds = repeats(args)
    run = start_run("think_ahead", args)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from onerec_dist.models import load_pretrained
    from onerec_dist.serving.config import ServingConfig
    from onerec_dist.serving.think_ahead import Fingerprints, ThinkAheadService, build_shards, load_cache
    from onerec_dist.serving.think_ahead import prepare_cache_dir
    from onerec_dist.sid.tokens import ItemTokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_ta_"))
    model_dir, codes, histories, targets = data_world(args) if args.model_dir else random_world(args, work)
    model, tokenizer = load_pretrained(model_dir, "auto", "auto")
    model.eval().to(device)
    item_tok = ItemTokenizer.from_tokenizer(tokenizer)
    cfg = ServingConfig(num_rationales=args.rationales, prefix_levels=args.prefix_levels, prefix_beam=args.prefix_beam,
                        max_think_tokens=args.think_tokens, shard_size=max(1, len(histories)),
                        recent_items=args.recent_items, use_rationale=args.use_rationale, beam_width=args.beam,
                        temperature=args.temperature, do_sample=not args.greedy,
                        max_k=min(args.beam, 20), generate_batch_size=64)
    users = [f"user{u}" for u in range(len(histories))]
    fingerprints = Fingerprints.of(model_dir)
    todo = prepare_cache_dir(work / "cache", fingerprints, cfg, users)
    start = time.perf_counter()
    build_shards(model, tokenizer, item_tok, codes, users, histories, cfg, work / "cache", todo, fingerprints)
    build_s = time.perf_counter() - start
    cache = load_cache(work / "cache", fingerprints)
    service = ThinkAheadService(model, tokenizer, item_tok, codes, cache, cfg)
    modes = Modes(model, tokenizer, service, codes, histories, cfg, args.think_tokens)
    positions = list(range(len(histories)))
    fns = {"full_reasoning": modes.full_reasoning, "think_ahead": modes.think_ahead, "no_thinking": modes.no_thinking}

    results, rows = {}, []
    for name, fn in fns.items():
        fn(positions[:1])  # warm-up
        start = time.perf_counter()
        items = [row for lo in range(0, len(positions), 16) for row in fn(positions[lo:lo + 16])]
        throughput = len(positions) / (time.perf_counter() - start)
        b1 = latencies(fn, positions, 1, max(1, rounds // 2), sync)
        b16 = latencies(fn, positions, 16, rounds, sync)
        results[name] = {"p50_ms_batch1": 1e3 * statistics.median(b1), "p99_ms_batch1": 1e3 * p99(b1),
                         "p50_ms_batch16": 1e3 * statistics.median(b16), "p99_ms_batch16": 1e3 * p99(b16),
                         "latency_batch1_s": summarize(b1), "latency_batch16_s": summarize(b16),
                         "requests_per_s_concurrency16": throughput, f"recall@{RECALL_K}": recall(items, targets)}
        rows.append({"mode": name, **{k: v for k, v in results[name].items() if not k.startswith("latency")}})
    m = args.prefix_levels
    in_cache = [list(codes[t][:m]) in (cache.get(u) or []) for u, t in zip(users, targets)]
    results["think_ahead"].update({"target_prefix_in_cache_share": float(np.mean(in_cache)),
                                   "offline_build_s_per_user": build_s / len(users),
                                   "mean_prefixes_per_user": float(cache.sizes().mean())})
    growth = cache_growth(model, tokenizer, item_tok, codes, histories[:8], cfg,
                          [int(t) for t in args.growth_t.split(",")], [int(b) for b in args.growth_b.split(",")])
    full_recall = results["full_reasoning"][f"recall@{RECALL_K}"]
    report = {
        "device": str(device), "model": args.model_dir or f"random {args.preset}", "users": len(users),
        "catalogue_items": len(codes), "T": args.rationales, "b": args.prefix_beam, "m": m,
        "recent_items": args.recent_items, "use_rationale": args.use_rationale, "greedy": args.greedy,
        "temperature": None if args.greedy else args.temperature,
        "p50_speedup_vs_full_reasoning": ratio(results["full_reasoning"]["p50_ms_batch1"],
                                               results["think_ahead"]["p50_ms_batch1"]),
        "p50_speedup_vs_full_reasoning_batch16": ratio(results["full_reasoning"]["p50_ms_batch16"],
                                                       results["think_ahead"]["p50_ms_batch16"]),
        "recall_ratio_vs_full_reasoning": ratio(results["think_ahead"][f"recall@{RECALL_K}"], full_recall),
        "recall_at_chance_level": args.model_dir is None, "modes": results, "cache_growth": growth,
    }
    path = run.finish(report, f"think_ahead_{device_suffix(args.device)}" + (f"_{args.tag}" if args.tag else ""),
                      args.out_dir)
    print(format_table(rows, [("mode", "mode"), ("p50_ms_batch1", "p50 ms b1"), ("p99_ms_batch1", "p99 ms b1"),
                              ("p50_ms_batch16", "p50 ms b16"), ("p99_ms_batch16", "p99 ms b16"),
                              ("requests_per_s_concurrency16", "req/s c16"), (f"recall@{RECALL_K}", "R@10")]))
    print(format_table(growth, [("T", "T"), ("b", "b"), ("mean_prefixes", "mean prefixes"),
                                ("max_prefixes", "max"), ("bound_T_times_b", "T*b")]))
    print(f"p50 speed-up vs full reasoning: {report['p50_speedup_vs_full_reasoning']}; recall ratio: "
          f"{report['recall_ratio_vs_full_reasoning']}; target prefix in cache: "
          f"{results['think_ahead']['target_prefix_in_cache_share']:.2%} -> {path}")


if __name__ == "__main__":
    main()
