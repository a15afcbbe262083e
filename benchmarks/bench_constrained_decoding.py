"""Benchmark constrained beam search over item IDs: our ConstrainedDecoder vs Hugging Face generate, plus ablations.

  .venv/bin/python benchmarks/bench_constrained_decoding.py --quick          # < 60 s on 2 CPU cores
  .venv/bin/python benchmarks/bench_constrained_decoding.py                  # 256 users, beams 10 and 50
  python benchmarks/bench_constrained_decoding.py --device cuda              # + step kernel time vs bytes read

World (identical for every decoder, built from --seed):
  * catalogue: --items (2000) unique semantic IDs of --levels x --codebook (4 x 256, the RQ-VAE shape of
    TIGER/OneRec). Codes are drawn level by level from a Zipf(--zipf) law over the K codes, rotated by a hash of the
    parent prefix, so the prefix tree looks like residual-quantisation codes: a few wide nodes and many narrow ones
    (uniform random IDs would make every level below the second a single forced child);
  * model: a randomly initialised Qwen3 of --preset ("tiny", the shape `onerec eval` uses for from-scratch runs and
    the tests use), vocabulary extended with the item tokens (onerec_dist.sid.vocab.extend_vocabulary);
  * users: --users next-item prompts rendered exactly like `onerec eval` (onerec_dist.evaluation.build_prompts) from
    histories of --min-history..--max-history items (uniform length, items drawn by a Zipf popularity), grouped into
    length batches of --batch-size (onerec_dist.evaluation.length_batches). HF runs on the same batches.

Measured per beam width W (top-K = W, so agreement covers the whole beam): users/s of our decoder (defaults,
normalization="full", the semantics of HF generate) and of the public code's decoder (hf_beam_search: generate with
num_beams=W and a prefix_allowed_tokens_fn trie), speedup, and topk_agreement = share of users whose top-K items are
identical, order included. Ablations switch each optimisation off in turn, in the same run:
  (a) prefill: "tree" (default: prompt prefilled once, its KV cache shared by the W beams through a tree mask) vs
      "once" (prefilled once, cache expanded to B*W rows and reordered every level) vs "per_beam" (every beam
      re-encodes its prompt, as HF generate does);
  (b) code_logits: "slice" (the step reads the level's K_l code columns; with normalization="valid" only those K_l
      rows of the output layer are multiplied) vs "full" (the step runs over whole vocabulary rows), for both
      normalisations;
  (c) step_impl: the fused step (Triton on CUDA; on CPU the vectorised PyTorch reference, which "auto" picks there)
      vs "naive", a Python loop over rows.
Every variant's top-K is compared with the default's. Timing is interleaved per batch (batch 1 by every variant, batch
2 by every variant, ...) and repeated --repeats times; a variant's time is the sum over batches of its per-batch
median wall time (the headline), with the per-batch best-of and the process CPU time beside it, because the machine
may be shared: a burst of load then hits every variant alike instead of whole passes of one. A timer breakdown of
one default pass (and one prefill="once" pass) shows where the time goes.
On CUDA the step kernel is also timed alone on the decode's own step shapes with benchmarks/bench_constrained_step.py
and reported against the bytes it must read (fraction of --peak-gbps).
Results: benchmarks/results/constrained_decoding_<device>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from onerec_dist.data.types import Examples
from onerec_dist.decoding import beam_search
from onerec_dist.decoding.beam_search import ConstrainedDecoder
from onerec_dist.decoding.hf_baseline import hf_beam_search
from onerec_dist.evaluation import build_prompts, length_batches
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.prompts import next_item_question
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary

REPO = Path(__file__).resolve().parents[1]

# (name, what is switched off, ConstrainedDecoder keyword arguments). "default" first: ratios are against it.
VARIANTS = [
    ("default", "-", dict(normalization="full")),
    ("prefill=once", "(a) shared tree cache -> cache expanded to B*W rows", dict(normalization="full", prefill="once")),
    ("prefill=per_beam", "(a) prefill once -> re-encode prompt per beam",
     dict(normalization="full", prefill="per_beam")),
    ("code_logits=full", "(b) K_l code columns -> full vocabulary rows",
     dict(normalization="full", code_logits="full")),
    ("step_impl=naive", "(c) fused step -> per-row Python loop", dict(normalization="full", step_impl="naive")),
    ("valid:default", "-", dict(normalization="valid")),
    ("valid:code_logits=full", "(b) K_l output rows -> full [R, V] matmul",
     dict(normalization="valid", code_logits="full")),
]
TIMING_NOTE = ("interleaved per batch; wall_s / users_per_s / speedup_vs_hf: sum over batches of the per-batch median "
               "over repeats; *_best_of: sum of per-batch minima; cpu_s: process CPU time (counts OpenMP spin-waits "
               "when threads > 1). On a shared machine load bursts slow many-small-op passes (ours) far more than "
               "few-large-op passes (HF per-beam prefill), so best-of is the better estimate of unshared speed.")
CUDA_VARIANTS = [("step_impl=reference", "(c) Triton kernel -> PyTorch reference",
                  dict(normalization="full", step_impl="reference"))]


# ------------------------------------------------------------------------------------------- world


def synthetic_codes(num_items: int, levels: int, codebook: int, zipf: float, seed: int) -> torch.Tensor:
    """[N, L] unique IDs shaped like residual-quantisation codes. Level l's code = (Zipf rank + hash(parent
    prefix)) mod K, so each parent has its own popular children. A repeated ID redraws its last code uniformly among
    the codes its parent does not use yet (ValueError if a parent is full: lower --items)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, codebook + 1) ** zipf
    weights /= weights.sum()
    codes = np.zeros((num_items, levels), dtype=np.int64)
    prefix_hash = np.zeros(num_items, dtype=np.int64)
    for level in range(levels):
        rank = rng.choice(codebook, size=num_items, p=weights)
        codes[:, level] = (rank + prefix_hash % codebook) % codebook
        prefix_hash = (prefix_hash * 1_000_003 + codes[:, level] * 7919 + 12_345) % (1 << 31)
    used: dict[tuple, set] = {}
    for row in codes:
        children = used.setdefault(tuple(row[:-1]), set())
        if row[-1] in children:
            free = sorted(set(range(codebook)) - children)
            if not free:
                raise ValueError(f"--items={num_items}: prefix {tuple(row[:-1])} has all {codebook} last-level "
                                 "codes; lower --items or raise --codebook")
            row[-1] = free[rng.integers(len(free))]
        children.add(row[-1])
    return torch.from_numpy(codes)


