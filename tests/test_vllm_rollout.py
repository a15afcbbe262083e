"""vLLM as the rationale sampler of a GPU rollout actor (onerec_dist/distributed/vllm_rollout.py), in one process
against a fake ``vllm`` module that samples with the transformers model it loaded: the completion parsing, the
request mapping, that a rollout actor's text comes from vLLM while its reward decode stays on our decoder, that a
weight sync reaches both copies, and the config errors. No real vLLM runs here (no GPU on the build machines)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from test_grpo import SIZES, build_world
from test_rollout_pool import perturb_and_send

from onerec_dist.distributed import vllm_rollout
from onerec_dist.distributed.rl_worker import reward_decoder
from onerec_dist.distributed.rollout_pool import RolloutPolicy
from onerec_dist.distributed.vllm_rollout import parse_completion
from onerec_dist.recipes import grpo
from onerec_dist.reasoning.teachers.llm import request_seed
from onerec_dist.sid.prefix_index import PrefixIndex

END = 99  # </think> in the parsing examples


def test_completion_parsing_matches_the_transformers_sampler():
    # vLLM keeps the stop token in token_ids: body before it, closed
    assert parse_completion([5, 6, END], END, END) == ([5, 6], True)
    # ... or drops it and reports it as stop_reason: the same reading
    assert parse_completion([5, 6], END, END) == ([5, 6], True)
    # cut by max_tokens (stop_reason None): every token is the body, not closed (force-closed later)
    assert parse_completion([5, 6, 7], None, END) == ([5, 6, 7], False)
    # closed at once: an empty rationale
    assert parse_completion([END], END, END) == ([], True)


def sample_like_vllm(model, prompt: list[int], temperature: float, max_tokens: int, end_id: int, seed: int):
    """What the fake engine returns for one request: transformers sampling seeded by the request, the stop token
    kept in token_ids (as vLLM does for a stop_token_ids hit)."""
    torch.manual_seed(seed)
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=1.0, top_k=None,
                         eos_token_id=end_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def fake_vllm(calls: dict) -> types.ModuleType:
    from transformers import AutoModelForCausalLM

    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class EngineModel:  # vLLM's model: load_weights takes (HF name, tensor) pairs
        def __init__(self, model):
            self.model = model

        def load_weights(self, weights):
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in weights:
                    params[name].copy_(tensor)
                    calls.setdefault("loaded", []).append(name)

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs
            self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()

        def generate(self, requests, sampling_params=None, use_tqdm=True):
            calls["params"] = [p.kwargs for p in sampling_params]
            outputs = []
            for request, params in zip(requests, sampling_params):
                p = params.kwargs
                end = p["stop_token_ids"][0]
                tokens = sample_like_vllm(self.model, request["prompt_token_ids"], p["temperature"], p["max_tokens"],
                                          end, p["seed"])
                stop = end if end in tokens else None
                outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens,
                                                                                    stop_reason=stop)]))
            return outputs

        def apply_model(self, func):
            return [func(EngineModel(self.model))]

    module.SamplingParams, module.LLM = SamplingParams, LLM
    return module


def vllm_cfg(**rl) -> grpo.RLConfig:
    rollout = grpo.RolloutConfig(backend="actors", num_gpus_per_actor=1, engine="vllm",
                                 vllm_gpu_memory_utilization=0.4)
    return grpo.RLConfig(group_size=2, beam_width=2, prompts_per_rank=2, max_think_tokens=4, temperature=1.3,
                         rollout=rollout, **rl)


def test_actor_samples_with_vllm_decodes_with_ours_and_syncs_both(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    monkeypatch.setattr(vllm_rollout, "cuda_available", lambda: True)
    world = build_world()
    model, tokenizer, think, users = world[0], world[1], world[3], world[5]
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = vllm_cfg()
    policy = RolloutPolicy(str(tmp_path / "model"), cfg, world[4], "fp32")   # the HF copy stays on CPU here
    assert calls["init"] == {"model": str(tmp_path / "model"), "tokenizer": str(tmp_path / "model"),
                             "dtype": "float32", "gpu_memory_utilization": 0.4}
    prompts = users.take([0, 1])
    rows = grpo.grouped_prompts(prompts, cfg.group_size)                       # [4] = 2 prompts x G=2

    def expected_rollout(reference_model, seed):
        """Each row sampled on its own with request_seed(seed, row); then the decode of our decoder on the same
        weights (the colocated worker's reward code, given these bodies)."""
        bodies, closed = [], []
        for row, prompt in enumerate(rows):
            body, is_closed = parse_completion(sample_like_vllm(reference_model, prompt, cfg.temperature,
                                                                cfg.max_think_tokens, think.end_id,
                                                                request_seed(seed, row)), None, think.end_id)
            bodies.append(body)
            closed.append(is_closed)
        return grpo.rollout_of(prompts, cfg.group_size, rows, bodies, np.array(closed))

    rollout, rewards, _, _ = policy.rollout(prompts, seed=7, version=0)
    assert calls["params"] == [{"n": 1, "temperature": 1.3, "top_p": 1.0, "max_tokens": 4,
                                "stop_token_ids": [think.end_id], "skip_special_tokens": False,
                                "seed": request_seed(7, row)} for row in range(4)]
    expected = expected_rollout(model, 7)
    assert rollout.bodies == expected.bodies and list(rollout.closed) == list(expected.closed)
    assert all(len(b) <= cfg.max_think_tokens and think.end_id not in b for b in rollout.bodies)
    assert rollout.prompts == rows and torch.equal(rollout.target_codes, expected.target_codes)
    colocated_decoder_rewards = _rewards_on(model, world, cfg, expected)
    assert torch.equal(rewards, colocated_decoder_rewards)

    # a sync of perturbed weights reaches the vLLM engine and the decoding copy
    trained, names, _ = perturb_and_send(policy, model)
    policy.commit(1, len(names))
    assert sorted(calls["loaded"]) == sorted(names)
    rollout, rewards, _, _ = policy.rollout(prompts, seed=7, version=1)
    expected_after = expected_rollout(trained, 7)
    assert expected_after.bodies != expected.bodies, "the perturbation changed no sample: the check could not fail"
    assert rollout.bodies == expected_after.bodies
    assert torch.equal(rewards, _rewards_on(trained, world, cfg, expected_after))


def _rewards_on(model, world, cfg, rollout):
    """Rewards [B, G] of ``rollout`` decoded by our decoder on ``model`` (the colocated worker's path)."""
    _, tokenizer, item_tok, think, codes, _ = world
    decoder = reward_decoder(model.eval(), item_tok, PrefixIndex.build(torch.as_tensor(codes), SIZES), cfg,
                             tokenizer.pad_token_id)
    with torch.no_grad():
        return grpo.rollout_rewards(decoder, think, rollout, cfg.reward)[0]


def test_config_and_environment_errors_name_the_field(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"rl\.rollout\.engine.*backend=actors"):
        grpo.RolloutConfig(engine="vllm")
    with pytest.raises(ValueError, match=r"rl\.rollout\.engine.*num_gpus_per_actor > 0"):
        grpo.RolloutConfig(backend="actors", engine="vllm")
    with pytest.raises(ValueError, match=r"rl\.rollout\.engine.*allowed values: hf, vllm"):
        grpo.RolloutConfig(engine="sglang")
    with pytest.raises(ValueError, match=r"rl\.rollout\.vllm_gpu_memory_utilization"):
        grpo.RolloutConfig(vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"rl\.rollout\.engine.*rl\.trainable=full"):
        vllm_cfg(trainable="lora")
    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"rl\.rollout\.engine='vllm' needs the vllm package.*engine=hf"):
        vllm_rollout.VLLMRationaleSampler.load(str(tmp_path), "fp32", END, 0.5)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm({}))
    monkeypatch.setattr(vllm_rollout, "cuda_available", lambda: False)
    with pytest.raises(ValueError, match=r"runs on a CUDA GPU, and this rollout actor has none"):
        vllm_rollout.VLLMRationaleSampler.load(str(tmp_path), "fp32", END, 0.5)
