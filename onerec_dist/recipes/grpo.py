"""Reasoning Enhancement: GRPO with the Rollout-Beam reward (OneRec-Think, arXiv:2510.11639, Sec. 4.3), read top to
bottom. The loop that runs these pieces on every Ray worker is onerec_dist/distributed/rl_worker.py; this module is
pure torch (no ray / deepspeed).

One GRPO step on rank r (its B prompts; a group's G samples never leave the rank):
  1. ``PromptSampler``: the next B training users of this rank (a seeded permutation per epoch; its position is in
     every checkpoint);
  2. ``sample_rationales`` (on the worker with the actor's weights, or on a Ray rollout actor that holds a synced
     copy: ``rl.rollout.backend``): each prompt (history prompt + <think>) repeated G times, ONE batched ``generate``
     (KV cache, temperature T) that stops a row at </think> or after ``max_think_tokens``; an unclosed row is
     force-closed and counted;
  3. ``rollout_rewards``: ONE batched constrained beam search (K beams, the catalogue's prefix index) over all B*G
     prefixes ``close_think(prompt, rationale)`` -> beams [B*G, K, L] -> reward (onerec_dist.rl.rewards) [B, G];
  4. ``group_advantages`` (onerec_dist.rl.advantages) [B, G];
  5. ``policy_batch``: prompt + rationale (+ </think> when the model wrote it), loss mask on the generated tokens
     only; old log-probs (actor, no grad) and reference log-probs (frozen reference) [N, T-1];
  6. ``grpo_loss`` (onerec_dist.rl.losses): clipped ratio + beta * k3 KL, summed per micro-batch; the loop divides by
     the loss tokens of the global batch (token-mean, verl's loss_agg_mode) and steps the strategy; with
     ``rl.item_nll_coef`` > 0 each row also carries its target item's ID after the rationale (``target_item_ids``)
     and ``item_nll_sum`` adds coef x the mean next-item NLL of those code tokens (a PPO-ptx-style anchor);
  7. rollout actors only: rank 0 streams the updated weights to them in buckets (LoRA: adapters only), all ranks
     wait, so the next step samples from the new policy (onerec_dist/distributed/rollout_pool.py).
With one update per rollout batch (as OneRec-Think), old == current weights, so the ratio is 1 at the update and the
clip fraction 0; it becomes non-zero with ``rl.updates_per_rollout`` > 1.

``rl.debug.shuffle_rewards`` permutes the rewards of a step across all its samples (the control: no rationale earns
its own reward any more, so the reward must not rise).

Domains (OneReason's specialists; data with several domains, onerec_dist/data/domains.py): prompts name the user's
domain, and the reward's decode and the held-out decode keep each user inside its domain's catalogue (the
``PromptSet`` carries a decoding/domains.DomainRestriction that every take / rollout keeps, so the workers' and the
rollout actors' decoders need nothing else). ``rl.domain=<name>`` trains a specialist: only that domain's training
users, held-out users of that domain; null trains on all domains mixed (the joint run).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from onerec_dist.config import require
from onerec_dist.rl.advantages import ADVANTAGE_ESTIMATORS
from onerec_dist.rl.losses import LOSS_AGG_MODES, entropy_from_logits, token_logprobs
from onerec_dist.rl.rewards import MISSING_CODE, REWARDS, compute_reward, level_matches
from onerec_dist.training.config import LoraSettings, check_stage_warmup

RL_TASK = "grpo"  # the one task name of the RL loop's logs


# ---------------------------------------------------------------------------------------------- configuration
@dataclass
class RLDebugConfig:
    """``rl.debug``: controls that must make the method fail."""

    shuffle_rewards: bool = False


ROLLOUT_BACKENDS = ("colocated", "actors")
ROLLOUT_ENGINES = ("hf", "vllm")
TRAINABLE = ("full", "lora")
ITEM_NLL_ROWS = ("all", "best")  # rollouts whose next-item loss counts (item_nll_row_mask)


@dataclass
class RolloutConfig:
    """``rl.rollout``: where rationales are sampled and rewarded. ``colocated``: on each worker with the actor's own
    weights (no copy); ``actors``: on a pool of Ray rollout actors (onerec_dist/distributed/rollout_pool.py) that
    receive the trained weights in buckets after every update (LoRA: the adapters only)."""

    backend: Literal["colocated", "actors"] = "colocated"
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.0
    sync_bucket_mb: float = 64.0
    engine: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory_utilization: float = 0.5

    def __post_init__(self) -> None:
        require(self.backend in ROLLOUT_BACKENDS, "rl.rollout.backend",
                f"{self.backend!r} is not allowed; allowed values: {', '.join(ROLLOUT_BACKENDS)}")
        require(self.engine in ROLLOUT_ENGINES, "rl.rollout.engine",
                f"{self.engine!r} is not allowed; allowed values: {', '.join(ROLLOUT_ENGINES)}")
        if self.engine == "vllm":
            require(self.backend == "actors", "rl.rollout.engine",
                    "'vllm' samples inside rollout actors; it needs rl.rollout.backend=actors (allowed with "
                    "backend=colocated: engine=hf)")
            require(self.num_gpus_per_actor > 0, "rl.rollout.engine",
                    "'vllm' runs on a GPU; it needs rl.rollout.num_gpus_per_actor > 0 (allowed on CPU actors: "
                    "engine=hf)")
        require(0 < self.vllm_gpu_memory_utilization < 1, "rl.rollout.vllm_gpu_memory_utilization",
                f"{self.vllm_gpu_memory_utilization}: allowed values: in (0, 1)")
        require(self.num_actors >= 1, "rl.rollout.num_actors", f"{self.num_actors}: allowed values: >= 1")
        require(self.num_gpus_per_actor >= 0, "rl.rollout.num_gpus_per_actor",
                f"{self.num_gpus_per_actor}: allowed values: >= 0 (0 = the actor runs on CPU)")
        require(self.num_cpus_per_actor >= 0, "rl.rollout.num_cpus_per_actor",
                f"{self.num_cpus_per_actor}: allowed values: >= 0 (fractions allowed; 0 = share the cores)")
        require(self.sync_bucket_mb > 0, "rl.rollout.sync_bucket_mb", f"{self.sync_bucket_mb}: allowed values: > 0")

    @property
    def sync_bucket_bytes(self) -> int:
        return max(1, int(self.sync_bucket_mb * 2**20))


@dataclass
class RLConfig:
    """``rl`` (conf/rl/default.yaml documents every field). Paper defaults: G=16, K=32, lr 1e-5, KL 1e-3, clip 0.2.
    ``trainable``: full (all weights; the reference is a frozen copy) | lora (``lora`` adapters + the item- and
    think-token rows; the reference is the actor with its adapters disabled, no copy)."""

    group_size: int = 16
    beam_width: int = 32
    prompts_per_rank: int = 4
    temperature: float = 1.0
    max_think_tokens: int = 128
    max_prompt_length: int = 512
    max_steps: int = 200
    train_users: int | None = None
    lr: float = 1.0e-5
    warmup_steps: int | None = None
    kl_coef: float = 1.0e-3
    item_nll_coef: float = 0.0
    item_nll_rows: Literal["all", "best"] = "all"
    clip: float = 0.2
    clip_high: float | None = None
    updates_per_rollout: int = 1
    micro_batch_rollouts: int | None = None
    reward: str = "rollout_beam"
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    normalization: Literal["full", "valid"] = "full"
    row_budget: int | None = None
    reference_dtype: str | None = None
    heldout_users: int = 64
    heldout_every: int = 0
    heldout_probe: bool = True
    log_every: int = 1
    checkpoint_every: int = 0
    seed: int = 0
    resume: str | None = None
    trainable: Literal["full", "lora"] = "full"
    domain: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    debug: RLDebugConfig = field(default_factory=RLDebugConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def domain_index(self, domain_names: list[str]) -> int | None:
        """Index of ``rl.domain`` among the data's domains; None for null (all domains). ValueError naming rl.domain
        and the allowed names when the data has no such domain (or a single domain)."""
        if self.domain is None:
            return None
        if len(domain_names) < 2 or self.domain not in domain_names:
            allowed = (", ".join(map(repr, domain_names)) if len(domain_names) > 1 else
                       "none: the data has a single domain")
            raise ValueError(f"rl.domain={self.domain!r} is not a domain of the data; allowed values: null (all "
                             f"domains), {allowed}")
        return domain_names.index(self.domain)

    def __post_init__(self) -> None:
        if isinstance(self.debug, dict):
            self.debug = RLDebugConfig(**self.debug)
        if isinstance(self.rollout, dict):
            self.rollout = RolloutConfig(**self.rollout)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        require(self.domain is None or bool(self.domain.strip()), "rl.domain",
                "must be null (all domains) or a domain name of the data")
        require(self.trainable in TRAINABLE, "rl.trainable",
                f"{self.trainable!r} is not allowed; allowed values: {', '.join(TRAINABLE)}")
        # vLLM holds plain weights: LoRA adapters would have to be merged into them after every update
        require(not (self.trainable == "lora" and self.rollout.engine == "vllm"), "rl.rollout.engine",
                "'vllm' needs rl.trainable=full (LoRA adapters are not merged into the vLLM weights); allowed with "
                "rl.trainable=lora: engine=hf")
        require(self.group_size >= 2, "rl.group_size", f"{self.group_size}: group-relative advantages need G >= 2")
        require(self.beam_width >= 1, "rl.beam_width", "must be >= 1 (and <= the number of catalogue items)")
        for name in ("prompts_per_rank", "max_think_tokens", "max_prompt_length", "max_steps", "updates_per_rollout",
                     "log_every"):
            require(getattr(self, name) >= 1, f"rl.{name}", "must be >= 1")
        require(self.temperature > 0, "rl.temperature", "must be > 0")
        require(self.train_users is None or self.train_users >= 1, "rl.train_users",
                "must be null (every training user) or >= 1")
        require(self.lr > 0, "rl.lr", "must be > 0")
        check_stage_warmup(self.warmup_steps, "rl.warmup_steps")
        require(self.kl_coef >= 0, "rl.kl_coef", "must be >= 0 (0 = no KL penalty)")
        require(self.item_nll_coef >= 0, "rl.item_nll_coef", "must be >= 0 (0 = no next-item term)")
        require(self.item_nll_rows in ITEM_NLL_ROWS, "rl.item_nll_rows",
                f"{self.item_nll_rows!r} is not allowed; allowed values: {', '.join(ITEM_NLL_ROWS)}")
        require(0 < self.clip < 1, "rl.clip", "must be in (0, 1)")
        require(self.clip_high is None or self.clip_high > 0, "rl.clip_high", "must be null or > 0")
        require(self.reward in REWARDS, "rl.reward",
                f"{self.reward!r} is not allowed; allowed values: {', '.join(REWARDS)}")
        require(self.advantage in ADVANTAGE_ESTIMATORS, "rl.advantage",
                f"{self.advantage!r} is not allowed; allowed values: {', '.join(ADVANTAGE_ESTIMATORS)}")
        require(self.loss_agg_mode in LOSS_AGG_MODES, "rl.loss_agg_mode",
                f"{self.loss_agg_mode!r} is not allowed; allowed values: {', '.join(LOSS_AGG_MODES)}")
        require(self.micro_batch_rollouts is None or self.micro_batch_rollouts >= 1, "rl.micro_batch_rollouts",
                "must be null (all rollouts of a rank at once) or >= 1")
        require(self.reference_dtype in (None, "fp32", "bf16", "fp16"), "rl.reference_dtype",
                f"{self.reference_dtype!r} is not allowed; allowed values: null, 'fp32', 'bf16', 'fp16'")
        require(self.heldout_users >= 0 and self.heldout_every >= 0 and self.checkpoint_every >= 0,
                "rl.heldout_users / rl.heldout_every / rl.checkpoint_every", "must be >= 0")

    @property
    def rollouts_per_rank(self) -> int:
        return self.prompts_per_rank * self.group_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches of one update (the trainer's grad_accum_steps)."""
        size = self.micro_batch_rollouts or self.rollouts_per_rank
        return math.ceil(self.rollouts_per_rank / size)