def build_world(args):
    """Model, tokenizers, prefix index, codes and the users' prompts and length batches."""
    codes = synthetic_codes(args.items, args.levels, args.codebook, args.zipf, args.seed)  # [N, L]
    corpus = [next_item_question([]), "The user has purchased, in order: a lamp, a chair, a red speaker, a blue tent."]
    tokenizer = build_tokenizer_from_corpus(corpus * 4, vocab_size=2000)
    model = build_tiny_model(tokenizer, preset=args.preset, seed=args.seed).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(args.levels, args.codebook), seed=args.seed)
    model.to(args.device)
    index = PrefixIndex.build(codes, item_tok.codebook_sizes)
    rng = np.random.default_rng(args.seed + 1)
    popularity = 1.0 / np.arange(1, args.items + 1)
    popularity = popularity[rng.permutation(args.items)] / popularity.sum()
    histories = [rng.choice(args.items, size=int(rng.integers(args.min_history, args.max_history + 1)),
                            p=popularity).tolist() for _ in range(args.users)]
    examples = Examples(users=[f"u{i}" for i in range(args.users)], histories=histories, targets=[0] * args.users)
    prompts = build_prompts(tokenizer, examples, codes.numpy())
    batches = length_batches(prompts, args.batch_size)
    return dict(model=model, tokenizer=tokenizer, item_tok=item_tok, index=index, codes=codes, prompts=prompts,
                batches=batches)


