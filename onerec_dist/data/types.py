"""Core data types: the item catalogue, user sequences, split examples and the drop/repair report.

Items are addressed everywhere by a dense *index* 0..N-1 (their position in the catalogue); the dataset's
own ids are kept as strings in ``Catalogue.item_ids`` so that nothing is lost on the way in or out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Catalogue:
    """Columnar item table. All lists have one entry per item, in dense-index order."""

    item_ids: list[str]
    titles: list[str]
    descriptions: list[str]
    brands: list[str]
    categories: list[list[str]]
    # [N, L] int64 semantic-ID codes, one column per level; None when the dataset has no IDs.
    semantic_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("titles", "descriptions", "brands", "categories"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Catalogue.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.semantic_ids is not None and self.semantic_ids.shape[0] != n:
            raise ValueError(f"Catalogue.semantic_ids has {self.semantic_ids.shape[0]} rows, expected {n}")
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids)}
        if len(self._index) != n:
            raise ValueError("Catalogue.item_ids must be unique")

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int | None:
        """Dense index of an external item id, or None when the item is not in the catalogue."""
        return self._index.get(item_id)

    def text(self, index: int) -> str:
        """All text we know about one item, in a fixed order, for embedding and captioning."""
        parts = [self.titles[index], self.brands[index], ", ".join(self.categories[index]), self.descriptions[index]]
        return ". ".join(p for p in parts if p)

    @classmethod
    def ids_only(cls, item_ids: list[str], semantic_ids: np.ndarray | None = None) -> "Catalogue":
        """A catalogue that knows only item ids (datasets without item text, e.g. Beauty)."""
        n = len(item_ids)
        return cls(item_ids, [""] * n, [""] * n, [""] * n, [[] for _ in range(n)], semantic_ids)


@dataclass
class Examples:
    """(history, target) pairs of one split. Histories are dense item indices, oldest first."""

    users: list[str] = field(default_factory=list)
    histories: list[list[int]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def append(self, user: str, history: list[int], target: int) -> None:
        self.users.append(user)
        self.histories.append(history)
        self.targets.append(target)

    def take(self, rows) -> "Examples":
        """The examples at positions ``rows``, in that order."""
        return Examples([self.users[i] for i in rows], [self.histories[i] for i in rows],
                        [self.targets[i] for i in rows])


@dataclass
class DropReport:
    """Counts of everything dropped or repaired while reading, each with its reason. Nothing is dropped silently."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str = "", count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        shown = self.examples.setdefault(reason, [])
        if example and len(shown) < 3:
            shown.append(example)

    def merge(self, other: "DropReport") -> None:
        """Add ``other`` as if its rows had been reported here after ours: counts added, examples kept up to the
        first three, as ``add`` keeps them (so chunks built apart merge into the serial report)."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[:max(0, 3 - len(shown))])

    def as_dict(self) -> dict:
        return {reason: {"count": c, "examples": self.examples.get(reason, [])} for reason, c in self.counts.items()}


@dataclass
class InteractionData:
    """A dataset as read: catalogue, time-ordered user sequences, optional personas and file-given splits."""

    name: str
    catalogue: Catalogue
    # user id -> dense item indices in time order
    sequences: dict[str, list[int]]
    # user id -> short persona text (synthetic data has one; others derive it later from the user's items)
    personas: dict[str, str] = field(default_factory=dict)
    # Splits given by the files themselves (MiniOneRec CSV); None for a split the release lacks.
    given_splits: dict[str, Examples | None] | None = None
    report: DropReport = field(default_factory=DropReport)
    # Domains (OneReason's specialise-then-unify; onerec_dist/data/domains.py): their names, each item's and each
    # user's domain index. Empty for single-domain data (every reader's, and synthetic data with num_domains=1).
    domain_names: list[str] = field(default_factory=list)
    item_domains: np.ndarray | None = None  # [N] int64 index into domain_names
    user_domains: dict[str, int] = field(default_factory=dict)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences.values())
