"""Itemic Alignment data (OneRec-Think, arXiv:2510.11639, Sec. 3.2): the four next-token-prediction tasks that
ground itemic tokens in language, as token ids with loss masks for the training engine.

1. ``persona_grounding`` (Interleaved User Persona Grounding): a user-profile text in which item IDs are
   interleaved with item text, one line per purchased item (ID, title, categories), then a summary of interests.
   The summary is the dataset's persona (``data.personas``, e.g. synthetic data) when there is one; otherwise it
   is DERIVED from the user's training items: their most frequent categories and brands
   (``tasks_text.derive_interest_summary``). The items are those of the user's training examples only (history +
   target of the user's longest training example), never a validation or test target. Loss on every token (plain
   LM on interleaved text, no chat prompt). Stage 1 (token warm-up, only the new embedding rows train) uses this
   task alone (``warmup_examples``); stage 2 mixes all four.
2. ``sequential_preference`` (Sequential Preference Modeling): prompt = the chat-rendered question
   ``prompts.next_item_question(history)``; answer = the target's item tokens + end of turn. Loss on the answer.
3. ``itemic_captioning`` (Itemic Dense Captioning): prompt = "Describe the item <ID>..."; answer = title and the
   description cut to ``max_description_tokens`` tokens + end of turn. Loss on the answer. Items without any text
   are skipped and counted.
4. ``general_text`` (General Language Modeling): documents of a txt / JSONL / parquet corpus, each + eos cut into
   ``max_length`` chunks; loss on every token. Default corpus: ``general_text.txt`` shipped in this package.

Prompts go through ``prompts.render_prompt`` (the tokenizer's chat template when it has one), so training and
decoding see the same prompt tokens. Item IDs in answers and persona texts are the ids of
``ItemTokenizer.encode_with_boundaries`` (L + 2 tokens); in prompts they are written as ``prompts.item_text`` and
tokenised by the tokenizer, where they are special tokens and become the same L + 2 ids.

Mixture (``build_alignment_mixture``): the paper's stage-2 proportions are 24.30 / 65.73 / 4.94 / 5.03 % (persona /
sequential / captioning / general). Every task is built in full (its *pool*), counts per task are allocated by the
largest-remainder method (sum = total exactly, each count within 1 of ratio x total), each pool is cycled (every
example floor(c/n) times) plus a seeded draw without replacement for the remainder, and the result is shuffled.
Everything is deterministic given the seed. Every truncation, skip and drop is counted in the stats. A catalogue
without any item text (ID-only, e.g. Beauty) has no caption: a text task whose ratio was not chosen by the user
(``explicit_ratios``) is then dropped, the other ratios renormalised, and ``stats["dropped_tasks"]`` says why.

Every example is at most ``max_length`` tokens: sequential histories are truncated from the left (the answer is never
cut), persona texts drop their oldest items, captions cut the description, general text is chunked.

Building in parallel (``processes`` > 1, ``align.build_processes``): the per-row tasks (persona per user, sequential
per training example or user, captioning per item) build contiguous chunks of their rows in a process pool and
concatenate them in row order (``tasks_parallel.build_in_chunks``), so every pool, hence the mixture and its stats,
is the serial one whatever the process or chunk count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onerec_dist.data.domains import user_domain_names
from onerec_dist.data.types import DropReport, Examples, InteractionData
from onerec_dist.prompts import end_of_turn_ids, next_item_question, render_prompt
from onerec_dist.sid.tokens import ItemTokenizer
from onerec_dist.training.batching import IGNORE_INDEX
from onerec_dist.training.tasks_parallel import MIN_PARALLEL_ROWS, build_in_chunks
from onerec_dist.training.tasks_text import (
    PERSONA_HEADER,
    PERSONA_ITEM_PREFIX,
    PERSONA_SUMMARY_PREFIX,
    caption_question,
    derive_interest_summary,
    persona_item_suffix,
    read_documents,
)

PERSONA = "persona_grounding"
SEQUENTIAL = "sequential_preference"
CAPTIONING = "itemic_captioning"
GENERAL = "general_text"
TASKS = (PERSONA, SEQUENTIAL, CAPTIONING, GENERAL)
# OneRec-Think Sec. 3.2, stage-2 data mixture (share of examples).
DEFAULT_RATIOS = {PERSONA: 0.2430, SEQUENTIAL: 0.6573, CAPTIONING: 0.0494, GENERAL: 0.0503}
# Tasks that cannot exist without item text (a caption is an item's title and description). Persona grounding is not
# one: without text it is the user's item-ID sequence (plus the dataset's persona, if any), which the warm-up needs;
# general text reads its own corpus.
TEXT_TASKS = (CAPTIONING,)


@dataclass
class AlignmentExample:
    """One training sequence in the engine's format (onerec_dist.training.batching): ``labels[t]`` is the token at
    position t where it carries a loss, -100 elsewhere. ``source`` says where it came from ("user u3", "train[17]
    user u3", "item 42", "doc 3 chunk 0"), for tests and debugging; the engine ignores it."""

    input_ids: list[int]
    labels: list[int]
    task: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _lm_example(ids: list[int], task: str, source: str) -> AlignmentExample:
    return AlignmentExample(list(ids), list(ids), task, source)


def _prompt_answer_example(prompt: list[int], answer: list[int], task: str, source: str) -> AlignmentExample:
    return AlignmentExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, task, source)