def rl_config(mapping: dict) -> RLConfig:
    from onerec_dist.config import from_mapping

    return from_mapping(RLConfig, mapping, "rl")


def check_engine(rl: RLConfig, zero_stage: int, precision: str) -> None:
    """ValueError for RL settings the engine cannot run together (checked by the driver, before any worker)."""
    if rl.trainable != "lora":
        return
    if zero_stage == 3:  # as reason_sft refuses it
        raise ValueError("rl.trainable=lora contradicts deepspeed.zero_stage=3 (a ZeRO-3-partitioned LoRA model "
                         "cannot be merged for export); use deepspeed.zero_stage=0, 1 or 2 with LoRA")
    if rl.reference_dtype not in (None, precision):
        raise ValueError(f"rl.reference_dtype={rl.reference_dtype!r} contradicts rl.trainable=lora: the reference "
                         f"is the actor itself with its adapters disabled, in trainer.precision={precision!r}; "
                         f"allowed values: null, {precision!r}")


# ---------------------------------------------------------------------------------------------- the task
@dataclass
class PromptSet:
    """Users as the policy sees them: inference prompts (history prompt + <think>) and the target's ID."""

    prompts: list[list[int]]        # U x prompt ids, each ending with <think>
    targets: np.ndarray             # [U] catalogue rows
    target_codes: np.ndarray        # [U, L] semantic IDs of the targets
    histories: list[list[int]]      # U x catalogue rows (for reporting; exclusion is off as in training)
    restriction: Any = None         # decoding/domains.DomainRestriction over the U users; None: whole catalogue

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, rows) -> "PromptSet":
        rows = list(rows)
        return PromptSet([self.prompts[i] for i in rows], self.targets[rows], self.target_codes[rows],
                         [self.histories[i] for i in rows],
                         self.restriction.take(rows) if self.restriction is not None else None)

    def allowed_prefixes(self, group_size: int = 1):
        """AllowedPrefixes of every user repeated ``group_size`` times in a row (its G rollouts), or None."""
        if self.restriction is None:
            return None
        return self.restriction.repeat(group_size).allowed(range(len(self) * group_size))


