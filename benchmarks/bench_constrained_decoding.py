"""Benchmark constrained beam search over item IDs: our ConstrainedDecoder vs Hugging Face generate (+ ablations).

  .venv/bin/python benchmarks/run_benchmarks.py decoding --quick        # CPU grid below, < 5 min on 2 idle cores
  python benchmarks/bench_constrained_decoding.py --device cuda          # full grid (GPU)
  python benchmarks/bench_constrained_decoding.py --device cuda --presets qwen3-0.6b --catalogues 100k:4x256 --beams 32

Grid: model preset x catalogue x beam width W (top-K = W, so agreement covers the whole beam).
  * model: a randomly initialised Qwen3 of the preset (onerec_dist.models): "small" (hidden 256, 4 layers) with the
    benchmark's 2,000-token BPE, or the Qwen3-0.6B shape (hidden 1024, 28 layers, 16/8 heads) with Qwen3's
    151,936-row vocabulary (so HF's full-vocabulary log-softmax costs what it costs on the real model); item tokens
    are added by onerec_dist.sid.vocab.extend_vocabulary (levels x codebook tokens);
  * catalogue: N unique semantic IDs of L levels x K codes: 4 x 256 (TIGER/OneRec RQ-VAE) or 3 x 8,192 (a wide
    codebook), N in 10k, 100k, 1M. Codes are drawn level by level from a Zipf(--zipf) law rotated by a hash of the
    parent prefix, so the prefix tree looks like residual-quantisation codes;
  * users: --users next-item prompts rendered like `onerec eval` (onerec_dist.evaluation.build_prompts) from
    histories of --min-history..--max-history items, grouped into length batches of --batch-size.
Baseline: the public code's decoder (onerec_dist.decoding.hf_baseline: generate(num_beams=W) with a MiniOneRec-style
dict trie in prefix_allowed_tokens_fn); its trie is built ONCE per catalogue outside the timed region (build time
reported as trie_build_s), as our PrefixIndex is.
Timing: per repeat, every batch is decoded by every variant in turn (order rotating per batch), so load bursts hit all
variants alike; a pass = the sum over batches; --repeats passes (>= 5 full, 3 quick) give median and IQR of the pass
time and users/s. speedup_vs_hf = median HF pass / median ours pass (ratio of medians); its IQR comes from the
per-repeat paired ratios. Best-of is reported beside, never alone. topk_agreement = share of users whose top-K items
equal HF's, order included (normalization="full" has HF generate's semantics); near-ties in float may differ.
--ablations (default: full mode, first grid point only) switches each optimisation off in turn (VARIANTS).
On CUDA the step kernel is timed alone on this decode's step shapes (bench_constrained_step.py) against the bytes it
must move, as a fraction of a memory bandwidth measured in the same run with a large device copy.
Results: benchmarks/results/constrained_decoding_<cpu|gpu>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # _common sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    device_suffix,
    errorbar,
    format_table,
    new_figure,
    ratio_of_medians,
    repeats,
    save_figure,
    start_run,
    stat_columns,
    summarize,
    write_csv,
)

from onerec_dist.data.types import Examples  # noqa: E402
from onerec_dist.decoding.beam_search import ConstrainedDecoder  # noqa: E402
from onerec_dist.decoding.hf_baseline import build_trie, hf_beam_search  # noqa: E402
from onerec_dist.evaluation import build_prompts, length_batches  # noqa: E402
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus  # noqa: E402
from onerec_dist.prompts import next_item_question  # noqa: E402
from onerec_dist.sid.prefix_index import PrefixIndex  # noqa: E402
from onerec_dist.sid.tokens import ItemTokenSpec  # noqa: E402
from onerec_dist.sid.vocab import extend_vocabulary  # noqa: E402

PRESET_VOCAB = {"tiny": None, "small": None, "qwen3-0.6b": 151_936}  # None: the benchmark tokenizer's size
FULL = {"presets": "small,qwen3-0.6b", "catalogues": "10k:4x256,100k:4x256,1m:4x256,10k:3x8192,100k:3x8192,1m:3x8192",
        "beams": "10,32,50", "users": 64}
# CPU quick: both code shapes and two catalogue sizes on the small model, beams 10 and 32 (~2-3 min on 2 cores).
QUICK = {"presets": "small", "catalogues": "10k:4x256,100k:3x8192", "beams": "10,32", "users": 8}

# (name, what is switched off, ConstrainedDecoder keyword arguments). "default" first: ratios are against it.
VARIANTS = [
    ("default", "-", dict(normalization="full")),
    ("prefill=once", "(a) shared tree cache -> cache expanded to B*W rows", dict(normalization="full", prefill="once")),
    ("prefill=per_beam", "(a) prefill once -> re-encode prompt per beam",
     dict(normalization="full", prefill="per_beam")),
    ("code_logits=full", "(b) K_l code columns -> full vocabulary rows",
     dict(normalization="full", code_logits="full")),
    ("step_impl=naive", "(c) fused step -> per-row Python loop", dict(normalization="full", step_impl="naive")),
]
CUDA_VARIANTS = [("step_impl=reference", "(c) Triton kernel -> PyTorch reference",
                  dict(normalization="full", step_impl="reference"))]


# ------------------------------------------------------------------------------------------- world


def synthetic_codes(num_items: int, levels: int, codebook: int, zipf: float, seed: int) -> torch.Tensor:
    """[N, L] unique IDs shaped like residual-quantisation codes. Level l's code = (Zipf rank + hash(parent
    prefix)) mod K, so each parent has its own popular children. Repeated IDs (and so over-full popular parents)
    are redrawn uniformly over all K**L IDs until every ID is unique (vectorised: 1M items take ~1 s)."""
    if num_items > codebook**levels:
        raise ValueError(f"{num_items} items do not fit in {codebook}**{levels} IDs")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, codebook + 1) ** zipf
    weights /= weights.sum()
    codes = np.zeros((num_items, levels), dtype=np.int64)
    prefix_hash = np.zeros(num_items, dtype=np.int64)
    for level in range(levels):
        rank = rng.choice(codebook, size=num_items, p=weights)
        codes[:, level] = (rank + prefix_hash % codebook) % codebook
        prefix_hash = (prefix_hash * 1_000_003 + codes[:, level] * 7919 + 12_345) % (1 << 31)
    place = codebook ** np.arange(levels - 1, -1, -1, dtype=np.int64)  # [L] mixed-radix digits
    ids = codes @ place  # [N] one integer per ID
    while True:
        _, first = np.unique(ids, return_index=True)
        repeated = np.ones(num_items, dtype=bool)
        repeated[first] = False
        if not repeated.any():
            break
        ids[repeated] = rng.integers(0, codebook**levels, size=int(repeated.sum()))
    return torch.from_numpy((ids[:, None] // place) % codebook)  # [N, L]


def parse_catalogue(text: str) -> tuple[int, int, int]:
    """'100k:3x8192' -> (100000, 3, 8192)."""
    try:
        size, shape = text.lower().split(":")
        levels, codebook = (int(v) for v in shape.split("x"))
        mult = {"k": 1_000, "m": 1_000_000}.get(size[-1], 1)
        return int(float(size.rstrip("km")) * mult), levels, codebook
    except ValueError as err:
        raise ValueError(f"catalogue {text!r}: expected SIZE:LEVELSxCODEBOOK, e.g. 100k:3x8192") from err


def catalogue_size_label(num_items: int) -> str:
    """1000000 -> '1m', 100000 -> '100k', 2500 -> '2500'."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if num_items % size == 0:
            return f"{num_items // size}{unit}"
    return str(num_items)


