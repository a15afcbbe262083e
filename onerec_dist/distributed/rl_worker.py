"""The GRPO loop on every Ray worker (``rl_loop``, run through ``worker_group.run_on_workers``); the steps it runs
are the recipe's pure functions (onerec_dist/recipes/grpo.py, which explains one step).

Rollouts (``rl.rollout.backend``):
  * ``colocated`` (default): generation and the reward's constrained decode use the actor's own weights inside
    ``strategy.gathered_parameters()`` (ZeRO-3: gathered once per phase; below ZeRO-3 whole already), so no weight
    copy exists; the ``sync`` phase is the all-reduce of the step's statistics;
  * ``actors``: rank r sends its prompts to rollout actor ``r % num_actors`` (``config["rollout_actors"]``, created
    by the driver; onerec_dist/distributed/rollout_pool.py), which runs the same two calls on its own copy of the
    policy. After each step's update rank 0 streams the trained weights to every actor in buckets
    (``rollout_pool.sync_weights``; LoRA: adapters only) and all ranks wait at a barrier, so no rank samples from
    stale weights; the ``sync`` phase then also holds the weight copy, and ``sync_bytes`` is logged per step.
    Held-out evaluation stays on the workers. A run (also a resumed one) first syncs the actors to its weights.
What trains (``rl.trainable``, ``prepare_policy``): all weights against a frozen copy, or LoRA adapters plus the item /
think token rows against the actor with its adapters disabled (no second model; the export merges the adapters).
Every phase is timed (rollout, reward, reference, update, sync). Checkpoints (``rl.checkpoint_every``) hold the
DeepSpeed state plus the reward history, the prompt sampler's position and the RNG states (strategy.save_checkpoint);
the sampling seed of a step is a function of (rl.seed, step, rank), so a resumed run draws the uninterrupted run's
rationales, on either backend.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from onerec_dist.recipes import grpo
from onerec_dist.rl.advantages import group_advantages
from onerec_dist.rl.losses import grpo_loss

PHASES = ("rollout", "reward", "reference", "update", "sync")
CHECKPOINTS_DIR = "checkpoints"
# per-step sums the update phase adds (the rollout's are grpo.rollout_stats)
UPDATE_STATS = ("tokens", "kl_sum", "pg_sum", "clipped_tokens", "entropy_sum", "item_nll_sum", "item_tokens")


def load_policy(model_dir: str, dtype: str):
    from onerec_dist.models import load_pretrained

    return load_pretrained(model_dir, "auto", {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype, "auto"))


def prepare_policy(strategy, config: dict[str, Any], num_items: int):
    """(actor engine, reference, tokenizer, think tokens, item tokenizer) of ``config["model_dir"]``.

    rl.trainable=full: every weight trains; the reference is a second, frozen load of the starting model
    (``config["reference_dir"]`` when given), hosted by the strategy (ZeRO-3: its own partitioned engine).
    rl.trainable=lora: the loaded policy gets LoRA adapters and trainable item / think token rows
    (training/lora.wrap_lora, as CoT SFT) before ``strategy.prepare``; the reference is the actor with its adapters
    disabled (``prepare_reference(None)``), i.e. exactly the loaded model, and no second model is loaded."""
    from onerec_dist.reasoning.cot_format import new_token_rows
    from onerec_dist.sid.tokens import ItemTokenizer
    from onerec_dist.training.engine_api import default_param_groups
    from onerec_dist.training.lora import lora_param_groups, wrap_lora

    cfg: grpo.RLConfig = config["rl"]
    model, tokenizer = load_policy(config["model_dir"], strategy.trainer.precision)
    think, item_tok = grpo.check_policy(tokenizer, ItemTokenizer.from_tokenizer, num_items, cfg)
    if cfg.trainable == "lora":
        if config.get("reference_dir"):
            raise ValueError("rl.trainable=lora: the reference is the actor with its adapters disabled (the loaded "
                             "model); a separate reference_dir is only for rl.trainable=full")
        model = wrap_lora(model, cfg.lora, new_token_rows(item_tok, think))
        engine = strategy.prepare(model, lora_param_groups(model, strategy.trainer.weight_decay))
        return engine, strategy.prepare_reference(None, cfg.reference_dtype), tokenizer, think, item_tok
    reference_model, _ = load_policy(config.get("reference_dir") or config["model_dir"], strategy.trainer.precision)
    grpo.check_reference(model, reference_model)
    model.requires_grad_(True)
    engine = strategy.prepare(model, default_param_groups(model, strategy.trainer.weight_decay))
    return engine, strategy.prepare_reference(reference_model, cfg.reference_dtype), tokenizer, think, item_tok


def _build(strategy, config: dict[str, Any]):
    """Actor engine, reference, tokenizer, think tokens, decoders."""
    from onerec_dist.decoding.beam_search import ConstrainedDecoder
    from onerec_dist.sid.prefix_index import PrefixIndex

    cfg: grpo.RLConfig = config["rl"]
    item_codes = torch.as_tensor(config["item_codes"], dtype=torch.long)                     # [I, L]
    engine, reference, tokenizer, think, item_tok = prepare_policy(strategy, config, len(item_codes))
    strategy.set_schedule_length(strategy.trainer.max_steps)  # rl.max_steps x updates: the whole budget (no passes)
    index = PrefixIndex.build(item_codes, item_tok.codebook_sizes)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    module = getattr(engine, "module", engine)
    decoder = reward_decoder(module, item_tok, index, cfg, pad)
    width = min(max(cfg.beam_width, 10), len(item_codes))
    eval_decoder = ConstrainedDecoder(module, item_tok, index, width, min(10, width), cfg.normalization,
                                      pad_token_id=pad, row_budget=cfg.row_budget)
    return engine, reference, tokenizer, think, pad, decoder, eval_decoder


def reward_decoder(module, item_tok, index, cfg: grpo.RLConfig, pad: int):
    """The reward's constrained decoder over ``module`` (K beams, all K returned): one definition for the workers
    and the rollout actors, so both decode alike."""
    from onerec_dist.decoding.beam_search import ConstrainedDecoder

    return ConstrainedDecoder(module, item_tok, index, cfg.beam_width, cfg.beam_width, cfg.normalization,
                              pad_token_id=pad, row_budget=cfg.row_budget)


def rollout_phase(module, decoder, think, prompts: grpo.PromptSet, cfg: grpo.RLConfig, pad: int, seed: int, mark,
                  sampler=None) -> tuple[grpo.Rollout, torch.Tensor, torch.Tensor]:
    """(rollout, rewards [B, G], per-level best match [N, L]) of ``prompts`` from ``module`` (whole weights, eval
    mode, no grad): G sampled rationales per prompt, then ONE constrained decode of all B*G prefixes.
    ``mark("rollout")`` is called between the two (the phase clock). Run by a worker (colocated) or a rollout
    actor; an actor with ``rl.rollout.engine=vllm`` passes its ``sampler`` (vllm_rollout.VLLMRationaleSampler) for
    the text, the decode stays on ``module``."""
    if sampler is None:
        rollout = grpo.sample_rationales(module, think, prompts, cfg, pad, seed)
    else:
        repeated = grpo.grouped_prompts(prompts, cfg.group_size)                              # [N]
        bodies, closed = sampler.sample(repeated, cfg.max_think_tokens, cfg.temperature, seed)
        rollout = grpo.rollout_of(prompts, cfg.group_size, repeated, bodies, closed)
    mark("rollout")
    rewards, per_level = grpo.rollout_rewards(decoder, think, rollout, cfg.reward)              # [B, G], [N, L]
    return rollout, rewards, per_level


def _heldout(strategy, config, think, pad, eval_decoder) -> dict[str, float]:
    """Recall@10 and reward (think mode, greedy) of the held-out users, sharded over ranks and all-reduced."""
    cfg: grpo.RLConfig = config["rl"]
    users: grpo.PromptSet = config["heldout"]
    mine = users.take(range(strategy.rank, len(users), strategy.world_size))
    with strategy.gathered_parameters() as module, torch.no_grad():
        sums = grpo.heldout_sums(module, eval_decoder, think, mine, cfg.reward, cfg.max_think_tokens, pad,
                                 probe_temperature=cfg.temperature if cfg.heldout_probe else None,
                                 seed=cfg.seed + strategy.rank)
    user_hits = torch.zeros(len(users), dtype=torch.float64)                                 # [U], global order
    user_hits[strategy.rank::strategy.world_size] = torch.as_tensor(sums.pop("user_hits"))
    names = sorted(sums)
    totals = dict(zip(names, strategy.all_reduce(torch.tensor([sums[n] for n in names])).tolist()))
    return grpo.heldout_report(totals, strategy.all_reduce(user_hits).numpy())


def _update(strategy, engine, cfg: grpo.RLConfig, batch, stats: dict[str, float]) -> None:
    """``updates_per_rollout`` optimizer steps on the rollout batch; loss / global loss units (token-mean), plus
    rl.item_nll_coef x the next-item loss / global code tokens when the batch carries ``item_mask``."""
    parts = grpo.micro_batches(batch, cfg.micro_batch_rollouts)
    with_items = "item_mask" in batch
    for _ in range(cfg.updates_per_rollout):
        local_units = local_items = 0
        for part in parts:
            mask = part["action_mask"][:, 1:]
            local_units += int(mask.sum()) if cfg.loss_agg_mode == "token-mean" else int((mask.sum(-1) > 0).sum())
            local_items += int(part["item_mask"][:, 1:].sum()) if with_items else 0
        units, items = strategy.all_reduce(torch.tensor([float(local_units), float(local_items)])).tolist()
        # the engine averages gradients over ranks: x world_size makes it a sum over the global batch's units
        scale, item_scale = strategy.world_size / max(units, 1.0), strategy.world_size / max(items, 1.0)
        for part in parts:
            logits = grpo.next_token_logits(engine, part)                                      # [n, T-1, V]
            logp, entropy = grpo.logprobs_of(logits, part, cfg.temperature, with_entropy=True)
            mask = part["action_mask"][:, 1:]
            out = grpo_loss(logp, part["old_logprobs"], part["ref_logprobs"], part["advantages"], mask,
                            clip_low=cfg.clip, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, mode=cfg.loss_agg_mode)
            loss = out.loss_sum * scale
            if with_items:
                nll_sum, item_tokens = grpo.item_nll_sum(logits, part)
                loss = loss + cfg.item_nll_coef * nll_sum * item_scale
                stats["item_nll_sum"] += float(nll_sum.detach())
                stats["item_tokens"] += item_tokens
            strategy.backward(loss)
            strategy.step()
            stats["tokens"] += out.tokens
            stats["kl_sum"] += float(out.kl_sum)
            stats["pg_sum"] += float(out.pg_sum)
            stats["clipped_tokens"] += out.clipped_tokens
            stats["entropy_sum"] += float((entropy * mask).sum())
    # statistics of the last update are what a reader wants; earlier updates are divided out
    for key in UPDATE_STATS:
        stats[key] /= cfg.updates_per_rollout


def grpo_step(strategy, engine, reference, config, think, pad, decoder, sampler, step: int
              ) -> tuple[dict[str, float], dict[str, float]]:
    """One GRPO step on this rank (recipes/grpo.py); returns (this rank's stat sums, seconds per phase)."""
    cfg: grpo.RLConfig = config["rl"]
    seconds, clock = dict.fromkeys(PHASES, 0.0), time.perf_counter()

    def mark(phase):
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] += now - clock
        clock = now

    prompts = config["train"].take(sampler.next_rows())
    seed = (cfg.seed * 1_000_003 + step) * 4096 + strategy.rank
    actors = config.get("rollout_actors")
    if actors:
        from onerec_dist.distributed import rollout_pool

        # the actor's weights are version `step` (synced after the previous step's update, or at the start)
        rollout, rewards, per_level, remote = rollout_pool.remote_rollout(
            actors[strategy.rank % len(actors)], prompts, seed, step)
        mark("rollout")  # the whole call; its reward part is the actor's own decode time
        seconds["rollout"] -= remote["reward"]
        seconds["reward"] += remote["reward"]
    else:
        with strategy.gathered_parameters() as module, torch.no_grad():
            rollout, rewards, per_level = rollout_phase(module, decoder, think, prompts, cfg, pad, seed, mark)
    stats = grpo.rollout_stats(rewards, per_level, rollout)
    if cfg.debug.shuffle_rewards:
        rewards = grpo.shuffle_rewards(rewards, seed)
    targets = grpo.target_item_ids(decoder.item_tokenizer, rollout) if cfg.item_nll_coef > 0 else None
    batch = grpo.policy_batch(think, rollout, group_advantages(rewards, cfg.advantage), pad, targets)
    if targets is not None:  # the (possibly shuffled) rewards pick the rows: the control loses this signal too
        batch["item_mask"] *= grpo.item_nll_row_mask(rewards, cfg.item_nll_rows).unsqueeze(-1).long()   # [N, T]
    batch = {k: v.to(strategy.device) for k, v in batch.items()}
    mark("reward")
    with torch.no_grad():
        batch["old_logprobs"] = torch.cat([grpo.sequence_logprobs(engine, p, cfg.temperature)[0]
                                           for p in grpo.micro_batches(batch, cfg.micro_batch_rollouts)])
        batch["ref_logprobs"] = torch.cat([grpo.sequence_logprobs(reference, p, cfg.temperature)[0].float()
                                           for p in grpo.micro_batches(batch, cfg.micro_batch_rollouts)])
    mark("reference")
    stats.update(dict.fromkeys(UPDATE_STATS, 0.0))
    _update(strategy, engine, cfg, batch, stats)
    mark("update")
    if actors:
        from onerec_dist.distributed import rollout_pool

        stats["synced_bytes"] = float(rollout_pool.sync_weights(strategy, actors, step + 1,
                                                                cfg.rollout.sync_bucket_bytes))
        mark("sync")
    return stats, seconds