class PromptSampler:
    """This rank's B prompts per step: epoch e is a permutation of all users seeded by (seed, e); step s of rank r
    takes the (s * world + r)-th block of B. Deterministic, so a resumed run takes the same prompts."""

    def __init__(self, num_users: int, per_rank: int, rank: int, world_size: int, seed: int):
        if num_users < per_rank * world_size:
            raise ValueError(f"rl.prompts_per_rank={per_rank} x {world_size} workers needs at least "
                             f"{per_rank * world_size} training users; the data has {num_users}")
        self.num_users, self.per_rank, self.rank, self.world = num_users, per_rank, rank, world_size
        self.seed, self.position = seed, 0  # position: steps taken

    def next_rows(self) -> list[int]:
        blocks_per_epoch = self.num_users // (self.per_rank * self.world)
        epoch, block = divmod(self.position, blocks_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_users)
        start = (block * self.world + self.rank) * self.per_rank
        self.position += 1
        return order[start:start + self.per_rank].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------- bad input
def check_policy(tokenizer, item_tokenizer_fn, num_items: int, cfg: RLConfig):
    """(think tokens, item tokenizer) of the policy, or a ValueError that says what is missing."""
    from onerec_dist.reasoning.cot_format import ThinkTokens

    try:
        think = ThinkTokens.from_tokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"onerec rl needs a model with <think> / </think> (the reason_sft export): {err}") from err
    try:
        item_tok = item_tokenizer_fn(tokenizer)
    except (ValueError, KeyError) as err:
        raise ValueError(f"onerec rl needs a model with item tokens (an aligned export that carries its IDs): "
                         f"{err}") from err
    if cfg.beam_width > num_items:
        raise ValueError(f"rl.beam_width={cfg.beam_width} is larger than the catalogue ({num_items} items); "
                         f"allowed values: 1..{num_items}")
    return think, item_tok