def build_model(preset: str, levels: int, codebook: int, args):
    """(model, tokenizer, item tokenizer) on args.device: a random Qwen3 of ``preset`` with the item tokens added."""
    corpus = [next_item_question([]), "The user has purchased, in order: a lamp, a chair, a red speaker, a blue tent."]
    tokenizer = build_tokenizer_from_corpus(corpus * 4, vocab_size=2000)
    overrides = {"vocab_size": PRESET_VOCAB[preset]} if PRESET_VOCAB[preset] else {}
    model = build_tiny_model(tokenizer, preset=preset, seed=args.seed, **overrides).eval()
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(levels, codebook), seed=args.seed)
    return model.to(args.device), tokenizer, item_tok


def build_catalogue(model, tokenizer, item_tok, num_items: int, levels: int, codebook: int, args) -> dict:
    """Codes, our PrefixIndex, HF's trie (both built here, untimed; build times recorded), prompts and batches."""
    codes = synthetic_codes(num_items, levels, codebook, args.zipf, args.seed)  # [N, L]
    started = time.perf_counter()
    index = PrefixIndex.build(codes, item_tok.codebook_sizes)
    index_s = time.perf_counter() - started
    started = time.perf_counter()
    trie = build_trie(item_tok, codes)
    trie_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed + 1)
    popularity = 1.0 / np.arange(1, num_items + 1)
    popularity = popularity[rng.permutation(num_items)] / popularity.sum()
    histories = [rng.choice(num_items, size=int(rng.integers(args.min_history, args.max_history + 1)),
                            p=popularity).tolist() for _ in range(args.users)]
    examples = Examples(users=[f"u{i}" for i in range(args.users)], histories=histories, targets=[0] * args.users)
    prompts = build_prompts(tokenizer, examples, codes.numpy())
    return dict(model=model, tokenizer=tokenizer, item_tok=item_tok, index=index, codes=codes, trie=trie,
                prompts=prompts, batches=length_batches(prompts, args.batch_size), index_build_s=index_s,
                trie_build_s=trie_s)