def world_summary(world, args) -> dict:
    model, prompts = world["model"], world["prompts"]
    lengths = [len(p) for p in prompts]
    padded = sum(max(len(prompts[i]) for i in b) * len(b) for b in world["batches"])
    return {
        "catalogue": {"num_items": args.items, "levels": args.levels, "codebook": args.codebook, "zipf": args.zipf,
                      "prefix_index": {k: v for k, v in world["index"].stats().items() if k != "build_seconds"}},
        "model": {"preset": args.preset, "vocab_rows": model.get_output_embeddings().weight.shape[0],
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": model.config._attn_implementation},
        "users": args.users, "history_items": [args.min_history, args.max_history],
        "prompt_tokens": {"mean": float(np.mean(lengths)), "min": min(lengths), "max": max(lengths)},
        "padding_share": 1 - sum(lengths) / padded, "batch_size": args.batch_size, "num_batches": len(world["batches"]),
    }


# ------------------------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(decoder, world):
    """Decode every batch; items [U, K] and scores [U, K] in user order."""
    items = torch.empty(len(world["prompts"]), decoder.top_k, dtype=torch.long)
    scores = torch.empty(len(world["prompts"]), decoder.top_k)
    for batch in world["batches"]:
        result = decoder.decode([world["prompts"][i] for i in batch])
        items[batch], scores[batch] = result.items.cpu(), result.scores.float().cpu()
    return items, scores


def ours_batch(decoder):
    """Our decoder on one batch of prompts: (items [b, K], scores [b, K]) on the host."""
    def decode(prompts):
        result = decoder.decode(prompts)
        return result.items.cpu(), result.scores.float().cpu()
    return decode


def hf_batch(width, top_k, world):
    """HF generate on one batch of prompts: (items [b, K], scores [b, K])."""
    return lambda prompts: hf_beam_search(world["model"], world["item_tok"], world["codes"], prompts, width, top_k,
                                          world["tokenizer"].pad_token_id)


def disagreements(ours, hf, limit: int = 10) -> list[dict]:
    """Users whose top-K differs from HF's: the first differing rank and both decoders' scores there. A gap of
    ~1e-6 is a near-tie that float rounding (different matmul shapes, lse vs log_softmax) ordered differently."""
    (ours_items, ours_scores), (hf_items, hf_scores) = ours, hf
    rows = []
    for user in (ours_items != hf_items).any(1).nonzero().squeeze(1).tolist()[:limit]:
        rank = int((ours_items[user] != hf_items[user]).nonzero()[0, 0])
        rows.append({"user": user, "rank": rank, "ours_item": int(ours_items[user, rank]),
                     "hf_item": int(hf_items[user, rank]), "ours_score": float(ours_scores[user, rank]),
                     "hf_score": float(hf_scores[user, rank]),
                     "score_gap": abs(float(ours_scores[user, rank] - hf_scores[user, rank])),
                     "same_item_set": set(ours_items[user].tolist()) == set(hf_items[user].tolist())})
    return rows


def timed(fn, device):
    """(result, wall seconds, process CPU seconds) of fn()."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def make_runners(width, world, args, device):
    """name -> (switch description, decoder keyword args or None for HF, fn: prompts -> (items, scores))."""
    top_k = width if args.top_k is None else min(args.top_k, width)
    variants = VARIANTS + (CUDA_VARIANTS if device.type == "cuda" else [])
    runners = {}
    for name, switch, kwargs in variants:
        decoder = ConstrainedDecoder(world["model"], world["item_tok"], world["index"], width, top_k,
                                     pad_token_id=world["tokenizer"].pad_token_id, **kwargs)
        runners[name] = (switch, {**kwargs, "prefill": decoder.prefill}, ours_batch(decoder))
    runners["hf_generate"] = ("baseline: HF generate + prefix_allowed_tokens_fn", None, hf_batch(width, top_k, world))
    return runners, top_k


def measure_width(width, world, args, device) -> dict:
    """All variants and HF at beam width ``width``. Interleaved per batch (batch 1 by every variant, then batch 2,
    ...), ``args.repeats`` times, so a burst of load from other processes hits all variants alike; a variant's time is
    the sum over batches of its per-batch median (best-of: per-batch minimum)."""
    runners, top_k = make_runners(width, world, args, device)
    warm = [world["prompts"][i] for i in world["batches"][0][:4]]
    for _, _, decode in runners.values():  # first-call overheads (allocator, lazy imports) out of the timing
        decode(warm)
    users, batches = len(world["prompts"]), world["batches"]
    times = {name: np.zeros((args.repeats, len(batches), 2)) for name in runners}  # [repeat, batch, (wall, cpu)]
    outputs = {name: (torch.empty(users, top_k, dtype=torch.long), torch.empty(users, top_k)) for name in runners}
    for repeat in range(args.repeats):
        for number, batch in enumerate(batches):
            prompts = [world["prompts"][i] for i in batch]
            for name, (_, _, decode) in runners.items():
                (items, scores), wall, cpu = timed(lambda: decode(prompts), device)
                times[name][repeat, number] = wall, cpu
                if repeat == 0:
                    outputs[name][0][batch], outputs[name][1][batch] = items, scores
        print(f"  W={width} repeat {repeat + 1}/{args.repeats} wall s: " + ", ".join(
            f"{name} {times[name][repeat, :, 0].sum():.2f}" for name in runners), flush=True)
    return summarise(width, top_k, runners, times, outputs, world)


def summarise(width, top_k, runners, times, outputs, world) -> dict:
    users = len(world["prompts"])
    med = {name: {"wall": float(np.median(t[:, :, 0], 0).sum()), "cpu": float(np.median(t[:, :, 1], 0).sum()),
                  "best": float(t[:, :, 0].min(0).sum())} for name, t in times.items()}
    default, valid_default = med["default"], med["valid:default"]
    (ours, ours_scores), (hf, hf_scores) = outputs["default"], outputs["hf_generate"]
    agreeing = (ours == hf).all(1)  # [U]
    rows = []
    for name, (switch, kwargs, _) in runners.items():
        base = valid_default if name.startswith("valid:") else default  # each ablation against its own default
        base_name = "valid:default" if name.startswith("valid:") else "default"
        rows.append({
            "variant": name, "switched_off": switch, "decoder_args": kwargs,
            "users_per_s": users / med[name]["wall"], "wall_s": med[name]["wall"], "cpu_s": med[name]["cpu"],
            "wall_best_of_s": med[name]["best"],
            "pass_wall_samples": times[name][:, :, 0].sum(1).tolist(),
            "pass_cpu_samples": times[name][:, :, 1].sum(1).tolist(),
            "slowdown_vs_" + ("default" if base_name == "default" else "valid_default"):
                med[name]["wall"] / base["wall"],
            "cpu_slowdown": med[name]["cpu"] / base["cpu"],
            "best_of_slowdown": med[name]["best"] / (med["valid:default"] if name.startswith("valid:")
                                                     else med["default"])["best"],
            "same_topk_as_default": float((outputs[name][0] == outputs[base_name][0]).all(1).float().mean()),
        })
    return {
        "beam_width": width, "top_k": top_k, "users": users,
        "users_per_s_ours": users / default["wall"], "users_per_s_hf": users / med["hf_generate"]["wall"],
        "speedup_vs_hf": med["hf_generate"]["wall"] / default["wall"],
        "speedup_vs_hf_cpu_time": med["hf_generate"]["cpu"] / default["cpu"],
        "speedup_vs_hf_best_of": med["hf_generate"]["best"] / med["default"]["best"],
        "topk_agreement": float(agreeing.float().mean()),
        "score_max_abs_diff_where_agreeing": float((ours_scores - hf_scores)[agreeing].abs().max())
        if bool(agreeing.any()) else None,
        "disagreements": disagreements(outputs["default"], outputs["hf_generate"]),
        "top1_agreement": float((ours[:, 0] == hf[:, 0]).float().mean()),
        "validity_ours": float((ours >= 0).float().mean()), "validity_hf": float((hf >= 0).float().mean()),
        "users_per_s_ours_valid_normalization": users / valid_default["wall"],
        "variants": rows,
    }


# ------------------------------------------------------------------------------------------- where the time goes


@contextlib.contextmanager
def stage_timers(decoder, device):
    """Accumulate wall time per stage of ``decoder.decode`` by wrapping its parts; yields {stage: seconds}."""
    totals: dict[str, float] = {}

    def wrap(stage, fn):
        def inner(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start
        return inner

    beams = [beam_search._TreeBeams, beam_search._CopiedBeams]
    saved = [(cls, cls.__init__, cls.feed) for cls in beams] + [beam_search.select_beams]
    for cls in beams:
        cls.__init__ = wrap("model: prefill", cls.__init__)
        cls.feed = wrap("model: beam tokens (+ tree mask / cache reorder)", cls.feed)
    beam_search.select_beams = wrap("select beams", beam_search.select_beams)
    decoder._level_logits = wrap("output layer (+ lse)", decoder._level_logits)
    decoder._step = wrap("constrained step", decoder._step)
    decoder.index.allowed_codes = wrap("prefix index", decoder.index.allowed_codes)
    decoder.index.advance = wrap("prefix index", decoder.index.advance)
    try:
        yield totals
    finally:
        for cls, init, feed in saved[:-1]:
            cls.__init__, cls.feed = init, feed
        beam_search.select_beams = saved[-1]
        for name in ("_level_logits", "_step"):
            del decoder.__dict__[name]
        for name in ("allowed_codes", "advance"):
            del decoder.index.__dict__[name]


def breakdown(width, top_k, world, device, **kwargs) -> dict:
    """Seconds per stage of one pass over every user (default switches unless ``kwargs``)."""
    decoder = ConstrainedDecoder(world["model"], world["item_tok"], world["index"], width, top_k,
                                 pad_token_id=world["tokenizer"].pad_token_id, **kwargs)
    with stage_timers(decoder, device) as totals:
        _, wall, _ = timed(lambda: run_ours(decoder, world), device)
    totals["other (padding, bookkeeping, result)"] = wall - sum(totals.values())
    return {"total_s": wall, "stages_s": totals, "shares": {k: v / wall for k, v in totals.items()}}


# ------------------------------------------------------------------------------------------- step kernel (CUDA)


def step_shapes(width, top_k, world) -> list[tuple[int, int, int]]:
    """(rows, codes, k) of every constrained_step call of the default decoder on the first batch."""
    decoder = ConstrainedDecoder(world["model"], world["item_tok"], world["index"], width, top_k,
                                 pad_token_id=world["tokenizer"].pad_token_id)
    shapes, step = [], decoder._step

    def record(logits, allowed, beam_scores, k, norm_lse, offset):
        shapes.append((logits.shape[0], logits.shape[1], k))
        return step(logits, allowed, beam_scores, k, norm_lse, offset)

    decoder._step = record
    decoder.decode([world["prompts"][i] for i in world["batches"][0]])
    return shapes


def step_kernel_report(width, top_k, world, args, device) -> list[dict]:
    """benchmarks/bench_constrained_step.py's per-shape timing (naive, reference, Triton on CUDA + fraction of
    peak bandwidth) on the shapes this decode runs."""
    spec = importlib.util.spec_from_file_location("bench_constrained_step", Path(__file__).with_name(
        "bench_constrained_step.py"))
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    step_args = argparse.Namespace(reps=args.step_reps, warmup=2, peak_gbps=args.peak_gbps)
    return [bench_step.bench_shape(rows, codes, k, "fp32", device, step_args)
            for rows, codes, k in dict.fromkeys(step_shapes(width, top_k, world))]


# ------------------------------------------------------------------------------------------- output


def print_table(result: dict) -> None:
    print(f"\nW={result['beam_width']} top-K={result['top_k']}: ours {result['users_per_s_ours']:.1f} users/s, "
          f"HF {result['users_per_s_hf']:.2f} users/s, speedup {result['speedup_vs_hf']:.1f}x "
          f"(CPU time {result['speedup_vs_hf_cpu_time']:.1f}x, best-of {result['speedup_vs_hf_best_of']:.1f}x), "
          f"top-K agreement {result['topk_agreement']:.3f}")
    for row in result["disagreements"]:
        print(f"  differs from HF: user {row['user']} rank {row['rank']}: ours item {row['ours_item']} "
              f"({row['ours_score']:.6f}) vs HF item {row['hf_item']} ({row['hf_score']:.6f}), "
              f"gap {row['score_gap']:.2e}, same item set {row['same_item_set']}")
    header = f"{'users/s':>9s} {'wall s':>8s} {'cpu s':>8s} {'x slower':>9s} {'same top-K':>10s}"
    print(f"{'variant':24s} {header}  switched off")
    for row in result["variants"]:
        slow = row.get("slowdown_vs_default", row.get("slowdown_vs_valid_default"))
        print(f"{row['variant']:24s} {row['users_per_s']:9.2f} {row['wall_s']:8.2f} {row['cpu_s']:8.2f} "
              f"{slow:9.2f} {row['same_topk_as_default']:10.3f}  {row['switched_off']}")


def best_of_slowdown(result: dict, row: dict) -> float:
    """Per-batch best-of wall time of ``row`` over its default's (the valid default for "valid:" variants)."""
    base = "valid:default" if row["variant"].startswith("valid:") else "default"
    return row["wall_best_of_s"] / next(r for r in result["variants"] if r["variant"] == base)["wall_best_of_s"]