def check_reference(actor: torch.nn.Module, reference: torch.nn.Module) -> None:
    """ValueError unless ``reference`` has the actor's parameter names and shapes (same architecture, vocabulary).
    For a separate reference (rl.trainable=full); a LoRA run's reference is the actor itself with its adapters
    disabled, so there is nothing to compare."""
    def shapes(model):
        return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}

    a, r = shapes(actor), shapes(reference)
    if a != r:
        diff = sorted(n for n in a.keys() | r.keys() if a.get(n) != r.get(n))[:3]
        raise ValueError(f"the reference policy does not match the actor: parameters {diff} differ "
                         f"(actor {[a.get(n) for n in diff]}, reference {[r.get(n) for n in diff]}); the reference "
                         "must be a frozen copy of the starting model")


# ---------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """B prompts x G rationales, rows ordered prompt-major (row b * G + g)."""

    prompts: list[list[int]]        # [N] prompt ids (each prompt repeated G times)
    bodies: list[list[int]]         # [N] generated rationale body ids (before </think>)
    closed: np.ndarray              # [N] bool: the model wrote </think>
    target_codes: torch.Tensor      # [N, L]
    group_size: int
    allowed: Any = None             # decoding.constraints.AllowedPrefixes [N]: each row's domain; None: all items


def sample_rationales(model, think, prompts: PromptSet, cfg: RLConfig, pad_token_id: int, seed: int) -> Rollout:
    """G rationales per prompt from the policy (temperature ``cfg.temperature``), one batched generate."""
    from onerec_dist.reasoning.think_eval import generate_rationales

    repeated = grouped_prompts(prompts, cfg.group_size)                                     # [N]
    bodies, closed = generate_rationales(model, think, repeated, cfg.max_think_tokens, pad_token_id, do_sample=True,
                                         temperature=cfg.temperature, top_p=1.0, seed=seed)
    return rollout_of(prompts, cfg.group_size, repeated, bodies, closed)


def grouped_prompts(prompts: PromptSet, group_size: int) -> list[list[int]]:
    """[N = B*G] each prompt's ids ``group_size`` times, prompt-major (the rows of a Rollout)."""
    return [p for p in prompts.prompts for _ in range(group_size)]


def rollout_of(prompts: PromptSet, group_size: int, repeated: list[list[int]], bodies: list[list[int]],
               closed: np.ndarray) -> Rollout:
    """The Rollout of ``prompts`` from the rationale ``bodies`` / ``closed`` [N] any sampler wrote after ``repeated``
    (= grouped_prompts(prompts, group_size), the sampler's input)."""
    codes = torch.as_tensor(np.repeat(prompts.target_codes, group_size, axis=0), dtype=torch.long)  # [N, L]
    return Rollout(repeated, bodies, np.asarray(closed, dtype=bool), codes, group_size,
                   prompts.allowed_prefixes(group_size))


def rollout_rewards(decoder, think, rollout: Rollout, reward: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, G], per-level best match [N, L]) from ONE constrained decode of all N = B*G prefixes (each row
    inside its domain's catalogue when the rollout carries ``allowed``)."""
    from onerec_dist.reasoning.cot_format import close_think

    prefixes = [close_think(think, p, b) for p, b in zip(rollout.prompts, rollout.bodies)]
    result = decoder.decode(prefixes, allowed_prefixes=rollout.allowed)
    beams = result.codes.cpu().masked_fill((result.items.cpu() < 0).unsqueeze(-1), MISSING_CODE)   # [N, K, L]
    target = rollout.target_codes                                                                  # [N, L]
    rewards = compute_reward(reward, beams, target).view(-1, rollout.group_size)                   # [B, G]
    per_level = level_matches(beams, target).any(dim=1).float()                                    # [N, L]
    return rewards, per_level


def shuffle_rewards(rewards: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, G] the same values permuted across all B*G samples (seeded): the reward no longer belongs to its
    rationale (rl.debug.shuffle_rewards)."""
    gen = torch.Generator().manual_seed(seed)
    flat = rewards.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=gen)].view_as(rewards)


# ---------------------------------------------------------------------------------------------- policy batch
def policy_batch(think, rollout: Rollout, advantages: torch.Tensor, pad_token_id: int,
                 target_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Right-padded prompt + rationale (+ </think> when generated) rows and the mask of the generated tokens.

    input_ids / attention_mask / action_mask [N, T]; advantages [N]. The loss sits on the tokens the policy sampled
    (rationale body, and the </think> it wrote); a force-closed row has no </think> action.
    ``target_ids`` [N, 1 + L] (<|item_begin|> + the target item's L code tokens, ``target_item_ids``) appends the
    answer the item decoder would be taught after the rationale: (</think> of a force-closed row) + separator +
    those ids, none of them an action; ``item_mask`` [N, T] is 1 on the L code tokens (rl.item_nll_coef).
    """
    rows, actions, items = [], [], []
    for i, (prompt, body, closed) in enumerate(zip(rollout.prompts, rollout.bodies, rollout.closed)):
        generated = list(body) + ([think.end_id] if closed else [])
        answer = []
        if target_ids is not None:
            ids = target_ids[i].tolist()
            answer = ([] if closed else [think.end_id]) + list(think.after_ids) + ids
        rows.append(list(prompt) + generated + answer)
        actions.append([0] * len(prompt) + [1] * len(generated) + [0] * len(answer))
        if target_ids is not None:  # the L code tokens close the row (<|item_begin|> before them is forced)
            levels = len(ids) - 1
            items.append([0] * (len(rows[-1]) - levels) + [1] * levels)
    width = max(len(r) for r in rows)

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values])                # [N, T]

    batch = {"input_ids": pad(rows, pad_token_id), "attention_mask": pad([[1] * len(r) for r in rows], 0),
             "action_mask": pad(actions, 0), "advantages": advantages.reshape(-1).float()}
    if target_ids is not None:
        batch["item_mask"] = pad(items, 0)
    return batch


