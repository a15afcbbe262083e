"""Domains of a dataset (OneReason's specialise-then-unify): which domain each user and item belongs to.

A dataset *has domains* when ``InteractionData.domain_names`` lists two or more (the synthetic generator with
``data.synthetic.num_domains`` >= 2; onerec_dist/data/synthetic_domains.py). Single-domain data has none, and then
every helper here says so (None / no restriction), so prompts, decoding and metrics stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onerec_dist.data.types import Examples, InteractionData


def has_domains(data: InteractionData) -> bool:
    return len(data.domain_names) > 1


def check_domains(data: InteractionData) -> None:
    """ValueError unless the domain fields agree: an index per item, a known index per user with items."""
    if not has_domains(data):
        return
    count = len(data.domain_names)
    items = data.item_domains
    if items is None or np.shape(items) != (len(data.catalogue),):
        raise ValueError(f"dataset {data.name!r}: item_domains must hold one domain per item "
                         f"({len(data.catalogue)}), got {None if items is None else np.shape(items)}")
    if len(items) and not (0 <= int(np.min(items)) and int(np.max(items)) < count):
        raise ValueError(f"dataset {data.name!r}: item_domains must be in [0, {count})")
    missing = [u for u in data.sequences if not 0 <= data.user_domains.get(u, -1) < count]
    if missing:
        raise ValueError(f"dataset {data.name!r}: {len(missing)} users have no domain, e.g. {missing[0]!r}")


def domain_index(data: InteractionData, name: str, field: str = "rl.domain") -> int:
    """Index of domain ``name``; ValueError naming ``field`` and the allowed names."""
    if name not in data.domain_names:
        allowed = ", ".join(data.domain_names) if data.domain_names else "none: the data has a single domain"
        raise ValueError(f"{field}={name!r} is not a domain of dataset {data.name!r}; allowed values: {allowed} "
                         "(or null for all domains)")
    return data.domain_names.index(name)


def user_domain_indices(data: InteractionData, users: Sequence[str]) -> np.ndarray | None:
    """[U] domain index of each user, or None when the data has no domains."""
    if not has_domains(data):
        return None
    return np.array([data.user_domains[u] for u in users], dtype=np.int64)


def user_domain_names(data: InteractionData, users: Sequence[str]) -> list[str] | None:
    """[U] domain name of each user (what the prompt names), or None when the data has no domains."""
    indices = user_domain_indices(data, users)
    return None if indices is None else [data.domain_names[d] for d in indices.tolist()]


def domain_name_by_user(data: InteractionData) -> dict[str, str] | None:
    """{user id: domain name}, or None when the data has no domains."""
    if not has_domains(data):
        return None
    return {user: data.domain_names[d] for user, d in data.user_domains.items()}


def domain_rows(examples: Examples, data: InteractionData, domain: int) -> list[int]:
    """Positions in ``examples`` of the users who live in ``domain`` (in order)."""
    return [i for i, u in enumerate(examples.users) if data.user_domains.get(u) == domain]


def examples_of_domain(examples: Examples, data: InteractionData, domain: int) -> Examples:
    """The examples whose user lives in ``domain`` (order kept)."""
    return examples.take(domain_rows(examples, data, domain))