def write_csv(report: dict, path: Path) -> None:
    fields = ["beam_width", "variant", "switched_off", "users_per_s", "wall_s", "cpu_s", "wall_best_of_s", "slowdown",
              "best_of_slowdown", "cpu_slowdown",
              "same_topk_as_default", "topk_agreement_vs_hf"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in report["beams"].values():
            for row in result["variants"]:
                writer.writerow({
                    "beam_width": result["beam_width"], "variant": row["variant"], "switched_off": row["switched_off"],
                    "users_per_s": f"{row['users_per_s']:.4g}", "wall_s": f"{row['wall_s']:.4g}",
                    "cpu_s": f"{row['cpu_s']:.4g}",
                    "slowdown": f"{row.get('slowdown_vs_default', row.get('slowdown_vs_valid_default')):.4g}",
                    "wall_best_of_s": f"{row['wall_best_of_s']:.4g}",
                    "best_of_slowdown": f"{best_of_slowdown(result, row):.4g}",
                    "cpu_slowdown": f"{row['cpu_slowdown']:.4g}", "same_topk_as_default": row["same_topk_as_default"],
                    "topk_agreement_vs_hf": result["topk_agreement"] if row["variant"] == "default" else "",
                })


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(report["beams"].values())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    x = np.arange(len(results))
    ours = [r["users_per_s_ours"] for r in results]
    hf = [r["users_per_s_hf"] for r in results]
    left.bar(x - 0.2, ours, 0.4, label="ours (ConstrainedDecoder)")
    left.bar(x + 0.2, hf, 0.4, label="HF generate + prefix_allowed_tokens_fn")
    for i, r in enumerate(results):
        label = (f"{r['speedup_vs_hf']:.1f}x median\n{r['speedup_vs_hf_best_of']:.1f}x best-of\n"
                 f"agree {r['topk_agreement']:.3f}")
        left.text(i, max(ours[i], hf[i]) * 1.15, label, ha="center", fontsize=8)
    left.set_yscale("log")
    left.set_ylim(min(hf) / 3, max(ours) * 30)  # headroom for the labels and the legend
    left.set_xticks(x, [f"W={r['beam_width']}" for r in results])
    left.set_ylabel("users / s (log)")
    left.set_title(f"{report['device']}, {report['threads']} threads: users/s (median), top-K = W")
    left.legend(fontsize=8, loc="upper right")
    names = [row["variant"] for row in results[0]["variants"] if row["variant"] not in ("default", "valid:default")]
    y = np.arange(len(names))
    height = 0.8 / len(results)
    for i, r in enumerate(results):
        rows = {row["variant"]: row for row in r["variants"]}
        slow = [best_of_slowdown(r, rows[n]) for n in names]
        right.barh(y + i * height, slow, height, label=f"W={r['beam_width']}")
    right.axvline(1.0, color="black", lw=0.8)
    right.set_xscale("log")
    right.set_yticks(y + height * (len(results) - 1) / 2, names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("x slower than the default (valid: vs valid default), per-batch best-of wall time; log")
    right.set_title("ablation: each optimisation switched off (same run)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 users, one repeat (under a minute on 2 idle cores)")
    parser.add_argument("--users", type=int, default=None, help="users decoded per pass (default 256, quick 8)")
    parser.add_argument("--beams", default="10,50", help="comma list of beam widths")
    parser.add_argument("--top-k", type=int, default=None, help="top-K per user (default: the beam width)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (CSV and PNG beside it)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed passes (default 5, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=32, help="users per length batch (eval's default)")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the code draws")
    parser.add_argument("--min-history", type=int, default=10)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="CUDA peak memory bandwidth (H100 SXM)")
    parser.add_argument("--step-reps", type=int, default=None, help="repetitions per step shape (20, quick 5)")
    args = parser.parse_args(argv)
    args.users = args.users or (8 if args.quick else 256)
    args.step_reps = args.step_reps or (5 if args.quick else 20)
    args.repeats = args.repeats or (1 if args.quick else 5)
    try:
        args.beam_widths = [int(b) for b in args.beams.split(",")]
    except ValueError:
        parser.error(f"--beams must be a comma list of ints, got {args.beams!r}")
    if min(args.beam_widths) < 1 or max(args.beam_widths) > args.items:
        parser.error(f"--beams entries must be in [1, --items={args.items}]")
    if not 1 <= args.min_history <= args.max_history:
        parser.error("--min-history must be >= 1 and <= --max-history")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter()
    world = build_world(args)
    report = {
        "device": args.device, "device_name": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "quick": args.quick, "repeats": args.repeats, "normalization": "full (HF generate's semantics)",
        "timing": TIMING_NOTE,
        "world": world_summary(world, args), "beams": {},
    }
    print(json.dumps(report["world"], indent=None))
    for width in args.beam_widths:
        result = measure_width(width, world, args, device)
        result["breakdown_default"] = breakdown(width, result["top_k"], world, device)
        if not args.quick:
            result["breakdown_prefill_once"] = breakdown(width, result["top_k"], world, device, prefill="once")
        result["step_kernel"] = step_kernel_report(width, result["top_k"], world, args, device)
        report["beams"][str(width)] = result
        print_table(result)
        print("  where the time goes (default):", ", ".join(
            f"{k} {v:.0%}" for k, v in result["breakdown_default"]["shares"].items()))
    report["seconds"] = time.perf_counter() - clock
    out = args.out or REPO / "benchmarks" / "results" / f"constrained_decoding_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    write_csv(report, out.with_suffix(".csv"))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} (+ .csv, .png) in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