def item_token_table(tokenizer, item_codes: np.ndarray, num_items: int | None = None) -> list[list[int]]:
    """[N][L + 2] token ids of every item's ID (begin, L code tokens, end), from the tokenizer's item tokens.

    Raises ValueError when the codes are not an [N, L] array of non-negative integers (N = ``num_items`` when
    given), when the tokenizer has no item tokens, or when a code is outside its level's codebook.
    """
    codes = np.asarray(item_codes)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"item_codes must have shape [num_items, num_levels], got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"item_codes must be integers, got dtype {codes.dtype}")
    if num_items is not None and codes.shape[0] != num_items:
        raise ValueError(f"item_codes has {codes.shape[0]} rows but the catalogue {num_items} items")
    item_tokenizer = ItemTokenizer.from_tokenizer(tokenizer)
    if codes.shape[1] != item_tokenizer.num_levels:
        raise ValueError(f"item_codes has {codes.shape[1]} levels but the tokenizer's item tokens "
                         f"{item_tokenizer.num_levels}")
    return item_tokenizer.encode_with_boundaries(torch.as_tensor(codes, dtype=torch.long)).tolist()


def _check_item_indices(train: Examples, num_items: int) -> None:
    flat = np.fromiter(itertools.chain(train.targets, *train.histories), dtype=np.int64)
    if flat.size == 0 or (flat.min() >= 0 and flat.max() < num_items):
        return
    for i, (history, target) in enumerate(zip(train.histories, train.targets)):  # find the culprit to name it
        for item in (*history, target):
            if not 0 <= item < num_items:
                raise ValueError(f"train example {i} (user {train.users[i]!r}) has item index {item} outside the "
                                 f"catalogue [0, {num_items})")


def training_items(train: Examples) -> dict[str, list[int]]:
    """Per user, history + target of the user's longest training example (the later one on ties): its most recent
    training-period items, oldest first. Validation / test targets are not in ``train``, so they never enter."""
    best: dict[str, tuple[int, int]] = {}
    for i, (user, history) in enumerate(zip(train.users, train.histories)):
        if user not in best or len(history) + 1 >= best[user][0]:
            best[user] = (len(history) + 1, i)
    return {user: list(train.histories[i]) + [train.targets[i]] for user, (_, i) in best.items()}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch encoding (Rust-parallel for fast tokenizers), no special tokens added."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------- 1. interleaved user persona grounding


