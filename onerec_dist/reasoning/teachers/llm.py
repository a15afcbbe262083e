"""The ``llm`` teacher: any Hugging Face causal LM writes the rationale (OneRec-Think Sec. 4.2 uses the aligned model
of the run itself).

``generate_batch`` is the pure core: user messages -> chat-rendered prompt ids (``prompts.render_prompt``) ->
left-padded batches -> ``model.generate`` -> the new text of each prompt. Greedy by default; with sampling, the
torch generator is seeded with (seed + batch index) before each batch, so a run is reproducible for a fixed
batch size. Sharding the batches over Ray workers (and vLLM as a GPU backend) lives in onerec_dist/distributed
and calls this core per shard.

The prompt (``reasoning.teacher.prompt_template``) is filled with ``{history}`` (one line per pruned item: ID,
title, categories, brand), ``{target}`` (the same line of the target: the teacher must know what to explain; the
leak lint drops rationales that name it) and ``{persona}`` (the dataset's persona, or "").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from onerec_dist.data.types import Catalogue, InteractionData
from onerec_dist.prompts import item_text, render_prompt
from onerec_dist.reasoning.teachers import LLMTeacherConfig, TeacherRequest


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 128,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 8) -> list[str]:
    """Generate one continuation per prompt (a user message, chat-rendered here, or ready token ids).

    Returns the decoded new tokens of each prompt (special tokens dropped, stripped), in prompt order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    encoded = [list(p) if not isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for index, start in enumerate(range(0, len(encoded), batch_size)):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding: every prompt ends at the last column, where generation starts.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)  # [b, W]
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            if do_sample:
                torch.manual_seed(seed + index)
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **sampling)  # [b, W+T]
            new = out[:, width:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


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


class LLMTeacher:
    name = "llm"

    def __init__(self, cfg: LLMTeacherConfig, data: InteractionData, item_codes: np.ndarray | None, model,
                 tokenizer):
        self.cfg, self.catalogue, self.model, self.tokenizer = cfg, data.catalogue, model, tokenizer
        self.item_codes = np.asarray(item_codes) if item_codes is not None else data.catalogue.semantic_ids
        self.batches_done = 0  # sampling seeds continue across calls: batch j of the run uses seed + j

    @classmethod
    def from_config(cls, cfg: LLMTeacherConfig, data: InteractionData, item_codes: np.ndarray | None = None, *,
                    model=None, tokenizer=None) -> "LLMTeacher":
        """``cfg.model`` null: the given (aligned) model; a path or hub name: loaded here (offline)."""
        if cfg.backend != "hf":
            raise ValueError(f"reasoning.teacher.backend={cfg.backend!r}: only 'hf' runs in-process; vLLM is "
                             "served by the Ray-sharded teacher (onerec_dist/distributed)")
        if cfg.model is not None:
            from onerec_dist.models import load_pretrained

            model, tokenizer = load_pretrained(cfg.model, dtype=cfg.dtype)
        if model is None or tokenizer is None:
            raise ValueError("reasoning.teacher.model is null (the aligned model of the run) but no model was given")
        return cls(cfg, data, item_codes, model, tokenizer)

    def prompts(self, requests: list[TeacherRequest]) -> list[str]:
        return [teacher_prompt(self.cfg.prompt_template, self.catalogue, self.item_codes, r) for r in requests]

    def rationales(self, requests: list[TeacherRequest]) -> list[str]:
        cfg = self.cfg
        out = generate_batch(self.model, self.tokenizer, self.prompts(requests), max_new_tokens=cfg.max_new_tokens,
                             do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                             seed=cfg.seed + self.batches_done, batch_size=cfg.batch_size)
        self.batches_done += -(-len(requests) // cfg.batch_size)
        return out