def decoder_for(world, width: int, top_k: int, **kwargs) -> ConstrainedDecoder:
    return ConstrainedDecoder(world["model"], world["item_tok"], world["index"], width, top_k,
                              pad_token_id=world["tokenizer"].pad_token_id, **kwargs)


def runners_for(world, width: int, top_k: int, ablations: bool, device: torch.device) -> dict:
    """name -> (switch description, fn: prompts -> (items [b, K], scores [b, K]) on the host)."""
    variants = VARIANTS + (CUDA_VARIANTS if device.type == "cuda" else []) if ablations else VARIANTS[:1]
    runners = {}
    for name, switch, kwargs in variants:
        decoder = decoder_for(world, width, top_k, **kwargs)
        runners[name] = (switch, lambda prompts, d=decoder: (lambda r: (r.items.cpu(), r.scores.float().cpu()))(
            d.decode(prompts)))
    runners["hf_generate"] = ("baseline: HF generate + trie", lambda prompts: hf_beam_search(
        world["model"], world["item_tok"], world["codes"], prompts, width, top_k, world["tokenizer"].pad_token_id,
        trie=world["trie"]))
    return runners


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_passes(runners: dict, world, n_repeats: int, device: torch.device):
    """Pass seconds [repeats] per runner (batches interleaved across runners, order rotating) and the first pass's
    outputs {name: (items [U, K], scores [U, K])}."""
    users, batches = len(world["prompts"]), world["batches"]
    names = list(runners)
    for name in names:  # first-call overheads (allocator, lazy imports) out of the timing
        runners[name][1]([world["prompts"][i] for i in batches[0][:2]])
    passes = {name: [0.0] * n_repeats for name in names}
    outputs = {}
    for repeat in range(n_repeats):
        for number, batch in enumerate(batches):
            prompts = [world["prompts"][i] for i in batch]
            shift = (repeat + number) % len(names)
            for name in names[shift:] + names[:shift]:
                _sync(device)
                started = time.perf_counter()
                items, scores = runners[name][1](prompts)
                _sync(device)
                passes[name][repeat] += time.perf_counter() - started
                if repeat == 0:
                    out = outputs.setdefault(name, (torch.empty(users, items.shape[1], dtype=torch.long),
                                                    torch.empty(users, items.shape[1])))
                    out[0][batch], out[1][batch] = items, scores
    return passes, outputs