def persona_grounding(data: InteractionData, train: Examples, item_codes: np.ndarray, tokenizer, *,
                      max_length: int, max_items: int | None = None, report: DropReport | None = None,
                      processes: int | None = None,
                      min_parallel_rows: int = MIN_PARALLEL_ROWS) -> list[AlignmentExample]:
    """One interleaved persona text per user with training examples (see the module docstring). Loss on all tokens.

    The text is header + one line per item ("- <ID> title (categories)") + the interest summary + eos. Pieces are
    tokenised separately and concatenated, so a line's length does not depend on its neighbours and dropping the
    oldest lines to fit ``max_length`` is exact. A user whose header + newest item + summary does not fit is
    skipped and counted. ``processes`` > 1: users in chunks in a process pool, same result (tasks_parallel).
    """
    report = report if report is not None else DropReport()
    ids = item_token_table(tokenizer, item_codes, len(data.catalogue))
    _check_item_indices(train, len(data.catalogue))
    user_items = training_items(train)
    if max_items is not None:
        user_items = {u: items[-max_items:] for u, items in user_items.items()}
    header, prefix = _encode(tokenizer, [PERSONA_HEADER, PERSONA_ITEM_PREFIX])
    context = {"tokenizer": tokenizer, "catalogue": data.catalogue, "personas": data.personas, "ids": ids,
               "user_items": list(user_items.items()), "header": header, "prefix": prefix,
               "eos": end_of_turn_ids(tokenizer), "max_length": max_length}
    examples, chunk_report = build_in_chunks(_persona_rows, context, len(user_items), processes=processes,
                                             min_parallel_rows=min_parallel_rows, desc=f"align data: {PERSONA}")
    report.merge(chunk_report)
    return examples


def _persona_rows(context: dict, start: int, stop: int) -> tuple[list[AlignmentExample], DropReport]:
    """Persona examples of users ``start .. stop - 1`` of ``context["user_items"]`` (tasks_parallel.BuildRows)."""
    report = DropReport()
    tokenizer, catalogue, ids = context["tokenizer"], context["catalogue"], context["ids"]
    header, prefix, eos, max_length = context["header"], context["prefix"], context["eos"], context["max_length"]
    rows = context["user_items"][start:stop]
    used = sorted({i for _, items in rows for i in items})
    suffixes = dict(zip(used, _encode(tokenizer, [persona_item_suffix(catalogue, i) for i in used])))
    summaries = [context["personas"].get(u) or derive_interest_summary(catalogue, items) for u, items in rows]
    summary_ids = _encode(tokenizer, [PERSONA_SUMMARY_PREFIX + s + "\n" if s else "" for s in summaries])

    examples = []
    for (user, items), summary in zip(rows, summary_ids):
        lines = [prefix + ids[i] + suffixes[i] for i in items]
        budget = max_length - len(header) - len(summary) - len(eos)
        kept: list[list[int]] = []
        for line in reversed(lines):  # newest first: the oldest items are the ones dropped
            if len(line) > budget:
                break
            kept.append(line)
            budget -= len(line)
        if not kept:
            report.add(f"persona text with one item longer than max_length={max_length} (user skipped)",
                       f"user {user}")
            continue
        if len(kept) < len(lines):
            report.add(f"persona text: oldest items dropped to fit max_length={max_length}", f"user {user}")
        body = [token for line in reversed(kept) for token in line]
        examples.append(_lm_example(header + body + summary + eos, PERSONA, f"user {user}"))
    return examples, report


# ---------------------------------------------------------------- 2. sequential preference modelling


