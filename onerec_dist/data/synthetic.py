"""Synthetic shopping dataset: a small world of categories, brands and items, and users who walk through it.

The data must be learnable (a next-item signal a model can pick up) and explainable (each step has a reason a
reasoning model can state). Everything is drawn from ``numpy.random.Generator`` streams spawned from
``cfg.seed``, so the same config always gives the same dataset. The generative process:

World (``build_world``)
  1. Taxonomy. T = ``num_top_categories`` top categories (Audio, Cameras, Kitchen, ...; past the name list the
     names repeat with a suffix, "Audio 2"), each with P = ``subcategories_per_top`` subcategories, S = T*P in all.
     Subcategory s is *related* to its P-1 siblings and to one cross-top partner: a hand-picked one where it
     exists in this world (e.g. Cameras/Lenses <-> Photo Printing/Photo Printers), else a random subcategory of
     another top. The relation is made symmetric, so a subcategory may have several cross-top partners.
  2. Brands. ``brands_per_top`` invented brand names per top category (all distinct).
  3. Items. Every subcategory gets one item, the other N-S are spread uniformly (multinomial). An item has a
     brand of its top category (uniform), an adjective, two attribute words of its top category, the title
     "<Brand> <Adjective> <Noun> <model code>" (unique) and a two-sentence description naming both.
  4. Popularity. Within a subcategory of n items, a random ranking r = 1..n gives weight 1/r^ZIPF_EXPONENT,
     normalised so each subcategory's weights sum to 1.
  5. Complements. Each item gets up to NUM_COMPLEMENTS distinct other items, drawn without replacement by
     popularity, half the mass from its own subcategory and half spread evenly over the related subcategories
     (all of it on one side when the other is empty). Complements are what one buys next ("an espresso
     machine, then a grinder").

Users (``simulate_users``)
  6. A user u has K = ``interests_per_user`` distinct latent interests (subcategories, uniform), a preferred brand
     (uniform among the brands of the top category of interest 0) and a length n_u ~ U{min_seq_len..max_seq_len}.
  7. Item 0 comes from an interest chosen uniformly, drawn from that subcategory with weight
     popularity * (BRAND_AFFINITY if the item has the preferred brand else 1).
  8. For t = 1 .. n_u-1, with a = item t-1:
       a. drift: with probability ``drift_prob`` one interest slot (uniform) is replaced by a related
          subcategory (uniform) that is not already an interest; nothing changes when there is none;
       b. with probability ``complement_prob`` item t is a complement of a (uniform among a's complements);
       c. otherwise item t is drawn as in 7 from an interest chosen uniformly, conditioned on != a (exactly:
          the draw skips a's share of the distribution). If that subcategory holds a alone, b. is used.
     So no item follows itself, and P(item t is a complement of a) = p + (1-p) * q(a, interests, brand), where
     q is the chance the interest draw lands on a complement; tests check both terms.
  9. Persona: one short sentence naming the user's initial interests and preferred brand, e.g.
     "Enjoys espresso machines and film cameras; often buys from Lumora."

Reasoning mode (``mode=reasoning``; the default mode is steps 1-9 exactly, same seed -> same data as before)
  10. A task where a rationale can spell out intermediate steps (OneRec-Think Sec. 4.2 needs one). Every
      subcategory s has one *partner*: the cross-top partner picked for it in step 1 (e.g. Lenses -> Photo
      Printers; the hand-picked one where it exists). Every user has a preferred brand in every top category: the
      one of step 6 in the top of interest 0, a uniform brand of the top elsewhere; every draw of step 7 / 8c uses
      the preferred brand of the drawn subcategory's top. At each step t >= W = ``rule_window``, after step 8
      has drawn its candidate, with probability ``rule_prob`` the rule replaces it:
        a. m = the majority subcategory of items t-W .. t-1 (ties: the most recent of the tied subcategories);
        b. item t is drawn as in 7 from partner(m), with the user's preferred brand of partner(m)'s top
           (weight popularity * BRAND_AFFINITY), skipping item t-1 (if partner(m) holds item t-1 alone, the
           rule does not fire).
      A rationale then reads: "the last items were mostly Lenses -> people who buy lenses move to photo
      printers -> they chose Lumora in Photo Printing before -> a Lumora photo printer". The rule's coin and
      the extra brands come from a fourth random stream, so steps 1-9 draw exactly the same numbers in both
      modes. ``SyntheticTrace.via_rule`` records which steps followed the rule.

Domains (``num_domains`` = D >= 2; D = 1 is steps 1-10 exactly, the same dataset as before domains existed)
  11. D separate worlds, each built by steps 1-10 with its own seed, taxonomy names, brands and dynamics, laid end to
      end in one catalogue; each user lives in one domain. ``onerec_dist/data/synthetic_domains.py`` documents the
      split of items and users, the per-domain seeds and names, and the spread of the dynamics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec_dist.data.config import SyntheticConfig
from onerec_dist.data.types import Catalogue, InteractionData

ZIPF_EXPONENT = 1.0  # popularity weight of the r-th most popular item of a subcategory: 1 / r^ZIPF_EXPONENT
NUM_COMPLEMENTS = 3  # complements per item (fewer only when the item has fewer candidates)
BRAND_AFFINITY = 3.0  # weight multiplier of the preferred brand's items in interest draws
SAME_SUB_COMPLEMENT_MASS = 0.5  # share of complement-drawing mass on the item's own subcategory

# top category -> [(subcategory, title noun, cross-top partner)]. The first four subcategories of the first five
# tops (the default world) have partners among themselves; a partner absent from the world is replaced at random.
TAXONOMY: dict[str, list[tuple[str, str, str]]] = {
    "Audio": [("Headphones", "Headphones", "Backpacks"), ("Speakers", "Speaker", "Tents"),
              ("Turntables", "Turntable", "Picture Frames"), ("Microphones", "Microphone", "Tripods"),
              ("Soundbars", "Soundbar", "Gaming Monitors"), ("Earbuds", "Earbuds", "Fitness Trackers")],
    "Cameras": [("Film Cameras", "Film Camera", "Photo Paper"), ("Lenses", "Lens", "Photo Printers"),
                ("Tripods", "Tripod", "Microphones"), ("Camera Bags", "Camera Bag", "Backpacks"),
                ("Action Cameras", "Action Camera", "Hiking Boots"), ("Flashes", "Flash", "Desk Lamps")],
    "Kitchen": [("Espresso Machines", "Espresso Machine", "Travel Mugs"),
                ("Coffee Grinders", "Coffee Grinder", "Camp Stoves"), ("Cookware", "Pan", "Camp Stoves"),
                ("Knives", "Chef Knife", "Tents"), ("Blenders", "Blender", "Dumbbells"),
                ("Kettles", "Kettle", "Camp Stoves")],
    "Outdoor": [("Tents", "Tent", "Speakers"), ("Backpacks", "Backpack", "Camera Bags"),
                ("Camp Stoves", "Camp Stove", "Cookware"), ("Travel Mugs", "Travel Mug", "Espresso Machines"),
                ("Hiking Boots", "Hiking Boots", "Running Shoes"), ("Headlamps", "Headlamp", "Outdoor Lighting")],
    "Photo Printing": [("Photo Printers", "Photo Printer", "Lenses"),
                       ("Photo Paper", "Photo Paper Pack", "Film Cameras"),
                       ("Picture Frames", "Picture Frame", "Turntables"),
                       ("Photo Albums", "Photo Album", "Film Cameras"), ("Notebooks", "Notebook", "Desk Lamps"),
                       ("Scanners", "Scanner", "Webcams")],
    "Fitness": [("Running Shoes", "Running Shoes", "Hiking Boots"),
                ("Fitness Trackers", "Fitness Tracker", "Headphones"), ("Yoga Mats", "Yoga Mat", "Speakers"),
                ("Dumbbells", "Dumbbell Set", "Blenders"), ("Water Bottles", "Water Bottle", "Travel Mugs"),
                ("Resistance Bands", "Resistance Band", "Standing Desks")],
    "Gaming": [("Game Controllers", "Controller", "Soundbars"), ("Gaming Mice", "Gaming Mouse", "Office Chairs"),
               ("Mechanical Keyboards", "Mechanical Keyboard", "Standing Desks"),
               ("Gaming Headsets", "Gaming Headset", "Headphones"),
               ("Gaming Monitors", "Gaming Monitor", "Monitor Arms"),
               ("Capture Cards", "Capture Card", "Microphones")],
    "Home Office": [("Desk Lamps", "Desk Lamp", "Notebooks"), ("Office Chairs", "Office Chair", "Gaming Mice"),
                    ("Standing Desks", "Standing Desk", "Mechanical Keyboards"),
                    ("Webcams", "Webcam", "Microphones"), ("Monitor Arms", "Monitor Arm", "Gaming Monitors"),
                    ("Desk Organisers", "Desk Organiser", "Notebooks")],
    "Garden": [("Garden Tools", "Garden Trowel", "Knives"), ("Planters", "Planter", "Picture Frames"),
               ("Seeds", "Seed Kit", "Cookware"), ("Grills", "Grill", "Camp Stoves"),
               ("Hoses", "Garden Hose", "Hiking Boots"), ("Outdoor Lighting", "Outdoor Light", "Headlamps")],
    "Music": [("Guitars", "Guitar", "Microphones"), ("Digital Pianos", "Digital Piano", "Headphones"),
              ("Guitar Pedals", "Guitar Pedal", "Speakers"), ("Vinyl Records", "Record Box Set", "Turntables"),
              ("Drum Pads", "Drum Pad", "Capture Cards"), ("Studio Monitors", "Studio Monitor", "Speakers")],
}
ATTRIBUTES: dict[str, list[str]] = {
    "Audio": ["wireless pairing", "warm bass", "noise cancelling", "low latency", "long battery life"],
    "Cameras": ["weather sealing", "fast autofocus", "a metal body", "a bright viewfinder", "image stabilisation"],
    "Kitchen": ["a stainless steel body", "precise temperature control", "easy cleaning", "a compact footprint",
                "a ceramic finish"],
    "Outdoor": ["a waterproof shell", "an ultralight frame", "reflective trim", "a four-season rating",
                "quick setup"],
    "Photo Printing": ["archival inks", "acid-free paper", "a linen cover", "a wide colour gamut", "fast drying"],
    "Fitness": ["a non-slip grip", "breathable mesh", "heart-rate tracking", "a cushioned sole", "a foldable design"],
    "Gaming": ["RGB lighting", "a high refresh rate", "hot-swappable switches", "a braided cable", "low input lag"],
    "Home Office": ["an ergonomic design", "a memory preset", "adjustable height", "USB-C power", "a matte finish"],
    "Garden": ["a rust-proof coating", "a weatherproof build", "a soft-grip handle", "solar charging",
               "a drip tray"],
    "Music": ["a solid spruce top", "weighted keys", "true bypass", "a 180-gram pressing", "velocity-sensitive pads"],
}
ADJECTIVES = ["Compact", "Pro", "Classic", "Ultra", "Lightweight", "Studio", "Travel", "Smart", "Heritage",
              "Essential", "Signature", "Active", "Urban", "Prime", "Nova"]
BRAND_STEMS = ["Lum", "Vel", "Kor", "Zen", "Ard", "Bri", "Cal", "Dra", "Eon", "Fal", "Gri", "Hal", "Iso", "Jur",
               "Kas", "Lio", "Mar", "Nor", "Oak", "Pax", "Quin", "Ros", "Sol", "Tor", "Ulm", "Vor", "Wen", "Xan",
               "Yor", "Zar"]
BRAND_ENDINGS = ["ora", "ix", "eon", "ara", "ent", "ion", "ica", "ux", "vo", "elle", "ano", "ys"]
PERSONA_TEMPLATES = ["Enjoys {interests}; often buys from {brand}.",
                     "Into {interests}, and a loyal {brand} customer.",
                     "Shops mostly for {interests}; tends to pick {brand}.",
                     "Keen on {interests}; trusts {brand} the most."]
ROMAN = ["", " II", " III", " IV", " V", " VI", " VII", " VIII", " IX", " X"]


@dataclass
class SyntheticWorld:
    """The item side of the synthetic dataset. S subcategories, N items, T*B brands (brand t*B+j is top t's j-th)."""

    top_names: list[str]  # [T]
    sub_names: list[str]  # [S], unique
    sub_nouns: list[str]  # [S], title noun
    sub_top: np.ndarray  # [S] top category of each subcategory
    related: list[np.ndarray]  # [S] sorted related subcategories (siblings + cross-top partners)
    brand_names: list[str]  # [T*B]
    brands_per_top: int
    item_sub: np.ndarray  # [N] subcategory of each item
    item_brand: np.ndarray  # [N] global brand index
    popularity: np.ndarray  # [N] Zipf weight, sums to 1 within each subcategory
    items_of_sub: list[np.ndarray]  # [S] item indices of each subcategory, ascending
    complements: np.ndarray  # [N, NUM_COMPLEMENTS] complement item indices, -1 padded
    num_complements: np.ndarray  # [N] valid entries per row of ``complements`` (>= 1)
    catalogue: Catalogue
    partner: np.ndarray | None = None  # [S] the cross-top partner picked for each subcategory (-1: none), step 10

    def is_complement(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[M] bool: is item b[i] one of item a[i]'s complements."""
        return (self.complements[np.asarray(a)] == np.asarray(b)[:, None]).any(axis=1)


@dataclass
class SyntheticTrace:
    """What ``simulate_users`` drew, latent state included, so tests can check every step. U users, T=max_seq_len."""

    user_ids: list[str]  # [U]
    lengths: np.ndarray  # [U] in [min_seq_len, max_seq_len]
    items: np.ndarray  # [U, T] item indices, -1 past each user's length
    via_complement: np.ndarray  # [U, T] bool: item t was drawn as a complement of item t-1 (False at t=0)
    interests: np.ndarray  # [U, T, K] the interests in force when item t was drawn (after that step's drift)
    brand: np.ndarray  # [U] preferred brand (global index)
    via_rule: np.ndarray | None = None  # [U, T] bool: item t followed the rule of step 10 (mode=reasoning only)
    brand_by_top: np.ndarray | None = None  # [U, num_top_categories] preferred brand per top (mode=reasoning only)


def generate_synthetic(cfg: SyntheticConfig, name: str = "synthetic") -> InteractionData:
    """The synthetic dataset of ``cfg`` (see the module docstring for the generative process).

    Item ids are "0".."N-1" (= dense index), user ids "u0".."u{U-1}"; every user has a persona. With
    ``num_domains`` >= 2 the dataset also records each item's and user's domain (step 11)."""
    if cfg.num_domains > 1:
        from onerec_dist.data.synthetic_domains import generate_domains

        return generate_domains(cfg, name)
    world = build_world(cfg)
    trace = simulate_users(world, cfg)
    sequences = {u: row[:n].tolist() for u, row, n in zip(trace.user_ids, trace.items, trace.lengths)}
    return InteractionData(name=name, catalogue=world.catalogue, sequences=sequences,
                           personas=write_personas(world, trace, cfg))


def _streams(cfg: SyntheticConfig) -> list[np.random.Generator]:
    """Independent generators for world, users, personas and the reasoning rule, so each part can be rebuilt
    alone (child i of SeedSequence.spawn does not depend on how many children are spawned)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4)]


def _check_sizes(cfg: SyntheticConfig) -> None:
    for field in ("num_top_categories", "subcategories_per_top", "brands_per_top"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"data.synthetic.{field}: must be >= 1, got {getattr(cfg, field)}")
    num_subs = cfg.num_top_categories * cfg.subcategories_per_top
    if cfg.num_items < num_subs:
        raise ValueError(f"data.synthetic.num_items: must be >= num_top_categories * subcategories_per_top = "
                         f"{num_subs} (one item per subcategory), got {cfg.num_items}")
    if cfg.interests_per_user > num_subs:
        raise ValueError(f"data.synthetic.interests_per_user: must be <= the number of subcategories {num_subs}, "
                         f"got {cfg.interests_per_user}")


# ---------------------------------------------------------------- world


def build_world(cfg: SyntheticConfig, first_top: int = 0, taken_brands: frozenset[str] = frozenset()
                ) -> SyntheticWorld:
    """Taxonomy, brands, items, popularity and complements (steps 1-5 of the module docstring).

    ``first_top``: the taxonomy's first top category is the name list's entry ``first_top`` (a domain's world
    starts past the tops of the domains before it, so names differ); ``taken_brands``: names other worlds use."""
    _check_sizes(cfg)
    rng = _streams(cfg)[0]
    top_names, sub_names, sub_nouns, sub_top, partner_names = _taxonomy(cfg, first_top)
    related, partner = _related(sub_names, sub_top, partner_names, rng)
    brand_names = _brand_names(cfg.num_top_categories * cfg.brands_per_top, rng, taken_brands)

    num_subs = len(sub_names)
    extra = rng.multinomial(cfg.num_items - num_subs, np.full(num_subs, 1.0 / num_subs))
    item_sub = np.repeat(np.arange(num_subs), 1 + extra)  # [N], sorted by subcategory
    items_of_sub = [np.flatnonzero(item_sub == s) for s in range(num_subs)]
    item_brand = sub_top[item_sub] * cfg.brands_per_top + rng.integers(cfg.brands_per_top, size=cfg.num_items)
    popularity = np.empty(cfg.num_items)
    for items in items_of_sub:
        weight = 1.0 / np.arange(1, len(items) + 1) ** ZIPF_EXPONENT
        popularity[rng.permutation(items)] = weight / weight.sum()

    complements, num_complements = _complements(item_sub, items_of_sub, related, popularity, rng)
    catalogue = _catalogue(top_names, sub_names, sub_nouns, sub_top, brand_names, item_sub, item_brand, rng,
                           first_top)
    return SyntheticWorld(top_names, sub_names, sub_nouns, sub_top, related, brand_names, cfg.brands_per_top,
                          item_sub, item_brand, popularity, items_of_sub, complements, num_complements, catalogue,
                          partner)


def _taxonomy(cfg: SyntheticConfig, first_top: int = 0
              ) -> tuple[list[str], list[str], list[str], np.ndarray, list[str]]:
    """Names of tops and subcategories (tops ``first_top`` .. of the name list); past the hand-written lists they
    repeat with a suffix."""
    bases = list(TAXONOMY)
    top_names, sub_names, sub_nouns, sub_top, partners = [], [], [], [], []
    for t in range(cfg.num_top_categories):
        base = bases[(first_top + t) % len(bases)]
        top_round = (first_top + t) // len(bases)
        top_suffix = f" {top_round + 1}" if top_round else ""
        top_names.append(base + top_suffix)
        for p in range(cfg.subcategories_per_top):
            sub, noun, partner = TAXONOMY[base][p % len(TAXONOMY[base])]
            sub_round = p // len(TAXONOMY[base])
            sub_suffix = (ROMAN[sub_round] if sub_round < len(ROMAN) else f" {sub_round + 1}") + top_suffix
            sub_names.append(sub + sub_suffix)
            sub_nouns.append(noun)
            partners.append(partner + sub_suffix)
            sub_top.append(t)
    return top_names, sub_names, sub_nouns, np.array(sub_top), partners


def _related(sub_names: list[str], sub_top: np.ndarray, partner_names: list[str],
             rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Siblings plus one cross-top partner per subcategory, made symmetric; also [S] each one's own partner."""
    index = {name: s for s, name in enumerate(sub_names)}
    related: list[set[int]] = [set(np.flatnonzero(sub_top == sub_top[s]).tolist()) - {s} for s in range(len(index))]
    own_partner = np.full(len(index), -1, dtype=np.int64)
    for s, partner_name in enumerate(partner_names):
        partner = index.get(partner_name)
        if partner is None or sub_top[partner] == sub_top[s]:
            others = np.flatnonzero(sub_top != sub_top[s])
            if len(others) == 0:  # a single top category: siblings only
                continue
            partner = int(rng.choice(others))
        related[s].add(partner)
        related[partner].add(s)
        own_partner[s] = partner
    return [np.array(sorted(r), dtype=np.int64) for r in related], own_partner


def _brand_names(count: int, rng: np.random.Generator, taken: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct names in a seeded order, skipping ``taken`` (names of other worlds)."""
    combos = [stem + ending for stem in BRAND_STEMS for ending in BRAND_ENDINGS]
    order = rng.permutation(len(combos))
    names, i = [], 0
    while len(names) < count:
        # Past the 360 stem+ending combinations, names repeat with a number (all stay distinct).
        name = combos[order[i % len(combos)]] + (str(i // len(combos) + 1) if i >= len(combos) else "")
        if name not in taken:
            names.append(name)
        i += 1
    return names


def _complements(item_sub: np.ndarray, items_of_sub: list[np.ndarray], related: list[np.ndarray],
                 popularity: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Step 5: per item, NUM_COMPLEMENTS draws without replacement from its own and related subcategories."""
    num_items = len(item_sub)
    complements = np.full((num_items, NUM_COMPLEMENTS), -1, dtype=np.int64)  # [N, C]
    counts = np.zeros(num_items, dtype=np.int64)
    for item in range(num_items):
        sub = item_sub[item]
        own = items_of_sub[sub][items_of_sub[sub] != item]
        near = [items_of_sub[r] for r in related[sub]]
        own_mass = SAME_SUB_COMPLEMENT_MASS if near else 1.0
        if len(own) == 0:
            own_mass = 0.0
        # P(candidate) = side mass * popularity share within its subcategory (own side renormalised without item).
        parts = [own_mass * popularity[own] / popularity[own].sum()] if len(own) else []
        parts += [(1.0 - own_mass) / len(near) * popularity[items] for items in near]
        pool = np.concatenate([own] + near)
        prob = np.concatenate(parts)
        k = min(NUM_COMPLEMENTS, len(pool))
        complements[item, :k] = rng.choice(pool, size=k, replace=False, p=prob / prob.sum())
        counts[item] = k
    return complements, counts


def _catalogue(top_names: list[str], sub_names: list[str], sub_nouns: list[str], sub_top: np.ndarray,
               brand_names: list[str], item_sub: np.ndarray, item_brand: np.ndarray,
               rng: np.random.Generator, first_top: int = 0) -> Catalogue:
    """Step 3: titles "<Brand> <Adjective> <Noun> <model code>" (unique) and two-sentence descriptions."""
    titles, descriptions, seen = [], [], set()
    base_tops = list(TAXONOMY)
    for item, (sub, brand) in enumerate(zip(item_sub.tolist(), item_brand.tolist())):
        top = top_names[sub_top[sub]]
        adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))]
        attributes = ATTRIBUTES[base_tops[(first_top + sub_top[sub]) % len(base_tops)]]
        first, second = rng.choice(len(attributes), size=2, replace=False)
        while True:  # model codes: 26*26*900 choices, so a clash is rare and a redraw ends it
            letters = "".join(chr(ord("A") + c) for c in rng.integers(26, size=2))
            title = f"{brand_names[brand]} {adjective} {sub_nouns[sub]} {letters}-{rng.integers(100, 1000)}"
            if title not in seen:
                break
        seen.add(title)
        titles.append(title)
        descriptions.append(f"{adjective} {sub_nouns[sub].lower()} with {attributes[first]} and "
                            f"{attributes[second]}. Part of {brand_names[brand]}'s {sub_names[sub].lower()} "
                            f"range in {top}.")
    return Catalogue(item_ids=[str(i) for i in range(len(item_sub))], titles=titles, descriptions=descriptions,
                     brands=[brand_names[b] for b in item_brand.tolist()],
                     categories=[[top_names[sub_top[s]], sub_names[s]] for s in item_sub.tolist()])


