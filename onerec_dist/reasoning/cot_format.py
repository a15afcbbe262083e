"""The one answer format of reasoning recommendation (OneRec-Think, arXiv:2510.11639, Sec. 4.2), shared by CoT SFT,
evaluation, RL and serving:

    prompt(history)  <think> "\\n" rationale "\\n" </think> "\\n\\n"  <|item_begin|> codes <|item_end|>  eos

The prompt is ``prompts.render_prompt(tokenizer, prompts.next_item_question(history, domain))``, the very prompt of
the sequential-preference task (onerec_dist.training.tasks), so the aligned model starts from text it has seen
(``domain``: the user's domain on data with several, named in a first line; None on single-domain data). The
think block is written like Qwen3's (``<think>\\n...\\n</think>\\n\\n``); a *non-thinking* answer is the same format
with an empty block (``<think>\\n\\n</think>\\n\\n``), so one checkpoint serves both modes. Token ids are built
piece by piece (prompt | <think> | encode("\\n" + r + "\\n") | </think> | encode("\\n\\n") | item ids | eos), never by
tokenising the joined string, so the ids of training, of ``inference_prompt`` + generation and of ``close_think``
agree whatever the BPE merges across the pieces.

Loss (``training_example``): every token after ``<think>`` carries the loss with equal weight: the rationale, the
closing ``</think>``, the separator, the item tokens and eos (the paper trains on the rationale and the item; the
delimiters and eos are what make generation stop and hand over to the item decoder). ``<think>`` itself ends the
inference prompt, so it is part of the prompt in both training and inference and carries no loss.

``<think>`` / ``</think>`` are added to a vocabulary that lacks them (``add_think_tokens``), the way
``onerec_dist.sid.vocab.extend_vocabulary`` adds item tokens: special tokens (never split), rows of older tokens
untouched, new rows = mean of the existing token rows + seeded N(0, noise_std^2) noise, in the input and (when
untied) the output matrix. Tokenizers that have them (Qwen3) are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onerec_dist.prompts import end_of_turn_ids
from onerec_dist.training.batching import IGNORE_INDEX
from onerec_dist.training.tasks import AlignmentExample, _fit_history_prompt

THINK_BEGIN = "<think>"
THINK_END = "</think>"
REASONING_TASK = "reasoning_sft"  # AlignmentExample.task of CoT examples
NOTHINK_TASK = "reasoning_nothink"  # ... of examples with an empty think block


def _body_text(rationale: str) -> str:
    """What stands between <think> and </think>: the rationale between two newlines (empty: "\\n\\n")."""
    return "\n" + rationale.strip() + "\n"


AFTER_THINK = "\n\n"  # between </think> and the item


@dataclass(frozen=True)
class ThinkTokens:
    """Ids of the think delimiters and of the fixed pieces around the rationale, for one tokenizer."""

    begin_id: int
    end_id: int
    after_ids: tuple[int, ...]  # encode("\n\n"): between </think> and the item
    empty_body_ids: tuple[int, ...]  # encode("\n\n"): the body of an empty think block

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ThinkTokens":
        """ValueError when the tokenizer lacks <think> or </think> (run ``add_think_tokens`` first)."""
        ids = tokenizer.convert_tokens_to_ids([THINK_BEGIN, THINK_END])
        back = tokenizer.convert_ids_to_tokens([i if i is not None else 0 for i in ids])
        missing = [t for t, i, b in zip((THINK_BEGIN, THINK_END), ids, back) if i is None or b != t]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; add them with "
                             "onerec_dist.reasoning.cot_format.add_think_tokens")
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return cls(int(ids[0]), int(ids[1]), encode(AFTER_THINK), encode(_body_text("")))

    def body_ids(self, tokenizer, rationale: str) -> list[int]:
        """encode("\\n" + rationale + "\\n"), add_special_tokens=False."""
        if not rationale.strip():
            return list(self.empty_body_ids)
        return tokenizer.encode(_body_text(rationale), add_special_tokens=False)


def new_token_rows(item_tok, think: ThinkTokens) -> list[int]:
    """Embedding rows of the tokens the base model never saw: the item tokens, <think> and </think>. They train
    beside the LoRA adapters (CoT SFT and GRPO with trainable=lora): a low-rank update of the projections alone
    cannot give them meaning."""
    return item_tok.item_token_ids().tolist() + [think.begin_id, think.end_id]


def add_think_tokens(model, tokenizer, noise_std: float = 0.02, pad_to_multiple_of: int = 64,
                     seed: int = 0) -> ThinkTokens:
    """Add <think> / </think> to ``tokenizer`` and ``model`` (in place) unless the tokenizer has both already.

    New rows: mean of the rows of the tokenizer's existing tokens + N(0, noise_std^2) (seeded), in the input
    embeddings and, when untied, the output embeddings; every older row is left bit-identical. The matrices grow
    to a multiple of ``pad_to_multiple_of`` only when the new tokens do not fit the spare rows.
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in (THINK_BEGIN, THINK_END) if t not in vocab]
    if not missing:
        return ThinkTokens.from_tokenizer(tokenizer)
    input_emb, output_emb = model.get_input_embeddings(), model.get_output_embeddings()
    old_rows, old_len = input_emb.weight.shape[0], len(tokenizer)
    if old_len > old_rows:
        raise ValueError(f"the tokenizer has {old_len} tokens but the model's input embeddings only {old_rows} rows")
    tied = output_emb is None or output_emb.weight is input_emb.weight
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    new_rows = math.ceil(max(len(tokenizer), old_rows) / pad_to_multiple_of) * pad_to_multiple_of
    if new_rows != old_rows:
        model.resize_token_embeddings(new_rows, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    input_emb, output_emb = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and output_emb is not None and output_emb.weight is not input_emb.weight:
        raise RuntimeError("resize_token_embeddings untied the input and output embeddings")
    rows = torch.tensor(tokenizer.convert_tokens_to_ids(missing), dtype=torch.long)  # [m]
    padding = torch.arange(old_rows, new_rows)
    rows = torch.cat([rows, padding[~torch.isin(padding, rows)]])  # resize rows no token uses get the mean too
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in [input_emb.weight] if tied else [input_emb.weight, output_emb.weight]:
            mean = weight[:old_len].float().mean(0)  # [d]
            noise = torch.randn(rows.numel(), weight.shape[1], generator=generator) * noise_std  # [m, d]
            weight[rows.to(weight.device)] = (mean + noise).to(weight.device, weight.dtype)
    return ThinkTokens.from_tokenizer(tokenizer)


def history_prompt(tokenizer, item_codes: np.ndarray, history: Sequence[int], budget: int,
                   domain: str | None = None) -> tuple[list[int], int]:
    """The sequential-preference prompt of the longest suffix of ``history`` within ``budget`` tokens, and that
    suffix's length (0 when not even one item fits). ``domain``: named in the prompt (None: single domain)."""
    return _fit_history_prompt(tokenizer, np.asarray(item_codes), list(history), budget, domain)


def inference_prompt(tokenizer, think: ThinkTokens, item_codes: np.ndarray, history: Sequence[int],
                     max_length: int | None = None, domain: str | None = None) -> list[int]:
    """Prompt ids up to and including <think>: generation writes the rationale from here."""
    budget = (max_length - 1) if max_length is not None else 1 << 30
    prompt, kept = history_prompt(tokenizer, item_codes, history, budget, domain)
    if kept == 0:
        raise ValueError(f"max_length={max_length} cannot hold a prompt with one history item")
    return prompt + [think.begin_id]


def close_think(think: ThinkTokens, prefix_ids: Sequence[int], rationale_ids: Sequence[int] | None = None
                ) -> list[int]:
    """The ids after which the item decoder starts (it appends <|item_begin|>): ``prefix_ids`` (an inference
    prompt, ending with <think>) + the rationale's body ids + </think> + separator. ``rationale_ids=None`` (or
    empty) gives the non-thinking answer's empty block; a generated body that ran over its cap is closed the same
    way (force-closed)."""
    body = list(rationale_ids) if rationale_ids else list(think.empty_body_ids)
    return list(prefix_ids) + body + [think.end_id] + list(think.after_ids)


def answer_ids(tokenizer, think: ThinkTokens, rationale: str | None, item_ids: Sequence[int]) -> list[int]:
    """Everything after <think>: body + </think> + separator + the item's L + 2 ids + eos."""
    body = think.body_ids(tokenizer, rationale or "")
    return body + [think.end_id] + list(think.after_ids) + list(item_ids) + end_of_turn_ids(tokenizer)


def training_example(tokenizer, think: ThinkTokens, item_codes: np.ndarray, item_ids: Sequence[int],
                     history: Sequence[int], rationale: str | None, max_length: int,
                     source: str = "", domain: str | None = None) -> AlignmentExample:
    """One CoT SFT example: inference prompt (history cut from the left to fit) + answer, loss on the answer.

    ``item_ids`` are the target's L + 2 ids (``ItemTokenizer.encode_with_boundaries``); ``rationale`` None or
    blank gives a non-thinking example. ValueError when ``max_length`` cannot hold one history item + the answer.
    """
    answer = answer_ids(tokenizer, think, rationale, item_ids)
    prompt, kept = history_prompt(tokenizer, item_codes, history, max_length - len(answer) - 1, domain)
    if kept == 0:
        raise ValueError(f"max_length={max_length} cannot hold a prompt with one history item plus the "
                         f"{len(answer)}-token answer ({source or 'example'}); raise max_length or cap rationales")
    prompt = prompt + [think.begin_id]
    task = REASONING_TASK if rationale and rationale.strip() else NOTHINK_TASK
    return AlignmentExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, task, source)


@dataclass
class ParsedThink:
    """A generated continuation of an inference prompt, split at </think>."""

    rationale: str  # decoded body, stripped
    rationale_ids: list[int]  # body ids as generated (before </think>, or all of them when unclosed)
    closed: bool  # </think> was generated
    rest_ids: list[int]  # what followed </think> (empty when unclosed)


def parse_continuation(tokenizer, think: ThinkTokens, generated_ids: Sequence[int]) -> ParsedThink:
    """Split generated ids (what came after the prompt's <think>) into rationale and the rest. Padding after eos
    is the caller's to strip; a second <think> is kept as text of the rationale."""
    ids = [int(i) for i in generated_ids]
    closed = think.end_id in ids
    cut = ids.index(think.end_id) if closed else len(ids)
    body = ids[:cut]
    text = tokenizer.decode(body, skip_special_tokens=False).strip()
    return ParsedThink(text, body, closed, ids[cut + 1:] if closed else [])
