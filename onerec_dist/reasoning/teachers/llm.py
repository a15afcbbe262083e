"""The ``llm`` teacher: any Hugging Face causal LM writes the rationale (OneRec-Think Sec. 4.2 uses the aligned model
of the run itself).

``generate_batch`` is the pure core: user messages -> chat-rendered prompt ids (``prompts.render_prompt``) ->
left-padded batches -> ``model.generate`` -> the new text of each prompt. Greedy by default. With sampling, request
``i`` draws its tokens from its own generator, seeded with ``request_seed(seed, i)`` (Gumbel-max over the
temperature / top-p distribution, one noise stream per row), so a rationale depends on its request and the seed only,
never on which other requests shared its batch or its Ray shard.

Backends (``reasoning.teacher.backend``): ``hf`` (transformers ``generate``) or ``vllm`` (GPU only, optional extra;
``vllm_generate`` maps the config to ``vllm.SamplingParams`` with the same per-request seeds). With
``reasoning.teacher.num_workers`` > 1 the requests go to Ray workers (onerec_dist/distributed/teacher_shards.py), each
of which loads the model once and runs ``load_generator`` -> ``.generate`` on contiguous shards.

The prompt (``reasoning.teacher.prompt_template``) is filled with ``{history}`` (one line per pruned item: ID,
title, categories, brand), ``{target}`` (the same line of the target: the teacher must know what to explain; the
leak lint drops rationales that name it) and ``{persona}`` (the dataset's persona, or "").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopPLogitsWarper)

from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.prompts import item_text, render_prompt
from onerec_dist.reasoning.teachers import LLMTeacherConfig, TeacherRequest


def vllm_missing(setting: str) -> str:
    """What to do when ``setting`` (e.g. reasoning.teacher.backend) chose vllm and it is not installed."""
    return (f"{setting}='vllm' needs the vllm package, which is not installed. It is a GPU-only optional extra "
            f"(pip install 'onerec-dist[vllm]' on a CUDA machine); on CPU use {setting.rsplit('.', 1)[1]}=hf.")


VLLM_MISSING = vllm_missing("reasoning.teacher.backend")


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request ``index`` of a run seeded ``seed``: a 32-bit draw of numpy's SeedSequence
    ([seed, index]), so neighbouring indices get unrelated streams."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class PerRequestSampler(LogitsProcessor):
    """Samples each row from its own torch generator, as a logits processor for a *greedy* ``generate``: the
    temperature and top-p warpers of transformers shape the scores, Gumbel-max picks one token per row
    (argmax(log p + G) with G ~ Gumbel(0, 1) is a draw from p), and every other token gets -inf so greedy takes it.
    Row r's noise comes from ``seeds[r]`` alone and step t uses its t-th draw: batch composition cannot change it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)  # [b, V], -inf outside the nucleus
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(scores.device)  # [b, V]
        gumbel = -torch.log(-torch.log(uniform))
        choice = (scores.float() + gumbel).argmax(dim=-1, keepdim=True)  # [b, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 128,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   indices: Sequence[int] | None = None, batch_size: int = 8) -> list[str]:
    """Generate one continuation per prompt (a user message, chat-rendered here, or ready token ids).

    ``indices``: the request index of each prompt (default 0, 1, ...); with ``do_sample`` prompt j is sampled with
    ``request_seed(seed, indices[j])``. Returns the decoded new tokens of each prompt (special tokens dropped,
    stripped), in prompt order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} request indices for {len(prompts)} prompts")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    encoded = [list(p) if not isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    # Greedy decoding in both modes: sampling happens inside PerRequestSampler (one generator per request).
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding: every prompt ends at the last column, where generation starts.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)  # [b, W]
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            extra = {}
            if do_sample:
                seeds = [request_seed(seed, i) for i in indices[start:start + batch_size]]
                extra["logits_processor"] = LogitsProcessorList([PerRequestSampler(seeds, temperature, top_p)])
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **greedy,
                                 **extra)  # [b, W+T]
            new = out[:, width:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


# ---------------------------------------------------------------- backends


@dataclass(frozen=True)
class ModelSource:
    """Where a worker (or vLLM) loads the teacher from, and how: the arguments of ``models.load_pretrained``."""

    path: str
    attn_implementation: str = "auto"
    dtype: str = "auto"


class HFGenerator:
    """transformers ``generate`` on a loaded model (``generate_batch``)."""

    def __init__(self, cfg: LLMTeacherConfig, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> list[str]:
        cfg = self.cfg
        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                              do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              indices=indices, batch_size=cfg.batch_size)


def import_vllm(setting: str = "reasoning.teacher.backend"):
    """The vllm module, or an ImportError that names ``setting`` and says what to do."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(vllm_missing(setting)) from err
    return vllm


