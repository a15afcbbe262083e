"""Rollout actors of GRPO (``rl.rollout.backend=actors``): a pool of Ray actors, each holding its own copy of the
policy, that sample the rationales and compute the reward's batched constrained decode for the training workers,
and receive the trained weights in buckets after every update (OneRec-Think Sec. 4.3's "distributed GRPO rollouts";
the weight-sync pattern of OpenRLHF / verl: gather, stream by name in size-capped buckets, load by name).

    driver (recipes/grpo.run_rl)      with rollout_actors(rl, trainer, ...) as actors: run_on_workers(rl_loop, ...)
    rank r (rl_worker.grpo_step)      remote_rollout(actors[r % n], prompts, seed, version) -> Rollout, rewards
    rank 0 after each update          sync_weights(strategy, actors, version, bucket_bytes)  + barrier on all ranks

``RolloutPolicy`` is a plain class (in-process tests use it directly); ``rollout_actors`` wraps it with
``ray.remote`` and the requested CPUs / GPUs. An actor runs the recipe's pure functions through
``rl_worker.rollout_phase`` and decodes with ``rl_worker.reward_decoder``: the same calls as a colocated worker, so
with equal weights and seed both give the same rewards. Every actor keeps a weight version (the number of updates
its weights include); a rollout asked for another version fails instead of sampling from stale weights.

What a sync sends (``synced_names``): the parameters the optimizer changes (``requires_grad``); for a LoRA (peft)
policy only the adapter tensors (peft's names: ``lora_A`` / ``lora_B`` ..., trainable tokens, modules_to_save):
the base weights the actor loaded never change. The actor is then a peft model with the same adapters: with
``rl.trainable=lora`` it wraps its policy exactly as the workers do (``training.lora.wrap_lora`` with ``rl.lora`` and
the item / think token rows), so the names match.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from onerec_dist.recipes import grpo

# Substrings of peft's adapter parameter names (peft's get_peft_model_state_dict keeps "lora_" keys for LoRA;
# trainable_token_indices adds "trainable_tokens_delta", modules_to_save "modules_to_save.<adapter>").
ADAPTER_MARKERS = ("lora_", "trainable_tokens_", "modules_to_save.")


# ---------------------------------------------------------------------------------------------- pure helpers
def is_peft_model(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config")


def synced_names(named_parameters: Iterable[tuple[str, torch.Tensor]], adapters_only: bool) -> list[str]:
    """Names a weight sync sends, in ``named_parameters`` order: the adapter tensors when ``adapters_only`` (a
    LoRA policy), else the parameters that train (``requires_grad``; frozen ones never change)."""
    if adapters_only:
        return [name for name, _ in named_parameters if any(marker in name for marker in ADAPTER_MARKERS)]
    return [name for name, param in named_parameters if param.requires_grad]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of ``named_tensors`` of at most ``bucket_bytes`` each (a tensor larger than the cap is a
    bucket of its own); every tensor once, in order. Lazy, so one bucket at a time is materialised."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------------- the actor
class RolloutPolicy:
    """One rollout actor's state: the policy loaded from ``model_dir`` (eval mode, no grad), the reward decoder the
    workers build, and the weight version. With ``rl.trainable=lora`` the policy carries the workers' LoRA adapters
    (``rl.lora``; fresh, i.e. the identity, until the first sync), which are then what ``load_bucket`` receives."""

    def __init__(self, model_dir: str, rl: grpo.RLConfig, item_codes: np.ndarray, precision: str = "fp32",
                 use_gpu: bool = False, threads: int = 1):
        from onerec_dist.distributed.rl_worker import load_policy, reward_decoder
        from onerec_dist.sid.prefix_index import PrefixIndex
        from onerec_dist.sid.tokens import ItemTokenizer

        torch.set_num_threads(max(1, threads))
        self.rl = rl
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray limits a GPU actor to the GPUs it was given
        codes = torch.as_tensor(item_codes, dtype=torch.long)                                   # [I, L]
        model, tokenizer = load_policy(model_dir, precision)
        self.think, item_tok = grpo.check_policy(tokenizer, ItemTokenizer.from_tokenizer, len(codes), rl)
        if rl.trainable == "lora":
            from onerec_dist.reasoning.cot_format import new_token_rows
            from onerec_dist.training.lora import wrap_lora

            model = wrap_lora(model, rl.lora, new_token_rows(item_tok, self.think))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder = reward_decoder(self.model, item_tok, PrefixIndex.build(codes, item_tok.codebook_sizes), rl,
                                      self.pad)
        self.version, self.loaded = 0, 0  # version: updates the weights include; loaded: tensors since last commit
        self.sampler = None  # rl.rollout.engine=vllm: vLLM samples the text, self.model still runs the reward decode
        if rl.rollout.engine == "vllm":
            from onerec_dist.distributed.vllm_rollout import VLLMRationaleSampler

            self.sampler = VLLMRationaleSampler.load(model_dir, precision, self.think.end_id,
                                                     rl.rollout.vllm_gpu_memory_utilization)

    def weight_version(self) -> int:
        return self.version

    def rollout(self, prompts: grpo.PromptSet, seed: int, version: int
                ) -> tuple[grpo.Rollout, torch.Tensor, torch.Tensor, dict[str, float]]:
        """(rollout, rewards [B, G], per-level [N, L], seconds of its rollout / reward parts) of ``prompts``."""
        from onerec_dist.distributed.rl_worker import rollout_phase

        if version != self.version:
            raise RuntimeError(f"rollout actor holds weight version {self.version} but version {version} was asked "
                               "for: the weight sync after the last update did not reach it")
        seconds, clock = {"rollout": 0.0, "reward": 0.0}, time.perf_counter()

        def mark(phase):
            nonlocal clock
            now = time.perf_counter()
            seconds[phase] += now - clock
            clock = now

        with torch.no_grad():
            rollout, rewards, per_level = rollout_phase(self.model, self.decoder, self.think, prompts, self.rl,
                                                        self.pad, seed, mark, self.sampler)
        mark("reward")
        return rollout, rewards.cpu(), per_level.cpu(), seconds

    def load_bucket(self, bucket: dict[str, torch.Tensor]) -> int:
        """Copy each tensor into the parameter of that name (cast to its dtype / device); returns the count."""
        unknown = sorted(set(bucket) - set(self.params))
        if unknown:
            raise ValueError(f"rollout actor's policy has no parameter(s) {unknown[:3]}: it must be built like the "
                             "trained actor (same model; for LoRA the same rl.trainable / rl.lora)")
        with torch.no_grad():
            for name, tensor in bucket.items():
                param = self.params[name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the rollout actor's "
                                     f"{tuple(param.shape)}")
                param.copy_(tensor)
        if self.sampler is not None:
            self.sampler.load_weights(bucket)
        self.loaded += len(bucket)
        return len(bucket)

    def commit(self, version: int, tensors: int) -> int:
        """End of a sync: the weights now hold ``version``, if all ``tensors`` sent arrived."""
        if self.loaded != tensors:
            raise RuntimeError(f"weight sync to version {version}: {tensors} tensors were sent, {self.loaded} loaded")
        self.version, self.loaded = version, 0
        return self.version

    def named_weights(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the parameters (all, or ``names``): for checks."""
        names = list(self.params) if names is None else list(names)
        return {name: self.params[name].detach().cpu().clone() for name in names}