def measure_point(world, point: dict, width: int, args, device: torch.device, ablations: bool) -> dict:
    """One grid point: our default decoder vs HF (+ ablations) at beam width ``width``."""
    top_k = width
    runners = runners_for(world, width, top_k, ablations, device)
    passes, outputs = time_passes(runners, world, repeats(args), device)
    users = len(world["prompts"])
    ours_t, hf_t = passes["default"], passes["hf_generate"]
    (ours, ours_scores), (hf, hf_scores) = outputs["default"], outputs["hf_generate"]
    agreeing = (ours == hf).all(1)  # [U]
    paired = summarize([h / o for h, o in zip(hf_t, ours_t)])  # per-repeat speedups (same repeat = same load)
    row = {**point, "beam_width": width, "top_k": top_k, "users": users,
           "trie_build_s": world["trie_build_s"], "index_build_s": world["index_build_s"],
           **stat_columns("ours_pass_s", summarize(ours_t)), **stat_columns("hf_pass_s", summarize(hf_t)),
           "users_per_s_ours": users / summarize(ours_t)["median"], "users_per_s_hf": users / summarize(hf_t)["median"],
           "speedup_vs_hf": ratio_of_medians(hf_t, ours_t), "speedup_q1": paired["q1"], "speedup_q3": paired["q3"],
           "speedup_iqr": paired["iqr"], "speedup_best_of": min(hf_t) / min(ours_t),
           "topk_agreement": float(agreeing.float().mean()), "top1_agreement": float((ours[:, 0] == hf[:, 0]).float()
                                                                                     .mean()),
           "score_max_abs_diff_where_agreeing": float((ours_scores - hf_scores)[agreeing].abs().max())
           if bool(agreeing.any()) else None,
           "validity_ours": float((ours >= 0).float().mean()), "validity_hf": float((hf >= 0).float().mean()),
           "_passes": passes}
    if ablations:
        row["ablations"] = [{"variant": name, "switched_off": switch, **stat_columns("pass_s", summarize(passes[name])),
                             "slowdown_vs_default": ratio_of_medians(passes[name], ours_t),
                             "same_topk_as_default": float((outputs[name][0] == ours).all(1).float().mean())}
                            for name, (switch, _) in runners.items() if name != "hf_generate"]
    return row


# ------------------------------------------------------------------------------------------- step kernel (CUDA)
def step_shapes(world, width: int) -> list[tuple[int, int, int]]:
    """(rows, codes, k) of every constrained_step call of the default decoder on the first batch."""
    decoder = decoder_for(world, width, width)
    shapes, step = [], decoder._step

    def record(logits, allowed, beam_scores, k, norm_lse, offset):
        shapes.append((logits.shape[0], logits.shape[1], k))
        return step(logits, allowed, beam_scores, k, norm_lse, offset)

    decoder._step = record
    decoder.decode([world["prompts"][i] for i in world["batches"][0]])
    return list(dict.fromkeys(shapes))


def step_kernel_report(world, width: int, args, device: torch.device) -> dict:
    """bench_constrained_step's timing of the step on this decode's shapes, against the bytes it must move, as a
    fraction of the copy bandwidth measured now on this device."""
    spec = importlib.util.spec_from_file_location("bench_constrained_step", Path(__file__).with_name(
        "bench_constrained_step.py"))
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    bandwidth = bench_step.copy_bandwidth(device)
    step_args = argparse.Namespace(reps=args.step_reps, warmup=2, peak_gbps=bandwidth["median"] / 1e9)
    return {"copy_bandwidth_bytes_per_s": bandwidth,
            "shapes": [bench_step.bench_shape(rows, codes, k, "fp32", device, step_args)
                       for rows, codes, k in step_shapes(world, width)]}


# ------------------------------------------------------------------------------------------- output
TABLE = [("preset", "preset"), ("catalogue", "catalogue"), ("beam_width", "W"), ("users_per_s_ours", "ours u/s"),
         ("users_per_s_hf", "HF u/s"), ("speedup_vs_hf", "speedup(med)"), ("speedup_q1", "q1"), ("speedup_q3", "q3"),
         ("speedup_best_of", "best-of"), ("topk_agreement", "top-K agree"), ("trie_build_s", "trie_s")]