def _all_reduce_stats(strategy, stats: dict[str, float]) -> dict[str, float]:
    names = sorted(stats)
    return dict(zip(names, strategy.all_reduce(torch.tensor([stats[n] for n in names])).tolist()))


def _save(strategy, output_dir: Path, state: dict, sampler, fingerprint: dict) -> str:
    step = state["step"]
    final = output_dir / CHECKPOINTS_DIR / f"checkpoint_step{step:08d}"
    staging = output_dir / "checkpoint_staging" / final.name / f"rank{strategy.rank}"
    shutil.rmtree(staging, ignore_errors=True)
    strategy.save_checkpoint(staging, f"step{step}", {"state": state, "sampler": sampler.state_dict()},
                             {**fingerprint, "step": step})
    shutil.copytree(staging, final, dirs_exist_ok=True)  # ranks write disjoint files (their own shards / state)
    strategy.barrier()
    shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def rl_loop(strategy, config: dict[str, Any]) -> dict[str, Any]:
    """The whole GRPO run on this rank; rank 0 returns the summary (recipes/grpo.summarise), others None."""
    from onerec_dist.distributed.worker import RankZeroLogger, _quiet_known_harmless_output

    _quiet_known_harmless_output()
    cfg: grpo.RLConfig = config["rl"]
    output_dir = Path(config["output_dir"])
    engine, reference, tokenizer, think, pad, decoder, eval_decoder = _build(strategy, config)
    sampler = grpo.PromptSampler(len(config["train"]), cfg.prompts_per_rank, strategy.rank, strategy.world_size,
                                 cfg.seed)
    fingerprint = {"zero_stage": strategy.ds.zero_stage, "precision": strategy.trainer.precision}
    state: dict[str, Any] = {"step": 0, "history": [], "heldout": {}, "timing": dict.fromkeys(PHASES, 0.0)}
    if config.get("resume_dir"):
        client = strategy.load_checkpoint(config["resume_dir"], fingerprint)
        state, _ = client["state"], sampler.load_state_dict(client["sampler"])
    actors = config.get("rollout_actors")
    if actors:  # the actors loaded the starting model; a resumed (or LoRA) actor differs from it: sync first
        from onerec_dist.distributed import rollout_pool

        sent = rollout_pool.sync_weights(strategy, actors, state["step"], cfg.rollout.sync_bucket_bytes)
        if strategy.is_rank0:
            print(f"rl: {len(actors)} rollout actor(s) hold weight version {state['step']} ({sent / 2**20:.2f} MiB "
                  f"synced; every update sends the same in buckets of {cfg.rollout.sync_bucket_mb:g} MB)", flush=True)
    evaluate = len(config["heldout"]) > 0
    if evaluate and "before" not in state["heldout"]:
        state["heldout"]["before"] = _heldout(strategy, config, think, pad, eval_decoder)
        warning = grpo.probe_warning(state["heldout"]["before"], cfg.temperature)
        if warning and strategy.is_rank0:
            print(warning, flush=True)
    logger = RankZeroLogger(strategy.trainer, output_dir, strategy.rank, state["step"],
                            {"rl": asdict(cfg), "trainer": asdict(strategy.trainer)}, config.get("progress", "lines"))
    checkpoint = None
    engine.train()
    try:
        while state["step"] < cfg.max_steps:
            local, seconds = grpo_step(strategy, engine, reference, config, think, pad, decoder, sampler,
                                       state["step"])
            clock = time.perf_counter()
            totals = _all_reduce_stats(strategy, local)
            seconds["sync"] += time.perf_counter() - clock
            state["step"] += 1
            row = {**grpo.step_row(totals, state["step"]), **{f"time/{k}": v for k, v in seconds.items()}}
            if "synced_bytes" in totals:  # rollout actors: bytes sent by the weight sync after this update
                row["sync_bytes"] = totals["synced_bytes"]
            for phase, value in seconds.items():
                state["timing"][phase] += value
            state["history"].append(row)
            if logger.bar is not None:
                logger.bar.update(1, reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.2e}")
            if state["step"] % cfg.log_every == 0:
                logger.log(row)
            if evaluate and cfg.heldout_every and state["step"] % cfg.heldout_every == 0:
                state["heldout"][f"step{state['step']}"] = _heldout(strategy, config, think, pad, eval_decoder)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                checkpoint = _save(strategy, output_dir, state, sampler, fingerprint)
    finally:
        logger.close()
    if evaluate:
        state["heldout"]["after"] = _heldout(strategy, config, think, pad, eval_decoder)
    export_dir = output_dir / "export"
    strategy.export_hf(engine, tokenizer, export_dir)
    if not strategy.is_rank0:
        return None
    timing = {phase: value / max(state["step"], 1) for phase, value in state["timing"].items()}
    summary = grpo.summarise(state["history"], state["heldout"], timing)
    summary.update({"export_dir": str(export_dir), "checkpoint_dir": checkpoint, "world_size": strategy.world_size,
                    "log": state["history"], "rollout_backend": cfg.rollout.backend if actors else "colocated",
                    "synced_bytes": sum(row.get("sync_bytes", 0.0) for row in state["history"])})
    return summary