def item_nll_row_mask(rewards: torch.Tensor, rows: str) -> torch.Tensor:
    """[B*G] bool: the rollouts whose next-item loss counts (rl.item_nll_rows). ``all``: every one; ``best``: those
    with their group's highest reward, when it is > 0 (the target is taught only after the rationales that decoded
    closest to it, as rejection-sampling fine-tuning keeps the best samples)."""
    if rows == "all":
        return torch.ones(rewards.numel(), dtype=torch.bool)
    best = rewards.max(dim=1, keepdim=True).values                                            # [B, 1]
    return ((rewards == best) & (best > 0)).reshape(-1)


def target_item_ids(item_tok, rollout: Rollout) -> torch.Tensor:
    """[N, 1 + L] <|item_begin|> + the code tokens of each row's target item (the decoder's answer after </think>)."""
    return item_tok.encode_with_boundaries(rollout.target_codes, validate=False)[:, :-1]


def next_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, T-1, V] the logits that predict tokens 1..T-1 of ``batch["input_ids"]``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, :-1]


def logprobs_of(logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float,
                with_entropy: bool = False):
    """log pi(token_t | prefix) [N, T-1] at the sampling temperature from ``next_token_logits``, and the entropy
    [N, T-1] of the next-token distribution when asked."""
    logits = logits.float() / temperature                                                    # [N, T-1, V]
    logp = token_logprobs(logits, batch["input_ids"][:, 1:])                                  # [N, T-1]
    return (logp, entropy_from_logits(logits.detach())) if with_entropy else (logp, None)


def sequence_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False):
    """``logprobs_of`` the model's own forward pass over ``batch``."""
    return logprobs_of(next_token_logits(model, batch), batch, temperature, with_entropy)


def item_nll_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of -log p(code token) at temperature 1 over the ``item_mask`` tokens, their count): the next-item loss
    of rl.item_nll_coef. Only those M positions go through the log-softmax ([M, V], not [N, T, V])."""
    positions = batch["item_mask"][:, 1:].bool()                                              # [N, T-1]
    picked = logits[positions].float()                                                        # [M, V]
    targets = batch["input_ids"][:, 1:][positions]                                            # [M]
    return torch.nn.functional.cross_entropy(picked, targets, reduction="sum"), int(positions.sum())


def micro_batches(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    """Row slices of ``size`` rollouts (None = one micro-batch)."""
    n = batch["input_ids"].shape[0]
    size = size or n
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------------- step statistics
def rollout_stats(rewards: torch.Tensor, per_level: torch.Tensor, rollout: Rollout) -> dict[str, float]:
    """This rank's sums over its samples (all-reduced by the loop)."""
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values                            # [B]
    out = {"reward_sum": float(rewards.sum()), "samples": float(rewards.numel()), "groups": float(rewards.shape[0]),
           "zero_spread_groups": float((spread == 0).sum()),
           "rationale_tokens": float(sum(len(b) for b in rollout.bodies)),
           "unclosed": float((~rollout.closed).sum())}
    for level in range(per_level.shape[1]):
        out[f"level{level}_sum"] = float(per_level[:, level].sum())
    return out


def step_row(totals: dict[str, float], step: int) -> dict[str, Any]:
    """A log row from the all-reduced sums of one step."""
    samples, tokens = max(totals["samples"], 1.0), max(totals["tokens"], 1.0)
    row = {"step": step, "reward": totals["reward_sum"] / samples,
           "zero_spread_share": totals["zero_spread_groups"] / max(totals["groups"], 1.0),
           "kl": totals["kl_sum"] / tokens, "pg_loss": totals["pg_sum"] / tokens,
           "clip_frac": totals["clipped_tokens"] / tokens, "entropy": totals["entropy_sum"] / tokens,
           "rationale_length": totals["rationale_tokens"] / samples, "unclosed_share": totals["unclosed"] / samples,
           "loss_tokens": totals["tokens"]}  # tokens the update trained on, all ranks (the ablation's training tokens)
    if totals.get("item_tokens"):  # rl.item_nll_coef > 0: the next-item loss per code token
        row["item_nll"] = totals["item_nll_sum"] / totals["item_tokens"]
    for key in sorted(k for k in totals if k.startswith("level")):
        row[f"reward_level{key[5:-4]}"] = totals[key] / samples
    return row