# ---------------------------------------------------------------------------------------------- driver side
def check_pool_resources(rollout: grpo.RolloutConfig, trainer, cpus: float, gpus: float) -> None:
    """ValueError naming the rl.rollout field when the cluster cannot host the workers and the actors together
    (Ray would wait forever)."""
    cpus_needed = trainer.num_workers * trainer.cpus_per_worker + rollout.num_actors * rollout.num_cpus_per_actor
    if cpus_needed > cpus:
        raise ValueError(f"rl.rollout.num_cpus_per_actor={rollout.num_cpus_per_actor:g}: {trainer.num_workers} "
                         f"workers x {trainer.cpus_per_worker} CPU + {rollout.num_actors} rollout actor(s) need "
                         f"{cpus_needed:g} CPUs, the cluster has {cpus:g}; allowed values: 0 (the actors share the "
                         "workers' cores: rollouts and updates alternate) up to what is left")
    gpus_needed = (trainer.num_workers if trainer.use_gpu else 0) + rollout.num_actors * rollout.num_gpus_per_actor
    if gpus_needed > gpus:
        raise ValueError(f"rl.rollout.num_gpus_per_actor={rollout.num_gpus_per_actor:g}: workers and rollout actors "
                         f"need {gpus_needed:g} GPUs, the cluster has {gpus:g}; allowed values: 0 (CPU actors) up "
                         "to what is left")


