"""Sample-efficient sequential preference modelling: one training example per user *sequence* with a loss on every
item's ID tokens (all positions, causal), instead of one example per (history -> target) window.

A window example (``tasks.sequential_preference``, ``align.multitask.sequential_format=window``) of a user with
training items s_0 .. s_m is the prompt ``next_item_question(s_0..s_{t-1})`` + answer ``ID(s_t) eos``, with a loss
on the answer only: m examples for m targets, each re-reading its whole history. A whole-sequence example
(``sequential_format=whole_sequence``, as SASRec / HSTU / generative pre-training train) is the single prompt
``next_item_question(s_0..s_{m-1})`` + answer ``ID(s_m) eos`` with a loss on the answer AND on the ID tokens
(begin, L codes, end) of every listed item s_1 .. s_{m-1}: item s_t is predicted from the question text and
s_0..s_{t-1} only, because the model is causal. The m targets cost one forward pass over about one history's tokens
instead of m, so an epoch of the same targets is ~m/2 times fewer tokens. The separators between IDs (", ") and the
question text carry no loss, and s_0 has no predecessor so it carries none either.

On a sequence of one target (s_0 -> s_1) both formats give the same example, hence the same loss
(tests/test_sequence_task.py). With more targets, a listed item's context differs from the window's (it is read
inside the question instead of after it), which is what the format trades for m x fewer tokens.

Long sequences: the user's items are cut, from the end, into windows that fit ``max_length`` tokens (and
``max_history`` items of context): the last window ends with the last item as the answer; the next window ends
with the first item of the previous one (which there was context only), so every target s_1 .. s_m carries a loss
exactly once. Packing many sequences into a micro-batch to a token budget is the trainer's job:
``trainer.batching=tokens`` with ``trainer.max_tokens`` (onerec_dist.training.batching).

The user's items are those of the user's longest training example (``tasks.training_items``): under leave-one-out
the training interactions s_0 .. s_{n-3}, each history already cut to ``data.max_history`` items.
"""

from __future__ import annotations

import numpy as np

from onerec_dist.data.domains import domain_name_by_user
from onerec_dist.data.types import DropReport, Examples, InteractionData
from onerec_dist.prompts import end_of_turn_ids
from onerec_dist.training.batching import IGNORE_INDEX

SEQUENTIAL_FORMATS = ("window", "whole_sequence")


def _item_spans(prompt: list[int], items: list[int], ids: list[list[int]]) -> list[tuple[int, int]]:
    """[start, end) token span of each of ``items`` (in order) in ``prompt``, by matching each item's ID tokens
    after the previous match. Raises ValueError when an ID is not found (a tokenizer that does not map the ID
    text to the item tokens)."""
    spans, cursor = [], 0
    for item in items:
        pattern, found = ids[item], -1
        for start in range(cursor, len(prompt) - len(pattern) + 1):
            if prompt[start:start + len(pattern)] == pattern:
                found = start
                break
        if found < 0:
            raise ValueError(f"the ID tokens of item {item} are not in the rendered prompt: the tokenizer does not "
                             "tokenise item IDs to the item tokens")
        spans.append((found, found + len(pattern)))
        cursor = found + len(pattern)
    return spans


def whole_sequence_example(tokenizer, codes: np.ndarray, ids: list[list[int]], items: list[int], first_target: int,
                           eos: list[int], source: str, domain: str | None = None):
    """One example over ``items`` (context s_0 then targets): prompt listing items[:-1], answer items[-1]. Loss on
    the answer and on the ID tokens of the listed items whose position is >= ``first_target`` (>= 1). ``domain``:
    the user's domain, named in the prompt (data with several domains)."""
    from onerec_dist.prompts import next_item_question, render_prompt
    from onerec_dist.training.tasks import SEQUENTIAL, AlignmentExample

    history = items[:-1]
    prompt = render_prompt(tokenizer, next_item_question(codes[history].tolist(), domain))
    labels = [IGNORE_INDEX] * len(prompt)
    for position, (start, end) in enumerate(_item_spans(prompt, history, ids)):
        if position >= first_target:
            labels[start:end] = prompt[start:end]
    answer = ids[items[-1]] + eos
    return AlignmentExample(prompt + answer, labels + answer, SEQUENTIAL, source)


def whole_sequence_preference(data: InteractionData, train: Examples, item_codes: np.ndarray, tokenizer, *,
                              max_length: int, max_history: int | None = None, report: DropReport | None = None,
                              processes: int | None = None, min_parallel_rows: int | None = None) -> list:
    """Whole-sequence examples of every user with at least one training target (module docstring).
    ``processes`` > 1: users in chunks in a process pool, same result (onerec_dist/training/tasks_parallel.py)."""
    from onerec_dist.training.tasks import _check_item_indices, item_token_table, training_items
    from onerec_dist.training.tasks_parallel import MIN_PARALLEL_ROWS, build_in_chunks

    report = report if report is not None else DropReport()
    codes = np.asarray(item_codes)
    ids = item_token_table(tokenizer, codes, len(data.catalogue))
    _check_item_indices(train, len(data.catalogue))
    sequences = list(training_items(train).items())
    context = {"tokenizer": tokenizer, "codes": codes, "ids": ids, "sequences": sequences,
               "eos": end_of_turn_ids(tokenizer), "max_length": max_length, "max_history": max_history,
               "domains": domain_name_by_user(data)}  # {user: domain name}, None: single domain
    examples, chunk_report = build_in_chunks(
        _whole_sequence_rows, context, len(sequences), processes=processes,
        min_parallel_rows=MIN_PARALLEL_ROWS if min_parallel_rows is None else min_parallel_rows,
        desc="align data: sequential_preference (whole_sequence)")
    report.merge(chunk_report)
    return examples


def _whole_sequence_rows(context: dict, start: int, stop: int) -> tuple[list, DropReport]:
    """Whole-sequence examples of users ``start .. stop - 1`` of ``context["sequences"]``
    (tasks_parallel.BuildRows)."""
    from onerec_dist.training.tasks import SEQUENTIAL, _fit_history_prompt

    report = DropReport()
    tokenizer, codes, ids, eos = (context[k] for k in ("tokenizer", "codes", "ids", "eos"))
    max_length, max_history = context["max_length"], context["max_history"]
    examples = []
    for user, sequence in context["sequences"][start:stop]:
        domain = context["domains"][user] if context.get("domains") else None
        end, windows = len(sequence) - 1, []  # ``end``: index of this window's answer item
        while end >= 1:
            answer_len = len(ids[sequence[end]]) + len(eos)
            context_items = sequence[max(0, end - max_history) if max_history else 0:end]
            _, kept = _fit_history_prompt(tokenizer, codes, context_items, max_length - answer_len, domain)
            if kept == 0:
                raise ValueError(f"{SEQUENTIAL}: max_length={max_length} cannot hold a prompt with one history item "
                                 f"plus the {answer_len}-token answer (user {user}); raise max_length")
            start_item = end - kept
            # Window items sequence[start_item .. end]; position 0 is context only (its own target, if any, is the
            # answer of the next window), positions 1 .. kept are targets.
            windows.append(whole_sequence_example(tokenizer, codes, ids, sequence[start_item:end + 1], 1, eos,
                                                  f"user {user} items {start_item}..{end}", domain))
            end = start_item
        if len(windows) > 1:
            report.add(f"user sequence cut into windows of max_length={max_length} tokens / max_history items",
                       f"user {user}", count=len(windows) - 1)
        examples.extend(reversed(windows))
    return examples, report