def vllm_sampling_params(vllm, cfg: LLMTeacherConfig, indices: Sequence[int]) -> list:
    """One ``vllm.SamplingParams`` per request: greedy is temperature 0 (vLLM's greedy); sampling keeps
    temperature / top_p and seeds request i with ``request_seed(cfg.seed, i)``, as the hf backend does."""
    params = []
    for index in indices:
        if cfg.do_sample:
            sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, seed=request_seed(cfg.seed, index))
        else:
            sampling = dict(temperature=0.0, top_p=1.0)
        params.append(vllm.SamplingParams(n=1, max_tokens=cfg.max_new_tokens, skip_special_tokens=True, **sampling))
    return params


class VLLMGenerator:
    """vLLM's offline ``LLM.generate`` on a GPU; prompts are rendered with the same chat template as the hf backend
    and handed over as token ids."""

    def __init__(self, cfg: LLMTeacherConfig, llm, tokenizer, vllm):
        self.cfg, self.llm, self.tokenizer, self.vllm = cfg, llm, tokenizer, vllm

    @classmethod
    def load(cls, cfg: LLMTeacherConfig, source: ModelSource) -> "VLLMGenerator":
        vllm = import_vllm()
        if not torch.cuda.is_available():
            raise ValueError("reasoning.teacher.backend='vllm' runs on a CUDA GPU, and none is available here; "
                             "allowed on CPU: backend=hf")
        llm = vllm.LLM(model=source.path, tokenizer=source.path, dtype=source.dtype, seed=cfg.seed)
        return cls(cfg, llm, llm.get_tokenizer(), vllm)

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> list[str]:
        token_prompts = [{"prompt_token_ids": render_prompt(self.tokenizer, p)} for p in prompts]
        params = vllm_sampling_params(self.vllm, self.cfg, indices)
        outputs = self.llm.generate(token_prompts, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def load_generator(cfg: LLMTeacherConfig, source: ModelSource):
    """The generator of ``cfg.backend`` with the model of ``source``, on a GPU when ``cfg.use_gpu`` (a Ray worker
    calls this once, then ``generate`` per shard)."""
    if cfg.backend == "vllm":
        return VLLMGenerator.load(cfg, source)
    from onerec_dist.devices import resolve_device
    from onerec_dist.models import load_pretrained

    if cfg.use_gpu and not torch.cuda.is_available():
        raise ValueError("reasoning.teacher.use_gpu=true but no CUDA GPU is available; set use_gpu=false")
    model, tokenizer = load_pretrained(source.path, source.attn_implementation, source.dtype)
    model.eval().to(resolve_device("cuda" if cfg.use_gpu else "cpu"))
    return HFGenerator(cfg, model, tokenizer)


# ---------------------------------------------------------------- the teacher


def item_line(catalogue: Catalogue, item_codes: np.ndarray | None, index: int) -> str:
    """"<ID> title (category > sub) by brand", leaving out what the dataset lacks."""
    parts = []
    if item_codes is not None:
        parts.append(item_text(item_codes[index]))
    if catalogue.titles[index]:
        parts.append(catalogue.titles[index])
    if catalogue.categories[index]:
        parts.append("(" + " > ".join(catalogue.categories[index]) + ")")
    if catalogue.brands[index]:
        parts.append(f"by {catalogue.brands[index]}")
    return " ".join(parts) or f"item {catalogue.item_ids[index]}"


def teacher_prompt(template: str, catalogue: Catalogue, item_codes: np.ndarray | None,
                   request: TeacherRequest) -> str:
    history = "\n".join(f"- {item_line(catalogue, item_codes, i)}" for i in (request.pruned or request.history))
    return template.format(history=history, target=item_line(catalogue, item_codes, request.target),
                           persona=request.persona)


def run_model_source(model, tokenizer, work_dir: str | Path | None) -> ModelSource:
    """The in-process (aligned) model saved to ``work_dir``/teacher_model, for Ray workers and vLLM to load: the
    same weights, dtype and attention implementation as in this process."""
    if work_dir is None:
        raise ValueError("reasoning.teacher.model is null (the aligned model of the run) with num_workers > 1 or "
                         "backend='vllm': the model must be saved for the workers, but no work directory was given")
    path = Path(work_dir) / "teacher_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    attn = getattr(model.config, "_attn_implementation", None) or "auto"
    return ModelSource(str(path), attn, "auto")


class LLMTeacher:
    """Prompts from requests; rationales from a generator (in-process hf, in-process vLLM, or Ray shards).
    Request indices (the sampling seeds) count every request this teacher has answered, in order."""

    name = "llm"

    def __init__(self, cfg: LLMTeacherConfig, data: InteractionData, item_codes: np.ndarray | None, generator):
        self.cfg, self.catalogue, self.generator = cfg, data.catalogue, generator
        self.item_codes = np.asarray(item_codes) if item_codes is not None else data.catalogue.semantic_ids
        self.requests_done = 0
        # Sharded: the bootstrap hands over all its requests in one call, so the shards can run side by side.
        self.takes_all_requests = cfg.num_workers > 1

    @classmethod
    def from_config(cls, cfg: LLMTeacherConfig, data: InteractionData, item_codes: np.ndarray | None = None, *,
                    model=None, tokenizer=None, work_dir: str | Path | None = None) -> "LLMTeacher":
        """``cfg.model`` null: the given (aligned) model (saved to ``work_dir`` when workers or vLLM must load it);
        a path or hub name: loaded (offline) here, by every Ray worker, or by vLLM."""
        if cfg.model is None and (model is None or tokenizer is None):
            raise ValueError("reasoning.teacher.model is null (the aligned model of the run) but no model was given")
        in_process_hf = cfg.num_workers == 1 and cfg.backend == "hf"
        if in_process_hf and cfg.model is None:
            return cls(cfg, data, item_codes, HFGenerator(cfg, model, tokenizer))
        source = ModelSource(cfg.model, "auto", cfg.dtype) if cfg.model is not None else \
            run_model_source(model, tokenizer, work_dir)
        if cfg.num_workers > 1:
            from onerec_dist.distributed.teacher_shards import ShardedGenerator

            return cls(cfg, data, item_codes, ShardedGenerator(cfg, source))
        return cls(cfg, data, item_codes, load_generator(cfg, source))

    def prompts(self, requests: list[TeacherRequest]) -> list[str]:
        return [teacher_prompt(self.cfg.prompt_template, self.catalogue, self.item_codes, r) for r in requests]

    def rationales(self, requests: list[TeacherRequest]) -> list[str]:
        indices = list(range(self.requests_done, self.requests_done + len(requests)))
        out = self.generator.generate(self.prompts(requests), indices)
        self.requests_done += len(requests)
        return out

    def close(self) -> None:
        """Release the workers (sharded) or the model; the teacher answers no more requests."""
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()
        self.generator = None
