"""Leak lint of teacher rationales (OneRec-Think, arXiv:2510.11639, Sec. 4.2: a rationale explains why a user would
want an item *like* y without naming y; a rationale that names it teaches the model to copy, not to reason).

A rationale is dropped, with the first reason that applies, when it
  * ``leak_item_tokens``: contains the target's full code sequence (``<item_a_3><item_b_7>...``, with or without
    the boundary tokens). Shorter prefixes (e.g. ``<item_a_3>``) are allowed: they are what ID-only data has
    instead of a category, and the metadata teacher states them only when the history supports them;
  * ``leak_id_text``: contains the target's dataset ID (``Catalogue.item_ids``) as a whole word. IDs shorter than
    ``min_id_chars`` characters ("42") would match counts and dates, so they count only after "item", "id",
    "#" or "no." ("item 42", "#42");
  * ``leak_title``: shares too much of the target's title: with the title's lower-cased word n-grams (n =
    ``title_ngram``, words = runs of letters and digits), the share of them present in the rationale is >=
    ``title_overlap``. Defaults n = 3, 0.5: "a Lumora film camera" passes for the title "Lumora Compact Film Camera
    AB-123" (no shared trigram of its 4), "the Lumora Compact Film Camera" does not (2 of 4 = 0.5). A title of
    fewer than n words leaks when all of its words appear in order as a phrase;
  * ``empty``: nothing but whitespace;
  * ``too_long``: more than ``max_tokens`` tokens (counted with the given tokenizer, else whitespace words);
  * ``repetitive``: a degenerate generation, one string looped (a weak ``llm`` teacher: the from-scratch model of
    experiment=scientific_ablation wrote "periorperior..." for every window). Measured as zlib's compressed size over
    the UTF-8 size, below ``min_compression``: written text stays above ~0.4 (the metadata teacher's Scientific
    rationales 0.49-0.68, a one-sentence template ~1.0), a loop falls to ~0.02-0.2.
The first three are counted as leaks (``dropped_leak``), the last three as ``dropped_other``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from onerec_dist.config import require
from onerec_dist.sid.tokens import BEGIN_TOKEN, END_TOKEN, code_token

LEAK_REASONS = ("leak_item_tokens", "leak_id_text", "leak_title")
OTHER_REASONS = ("empty", "too_long", "repetitive")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class LintConfig:
    """``reasoning.lint`` (conf/reasoning/default.yaml documents every field)."""

    title_ngram: int = 3
    title_overlap: float = 0.5
    min_id_chars: int = 4
    max_tokens: int = 256
    min_compression: float = 0.25

    def __post_init__(self) -> None:
        require(self.title_ngram >= 1, "reasoning.lint.title_ngram", f"must be >= 1, got {self.title_ngram}")
        require(0 < self.title_overlap <= 1, "reasoning.lint.title_overlap",
                f"must be in (0, 1], got {self.title_overlap}")
        require(self.min_id_chars >= 1, "reasoning.lint.min_id_chars", f"must be >= 1, got {self.min_id_chars}")
        require(self.max_tokens >= 1, "reasoning.lint.max_tokens", f"must be >= 1, got {self.max_tokens}")
        require(0 <= self.min_compression < 1, "reasoning.lint.min_compression",
                f"must be in [0, 1) (0 keeps every rationale), got {self.min_compression}")


@dataclass
class LintCounts:
    """How many rationales were checked, kept and dropped, per reason."""

    checked: int = 0
    kept: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str | None) -> None:
        self.checked += 1
        if reason is None:
            self.kept += 1
        else:
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    @property
    def dropped_leak(self) -> int:
        return sum(self.by_reason.get(r, 0) for r in LEAK_REASONS)

    @property
    def dropped_other(self) -> int:
        return sum(self.by_reason.get(r, 0) for r in OTHER_REASONS)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def title_overlap(rationale: str, title: str, n: int) -> float:
    """Share of the title's word n-grams found in the rationale (titles shorter than n: 1.0 when the whole title
    appears as a phrase, else 0.0; an empty title: 0.0)."""
    title_words, text_words = words(title), words(rationale)
    if not title_words:
        return 0.0
    size = min(n, len(title_words))
    wanted = ngrams(title_words, size)
    return len(wanted & ngrams(text_words, size)) / len(wanted)


def _id_pattern(item_id: str, min_chars: int) -> re.Pattern:
    escaped = re.escape(item_id.lower())
    if len(item_id) >= min_chars:
        return re.compile(rf"(?<![a-z0-9]){escaped}(?![a-z0-9])")
    return re.compile(rf"(?:\bitem|\bid|#|\bno\.)\s*#?\s*{escaped}(?![a-z0-9])")


def lint_rationale(rationale: str, *, target_codes: Sequence[int] | None, target_id: str | None,
                   target_title: str | None, cfg: LintConfig,
                   count_tokens: Callable[[str], int] | None = None) -> str | None:
    """The reason to drop ``rationale`` (see the module docstring), or None to keep it."""
    if not rationale.strip():
        return "empty"
    if target_codes is not None and len(target_codes):
        codes = "".join(code_token(level, int(c)) for level, c in enumerate(target_codes))
        if codes in rationale.replace(BEGIN_TOKEN, "").replace(END_TOKEN, "").replace(" ", ""):
            return "leak_item_tokens"
    lowered = rationale.lower()
    if target_id and _id_pattern(target_id, cfg.min_id_chars).search(lowered):
        return "leak_id_text"
    if target_title and title_overlap(rationale, target_title, cfg.title_ngram) >= cfg.title_overlap:
        return "leak_title"
    length = count_tokens(rationale) if count_tokens is not None else len(rationale.split())
    if length > cfg.max_tokens:
        return "too_long"
    if compression_ratio(rationale) < cfg.min_compression:
        return "repetitive"
    return None


def compression_ratio(text: str) -> float:
    """zlib-compressed size / UTF-8 size: ~0.02 for one word looped, 0.4-0.7 for written sentences, > 1 when short."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw)