def plot(rows: list[dict], path: Path, title: str) -> Path:
    fig, (left, right) = new_figure(2, width_per_panel=7.0, height=4.8)
    labels = [f"{r['preset']}\n{r['catalogue']}\nW={r['beam_width']}" for r in rows]
    x = np.arange(len(rows))
    users = [r["users"] for r in rows]
    for key, name, offset in (("ours_pass_s", "ours", -0.1), ("hf_pass_s", "HF generate + trie", 0.1)):
        # users/s = users / pass seconds: the median maps to the median, q1 of seconds to q3 of users/s
        stats = [{"median": u / r[key], "q1": u / r[f"{key}_q3"], "q3": u / r[f"{key}_q1"]} for u, r in zip(users, rows)]
        errorbar(left, x + offset, stats, fmt="o", label=name)
    left.set_yscale("log")
    left.set(ylabel="users / s (median, IQR whiskers; log)", title="throughput")
    speed = [{"median": r["speedup_vs_hf"], "q1": r["speedup_q1"], "q3": r["speedup_q3"]} for r in rows]
    errorbar(right, x, speed, fmt="o", label="median of passes (IQR of paired repeats)")
    right.axhline(1.0, color="black", lw=0.8)
    right.set(ylabel="speedup vs HF (x)", title="speedup = median HF pass / median ours pass")
    for ax in (left, right):
        ax.set_xticks(x, labels, fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--presets", default=None, help=f"comma list (default {FULL['presets']}; quick "
                                                        f"{QUICK['presets']})")
    parser.add_argument("--catalogues", default=None, help=f"comma list of SIZE:LxK (default {FULL['catalogues']}; "
                                                           f"quick {QUICK['catalogues']})")
    parser.add_argument("--beams", default=None, help=f"comma list (default {FULL['beams']}; quick {QUICK['beams']})")
    parser.add_argument("--users", type=int, default=None, help="users per pass (default 64, quick 8)")
    parser.add_argument("--ablations", choices=["auto", "on", "off"], default="auto",
                        help="auto: on for the first grid point in full mode, off with --quick")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=32, help="users per length batch (eval's default)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the code draws")
    parser.add_argument("--min-history", type=int, default=10)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-reps", type=int, default=20, help="repetitions per step shape (CUDA)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else FULL
    args.presets = (args.presets or grid["presets"]).split(",")
    if unknown := [p for p in args.presets if p not in PRESET_VOCAB]:
        parser.error(f"--presets {unknown}: choose from {', '.join(PRESET_VOCAB)}")
    try:
        args.catalogues = [parse_catalogue(c) for c in (args.catalogues or grid["catalogues"]).split(",")]
        args.beam_widths = [int(b) for b in (args.beams or grid["beams"]).split(",")]
    except ValueError as err:
        parser.error(str(err))
    args.users = args.users or grid["users"]
    if min(args.beam_widths) < 1 or max(args.beam_widths) > min(n for n, _, _ in args.catalogues):
        parser.error("--beams entries must be in [1, smallest catalogue]")
    if not 1 <= args.min_history <= args.max_history:
        parser.error("--min-history must be >= 1 and <= --max-history")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    repeats(args)  # validates --repeats
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = start_run("constrained_decoding", args)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        for levels, codebook in dict.fromkeys((lv, k) for _, lv, k in args.catalogues):
            model, tokenizer, item_tok = build_model(preset, levels, codebook, args)
            params = sum(p.numel() for p in model.parameters())
            for num_items in [n for n, lv, k in args.catalogues if (lv, k) == (levels, codebook)]:
                world = build_catalogue(model, tokenizer, item_tok, num_items, levels, codebook, args)
                point = {"preset": preset, "params": params, "vocab_rows": model.get_output_embeddings().weight.shape[0],
                         "catalogue": f"{catalogue_size_label(num_items)}:{levels}x{codebook}", "num_items": num_items,
                         "levels": levels, "codebook": codebook}
                for width in args.beam_widths:
                    ablate = args.ablations == "on" or (args.ablations == "auto" and not args.quick and not rows)
                    row = measure_point(world, point, width, args, device, ablate)
                    if device.type == "cuda":
                        row["step_kernel"] = step_kernel_report(world, width, args, device)
                    rows.append(row)
                    print(format_table([row], TABLE), flush=True)
            del model
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print(format_table(public, TABLE))
    stem = f"constrained_decoding_{device_suffix(args.device)}{'_' + args.tag if args.tag else ''}"
    report = {"timing": "pass = sum over length batches; figures are medians over interleaved repeats with IQR; "
                        "speedup = ratio of medians, IQR from per-repeat paired ratios; best-of beside",
              "threads": torch.get_num_threads(), "results": public,
              "pass_seconds": [{"preset": r["preset"], "catalogue": r["catalogue"], "beam_width": r["beam_width"],
                                **r["_passes"]} for r in rows]}
    path = run.finish(report, stem, args.out_dir)
    write_csv(public, path.with_suffix(".csv"))
    plot(public, path.with_suffix(".png"), f"{args.device}, {torch.get_num_threads()} threads, "
                                           f"{run.provenance['cpu_model']}, top-K = W")
    print(f"wrote {path} (+ .csv, .png) in {run.wall_s:.0f} s")
    return report


if __name__ == "__main__":
    main()