def summarise(history: list[dict[str, Any]], heldout: dict[str, Any], timing: dict[str, float]) -> dict[str, Any]:
    """The run's summary: reward of the first / last 10 steps, KL and clip-fraction maxima, held-out before/after
    and its paired change, seconds per phase, and the tokens trained on (``tokens``, as the other training stages
    report it)."""
    rewards = [row["reward"] for row in history]
    return {"reward_first10": float(np.mean(rewards[:10])) if rewards else None,
            "reward_last10": float(np.mean(rewards[-10:])) if rewards else None,
            "kl_max": max((row["kl"] for row in history), default=None),
            "clip_frac_max": max((row["clip_frac"] for row in history), default=None),
            "unclosed_share_max": max((row["unclosed_share"] for row in history), default=None),
            "rewards": rewards, "heldout": heldout, "heldout_change": heldout_change(heldout),
            "timing": timing, "steps": len(history),
            "tokens": int(sum(row.get("loss_tokens", 0) for row in history))}


def heldout_change(heldout: dict[str, Any]) -> dict[str, Any] | None:
    """Held-out think-mode Recall@10 after minus before on the same users, with the paired bootstrap 95 % interval
    (users resampled with their before/after pair; onerec_dist/reasoning/think_eval.py); None without both."""
    from onerec_dist.reasoning.think_eval import paired_bootstrap

    before, after = heldout.get("before", {}), heldout.get("after", {})
    if not before.get("user_hits") or not after.get("user_hits"):
        return None
    return paired_bootstrap(np.asarray(after["user_hits"]), np.asarray(before["user_hits"]))