def _fit_history_prompt(tokenizer, codes: np.ndarray, history: list[int], budget: int,
                        domain: str | None = None) -> tuple[list[int], int]:
    """The prompt with the longest suffix of ``history`` whose length is <= ``budget``, and that suffix's length
    (0 and [] when even one item does not fit). The prompt length grows with the number of items, so binary
    search finds the longest fitting suffix in O(log n) renders. ``domain``: named in the prompt (data with
    several domains; None: unchanged)."""

    def render(k: int) -> list[int]:
        return render_prompt(tokenizer, next_item_question(codes[history[-k:]].tolist(), domain))

    full = render(len(history))
    if len(full) <= budget:
        return full, len(history)
    lo, hi, best = 1, len(history) - 1, ([], 0)  # invariant: every k > hi is too long
    while lo <= hi:
        mid = (lo + hi) // 2
        prompt = render(mid)
        if len(prompt) <= budget:
            best, lo = (prompt, mid), mid + 1
        else:
            hi = mid - 1
    return best


def sequential_preference(data: InteractionData, train: Examples, item_codes: np.ndarray, tokenizer, *,
                          max_length: int, max_history: int | None = None, report: DropReport | None = None,
                          processes: int | None = None,
                          min_parallel_rows: int = MIN_PARALLEL_ROWS) -> list[AlignmentExample]:
    """One example per training example: its last ``max_history`` history items -> its target. Loss on the answer.

    Histories that do not fit ``max_length`` with the answer are truncated from the left (counted); the answer is
    never cut. Raises ValueError when ``max_length`` cannot hold one history item plus the answer.
    ``processes`` > 1: training examples in chunks in a process pool, same result (tasks_parallel).
    """
    report = report if report is not None else DropReport()
    codes = np.asarray(item_codes)
    ids = item_token_table(tokenizer, codes, len(data.catalogue))
    _check_item_indices(train, len(data.catalogue))
    context = {"tokenizer": tokenizer, "codes": codes, "ids": ids, "train": train, "eos": end_of_turn_ids(tokenizer),
               "max_length": max_length, "max_history": max_history,
               "domains": user_domain_names(data, train.users)}  # [E] names, None: single domain
    examples, chunk_report = build_in_chunks(_sequential_rows, context, len(train), processes=processes,
                                             min_parallel_rows=min_parallel_rows, desc=f"align data: {SEQUENTIAL}")
    report.merge(chunk_report)
    return examples


def _sequential_rows(context: dict, start: int, stop: int) -> tuple[list[AlignmentExample], DropReport]:
    """Window examples of training examples ``start .. stop - 1`` (tasks_parallel.BuildRows)."""
    report = DropReport()
    tokenizer, codes, ids, train, eos = (context[k] for k in ("tokenizer", "codes", "ids", "train", "eos"))
    max_length, max_history = context["max_length"], context["max_history"]
    examples = []
    for i in range(start, stop):
        user, history, target = train.users[i], train.histories[i], train.targets[i]
        source = f"train[{i}] user {user}"
        if not history:
            report.add("training example with an empty history (skipped)", source)
            continue
        history = list(history[-max_history:] if max_history else history)
        answer = ids[target] + eos
        domain = context["domains"][i] if context.get("domains") else None
        prompt, kept = _fit_history_prompt(tokenizer, codes, history, max_length - len(answer), domain)
        if kept == 0:
            raise ValueError(f"{SEQUENTIAL}: max_length={max_length} cannot hold a prompt with one history item "
                             f"plus the {len(answer)}-token answer ({source}); raise max_length")
        if kept < len(history):
            report.add(f"history truncated from the left to fit max_length={max_length}", source)
        examples.append(_prompt_answer_example(prompt, answer, SEQUENTIAL, source))
    return examples, report


# ---------------------------------------------------------------- 3. itemic dense captioning