@contextlib.contextmanager
def rollout_actors(rl: grpo.RLConfig, trainer, model_dir: str, item_codes: np.ndarray) -> Iterator[list | None]:
    """The rollout actors of ``rl.rollout`` (None for the colocated backend), started on the Ray session the
    workers will use and loaded before this yields; killed on exit (and a Ray this call started is stopped).
    ``rl`` carries ``trainable`` / ``lora``, so a LoRA run's actors hold the same adapters and receive only them."""
    if rl.rollout.backend != "actors":
        yield None
        return
    import ray

    from onerec_dist.distributed import ray_job

    settings = rl.rollout
    started = ray_job.ensure_training_ray(trainer)  # the Ray the workers then join
    actors: list = []
    try:
        resources = ray.cluster_resources()
        check_pool_resources(settings, trainer, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        remote_class = ray.remote(RolloutPolicy).options(num_cpus=settings.num_cpus_per_actor,
                                                         num_gpus=settings.num_gpus_per_actor)
        threads = max(1, math.ceil(settings.num_cpus_per_actor))
        actors = [remote_class.remote(model_dir, rl, item_codes, trainer.precision,
                                      settings.num_gpus_per_actor > 0, threads)
                  for _ in range(settings.num_actors)]
        ray.get([actor.weight_version.remote() for actor in actors])  # loaded; a load error surfaces here
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- worker side
def remote_rollout(actor, prompts: grpo.PromptSet, seed: int, version: int):
    """``RolloutPolicy.rollout`` on ``actor`` (blocking)."""
    import ray

    return ray.get(actor.rollout.remote(prompts, seed, version))


def sync_weights(strategy, actors: list, version: int, bucket_bytes: int) -> int:
    """Stream the trained weights to every rollout actor and set their version; returns the bytes sent (0 on ranks
    other than 0). Every rank must call it (ZeRO-3 gathers the weights collectively; the barrier at the end keeps
    every rank from sampling before the actors hold ``version``).

    Rank 0 puts one bucket of at most ``bucket_bytes`` into the object store at a time and waits until every actor
    loaded it before the next, so at most one bucket per sync is in flight. The bytes counted are the weights' (one
    copy; each actor reads that copy from the object store)."""
    import ray

    sent = 0
    with strategy.gathered_parameters() as module:
        if strategy.is_rank0:
            named = list(module.named_parameters())
            keep = set(synced_names(named, adapters_only=is_peft_model(module)))
            count = 0
            for bucket in weight_buckets(((n, p) for n, p in named if n in keep), bucket_bytes):
                ref = ray.put({name: tensor.detach().cpu() for name, tensor in bucket})
                ray.get([actor.load_bucket.remote(ref) for actor in actors])
                sent += sum(tensor_bytes(tensor) for _, tensor in bucket)
                count += len(bucket)
            ray.get([actor.commit.remote(version, count) for actor in actors])
    strategy.barrier()
    return sent
