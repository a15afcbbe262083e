"""Synthetic data with several domains (step 11 of onerec_dist/data/synthetic.py): D separate shops, one catalogue.

OneReason's specialise-then-unify needs domains whose users behave differently. With ``data.synthetic.num_domains``
= D >= 2 (D = 1 never comes here: it is steps 1-10 exactly):
  * sizes: domain d gets n_d = N // D items (the first N % D domains one more) and u_d = U // D users alike; every
    domain must hold one item per subcategory (n_d >= num_top_categories * subcategories_per_top = T * P);
  * worlds: domain d is built by steps 1-10 (``build_world``, ``simulate_users``, ``write_personas``) with the
    top-level settings except: its own seed seed_d = SeedSequence([seed, d]).generate_state(1)[0]; taxonomy names
    from top category d * T of the name list on (T = 5: Audio .. Photo Printing for domain 0, Fitness .. Music for
    domain 1; past the ten names they repeat with a suffix, "Audio 2"), so its prompts and item texts differ from
    the other domains'; brand names distinct from the domains before it; and the dynamics below;
  * dynamics: ``domains[d].<field>`` where set, else a spread over x = d / (D - 1) in [0, 1]:
        complement_prob_d = complement_prob * (1 - x / 2)   (domain 0 as configured, the last one half of it)
        drift_prob_d      = min(1, drift_prob * (1 + x))    (the last domain's interests drift twice as often)
        rule_prob_d       = rule_prob * (1 - x / 2)         (mode=reasoning: the last follows the rule half as often)
    so, left to the defaults, the first domain is the most predictable and the last the least;
  * names: ``domains[d].name``, else "Shop A", "Shop B", ... (prompts name the domain: onerec_dist/prompts.py);
  * one catalogue: the worlds' items end to end (domain 0's are rows 0 .. n_0 - 1, then domain 1's, ...), so
    semantic IDs are built once over all items; users "u0" .. likewise (domain 0's first). ``InteractionData``
    records ``domain_names``, ``item_domains`` [N] and ``user_domains`` {user id: d}.
A user's items all come from its domain's world (a world knows only its own items).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from onerec_dist.data.config import SyntheticConfig, SyntheticDomainConfig
from onerec_dist.data.synthetic import SyntheticTrace, SyntheticWorld, build_world, simulate_users, write_personas
from onerec_dist.data.types import Catalogue, InteractionData


@dataclass
class SyntheticDomain:
    """One domain's world as built: its single-domain config, world, trace and where its rows start."""

    name: str
    cfg: SyntheticConfig  # num_domains=1, the domain's own seed and dynamics
    world: SyntheticWorld
    trace: SyntheticTrace
    first_item: int  # catalogue row of its item 0
    first_user: int  # number of its user u0 in the whole dataset


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes differing by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return [base + (1 if d < extra else 0) for d in range(parts)]


def default_domain_name(d: int) -> str:
    return f"Shop {chr(ord('A') + d)}" if d < 26 else f"Shop {d + 1}"


def domain_configs(cfg: SyntheticConfig) -> list[tuple[str, SyntheticConfig]]:
    """(name, single-domain config) of each domain (module docstring: sizes, seed, dynamics)."""
    count = cfg.num_domains
    items, users = split_sizes(cfg.num_items, count), split_sizes(cfg.num_users, count)
    need = cfg.num_top_categories * cfg.subcategories_per_top
    if items[-1] < need:
        raise ValueError(f"data.synthetic.num_items: {cfg.num_items} items over num_domains={count} give "
                         f"{items[-1]} per domain; each domain needs >= num_top_categories * subcategories_per_top "
                         f"= {need} (one item per subcategory), so num_items >= {need * count}")
    if users[-1] < 1:
        raise ValueError(f"data.synthetic.num_users: must be >= num_domains={count} (a user per domain), "
                         f"got {cfg.num_users}")
    out = []
    for d in range(count):
        x = d / (count - 1)
        spread = {"complement_prob": cfg.complement_prob * (1 - x / 2),
                  "drift_prob": min(1.0, cfg.drift_prob * (1 + x)),
                  "rule_prob": cfg.rule_prob * (1 - x / 2)}
        given = cfg.domains[d] if cfg.domains else SyntheticDomainConfig()
        dynamics = {k: v if getattr(given, k) is None else getattr(given, k) for k, v in spread.items()}
        seed = int(np.random.SeedSequence([cfg.seed, d]).generate_state(1)[0])
        single = dataclasses.replace(cfg, num_items=items[d], num_users=users[d], seed=seed, num_domains=1,
                                     domains=[], **dynamics)
        out.append((given.name or default_domain_name(d), single))
    return out


def build_domains(cfg: SyntheticConfig) -> list[SyntheticDomain]:
    """Every domain's world and users (module docstring), in domain order."""
    domains, taken = [], frozenset()
    first_item = first_user = 0
    for d, (name, single) in enumerate(domain_configs(cfg)):
        world = build_world(single, first_top=d * cfg.num_top_categories, taken_brands=taken)
        trace = simulate_users(world, single)
        domains.append(SyntheticDomain(name, single, world, trace, first_item, first_user))
        taken |= frozenset(world.brand_names)
        first_item += len(world.item_sub)
        first_user += len(trace.user_ids)
    return domains


def generate_domains(cfg: SyntheticConfig, name: str = "synthetic") -> InteractionData:
    """The dataset of D >= 2 domains: one catalogue, every user in one domain, the domains recorded."""
    domains = build_domains(cfg)
    parts = [d.world.catalogue for d in domains]
    total = sum(len(c) for c in parts)
    catalogue = Catalogue(item_ids=[str(i) for i in range(total)],
                          titles=[t for c in parts for t in c.titles],
                          descriptions=[t for c in parts for t in c.descriptions],
                          brands=[b for c in parts for b in c.brands],
                          categories=[list(x) for c in parts for x in c.categories])
    sequences: dict[str, list[int]] = {}
    personas: dict[str, str] = {}
    user_domains: dict[str, int] = {}
    for index, domain in enumerate(domains):
        trace = domain.trace
        local_personas = write_personas(domain.world, trace, domain.cfg)
        for i, (local, row, length) in enumerate(zip(trace.user_ids, trace.items, trace.lengths)):
            user = f"u{domain.first_user + i}"
            sequences[user] = (row[:length] + domain.first_item).tolist()
            personas[user] = local_personas[local]
            user_domains[user] = index
    item_domains = np.repeat(np.arange(len(domains), dtype=np.int64), [len(c) for c in parts])  # [N]
    return InteractionData(name=name, catalogue=catalogue, sequences=sequences, personas=personas,
                           domain_names=[d.name for d in domains], item_domains=item_domains,
                           user_domains=user_domains)