def itemic_captioning(data: InteractionData, train: Examples, item_codes: np.ndarray, tokenizer, *,
                      max_length: int, max_description_tokens: int = 64, report: DropReport | None = None,
                      processes: int | None = None,
                      min_parallel_rows: int = MIN_PARALLEL_ROWS) -> list[AlignmentExample]:
    """One example per catalogue item with text: its ID -> title + newline + the first ``max_description_tokens``
    description tokens + eos. Loss on the answer.

    ``train`` is unused (captions describe items, not users; the signature matches the other builders). Items
    without title and description are skipped and counted; descriptions cut to fit are counted; an item whose
    prompt + title does not fit ``max_length`` is skipped and counted. ``processes`` > 1: items in chunks in a
    process pool, same result (tasks_parallel).
    """
    if max_description_tokens < 0:
        raise ValueError(f"max_description_tokens must be >= 0, got {max_description_tokens}")
    report = report if report is not None else DropReport()
    catalogue = data.catalogue
    codes = np.asarray(item_codes)
    item_token_table(tokenizer, codes, len(catalogue))  # checks the codes against the tokenizer's item tokens
    titles = [t.strip() for t in catalogue.titles]
    descriptions = [d.strip() for d in catalogue.descriptions]
    items = [i for i in range(len(catalogue)) if titles[i] or descriptions[i]]
    if len(items) < len(catalogue):
        first = next(i for i in range(len(catalogue)) if not (titles[i] or descriptions[i]))
        report.add("item without title or description (no caption)", f"item {catalogue.item_ids[first]}",
                   count=len(catalogue) - len(items))
    context = {"tokenizer": tokenizer, "codes": codes, "items": items, "item_ids": catalogue.item_ids,
               "titles": titles, "descriptions": descriptions, "eos": end_of_turn_ids(tokenizer),
               "max_length": max_length, "max_description_tokens": max_description_tokens}
    examples, chunk_report = build_in_chunks(_caption_rows, context, len(items), processes=processes,
                                             min_parallel_rows=min_parallel_rows, desc=f"align data: {CAPTIONING}")
    report.merge(chunk_report)
    return examples


def _caption_rows(context: dict, start: int, stop: int) -> tuple[list[AlignmentExample], DropReport]:
    """Caption examples of items ``start .. stop - 1`` of ``context["items"]`` (tasks_parallel.BuildRows)."""
    report = DropReport()
    tokenizer, codes, titles, descriptions = (context[k] for k in ("tokenizer", "codes", "titles", "descriptions"))
    eos, max_length, max_description_tokens = context["eos"], context["max_length"], context["max_description_tokens"]
    items = context["items"][start:stop]
    # The description follows the title on a new line; a description-only item starts with it.
    title_ids = _encode(tokenizer, [titles[i] for i in items])
    description_ids = _encode(tokenizer, [("\n" if titles[i] else "") + descriptions[i] if descriptions[i] else ""
                                          for i in items])
    examples = []
    for item, title, description in zip(items, title_ids, description_ids):
        source = f"item {context['item_ids'][item]}"
        prompt = render_prompt(tokenizer, caption_question(codes[item].tolist()))
        room = max_length - len(prompt) - len(title) - len(eos)  # tokens left for the description
        if room < 0 or (not title and room == 0):
            report.add(f"caption prompt + title longer than max_length={max_length} (item skipped)", source)
            continue
        if len(description) > max_description_tokens:
            description = description[:max_description_tokens]
            report.add(f"description cut to max_description_tokens={max_description_tokens}", source)
        if len(description) > room:
            description = description[:room]
            report.add(f"description cut to fit max_length={max_length}", source)
        if not title and not description:  # description-only item with max_description_tokens=0
            report.add("caption empty after cutting the description (item skipped)", source)
            continue
        examples.append(_prompt_answer_example(prompt, title + description + eos, CAPTIONING, source))
    return examples, report


# ---------------------------------------------------------------- 4. general language modelling


