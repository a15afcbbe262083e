"""The ``metadata`` teacher: deterministic rationales from item metadata and training-split statistics, written in
OneReason's three levels of cognition:

  1. Persona abstraction: who the user is, from the pruned history (the k items closest to the target): their
     most frequent groups and top categories, and a brand only when one recurs (>= ``min_brand_count`` items).
  2. Interest expansion: a few candidate directions: where shoppers go next after the user's recent situation
     (the majority group of their last ``transition_window`` items, ties to the most recent; transition counts
     fitted on the training split only), and the user's own dominant groups.
  3. Transition inference: which direction comes next and why now: the target's group, justified by what supports
     it (a common transition from the recent situation, the user's own history, or neither, which is said plainly);
     a brand only when the user bought it before, in the target's top category or as their recurring brand.

It never states what the history cannot support: every count it writes is a count of the user's items or of
training-split transitions, and a target group that nothing points to is called a new direction. It names the
target's group (a category, or an ID prefix), never its title or full ID (the leak lint checks that).

A *group* is an item's most specific category (``Catalogue.categories[i][-1]``) and its *top* the first one. For
ID-only data (Beauty: no categories), the group is the item's ID prefix of ``prefix_levels`` levels
(``<item_a_12>``) and there is no top: the teacher speaks of shared ID prefixes instead of categories.

Seeded: the seed and the request pick among equivalent phrasings (deterministic for a given seed).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onerec_dist.data.types import Catalogue, Examples, InteractionData
from onerec_dist.reasoning.teachers import MetadataTeacherConfig, TeacherRequest
from onerec_dist.sid.tokens import code_token


@dataclass
class ItemFacets:
    """Per item: group (category or ID prefix), top category ("" when unknown) and brand ("" when unknown)."""

    group: list[str]  # [N]
    top: list[str]  # [N]
    brand: list[str]  # [N]
    by_prefix: bool  # groups are ID prefixes (ID-only data)

    @classmethod
    def from_catalogue(cls, catalogue: Catalogue, item_codes: np.ndarray | None = None,
                       prefix_levels: int = 1) -> "ItemFacets":
        if any(catalogue.categories[i] for i in range(len(catalogue))):
            group = [cats[-1] if cats else "" for cats in catalogue.categories]
            top = [cats[0] if len(cats) > 1 else "" for cats in catalogue.categories]
            return cls(group, top, list(catalogue.brands), False)
        codes = item_codes if item_codes is not None else catalogue.semantic_ids
        if codes is None:
            raise ValueError("the metadata teacher needs item categories or semantic IDs (ID-only data speaks of "
                             "shared ID prefixes); this catalogue has neither")
        codes = np.asarray(codes)[:, :prefix_levels]
        group = ["".join(code_token(level, int(c)) for level, c in enumerate(row)) for row in codes.tolist()]
        return cls(group, [""] * len(group), list(catalogue.brands), True)


def majority(values: Sequence[str]) -> str:
    """The most frequent value; ties go to the one seen last (most recent)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in reversed(values) if counts[v] == best)


@dataclass
class TransitionStats:
    """counts[situation][next group]: how often, in the training split, a window whose last W items have majority
    group ``situation`` was followed by an item of ``next group``."""

    counts: dict[str, Counter]
    window: int

    @classmethod
    def fit(cls, train: Examples, facets: ItemFacets, window: int) -> "TransitionStats":
        """One count per training window (history -> target): the training split's steps, each once."""
        counts: dict[str, Counter] = {}
        for history, target in zip(train.histories, train.targets):
            if not history:
                continue
            situation = majority([facets.group[i] for i in history[-window:]])
            counts.setdefault(situation, Counter())[facets.group[target]] += 1
        return cls(counts, window)

    def next_groups(self, situation: str, limit: int) -> list[tuple[str, float]]:
        """Most common next groups after ``situation`` with their share, most common first (ties: name order)."""
        counter = self.counts.get(situation)
        if not counter:
            return []
        total = sum(counter.values())
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return [(group, count / total) for group, count in ranked]


_PERSONA_OPENERS = ("Persona: of the {n} past purchases closest to this need, ",
                    "Persona: among the {n} most relevant past purchases, ")
_TRANSITION_OPENERS = ("Transition: {group} is the likely next step", "Transition: next comes {group}")


