"""One dataset split into domains by an item attribute (OneReason's specialise-then-unify on real data, issue 14).

With ``data.domain_split.attribute`` set, ``load_dataset`` (data/splits.py) passes the dataset a reader built
(letter, minionerec, interactions; synthetic data with one domain too) through ``split_by_attribute``, before the
splits and semantic IDs. The rule, step by step:
  1. value: item i's ``attribute`` at ``level``. ``categories`` is a path ('Industrial & Scientific,Fasteners,
     Collated Fasteners,Staples'; level 0 'Industrial & Scientific', level 1 'Fasteners'); ``brand`` has one level
     (0). An item whose path is shorter than level + 1, or whose brand is empty, has no value.
  2. domains: the values ranked by their interactions (every occurrence of one of their items in a user's
     sequence), most first, ties by name; the first ``max_domains`` with at least one interaction are the domains,
     in that order.
  3. other items (another value, or none): ``other=merge`` puts them in one more domain named ``other_name``, last
     (only when there is such an item); ``other=drop`` removes them from the catalogue (external ids and semantic
     IDs of the kept items unchanged) with their interactions, counted.
  4. a user's ONE domain: the domain of most of their interactions; a tie goes to the tied domain of the user's
     latest interaction among them (the most recent interest; it keeps the test target when it can). A user with no
     interaction left (all with dropped items) is dropped, counted.
  5. interactions outside the user's domain are dropped, counted. A user left shorter than ``data.min_seq_len`` then
     follows ``data.on_short_user`` like any other (make_splits).
  6. splits given by the files (minionerec): each example keeps its history items of the user's domain; an example
     whose target is outside that domain, or whose history empties, is dropped; both counted.
Every count goes into the dataset's ``DropReport`` (``dropped_or_repaired`` of `onerec prepare`). Fewer than two
domains holding users is a ValueError; a domain may hold items and no user (its items stay its own). The result has ``domain_names``, ``item_domains`` [N] and ``user_domains``,
the fields prompts, domain-restricted decoding and per-domain metrics read (data/domains.py).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from onerec_dist.data.config import DomainSplitConfig
from onerec_dist.data.types import Catalogue, DropReport, Examples, InteractionData

ITEM_ATTRIBUTES = ("categories", "brand")  # the Catalogue columns an item can be grouped by


def item_paths(catalogue: Catalogue, attribute: str) -> list[list[str]]:
    """[N] each item's value path of ``attribute`` (categories: the category path; brand: [brand] or [])."""
    if attribute == "categories":
        return [list(path) for path in catalogue.categories]
    return [[brand] if brand else [] for brand in catalogue.brands]


def attributes_present(catalogue: Catalogue) -> list[str]:
    """The attributes at least one item of the catalogue has a value of."""
    return [a for a in ITEM_ATTRIBUTES if any(item_paths(catalogue, a))]


def item_values(data: InteractionData, cfg: DomainSplitConfig) -> list[str | None]:
    """[N] the value each item has at ``cfg.level`` of ``cfg.attribute`` (None: no value). ValueError for an
    attribute the items do not have, or a level no item's path reaches."""
    present = attributes_present(data.catalogue)
    if cfg.attribute not in present:
        known = ", ".join(present) if present else "none (the catalogue has ids only)"
        raise ValueError(f"data.domain_split.attribute={cfg.attribute!r} is not an attribute of the items of dataset "
                         f"{data.name!r}; attributes they have: {known}")
    paths = item_paths(data.catalogue, cfg.attribute)
    depth = max(len(p) for p in paths)
    if cfg.level >= depth:
        raise ValueError(f"data.domain_split.level={cfg.level}: no item of dataset {data.name!r} has a "
                         f"{cfg.attribute} value at that level; allowed values: 0 .. {depth - 1}")
    return [p[cfg.level] if len(p) > cfg.level else None for p in paths]