def general_text(tokenizer, *, max_length: int, path: str | None = None,
                 report: DropReport | None = None) -> list[AlignmentExample]:
    """Documents of ``path`` (txt / JSONL / parquet, see tasks_text.read_documents; None = the built-in corpus),
    each followed by eos and cut into chunks of ``max_length`` tokens. Loss on all tokens.

    Documents are not packed together (no attention across documents); a last chunk of one token is dropped and
    counted (a sequence needs two tokens to predict anything).
    """
    report = report if report is not None else DropReport()
    eos = end_of_turn_ids(tokenizer)
    examples = []
    for d, ids in enumerate(_encode(tokenizer, read_documents(path, report))):
        ids = ids + eos
        for c, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start:start + max_length]
            if len(chunk) < 2:
                report.add("general-text chunk of one token (dropped)", f"doc {d}")
                continue
            examples.append(_lm_example(chunk, GENERAL, f"doc {d} chunk {c}"))
    return examples


# ---------------------------------------------------------------- mixture


def resolve_ratios(ratios: Mapping[str, float] | None, tasks: Sequence[str] | None) -> dict[str, float]:
    """Normalised ratios of the selected tasks, in TASKS order.

    ``tasks`` None = the tasks ``ratios`` names (all four when ``ratios`` is None too); ``ratios`` None = the paper's
    DEFAULT_RATIOS restricted to ``tasks``. Ratios of valid tasks outside ``tasks`` are ignored (the caller reports
    them). Raises ValueError for unknown or repeated task names, a selected task without a ratio, a negative or
    non-finite ratio, and ratios summing to 0.
    """
    def check_names(names: Sequence[str], where: str) -> None:
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"{where}: unknown alignment task {unknown[0]!r}; valid tasks: {list(TASKS)}")

    if ratios is not None:
        check_names(list(ratios), "ratios")
    if tasks is None:
        tasks = list(ratios) if ratios is not None else list(TASKS)
    tasks = list(tasks)
    check_names(tasks, "tasks")
    if not tasks:
        raise ValueError(f"tasks is empty; choose among {list(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks lists a task twice: {tasks}")
    ratios = DEFAULT_RATIOS if ratios is None else ratios
    missing = [t for t in tasks if t not in ratios]
    if missing:
        raise ValueError(f"ratios has no entry for task {missing[0]!r} (ratios: {dict(ratios)})")
    values = {}
    for task in tasks:
        value = ratios[task]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"ratios[{task!r}] must be a finite number >= 0, got {value!r}")
        values[task] = float(value)
    total = sum(values.values())
    if total <= 0:
        raise ValueError(f"the ratios of tasks {tasks} sum to 0; give at least one task a ratio > 0")
    return {t: values[t] / total for t in TASKS if t in values}


