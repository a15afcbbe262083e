"""One GRPO step with the Rollout-Beam reward: ours (onerec_dist/distributed/rl_worker.grpo_step: one batched
rationale generate, ONE batched constrained decode of all B*G prefixes) vs TRL's ``GRPOTrainer`` whose reward
function runs HF ``generate(num_beams=K, prefix_allowed_tokens_fn=trie)`` once per completion (the public fork's
approach). Same model, prompts, G, K, rationale cap, lr, KL and clip.

    .venv/bin/python benchmarks/bench_rl_step.py --quick --allow-dirty      # toy size on CPU
    benchmarks/gpu_check.sh                                                # GPU variant: Qwen3-0.6B shape, G=16, K=32

Reports speedup_step_vs_trl (median TRL step / median ours), speedup_reward_vs_trl (reward phases likewise),
reward_share_of_step (ours: reward phase / whole step), each from interleaved repeats (median / IQR,
benchmarks/_common.py). TRL installs with the pinned stack through the optional extra ``bench`` (trl>=1.16).
Both sides run in this process, one thread pool, single device (no Ray / DeepSpeed: the step, not the launcher).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import add_common_args, interleaved, ratio_of_medians, repeats, start_run, summarize  # noqa

SIZES = {"quick": dict(preset="tiny", levels=[4, 4, 4], items=40, users=8, G=4, K=4, B=2, T=8),
         "cpu": dict(preset="tiny", levels=[8, 8, 8], items=300, users=32, G=8, K=16, B=2, T=32),
         "gpu": dict(preset="qwen3-0.6b", levels=[256, 256, 256], items=10000, users=64, G=16, K=32, B=2, T=64)}


class LocalStrategy:
    """The strategy's interface in one process (identity collectives, plain AdamW), for timing the step alone."""

    rank, world_size, is_rank0 = 0, 1, True

    def __init__(self, model, lr: float):
        self.engine, self.device = model, model.get_output_embeddings().weight.device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def all_reduce(self, values):
        return values.detach().double().clone()

    @contextlib.contextmanager
    def gathered_parameters(self, model=None):
        module = model or self.engine
        module.eval()
        try:
            yield module
        finally:
            module.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def build_world(size: dict, device: str):
    """(model, tokenizer, item_tokenizer, think, codes [I, L], users PromptSet)."""
    from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
    from onerec_dist.reasoning.cot_format import add_think_tokens, inference_prompt
    from onerec_dist.recipes.grpo import PromptSet
    from onerec_dist.sid.tokens import ItemTokenSpec
    from onerec_dist.sid.vocab import extend_vocabulary

    gen = torch.Generator().manual_seed(0)
    levels = size["levels"]
    space = int(np.prod(levels))
    rows = torch.randperm(space, generator=gen)[:size["items"]]
    codes = np.stack([(rows // int(np.prod(levels[i + 1:]))) % levels[i] for i in range(len(levels))], 1).astype(
        np.int64)                                                                         # [I, L] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair, then"] * 4, 300)
    model = build_tiny_model(tokenizer, size["preset"], seed=0)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(len(levels), levels), seed=0)
    think = add_think_tokens(model, tokenizer, seed=0)
    rng = np.random.default_rng(0)
    histories = [rng.choice(size["items"], 5, replace=False).tolist() for _ in range(size["users"])]
    targets = rng.integers(0, size["items"], size["users"])
    prompts = [inference_prompt(tokenizer, think, codes, h) for h in histories]
    return model.to(device), tokenizer, item_tok, think, codes, PromptSet(prompts, targets, codes[targets],
                                                                          histories)


def ours(world, size, rl_cfg):
    """A callable running one of our GRPO steps; its phase seconds are appended to ``phases``."""
    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.distributed.rl_worker import grpo_step
    from onerec_dist.recipes.grpo import PromptSampler
    from onerec_dist.sid.prefix_index import PrefixIndex

    model, tokenizer, item_tok, think, codes, users = world
    actor = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    strategy = LocalStrategy(actor, rl_cfg.lr)
    index = PrefixIndex.build(torch.as_tensor(codes), item_tok.codebook_sizes)
    decoder = ConstrainedDecoder(actor, item_tok, index, size["K"], size["K"])
    sampler = PromptSampler(len(users), size["B"], 0, 1, 0)
    config, phases, step = {"rl": rl_cfg, "train": users}, [], [0]

    def run():
        _, seconds = grpo_step(strategy, actor, reference, config, think, tokenizer.pad_token_id, decoder, sampler,
                               step[0])
        step[0] += 1
        phases.append(seconds)
    return run, phases


def trl_step(world, size, rl_cfg, workdir: Path):
    """A callable running one TRL GRPOTrainer step; reward seconds of each step are appended to ``reward_s``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from onerec_dist.decoding.hf_baseline import build_trie, hf_beam_search
    from onerec_dist.reasoning.cot_format import close_think
    from onerec_dist.rl.rewards import rollout_beam_reward

    model, tokenizer, item_tok, think, codes, users = world
    codes_t = torch.as_tensor(codes)
    trie = build_trie(item_tok, codes_t)
    text = [tokenizer.decode(p) for p in users.prompts]
    reward_s, current = [], [0.0]

    def beam_reward(prompts, completions, completion_ids, target, **_):
        begin = time.perf_counter()
        out = []
        for prompt, ids, item in zip(prompts, completion_ids, target):
            ids = list(ids)
            body = ids[:ids.index(think.end_id)] if think.end_id in ids else ids
            prefix = close_think(think, tokenizer.encode(prompt, add_special_tokens=False), body)
            items, _ = hf_beam_search(policy, item_tok, codes_t, [prefix], size["K"], size["K"],
                                      tokenizer.pad_token_id, trie)               # one beam search per completion
            beams = codes_t[items.clamp(min=0)].masked_fill((items < 0).unsqueeze(-1), -1)       # [1, K, L]
            out.append(float(rollout_beam_reward(beams, codes_t[[int(item)]])[0]))
        current[0] += time.perf_counter() - begin
        return out

    args = GRPOConfig(output_dir=str(workdir), per_device_train_batch_size=size["B"] * size["G"],
                      num_generations=size["G"], max_completion_length=size["T"], temperature=rl_cfg.temperature,
                      learning_rate=rl_cfg.lr, beta=rl_cfg.kl_coef, epsilon=rl_cfg.clip, max_steps=10 ** 6,
                      report_to="none", save_strategy="no", logging_steps=10 ** 6, bf16=False, seed=0,
                      use_cpu=not torch.cuda.is_available())
    # TRL builds its reference model from the policy's path, so the policy goes through a saved directory
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    policy = None
    trainer = GRPOTrainer(model=str(workdir / "model"), reward_funcs=[beam_reward], args=args,
                          processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": text, "target": users.targets.tolist()}))
    policy = trainer.model
    trainer.create_optimizer_and_scheduler(num_training_steps=10 ** 6)
    batches = iter(trainer.get_train_dataloader())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this step bypasses

    def run():
        current[0] = 0.0
        batch = next(batches)
        trainer.model.train()
        loss = trainer.training_step(trainer.model, batch, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        reward_s.append(current[0])
        return loss
    return run, reward_s


def main(argv=None) -> dict:
    from onerec_dist.recipes.grpo import RLConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: quick with --quick, else cpu")
    args = parser.parse_args(argv)
    size_name = args.size or ("quick" if args.quick else ("gpu" if args.device == "cuda" else "cpu"))
    size = SIZES[size_name]
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    run = start_run("bench_rl_step", args)
    world = build_world(size, device)
    rl_cfg = RLConfig(group_size=size["G"], beam_width=size["K"], prompts_per_rank=size["B"],
                      max_think_tokens=size["T"], lr=1e-5, kl_coef=1e-3, clip=0.2)
    ours_fn, ours_phases = ours(world, size, rl_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trl_fn, trl_reward = trl_step(world, size, rl_cfg, Path(tmp))
        times = interleaved({"ours": ours_fn, "trl": trl_fn}, repeats=repeats(args), warmup=1)
    ours_reward = [p["reward"] for p in ours_phases[-len(times["ours"]):]]
    trl_reward = trl_reward[-len(times["trl"]):]
    result = {"size": size_name, "config": size, "device": device,
              "step_ours": summarize(times["ours"]), "step_trl": summarize(times["trl"]),
              "reward_ours": summarize(ours_reward), "reward_trl": summarize(trl_reward),
              "speedup_step_vs_trl": ratio_of_medians(times["trl"], times["ours"]),
              "speedup_reward_vs_trl": ratio_of_medians(trl_reward, ours_reward),
              "reward_share_of_step": float(np.median(ours_reward) / np.median(times["ours"])),
              "phases_ours": {k: summarize([p[k] for p in ours_phases]) for k in ours_phases[0]}}
    print(f"GRPO step ({size_name}, G={size['G']}, K={size['K']}, B={size['B']}): ours "
          f"{result['step_ours']['median']:.3f} s, TRL {result['step_trl']['median']:.3f} s -> "
          f"{result['speedup_step_vs_trl']:.2f}x; reward phase {result['speedup_reward_vs_trl']:.2f}x; "
          f"reward share of our step {result['reward_share_of_step']:.1%}")
    # the device's default size writes bench_rl_step_<device>.json; another size adds its name (…_cpu_quick.json)
    default_size = "gpu" if device == "cuda" else "cpu"
    stem = f"bench_rl_step_{default_size}" + ("" if size_name == default_size else f"_{size_name}")
    run.finish(result, stem=stem, out_dir=args.out_dir)
    return result


if __name__ == "__main__":
    main()
