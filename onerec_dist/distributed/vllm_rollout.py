"""vLLM as the rationale sampler of a GPU rollout actor (``rl.rollout.engine=vllm``; OneRec-Think Sec. 4.3's
distributed rollouts with a serving engine for the text, as OpenRLHF / verl / TRL do).

Only the rationale text comes from vLLM: G samples per prompt at ``rl.temperature``, stopped at ``</think>`` or after
``rl.max_think_tokens`` tokens, the same contract as ``reasoning.think_eval.generate_rationales``. The reward's
constrained beam search still runs on our decoder over the actor's transformers copy (vLLM has no per-row catalogue
constraint), so the actor holds the policy twice; ``load_bucket`` of the rollout actor writes each synced bucket into
both (``load_weights`` takes Hugging Face parameter names). Each request is seeded with
``request_seed(seed, row)``, so a rollout depends on the step's seed and its row, not on vLLM's batching.

Not verified on a real vLLM here (no GPU on the build machines); the tests run it against a fake ``vllm`` module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from onerec_dist.reasoning.teachers.llm import import_vllm, request_seed
from onerec_dist.training.flops import DTYPES


def cuda_available() -> bool:
    return torch.cuda.is_available()


def parse_completion(token_ids: Sequence[int], stop_reason, end_id: int) -> tuple[list[int], bool]:
    """(body, closed) of one vLLM completion: the tokens before ``</think>`` and whether the model wrote it.
    vLLM may or may not keep a stop token in ``token_ids`` (it reports it as ``stop_reason``); both read the same.
    A completion cut by ``max_tokens`` keeps all its tokens and is not closed (force-closed later, and counted)."""
    tokens = list(token_ids)
    if end_id in tokens:
        return tokens[:tokens.index(end_id)], True
    return tokens, stop_reason == end_id


class VLLMRationaleSampler:
    """``sample`` -> (bodies [N], closed [N]) of the rationales after each prompt; ``load_weights`` takes a synced
    bucket {HF name: tensor}."""

    def __init__(self, llm, vllm, end_id: int):
        self.llm, self.vllm, self.end_id = llm, vllm, end_id

    @classmethod
    def load(cls, model_dir: str, precision: str, end_id: int, gpu_memory_utilization: float
             ) -> "VLLMRationaleSampler":
        vllm = import_vllm("rl.rollout.engine")
        if not cuda_available():
            raise ValueError("rl.rollout.engine='vllm' runs on a CUDA GPU, and this rollout actor has none; allowed "
                             "on CPU: engine=hf")
        dtype = str(DTYPES[precision]).removeprefix("torch.") if precision in DTYPES else "auto"   # "float32"
        # the exported model's tokenizer already holds the item and think tokens
        llm = vllm.LLM(model=model_dir, tokenizer=model_dir, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization)
        return cls(llm, vllm, end_id)

    def sample(self, prompts: Sequence[Sequence[int]], max_think_tokens: int, temperature: float, seed: int
               ) -> tuple[list[list[int]], np.ndarray]:
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        params = [self.vllm.SamplingParams(n=1, temperature=temperature, top_p=1.0, max_tokens=max_think_tokens,
                                           stop_token_ids=[self.end_id], skip_special_tokens=False,
                                           seed=request_seed(seed, row))
                  for row in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        bodies, closed = [], np.zeros(len(prompts), dtype=bool)
        for row, output in enumerate(outputs):
            completion = output.outputs[0]
            body, closed[row] = parse_completion(completion.token_ids, getattr(completion, "stop_reason", None),
                                                 self.end_id)
            bodies.append(body)
        return bodies, closed

    def load_weights(self, bucket: dict[str, torch.Tensor]) -> None:
        """Write ``bucket`` into vLLM's model (``LLM.apply_model`` where this vLLM has it, else the in-process
        driver worker's model, as TRL's colocated mode does)."""
        weights = list(bucket.items())
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(lambda model: model.load_weights(weights))
            return
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