class MetadataTeacher:
    name = "metadata"

    def __init__(self, cfg: MetadataTeacherConfig, facets: ItemFacets, stats: TransitionStats):
        self.cfg, self.facets, self.stats = cfg, facets, stats

    @classmethod
    def fit(cls, cfg: MetadataTeacherConfig, data: InteractionData, train: Examples,
            item_codes: np.ndarray | None = None) -> "MetadataTeacher":
        """Facets from the catalogue, transition statistics from ``train`` (the training split) only."""
        facets = ItemFacets.from_catalogue(data.catalogue, item_codes, cfg.prefix_levels)
        return cls(cfg, facets, TransitionStats.fit(train, facets, cfg.transition_window))

    def rationales(self, requests: list[TeacherRequest]) -> list[str]:
        return [self.rationale(r) for r in requests]

    def _rng(self, request: TeacherRequest) -> np.random.Generator:
        key = zlib.crc32(f"{request.user}|{len(request.history)}|{request.target}".encode())
        return np.random.default_rng([self.cfg.seed, key])

    def _label(self, group: str) -> str:
        return f"the ID prefix {group}" if self.facets.by_prefix else group

    def rationale(self, request: TeacherRequest) -> str:
        rng = self._rng(request)
        pruned = list(request.pruned) or list(request.history)
        recent = list(request.history)[-self.cfg.transition_window:]
        situation = majority([self.facets.group[i] for i in recent]) if recent else ""
        persona, dominant, brand = self._persona(pruned, rng)
        candidates, expansion = self._expansion(recent, situation, dominant)
        transition = self._transition(request, pruned, situation, dominant, candidates, brand, rng)
        return "\n".join([persona, expansion, transition])

    # ---------------------------------------------------------------- level 1: persona abstraction

    def _persona(self, pruned: list[int], rng) -> tuple[str, list[str], tuple[str, int] | None]:
        """Persona sentence, the dominant groups (most frequent first), and the recurring brand with its count."""
        f = self.facets
        groups = Counter(f.group[i] for i in pruned)
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
        dominant = [g for g, _ in ranked[:2]]
        n = len(pruned)
        if f.by_prefix:
            parts = [f"{c} {'share' if c > 1 else 'has'} the ID prefix {g}" for g, c in ranked[:2]]
        else:
            parts = [f"{c} {'are' if c > 1 else 'is'} {g}" for g, c in ranked[:2]]
        text = _PERSONA_OPENERS[rng.integers(len(_PERSONA_OPENERS))].format(n=n) + " and ".join(parts)
        tops = Counter(f.top[i] for i in pruned if f.top[i])
        if tops:
            top, count = sorted(tops.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            text += f", {count} of {n} in {top}"
        brands = Counter(f.brand[i] for i in pruned if f.brand[i])
        brand = None
        if brands:
            name, count = sorted(brands.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            if count >= self.cfg.min_brand_count:
                brand = (name, count)
                text += f"; they keep coming back to {name} ({count} of {n})"
        return text + ".", dominant, brand

    # ---------------------------------------------------------------- level 2: interest expansion

    def _expansion(self, recent: list[int], situation: str, dominant: list[str]) -> tuple[list[str], str]:
        """Candidate directions (transitions from the recent situation, then the user's dominant groups)."""
        k = self.cfg.num_candidates
        moves = self.stats.next_groups(situation, k) if recent else []
        candidates: list[str] = []
        for group in [g for g, _ in moves] + dominant:
            if group not in candidates and len(candidates) < k:
                candidates.append(group)
        in_window = sum(self.facets.group[i] == situation for i in recent)
        if in_window > 1:
            text = (f"Interest expansion: their last {len(recent)} purchases were mostly {self._label(situation)} "
                    f"({in_window} of {len(recent)})")
        else:
            text = f"Interest expansion: their latest purchase was {self._label(situation)}"
        if moves:
            listed = ", ".join(f"{self._label(g)} ({share:.0%}{' of the time' if j == 0 else ''})"
                               for j, (g, share) in enumerate(moves))
            text += f"; after that, shoppers move on to {listed}"
        else:
            text += "; the training data shows no typical next step after such a run"
        own = [g for g in dominant if g not in [m for m, _ in moves]]
        if own:
            text += f"; their own history also points to {' and '.join(self._label(g) for g in own)}"
        return candidates, text + "."

    # ---------------------------------------------------------------- level 3: transition inference

    def _transition(self, request: TeacherRequest, pruned: list[int], situation: str, dominant: list[str],
                    candidates: list[str], brand: tuple[str, int] | None, rng) -> str:
        f = self.facets
        target_group = f.group[request.target]
        label = self._label(target_group)
        shares = dict(self.stats.next_groups(situation, len(self.stats.counts.get(situation, ()))))
        own = sum(f.group[i] == target_group for i in pruned)
        text = _TRANSITION_OPENERS[rng.integers(len(_TRANSITION_OPENERS))].format(group=label)
        if target_group in candidates and shares.get(target_group, 0) > 0:
            text += (f", because it is where shoppers go after {self._label(situation)} "
                     f"({shares[target_group]:.0%} of such steps)")
            if own:
                text += f", and they bought it {own} time{'s' if own > 1 else ''} before"
        elif own:
            text += f", a return to a group they bought {own} time{'s' if own > 1 else ''} before"
        else:
            text += (", a new direction: neither their history nor the usual next steps point to it strongly, so "
                     "it is an exploratory pick")
        return text + self._brand_clause(request, pruned, brand) + "."

    def _brand_clause(self, request: TeacherRequest, pruned: list[int], brand: tuple[str, int] | None) -> str:
        f = self.facets
        target_brand = f.brand[request.target]
        if not target_brand:
            return ""
        top = f.top[request.target]
        if top:
            in_top = [i for i in pruned if f.top[i] == top]
            same = sum(f.brand[i] == target_brand for i in in_top)
            if same:
                return f"; in {top} they chose {target_brand} before ({same} of {len(in_top)}), so {target_brand} again"
        if brand is not None and brand[0] == target_brand:
            return f"; {target_brand}, their recurring brand, is the natural choice"
        return ""