# ---------------------------------------------------------------- users


class _InterestSampler:
    """Step 7 for many users at once: inverse-CDF draws from (subcategory, preferred brand) rows.

    Row r = sub*(B+1) + b holds the subcategory's items with weight popularity * (BRAND_AFFINITY if the item's
    brand slot is b), b = B meaning no preferred brand in this top. Rows are normalised to [0, 1] and laid end
    to end as r + cumulative weight, so one ``searchsorted`` serves all users.
    """

    def __init__(self, world: SyntheticWorld):
        slots = world.brands_per_top + 1
        keys, items, starts, lengths, item_pos = [], [], [], [], np.empty(len(world.item_sub), dtype=np.int64)
        offset = 0
        for sub, sub_items in enumerate(world.items_of_sub):
            item_pos[sub_items] = np.arange(len(sub_items))
            for b in range(slots):
                weight = world.popularity[sub_items] * np.where(
                    world.item_brand[sub_items] % world.brands_per_top == b, BRAND_AFFINITY, 1.0)
                cdf = np.cumsum(weight / weight.sum())
                cdf[-1] = 1.0
                keys.append(sub * slots + b + cdf)
                items.append(sub_items)
                starts.append(offset)
                lengths.append(len(sub_items))
                offset += len(sub_items)
        self.world, self.slots = world, slots
        self.keys = np.concatenate(keys)  # [R*n] row + cumulative weight
        self.cdf = self.keys - np.repeat(np.arange(len(starts)), lengths)  # [R*n] cumulative weight in [0, 1]
        self.items = np.concatenate(items)
        self.starts, self.lengths, self.item_pos = np.array(starts), np.array(lengths), item_pos

    def draw(self, subs: np.ndarray, brand: np.ndarray, exclude: np.ndarray | None,
             u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items [M] drawn from ``subs`` [M] for users of ``brand`` [M] with uniforms ``u`` [M], skipping
        ``exclude`` [M] (-1: none). Also returns [M] bool: the subcategory held only the excluded item."""
        world = self.world
        same_top = world.sub_top[subs] == brand // world.brands_per_top
        rows = subs * self.slots + np.where(same_top, brand % world.brands_per_top, self.slots - 1)
        start, end = self.starts[rows], self.starts[rows] + self.lengths[rows]
        lo = np.zeros(len(subs))
        hi = np.zeros(len(subs))
        if exclude is not None:
            # The excluded item a covers [lo, hi) of its row: draw x from [0, 1 - (hi-lo)) and step over it.
            inside = (exclude >= 0) & (world.item_sub[np.maximum(exclude, 0)] == subs)
            at = np.where(inside, start + self.item_pos[np.maximum(exclude, 0)], start)
            hi = np.where(inside, self.cdf[at], 0.0)
            lo = np.where(inside & (at > start), self.cdf[at - 1], 0.0)
        x = u * (1.0 - (hi - lo))
        x = np.where(x >= lo, x + (hi - lo), x)
        pos = np.clip(np.searchsorted(self.keys, rows + x, side="right"), start, end - 1)
        if exclude is not None:  # a float tie at the edge of a's interval: take the next item of the row
            tie = self.items[pos] == exclude
            pos = np.clip(np.where(tie, np.where(pos + 1 < end, pos + 1, pos - 1), pos), start, end - 1)
        only_excluded = (hi - lo) >= 1.0
        return self.items[pos], only_excluded


def simulate_users(world: SyntheticWorld, cfg: SyntheticConfig) -> SyntheticTrace:
    """Steps 6-8 (and 10 with mode=reasoning) of the module docstring, all users in lockstep (one vectorised pass
    per position t)."""
    _check_sizes(cfg)
    rng = _streams(cfg)[1]
    num_users, k, t_max = cfg.num_users, cfg.interests_per_user, cfg.max_seq_len
    num_subs = len(world.sub_names)
    users = np.arange(num_users)
    lengths = rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1, size=num_users)
    interests = _distinct_interests(num_users, k, num_subs, rng)  # [U, K]
    brand = world.sub_top[interests[:, 0]] * cfg.brands_per_top + rng.integers(cfg.brands_per_top, size=num_users)
    related = _padded(world.related)  # [S, R]
    sampler = _InterestSampler(world)
    reasoning = cfg.mode == "reasoning"
    rule_rng = _streams(cfg)[3]
    brand_by_top = _brands_by_top(world, interests, brand, rule_rng) if reasoning else None  # [U, T]

    def brand_of(subs: np.ndarray) -> np.ndarray:
        """Preferred brand for draws from ``subs`` [U]: one brand per user, or per (user, top) when reasoning."""
        return brand if brand_by_top is None else brand_by_top[users, world.sub_top[subs]]

    items = np.full((num_users, t_max), -1, dtype=np.int64)
    via_complement = np.zeros((num_users, t_max), dtype=bool)
    interest_log = np.zeros((num_users, t_max, k), dtype=np.int64)
    interest_log[:, 0] = interests
    via_rule = np.zeros((num_users, t_max), dtype=bool) if reasoning else None
    slot = rng.integers(k, size=num_users)
    subs = interests[users, slot]
    items[:, 0], _ = sampler.draw(subs, brand_of(subs), None, rng.random(num_users))
    for t in range(1, t_max):
        active = t < lengths
        _drift(interests, related, active & (rng.random(num_users) < cfg.drift_prob), rng)
        interest_log[:, t] = interests
        prev = items[:, t - 1]
        slot = rng.integers(k, size=num_users)
        subs = interests[users, slot]
        drawn, only_prev = sampler.draw(subs, brand_of(subs), prev, rng.random(num_users))
        pick = (rng.random(num_users) * world.num_complements[np.maximum(prev, 0)]).astype(np.int64)
        complement = world.complements[np.maximum(prev, 0), pick]
        use_complement = (rng.random(num_users) < cfg.complement_prob) | only_prev
        step = np.where(use_complement, complement, drawn)
        if reasoning:
            rule_item, fired = _rule_step(world, cfg, items, t, brand_by_top, sampler, rule_rng)
            fired &= active
            step = np.where(fired, rule_item, step)
            use_complement &= ~fired
            via_rule[:, t] = fired
        items[:, t] = np.where(active, step, -1)
        via_complement[:, t] = active & use_complement
    return SyntheticTrace([f"u{i}" for i in range(num_users)], lengths, items, via_complement, interest_log, brand,
                          via_rule, brand_by_top)


def _brands_by_top(world: SyntheticWorld, interests: np.ndarray, brand: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Step 10: [U, T] preferred brand per top category; the step-6 brand in the top of interest 0."""
    num_users, num_tops = len(brand), len(world.top_names)
    slots = rng.integers(world.brands_per_top, size=(num_users, num_tops))
    by_top = np.arange(num_tops) * world.brands_per_top + slots  # [U, T] global brand indices
    by_top[np.arange(num_users), world.sub_top[interests[:, 0]]] = brand
    return by_top


def majority_subcategory(item_sub: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Step 10a: [U] the most frequent subcategory of each row of ``window`` [U, W] (item indices, oldest first);
    ties go to the tied subcategory seen most recently."""
    subs = item_sub[window]  # [U, W]
    counts = (subs[:, :, None] == subs[:, None, :]).sum(axis=2)  # [U, W] how often each position's sub occurs
    width = subs.shape[1]
    best = (counts * width + np.arange(width)).argmax(axis=1)  # count first, then recency
    return subs[np.arange(len(subs)), best]


def _rule_step(world: SyntheticWorld, cfg: SyntheticConfig, items: np.ndarray, t: int, brand_by_top: np.ndarray,
               sampler: _InterestSampler, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Step 10 at position t: ([U] the rule's item, [U] bool whether the rule fires). Draws two uniforms per user
    at every t (also before W), so the stream's position does not depend on the data."""
    num_users = items.shape[0]
    coin, u = rng.random(num_users), rng.random(num_users)
    window = cfg.rule_window
    if t < window:
        return np.full(num_users, -1), np.zeros(num_users, dtype=bool)
    target_sub = world.partner[majority_subcategory(world.item_sub, np.maximum(items[:, t - window:t], 0))]
    brand = brand_by_top[np.arange(num_users), world.sub_top[target_sub]]
    drawn, only_prev = sampler.draw(target_sub, brand, items[:, t - 1], u)
    return drawn, (coin < cfg.rule_prob) & ~only_prev


def _distinct_interests(num_users: int, k: int, num_subs: int, rng: np.random.Generator) -> np.ndarray:
    """[U, K] uniform distinct subcategories per user (redraw a slot while it repeats an earlier one)."""
    interests = np.zeros((num_users, k), dtype=np.int64)
    for j in range(k):
        column = rng.integers(num_subs, size=num_users)
        clash = (interests[:, :j] == column[:, None]).any(axis=1)
        while clash.any():
            column[clash] = rng.integers(num_subs, size=int(clash.sum()))
            clash = (interests[:, :j] == column[:, None]).any(axis=1)
        interests[:, j] = column
    return interests


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    table = np.full((len(rows), max(1, max(len(r) for r in rows))), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return table


def _drift(interests: np.ndarray, related: np.ndarray, drifting: np.ndarray, rng: np.random.Generator) -> None:
    """Step 8a in place: for each drifting user, one slot -> a related subcategory not already an interest."""
    who = np.flatnonzero(drifting)
    if len(who) == 0:
        return
    slot = rng.integers(interests.shape[1], size=len(who))
    candidates = related[interests[who, slot]]  # [M, R], -1 padded
    taken = (candidates[:, :, None] == interests[who][:, None, :]).any(axis=2)
    valid = (candidates >= 0) & ~taken
    choice = np.where(valid, rng.random(candidates.shape), -1.0).argmax(axis=1)  # uniform among valid
    ok = valid.any(axis=1)
    interests[who[ok], slot[ok]] = candidates[ok, choice[ok]]


def write_personas(world: SyntheticWorld, trace: SyntheticTrace, cfg: SyntheticConfig) -> dict[str, str]:
    """Step 9: one sentence per user naming the initial interests (lower case) and the preferred brand."""
    rng = _streams(cfg)[2]
    template = rng.integers(len(PERSONA_TEMPLATES), size=len(trace.user_ids))
    personas = {}
    for user, subs, brand, form in zip(trace.user_ids, trace.interests[:, 0].tolist(), trace.brand.tolist(),
                                       template.tolist()):
        names = [world.sub_names[s].lower() for s in subs]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        personas[user] = PERSONA_TEMPLATES[form].format(interests=joined, brand=world.brand_names[brand])
    return personas
