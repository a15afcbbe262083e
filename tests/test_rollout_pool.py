"""Rollout actors of GRPO (onerec_dist/distributed/rollout_pool.py), in one process, no Ray: the weight-sync
bucketing, the LoRA filter, and ``RolloutPolicy`` (the actor's state) against the colocated rollout of the workers.
The 2-worker Ray equivalence run (actors vs colocated) is in tests/test_grpo.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_grpo import SIZES, build_world

from onerec_dist.distributed.rl_worker import reward_decoder, rollout_phase
from onerec_dist.distributed.rollout_pool import (RolloutPolicy, is_peft_model, synced_names, tensor_bytes,
                                                  weight_buckets)
from onerec_dist.reasoning.cot_format import new_token_rows
from onerec_dist.recipes import grpo
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.training.config import LoraSettings

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_buckets_stay_under_the_cap_and_keep_every_tensor_once():
    # fp32 tensors of 10, 20, 5, 40 and 3 elements = 40, 80, 20, 160, 12 bytes; cap 100 bytes, greedy in order:
    # [a] (40; +b would be 120) | [b, c] (80 + 20 = 100 <= 100) | [d] (160 > cap: a bucket of its own) | [e] (12)
    named = [(n, torch.zeros(k)) for n, k in (("a", 10), ("b", 20), ("c", 5), ("d", 40), ("e", 3))]
    buckets = list(weight_buckets(iter(named), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"], ["d"], ["e"]]
    assert [sum(tensor_bytes(t) for _, t in b) for b in buckets] == [40, 100, 160, 12]
    # bf16 halves the bytes: 20 + 40 + 10 + 80 + 6 -> [a, b, c] (70; +d would be 150) | [d, e] (86)
    half = [(n, t.bfloat16()) for n, t in named]
    assert [[n for n, _ in b] for b in weight_buckets(half, 100)] == [["a", "b", "c"], ["d", "e"]]
    assert list(weight_buckets([], 100)) == []


def test_synced_names_full_model_are_the_trainable_parameters():
    a, b, c = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    b.requires_grad_(False)  # frozen: never changes, never sent
    assert synced_names([("x.weight", a), ("y.weight", b), ("z.bias", c)], adapters_only=False) == ["x.weight",
                                                                                                    "z.bias"]


def test_lora_filter_keeps_only_the_adapter_tensors():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_world()[0], LoraConfig(**LORA))
    named = list(model.named_parameters())
    names = synced_names(named, adapters_only=is_peft_model(model))
    # the tiny Qwen3 has 2 layers; q_proj and v_proj of each carry lora_A and lora_B: 2 x 2 x 2 = 8 tensors
    layers = model.config.num_hidden_layers
    assert len(names) == layers * 2 * 2
    assert all((".lora_A." in n or ".lora_B." in n) and ("q_proj" in n or "v_proj" in n) for n in names)
    assert set(names) == {n for n, p in named if p.requires_grad}   # peft froze everything else
    assert not any(n.endswith("embed_tokens.weight") or "mlp" in n for n in names)
    # a worked example on names alone (peft's spelling), trainable flags ignored: base weights never leave
    p = torch.nn.Parameter(torch.zeros(1))
    listed = [("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", p),
              ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", p),
              ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", p),
              ("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default", p),
              ("base_model.model.lm_head.weight", p)]
    assert synced_names(listed, adapters_only=True) == [listed[1][0], listed[2][0], listed[3][0]]


def _policy_and_world(tmp_path, trainable="full"):
    model, tokenizer, item_tok, think, codes, users = build_world()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = grpo.RLConfig(group_size=2, beam_width=2, prompts_per_rank=2, max_think_tokens=4, trainable=trainable,
                        lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    policy = RolloutPolicy(str(tmp_path / "model"), cfg, codes, "fp32")
    return policy, (model, tokenizer, item_tok, think, codes, users), cfg


def _colocated(model, world, cfg, prompts, seed):
    _, tokenizer, item_tok, think, codes, _ = world
    decoder = reward_decoder(model, item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), cfg,
                             tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        return rollout_phase(model, decoder, think, prompts, cfg, tokenizer.pad_token_id, seed, lambda phase: None)


def perturb_and_send(policy, model, bucket_bytes: int = 100_000):
    """(trained, synced names, bucket count): a copy of ``model`` with noise on every weight (a stand-in for an
    update), its trainable tensors sent to ``policy.load_bucket`` in ``bucket_bytes`` buckets (not committed)."""
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    named = list(trained.named_parameters())
    names = synced_names(named, adapters_only=False)
    buckets = list(weight_buckets(((n, p.detach()) for n, p in named if n in names), bucket_bytes))
    for bucket in buckets:
        policy.load_bucket(dict(bucket))
    return trained, names, len(buckets)


def test_actor_rollout_equals_the_colocated_one_and_follows_synced_weights(tmp_path):
    policy, world, cfg = _policy_and_world(tmp_path)
    model, users = world[0], world[5]
    prompts = users.take([0, 1])
    rollout, rewards, per_level, seconds = policy.rollout(prompts, seed=7, version=0)
    expected = _colocated(model, world, cfg, prompts, 7)
    assert rollout.bodies == expected[0].bodies and torch.equal(rewards, expected[1])
    assert torch.equal(per_level, expected[2]) and set(seconds) == {"rollout", "reward"}
    with pytest.raises(RuntimeError, match="holds weight version 0 but version 1"):
        policy.rollout(prompts, seed=7, version=1)
    # "train": perturb every weight, then sync it in 0.1 MB buckets (several for the ~0.8 MB tiny model)
    trained, names, buckets = perturb_and_send(policy, model)
    named = list(trained.named_parameters())
    assert buckets > 1
    with pytest.raises(RuntimeError, match="tensors were sent"):   # a lost bucket: the version does not move
        policy.commit(1, len(names) + 1)
    assert policy.weight_version() == 0
    assert policy.commit(1, len(names)) == 1 and policy.weight_version() == 1
    got = policy.named_weights()
    assert all(torch.equal(got[n], p.detach()) for n, p in named)
    before = expected[0].bodies
    rollout, rewards, _, _ = policy.rollout(prompts, seed=7, version=1)
    expected = _colocated(trained, world, cfg, prompts, 7)
    assert expected[0].bodies != before, "the perturbation did not change the samples: the check could not fail"
    assert rollout.bodies == expected[0].bodies and torch.equal(rewards, expected[1])
    with pytest.raises(ValueError, match="has no parameter"):
        policy.load_bucket({"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        policy.load_bucket({names[0]: torch.zeros(1)})


def test_lora_sync_sends_adapters_only_and_reproduces_the_trained_policy(tmp_path):
    """rl.trainable=lora: the actor wraps its policy as the workers do (wrap_lora with rl.lora and the item / think
    token rows), so the trained adapters and token deltas load by name and nothing else is sent."""
    from onerec_dist.training.lora import wrap_lora

    policy, world, cfg = _policy_and_world(tmp_path, trainable="lora")
    base, item_tok, think = world[0], world[2], world[3]
    assert is_peft_model(policy.model)
    torch.manual_seed(3)
    trained = wrap_lora(copy.deepcopy(base), cfg.lora, new_token_rows(item_tok, think))
    with torch.no_grad():  # "trained": lora_B != 0 (peft starts it at 0), token rows unlike the base rows
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    named = list(trained.named_parameters())
    names = synced_names(named, adapters_only=is_peft_model(trained))
    assert any("trainable_tokens_delta" in n for n in names) and any(".lora_B." in n for n in names)
    assert set(names) == {n for n, p in named if p.requires_grad}
    sent = sum(tensor_bytes(p) for n, p in named if n in names)
    everything = sum(tensor_bytes(p) for _, p in named)
    # adapters of r=4 on two projections and the item / think token rows: a small share of the model
    assert 0 < sent < everything / 10
    for bucket in weight_buckets(((n, p.detach()) for n, p in named if n in names), 4096):
        policy.load_bucket(dict(bucket))
    policy.commit(1, len(names))
    got = policy.named_weights()
    assert all(torch.equal(got[n], p.detach()) for n, p in named)   # base weights were equal already
    prompts = world[5].take([2, 3])
    rollout, rewards, _, _ = policy.rollout(prompts, seed=11, version=1)
    expected = _colocated(trained, world, cfg, prompts, 11)
    assert expected[0].bodies != _colocated(base, world, cfg, prompts, 11)[0].bodies  # the adapters matter
    assert rollout.bodies == expected[0].bodies and torch.equal(rewards, expected[1])


def test_pool_resources_are_checked_before_ray_would_wait_forever():
    from onerec_dist.distributed.rollout_pool import check_pool_resources
    from onerec_dist.training.config import TrainerConfig

    from onerec_dist.distributed.rollout_pool import rollout_actors

    trainer = TrainerConfig(num_workers=2, wandb={"mode": "disabled"})   # 2 workers x 1 CPU
    with rollout_actors(grpo.RLConfig(), trainer, "unused", None) as actors:   # colocated: no pool, no Ray
        assert actors is None
    # 2 + 1 x 0 = 2 CPUs fit a 2-core machine; 2 + 2 x 0.5 = 3 do not
    check_pool_resources(grpo.RolloutConfig(backend="actors", num_cpus_per_actor=0), trainer, cpus=2, gpus=0)
    with pytest.raises(ValueError, match=r"rl.rollout.num_cpus_per_actor=0.5: .* need 3 CPUs, the cluster has 2"):
        check_pool_resources(grpo.RolloutConfig(backend="actors", num_actors=2, num_cpus_per_actor=0.5), trainer,
                             cpus=2, gpus=0)
    with pytest.raises(ValueError, match=r"rl.rollout.num_gpus_per_actor=1: .* need 1 GPUs, the cluster has 0"):
        check_pool_resources(grpo.RolloutConfig(backend="actors", num_gpus_per_actor=1), trainer, cpus=2, gpus=0)
    with pytest.raises(ValueError, match="rl.rollout.backend: 'vllm' is not allowed; allowed values: colocated, act"):
        grpo.RolloutConfig(backend="vllm")
    with pytest.raises(ValueError, match="rl.rollout.sync_bucket_mb"):
        grpo.rl_config({"rollout": {"sync_bucket_mb": 0}})