# ---------------------------------------------------------------------------------------------- held-out users
def heldout_sums(model, decoder, think, users: PromptSet, reward: str, max_think_tokens: int, pad_token_id: int,
                 k: int = 10, probe_temperature: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Think-mode evaluation sums of ``users``: greedy rationale -> constrained decode -> hit@k and reward; also
    ``user_hits``, the [U] 0/1 hits themselves (for a paired before/after interval).

    ``probe_temperature`` also scores the same users with an empty think block (``nothink_*``) and with one rationale
    sampled at that temperature (``sampled_*``, as the rollouts sample them): when sampled rationales score below
    none at all, the group advantages favour the samples that close </think> early, and GRPO teaches the policy to
    stop thinking (measured on the synthetic reasoning task, README "GRPO rollouts")."""
    from onerec_dist.reasoning.think_eval import generate_rationales

    if len(users) == 0:
        return {"users": 0.0, "hits": 0.0, "reward_sum": 0.0, "unclosed": 0.0, "user_hits": np.zeros(0)}
    bodies, closed = generate_rationales(model, think, users.prompts, max_think_tokens, pad_token_id)
    user_hits, rewards = _decode_sums(decoder, think, users, bodies, reward, k)
    out = {"users": float(len(users)), "hits": float(user_hits.sum()), "reward_sum": rewards,
           "unclosed": float((~closed).sum()), "user_hits": user_hits}
    if probe_temperature is not None:
        nothink_hits, out["nothink_reward_sum"] = _decode_sums(decoder, think, users, [[]] * len(users), reward, k)
        out["nothink_hits"] = float(nothink_hits.sum())
        with torch.random.fork_rng():  # generate_rationales seeds torch: leave the run's stream as it was
            sampled, _ = generate_rationales(model, think, users.prompts, max_think_tokens, pad_token_id,
                                             do_sample=True, temperature=probe_temperature, seed=seed)
        sampled_hits, out["sampled_reward_sum"] = _decode_sums(decoder, think, users, sampled, reward, k)
        out["sampled_hits"] = float(sampled_hits.sum())
        out["sampled_tokens"] = float(sum(len(body) for body in sampled))
    return out


def _decode_sums(decoder, think, users: PromptSet, bodies: list[list[int]], reward: str, k: int
                 ) -> tuple[np.ndarray, float]:
    """([U] 0/1 hits@k, reward sum) of ``users`` after the rationale ``bodies`` (closed by </think>)."""
    from onerec_dist.reasoning.cot_format import close_think

    result = decoder.decode([close_think(think, p, b) for p, b in zip(users.prompts, bodies)],
                            allowed_prefixes=users.allowed_prefixes())
    items = result.items.cpu()                                                               # [U, K]
    hits = (items[:, :k] == torch.as_tensor(users.targets).unsqueeze(1)).any(dim=1)         # [U]
    beams = result.codes.cpu().masked_fill((items < 0).unsqueeze(-1), MISSING_CODE)         # [U, K, L]
    rewards = compute_reward(reward, beams, torch.as_tensor(users.target_codes, dtype=torch.long))
    return hits.numpy().astype(np.float64), float(rewards.sum())


def heldout_report(totals: dict[str, float], user_hits: np.ndarray | None = None) -> dict[str, Any]:
    """The held-out entry of the summary from all-reduced ``heldout_sums``; with the probe, ``nothink`` and
    ``sampled`` beside the greedy think-mode figures. ``user_hits`` [U] (0/1 in the held-out users' order) is kept
    so that two reports on the same users give a paired interval (``heldout_change``)."""
    n = max(totals["users"], 1.0)
    report: dict[str, Any] = {"users": int(totals["users"]), "recall@10": totals["hits"] / n,
                              "reward": totals["reward_sum"] / n, "unclosed_share": totals["unclosed"] / n}
    if user_hits is not None:
        report["user_hits"] = [int(h) for h in user_hits]
    if "nothink_hits" in totals:
        report["nothink"] = {"recall@10": totals["nothink_hits"] / n, "reward": totals["nothink_reward_sum"] / n}
        report["sampled"] = {"recall@10": totals["sampled_hits"] / n, "reward": totals["sampled_reward_sum"] / n,
                             "rationale_length": totals["sampled_tokens"] / n}
    return report


def probe_warning(report: dict[str, Any], temperature: float) -> str | None:
    """A warning when rationales sampled at the rollout temperature earn less reward than no rationale."""
    if "sampled" not in report or report["sampled"]["reward"] >= report["nothink"]["reward"]:
        return None
    return (f"rl: warning: on the held-out users, rationales sampled at T={temperature:g} earn less reward "
            f"({report['sampled']['reward']:.3f}) than no rationale ({report['nothink']['reward']:.3f}); GRPO will "
            f"favour rollouts that stop thinking early. Consider a lower rl.temperature or a reward that separates "
            f"thinking from not (README: GRPO rollouts)")


# ---------------------------------------------------------------------------------------------- the run (driver)
def prompt_set(tokenizer, think, item_codes: np.ndarray, examples, max_prompt_length: int,
               limit: int | None = None, data=None) -> PromptSet:
    """The inference prompts of ``examples`` (first ``limit`` users), history cut from the left to fit. ``data``
    with several domains: prompts name each user's domain and the set carries their domain restriction."""
    from onerec_dist.data.domains import user_domain_names
    from onerec_dist.decoding.domains import domain_restriction
    from onerec_dist.reasoning.cot_format import inference_prompt

    count = len(examples) if limit is None else min(limit, len(examples))
    histories = [list(examples.histories[i]) for i in range(count)]
    targets = np.asarray(examples.targets[:count], dtype=np.int64)
    users = list(examples.users[:count])
    names = (user_domain_names(data, users) if data is not None else None) or [None] * count
    prompts = [inference_prompt(tokenizer, think, item_codes, h, max_prompt_length, domain=d)
               for h, d in zip(histories, names)]
    restriction = domain_restriction(data, users, item_codes) if data is not None else None
    return PromptSet(prompts, targets, np.asarray(item_codes)[targets].reshape(count, -1), histories, restriction)


def training_pool(train: PromptSet, train_users: int | None, seed: int) -> PromptSet:
    """``train_users`` of the training prompts, a seeded sample kept in their order (rl.train_users; None = all).
    A pool of ``max_steps / k`` steps' prompts makes every k-step window one pass over the same users, so
    reward_first10 and reward_last10 compare the same prompts (with all users they compare different ones)."""
    if train_users is None or train_users >= len(train):
        return train
    keep = np.sort(np.random.default_rng(seed).choice(len(train), train_users, replace=False))
    return train.take(keep.tolist())


def window_warning(pool_users: int, per_rank: int, world_size: int, max_steps: int, seed: int = 0,
                   window: int = 10) -> str | None:
    """A warning when reward_first10 and reward_last10 do not score the same users the same number of times, else
    None. The windows are read off PromptSampler itself (every rank's rows of each step), so the check follows its
    epochs (``pool // per step`` steps; users past the last whole step sit that epoch out) without restating them."""
    if max_steps < window:
        return None  # both "windows" are the whole run
    samplers = [PromptSampler(pool_users, per_rank, rank, world_size, seed) for rank in range(world_size)]
    steps = [[row for sampler in samplers for row in sampler.next_rows()] for _ in range(max_steps)]
    first, last = (Counter(row for step in part for row in step) for part in (steps[:window], steps[-window:]))
    if first == last:
        return None
    per_step = per_rank * world_size
    return (f"rl: warning: {pool_users} training users at {per_step} per step (rl.prompts_per_rank x workers) "
            f"make an epoch of {pool_users / per_step:g} steps, so the first and last {window} steps of "
            f"{max_steps} see different users and reward_first10 / reward_last10 mix learning with the users' "
            f"difficulty; to compare like with like, set rl.train_users to {per_step} x d with d dividing "
            f"{window} (e.g. {window * per_step}) and rl.max_steps to {window} + a multiple of d")


def domain_examples(rl: RLConfig, data, splits) -> tuple:
    """(training examples, validation examples or None) of ``rl.domain`` (all domains for null); ValueError when
    rl.beam_width exceeds a trained domain's catalogue."""
    from onerec_dist.data.domains import examples_of_domain, has_domains

    train, valid = splits["train"], splits.get("valid")
    domain = rl.domain_index(data.domain_names)
    if domain is not None:
        train = examples_of_domain(train, data, domain)
        valid = examples_of_domain(valid, data, domain) if valid is not None else None
    if has_domains(data):
        trained = [domain] if domain is not None else range(len(data.domain_names))
        sizes = {data.domain_names[d]: int((np.asarray(data.item_domains) == d).sum()) for d in trained}
        smallest = min(sizes, key=sizes.get)
        if rl.beam_width > sizes[smallest]:
            raise ValueError(f"rl.beam_width={rl.beam_width} is larger than domain {smallest!r}'s catalogue "
                             f"({sizes[smallest]} items; decoding stays inside it); allowed values: "
                             f"1..{sizes[smallest]}")
    return train, valid


def rl_engine_configs(cfg, rl: RLConfig):
    """trainer / deepspeed configs of the RL run: rl.lr, rl.max_steps x updates, rl.micro_batches accumulation; the
    rollouts are the data, so no passes (max_epochs) and no validation."""
    from onerec_dist.training.config import stage_engine_configs

    # rl.warmup_steps counts GRPO steps, as rl.max_steps does; the schedule counts optimizer updates.
    warmup = None if rl.warmup_steps is None else rl.warmup_steps * rl.updates_per_rollout
    return stage_engine_configs(cfg, clear=("max_epochs",), lr=rl.lr, max_steps=rl.max_steps * rl.updates_per_rollout,
                                warmup_steps=warmup,
                                grad_accum_steps=rl.micro_batches, batching="examples", validate_every=0,
                                micro_batch_size=rl.micro_batch_rollouts or rl.rollouts_per_rank)


def run_rl(cfg, output_dir) -> dict[str, Any]:
    """`onerec rl`: GRPO from ``model.name_or_path`` (the reason_sft export) on the training users; held-out users
    from the validation split. Writes ``summary.json`` and ``export/`` (which carries the model's item IDs)."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from onerec_dist.data.config import data_config
    from onerec_dist.data.splits import load_dataset, make_splits
    from onerec_dist.distributed.rl_worker import rl_loop
    from onerec_dist.distributed.rollout_pool import rollout_actors
    from onerec_dist.distributed.worker_group import run_on_workers
    from onerec_dist.model_setup import model_config, semantic_ids_for_run
    from onerec_dist.sid.model_ids import copy_model_ids
    from onerec_dist.sid.tokens import ItemTokenizer

    rl = rl_config(OmegaConf.to_container(cfg.rl, resolve=True) if "rl" in cfg else {})
    trainer, ds = rl_engine_configs(cfg, rl)
    check_engine(rl, ds.zero_stage, trainer.precision)
    model_dir = model_config(cfg).name_or_path
    if not model_dir:
        raise ValueError("onerec rl starts from the CoT SFT model: set model.name_or_path to the reason_sft export "
                         "(`onerec reason stage=sft`; the pipeline hands it over)")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_config(cfg))
    splits = make_splits(data, data_config(cfg))
    item_codes, _, ids_source = semantic_ids_for_run(cfg, data, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    think, _ = check_policy(tokenizer, ItemTokenizer.from_tokenizer, len(item_codes), rl)
    train_examples, valid = domain_examples(rl, data, splits)
    train = training_pool(prompt_set(tokenizer, think, item_codes, train_examples, rl.max_prompt_length, data=data),
                          rl.train_users, rl.seed)
    heldout = prompt_set(tokenizer, think, item_codes, valid, rl.max_prompt_length, rl.heldout_users, data=data) \
        if valid is not None and rl.heldout_users else train.take([])
    # a pool of training users is there to compare the two windows (conf/rl/default.yaml): say when they cannot
    warning = window_warning(len(train), rl.prompts_per_rank, trainer.num_workers, rl.max_steps, rl.seed) \
        if rl.train_users is not None else None
    if warning:
        print(warning, flush=True)
    print(f"rl: GRPO G={rl.group_size} K={rl.beam_width}, {rl.prompts_per_rank} prompts x {trainer.num_workers} "
          f"worker(s), ZeRO-{ds.zero_stage}, {rl.trainable}, {rl.max_steps} steps, reward {rl.reward}"
          + (", rewards shuffled (control)" if rl.debug.shuffle_rewards else "")
          + (f", rollouts on {rl.rollout.num_actors} Ray actor(s)" if rl.rollout.backend == "actors" else "")
          + (f", domain {rl.domain!r} ({len(train)} training examples)" if rl.domain is not None else ""),
          flush=True)
    config = {"rl": rl, "model_dir": str(model_dir), "item_codes": np.asarray(item_codes), "train": train,
              "heldout": heldout, "output_dir": str(output_dir), "resume_dir": rl.resume}
    # rl.rollout.backend=actors: the actors start (and load the model) before the workers; rank r uses r % n
    with rollout_actors(rl, trainer, str(model_dir), np.asarray(item_codes)) as actors:
        config["rollout_actors"] = actors
        summary = run_on_workers(rl_loop, config, trainer, ds, output_dir)[0]
    copy_model_ids(model_dir, summary["export_dir"])
    summary.update({"semantic_ids": ids_source, "model": str(model_dir), "num_items": len(item_codes),
                    "shuffle_rewards": rl.debug.shuffle_rewards, "trainable": rl.trainable, "domain": rl.domain,
                    "train_examples": len(train), "domains": list(data.domain_names)})
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"rl: reward {summary['reward_first10']:.4f} (first 10 steps) -> {summary['reward_last10']:.4f} "
          f"(last 10); kl_max {summary['kl_max']:.3g}; {heldout_line(summary)}", flush=True)
    return summary


def heldout_line(summary: dict[str, Any]) -> str:
    """The held-out part of the run's last line: think-mode Recall@10 before -> after and the paired interval."""
    heldout, change = summary["heldout"], summary.get("heldout_change")
    if "before" not in heldout or "after" not in heldout:
        return "no held-out users"
    line = (f"held-out think Recall@10 {heldout['before']['recall@10']:.4f} -> {heldout['after']['recall@10']:.4f} "
            f"({heldout['after']['users']} users)")
    if change is not None:
        low, high = change["ci95"]
        line += f", change {change['mean']:+.4f} (95% paired bootstrap [{low:+.4f}, {high:+.4f}])"
    return line