def rank_values(values: list[str | None], sequences: dict[str, list[int]], max_domains: int) -> list[str]:
    """The ``max_domains`` values with most interactions (ties: by name), most first."""
    counts = Counter(values[i] for seq in sequences.values() for i in seq)
    counts.pop(None, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [value for value, _ in ranked[:max_domains]]


def majority_domain(domains: list[int]) -> int:
    """The most frequent entry of a user's item domains (time order); a tie goes to the tied domain that comes
    last. [0, 1, 1, 0] -> 0 (2 each, the last interaction is in 0); [1, 0, 0] -> 0."""
    counts = Counter(domains)
    top = max(counts.values())
    return next(d for d in reversed(domains) if counts[d] == top)


def split_by_attribute(data: InteractionData, cfg: DomainSplitConfig) -> InteractionData:
    """``data`` split into domains by ``cfg.attribute`` (module docstring); counts go into ``data.report``."""
    if len(data.domain_names) > 1:
        raise ValueError(f"data.domain_split.attribute={cfg.attribute!r}: dataset {data.name!r} already has domains "
                         f"{data.domain_names}; set data.domain_split.attribute=null")
    values = item_values(data, cfg)
    kept = rank_values(values, data.sequences, cfg.max_domains)
    if cfg.other == "merge" and cfg.other_name in kept:
        raise ValueError(f"data.domain_split.other_name={cfg.other_name!r} is also a kept {cfg.attribute} value; "
                         "choose another name")
    index = {value: d for d, value in enumerate(kept)}
    item_domain = np.array([index.get(v, -1) for v in values], dtype=np.int64)  # [N], -1: other
    names = list(kept)
    report = data.report
    where = f"{cfg.attribute} level {cfg.level}"
    if cfg.other == "merge" and (item_domain < 0).any():
        names.append(cfg.other_name)
        item_domain[item_domain < 0] = len(kept)
    catalogue, new_index = data.catalogue, np.arange(len(data.catalogue), dtype=np.int64)  # [N] old -> new row
    if (item_domain < 0).any():  # other=drop
        catalogue, new_index = keep_items(data.catalogue, item_domain >= 0)
        report.add(f"item whose {where} value is none of the {len(kept)} domains (item dropped: "
                   "data.domain_split.other=drop)", f"item {data.catalogue.item_ids[int(np.argmax(item_domain < 0))]}",
                   count=int((item_domain < 0).sum()))
        item_domain = item_domain[item_domain >= 0]
    sequences, user_domains = assign_users(data.sequences, new_index, item_domain, report)
    _require_two_domains(data.name, names, sequences, user_domains, where)
    given = None
    if data.given_splits is not None:
        given = {split: None if ex is None else keep_examples(ex, new_index, item_domain, user_domains, report)
                 for split, ex in data.given_splits.items()}
    personas = {u: p for u, p in data.personas.items() if u in sequences}
    return InteractionData(data.name, catalogue, sequences, personas=personas, given_splits=given, report=report,
                           domain_names=names, item_domains=item_domain, user_domains=user_domains)


def keep_items(catalogue: Catalogue, keep: np.ndarray) -> tuple[Catalogue, np.ndarray]:
    """The catalogue of the items where ``keep`` [N] is True (order kept), and [N] old row -> new row (-1: gone)."""
    rows = np.flatnonzero(keep)
    new_index = np.full(len(catalogue), -1, dtype=np.int64)
    new_index[rows] = np.arange(len(rows))
    pick = rows.tolist()
    sids = None if catalogue.semantic_ids is None else catalogue.semantic_ids[rows]
    return Catalogue([catalogue.item_ids[i] for i in pick], [catalogue.titles[i] for i in pick],
                     [catalogue.descriptions[i] for i in pick], [catalogue.brands[i] for i in pick],
                     [list(catalogue.categories[i]) for i in pick], sids), new_index


def assign_users(sequences: dict[str, list[int]], new_index: np.ndarray, item_domain: np.ndarray,
                 report: DropReport) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Each user's domain (majority, ``majority_domain``) and the sequence of their items in it (new rows)."""
    out: dict[str, list[int]] = {}
    user_domains: dict[str, int] = {}
    new_index, item_domain = new_index.tolist(), item_domain.tolist()  # plain lists: ~50x faster to index
    for user, seq in sequences.items():
        rows = [new_index[i] for i in seq]
        kept = [r for r in rows if r >= 0]
        if len(kept) < len(rows):
            report.add("interaction with a dropped item (data.domain_split.other=drop)",
                       f"user {user}", count=len(rows) - len(kept))
        if not kept:
            if seq:
                report.add("user whose every interaction was with a dropped item (user dropped)", f"user {user}")
                continue
            # read with no interaction at all (e.g. on_unknown_item=drop): always shorter than min_seq_len (>= 3),
            # so on_short_user drops it or raises in make_splits; domain 0 only keeps the fields complete till then
            out[user], user_domains[user] = [], 0
            continue
        domain = majority_domain([item_domain[r] for r in kept])
        own = [r for r in kept if item_domain[r] == domain]
        if len(own) < len(kept):
            report.add("interaction outside the user's domain (interaction dropped: data.domain_split)",
                       f"user {user}", count=len(kept) - len(own))
        out[user], user_domains[user] = own, domain
    return out, user_domains


def keep_examples(examples: Examples, new_index: np.ndarray, item_domain: np.ndarray, user_domains: dict[str, int],
                  report: DropReport) -> Examples:
    """A file-given split restricted to each user's domain (module docstring, step 6)."""
    out = Examples()
    new_index, item_domain = new_index.tolist(), item_domain.tolist()
    for user, history, target in zip(examples.users, examples.histories, examples.targets):
        domain = user_domains.get(user)
        new_target = new_index[target]
        if domain is None or new_target < 0 or item_domain[new_target] != domain:
            report.add("given-split example whose target is outside the user's domain (example dropped: "
                       "data.domain_split)", f"user {user}")
            continue
        rows = [new_index[i] for i in history]
        own = [r for r in rows if r >= 0 and item_domain[r] == domain]
        if len(own) < len(rows):
            report.add("given-split history item outside the user's domain (dropped: data.domain_split)",
                       f"user {user}", count=len(rows) - len(own))
        if not own:
            report.add("given-split example with no history left in the user's domain (example dropped)",
                       f"user {user}")
            continue
        out.append(user, own, new_target)
    return out


def _require_two_domains(name: str, names: list[str], sequences: dict[str, list[int]], user_domains: dict[str, int],
                         where: str) -> None:
    populated = sorted({names[d] for user, d in user_domains.items() if sequences[user]})
    if len(populated) < 2:
        raise ValueError(f"data.domain_split: dataset {name!r} split by {where} gives {len(populated)} domain(s) "
                         f"with users ({', '.join(populated) or 'none'}; values kept: {names}); at least 2 are "
                         "needed: choose another level or attribute, raise max_domains or set other=merge")