def allocate_counts(total: int, probabilities: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment: counts sum to ``total`` and each is floor or ceil of p * total (ties of the
    remainders go to the task earlier in TASKS)."""
    exact = {t: p * total for t, p in probabilities.items()}
    counts = {t: math.floor(x) for t, x in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda t: (-(exact[t] - counts[t]), TASKS.index(t)))
    for task in by_remainder[:left]:
        counts[task] += 1
    return counts


def cycle_sample(pool_size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into a pool of ``pool_size``: every index floor(count / n) times, plus a draw without
    replacement for the remainder, so no example repeats more than once more than any other. [count]"""
    full, rest = divmod(count, pool_size)
    return np.concatenate([np.tile(np.arange(pool_size), full), rng.choice(pool_size, size=rest, replace=False)])


def _build_pool(task: str, data: InteractionData, train: Examples, item_codes: np.ndarray, tokenizer,
                max_length: int, options: dict, report: DropReport) -> list[AlignmentExample]:
    # Per-row tasks build their rows in chunks in a process pool when asked (tasks_parallel); same pool either way.
    parallel = {"processes": options["processes"], "min_parallel_rows": options["min_parallel_rows"]}
    if task == PERSONA:
        return persona_grounding(data, train, item_codes, tokenizer, max_length=max_length,
                                 max_items=options["max_persona_items"], report=report, **parallel)
    if task == SEQUENTIAL and options["sequential_format"] == "whole_sequence":  # training/tasks_sequence.py
        from onerec_dist.training.tasks_sequence import whole_sequence_preference

        return whole_sequence_preference(data, train, item_codes, tokenizer, max_length=max_length,
                                         max_history=options["max_history"], report=report, **parallel)
    if task == SEQUENTIAL:
        return sequential_preference(data, train, item_codes, tokenizer, max_length=max_length,
                                     max_history=options["max_history"], report=report, **parallel)
    if task == CAPTIONING:
        return itemic_captioning(data, train, item_codes, tokenizer, max_length=max_length,
                                 max_description_tokens=options["max_description_tokens"], report=report,
                                 **parallel)
    return general_text(tokenizer, max_length=max_length, path=options["general_text_path"], report=report)


def _task_stats(ratio: float, pool: list[AlignmentExample], chosen: np.ndarray, report: DropReport) -> dict:
    picked = [pool[i] for i in chosen.tolist()]
    return {"ratio": ratio, "pool": len(pool), "count": len(picked), "distinct": len(set(chosen.tolist())),
            "tokens": sum(len(e) for e in picked), "loss_tokens": sum(e.num_loss_tokens for e in picked),
            "max_example_tokens": max((len(e) for e in picked), default=0),
            "skipped_or_truncated": report.as_dict()}


def has_item_text(catalogue) -> bool:
    """Whether any item has a title or a description (what a caption is made of)."""
    return any(t.strip() for t in catalogue.titles) or any(d.strip() for d in catalogue.descriptions)


def drop_text_tasks(probabilities: dict[str, float], explicit: Collection[str]) -> tuple[dict[str, float], dict]:
    """For a catalogue without item text: ratios without the text tasks the user did not choose, renormalised, and
    {dropped task: reason}. An explicitly chosen text task stays (and fails later for want of examples)."""
    dropped = {t: "the catalogue has no item text (no title or description), so this task has no example; its "
                  "default ratio was dropped and the others renormalised"
               for t in TEXT_TASKS if probabilities.get(t, 0) > 0 and t not in explicit}
    kept = sum(p for t, p in probabilities.items() if t not in dropped)
    return {t: (0.0 if t in dropped else p / kept) for t, p in probabilities.items()}, dropped


def build_alignment_mixture(data: InteractionData, train_examples: Examples, item_codes: np.ndarray, tokenizer,
                            ratios: Mapping[str, float] | None = None, num_examples: int | None = None,
                            max_length: int = 1024, seed: int = 0, general_text_path: str | None = None,
                            tasks: Sequence[str] | None = None, *, max_history: int | None = None,
                            max_persona_items: int | None = None, max_description_tokens: int = 64,
                            explicit_ratios: Collection[str] | None = None,
                            sequential_format: str = "window", processes: int | None = None,
                            min_parallel_rows: int = MIN_PARALLEL_ROWS) -> tuple[list[AlignmentExample], dict]:
    """The stage-2 Itemic Alignment mixture (module docstring) and its stats.

    ``num_examples`` None = the smallest total at which every task's pool appears at least once
    (max over tasks of ceil(pool / ratio)). Tasks with ratio 0 are not built. Raises ValueError for a task with
    ratio > 0 and no example after filtering, and for bad ratios / task names (``resolve_ratios``).
    ``sequential_format``: window (one example per training target) | whole_sequence (one per user sequence, a loss
    on every item; onerec_dist/training/tasks_sequence.py).
    ``explicit_ratios``: the tasks whose ratio the user chose (None = every task ``ratios`` names; with ``ratios``
    None, none); on a catalogue without item text the other text tasks are dropped (``drop_text_tasks``).
    ``processes``: None / 1 = build every pool in this process; > 1 = the per-row tasks (persona, sequential,
    captioning) build inputs of at least ``min_parallel_rows`` rows in chunks in that many processes
    (onerec_dist/training/tasks_parallel.py). The result (examples, order, stats) does not depend on either.

    Stats: per task ratio, pool size, count, distinct examples, tokens, loss tokens, longest example and every
    skip / truncation with its reason; totals; ratios ignored because their task was not selected.
    """
    probabilities = resolve_ratios(ratios, tasks)
    dropped: dict = {}
    if not has_item_text(data.catalogue):
        explicit = set(ratios or {}) if explicit_ratios is None else set(explicit_ratios)
        probabilities, dropped = drop_text_tasks(probabilities, explicit)
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                     or num_examples < 1):
        raise ValueError(f"num_examples must be an int >= 1 or None, got {num_examples!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if sequential_format not in ("window", "whole_sequence"):
        raise ValueError(f"sequential_format={sequential_format!r}; allowed: 'window', 'whole_sequence'")
    for name, value in (("processes", 1 if processes is None else processes),
                        ("min_parallel_rows", min_parallel_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    options = {"processes": processes, "min_parallel_rows": min_parallel_rows,
               "max_history": max_history, "max_persona_items": max_persona_items,
               "sequential_format": sequential_format,
               "max_description_tokens": max_description_tokens, "general_text_path": general_text_path}
    active = {t: p for t, p in probabilities.items() if p > 0}
    pools, reports = {}, {}
    for task in active:
        reports[task] = DropReport()
        pools[task] = _build_pool(task, data, train_examples, item_codes, tokenizer, max_length, options,
                                  reports[task])
        if not pools[task]:
            raise ValueError(f"alignment task {task!r} has ratio {active[task]:.4f} but no example after filtering "
                             f"(skipped: {reports[task].as_dict() or 'nothing to build from'}); give it ratio 0 or "
                             "fix its input")
    total = num_examples if num_examples is not None else max(math.ceil(len(pools[t]) / p)
                                                              for t, p in active.items())
    counts = allocate_counts(total, active)

    mixture: list[AlignmentExample] = []
    stats: dict = {"tasks": {}, "seed": seed, "max_length": max_length,
                   "ignored_ratios": sorted(set(ratios or {}) - set(probabilities)), "dropped_tasks": dropped}
    for task, ratio in probabilities.items():
        if task not in active:
            stats["tasks"][task] = _task_stats(0.0, [], np.zeros(0, dtype=np.int64), DropReport())
            continue
        # One stream per task, keyed by its place in TASKS: selecting other tasks does not change its draw.
        rng = np.random.default_rng([seed, TASKS.index(task)])
        chosen = cycle_sample(len(pools[task]), counts[task], rng)
        stats["tasks"][task] = _task_stats(ratio, pools[task], chosen, reports[task])
        mixture.extend(pools[task][i] for i in chosen.tolist())
    order = np.random.default_rng([seed, len(TASKS)]).permutation(len(mixture))
    mixture = [mixture[i] for i in order.tolist()]
    stats["total_examples"] = len(mixture)
    stats["total_tokens"] = sum(s["tokens"] for s in stats["tasks"].values())
    stats["total_loss_tokens"] = sum(s["loss_tokens"] for s in stats["tasks"].values())
    return mixture, stats


def warmup_examples(data: InteractionData, train_examples: Examples, item_codes: np.ndarray, tokenizer,
                    num_examples: int | None = None, max_length: int = 1024, seed: int = 0, *,
                    max_persona_items: int | None = None, processes: int | None = None,
                    min_parallel_rows: int = MIN_PARALLEL_ROWS) -> tuple[list[AlignmentExample], dict]:
    """Stage-1 (token warm-up) data: interleaved persona grounding only (OneRec-Think Sec. 3.2: the warm-up trains
    only the new itemic-token embeddings on interleaved persona text). Same return as build_alignment_mixture."""
    return build_alignment_mixture(data, train_examples, item_codes, tokenizer, ratios={PERSONA: 1.0},
                                   num_examples=num_examples, max_length=max_length, seed=seed, tasks=[PERSONA],
                                   max_persona_items=max_persona_items, processes=processes,
                                   min_parallel_rows=min_parallel_rows)
