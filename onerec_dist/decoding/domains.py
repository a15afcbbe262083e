"""Decoding inside a domain's catalogue (OneReason's domains: a user of domain d is recommended items of d only).

``DomainPrefixes`` holds, for every domain d, the sorted unique m-level prefixes of its items' semantic IDs, with
ONE m for all domains: the smallest m at which no m-level prefix is shared by items of two domains (every prefix is
"pure"). Then, for the constrained decoder's ``allowed_prefixes`` (constraints.py):

    item i lies below an allowed prefix of domain d  <=>  i is an item of domain d

(=>: all items below a pure prefix of d are d's; <=: every item of d has its own m-prefix in d's set). Full IDs are
unique per item (PrefixIndex refuses duplicates), so m = L always qualifies and the restriction is exact whatever
the IDs; a smaller m only makes the sets smaller (m = 1 when the domains' first codes happen to be disjoint).

``DomainRestriction`` pairs those sets with the domain of each user position of an evaluation or RL prompt set;
``allowed(rows)`` is the ``AllowedPrefixes`` of a batch (a row of domain -1, unknown, is left unrestricted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onerec_dist.data.domains import has_domains, user_domain_indices
from onerec_dist.decoding.constraints import AllowedPrefixes


def pure_prefix_levels(codes: torch.Tensor, domains: torch.Tensor) -> int:
    """Smallest m such that each m-level prefix of ``codes`` [N, L] belongs to items of one domain ``domains`` [N];
    ValueError when even full IDs are shared across domains."""
    for m in range(1, codes.shape[1] + 1):
        pairs = torch.unique(torch.cat([codes[:, :m], domains[:, None]], 1), dim=0)  # unique (prefix, domain)
        if torch.unique(pairs[:, :m], dim=0).shape[0] == pairs.shape[0]:  # no prefix with two domains
            return m
    raise ValueError("items of different domains share a full semantic ID: decoding cannot keep the domains apart")


@dataclass(frozen=True)
class DomainPrefixes:
    """Per domain, the pure m-level prefixes of its items (module docstring)."""

    num_levels: int  # m
    prefixes: tuple[torch.Tensor, ...]  # [D] each [P_d, m] int64, sorted unique

    @classmethod
    def build(cls, item_codes, item_domains, num_domains: int | None = None) -> DomainPrefixes:
        codes = torch.as_tensor(np.asarray(item_codes), dtype=torch.long)  # [N, L]
        domains = torch.as_tensor(np.asarray(item_domains), dtype=torch.long)  # [N]
        if codes.dim() != 2 or domains.shape != (codes.shape[0],):
            raise ValueError(f"item_codes must be [N, L] and item_domains [N], got {tuple(codes.shape)} and "
                             f"{tuple(domains.shape)}")
        count = num_domains if num_domains is not None else int(domains.max()) + 1
        m = pure_prefix_levels(codes, domains)
        return cls(m, tuple(torch.unique(codes[domains == d, :m], dim=0).reshape(-1, m) for d in range(count)))

    def allowed(self, domains: Sequence[int]) -> AllowedPrefixes:
        """[B] rows: row b may decode only items of domain ``domains[b]`` (-1: the whole catalogue)."""
        domains = [int(d) for d in domains]
        sets = [self.prefixes[d] for d in domains if d >= 0]
        counts = torch.tensor([0] + [self.prefixes[d].shape[0] if d >= 0 else 0 for d in domains])  # [B + 1]
        codes = torch.cat(sets) if sets else torch.empty(0, self.num_levels, dtype=torch.long)  # [P, m]
        return AllowedPrefixes(counts.cumsum(0), codes, torch.tensor([d < 0 for d in domains], dtype=torch.bool))


@dataclass(frozen=True)
class DomainRestriction:
    """The domain of each user position of a prompt set, and the domains' prefix sets."""

    prefixes: DomainPrefixes
    user_domains: np.ndarray  # [U] domain index of each user position

    def allowed(self, rows: Sequence[int]) -> AllowedPrefixes:
        """AllowedPrefixes of the user positions ``rows`` (in that order)."""
        return self.prefixes.allowed(self.user_domains[np.asarray(list(rows), dtype=np.int64)].tolist())

    def take(self, rows: Sequence[int]) -> DomainRestriction:
        return DomainRestriction(self.prefixes, self.user_domains[np.asarray(list(rows), dtype=np.int64)])

    def repeat(self, times: int) -> DomainRestriction:
        """Each user position ``times`` times in a row (the G rationales of a GRPO group)."""
        return DomainRestriction(self.prefixes, np.repeat(self.user_domains, times))


def domain_restriction(data, users: Sequence[str], item_codes) -> DomainRestriction | None:
    """The restriction of ``users`` (user ids) to their domains' catalogues; None when the data has no domains."""
    if not has_domains(data):
        return None
    prefixes = DomainPrefixes.build(item_codes, data.item_domains, len(data.domain_names))
    return DomainRestriction(prefixes, user_domain_indices(data, users))
