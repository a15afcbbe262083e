"""Per-row constraints for constrained decoding: ragged sets of allowed ID prefixes, and row chunking.

Think-Ahead (OneRec-Think, arXiv:2510.11639, Sec. 4.4) splits decoding: offline, beam search over the first m levels
after each of T rationales gives a user a set of m-level prefixes; online, the remaining levels are decoded only
below that user's prefixes. ``AllowedPrefixes`` holds those ragged sets as CSR (offsets + codes) and
``prefix_constraint`` turns them into the per-level mask the decoders AND into the prefix-index mask:

    at level l < m, code c may follow row r's node n iff the child (n, c) is an ancestor of (or is) one of the
    row's allowed prefixes; at levels >= m there is no extra restriction (the prefix index keeps the ID valid).

The ancestors are precomputed once per call as sorted keys ``row * num_nodes(l) + node`` per level, so the mask at
each level is one children lookup and one ``searchsorted``: no host sync inside the level loop.

``run_in_row_chunks`` cuts a large batch (e.g. the B*G rationale prefixes of a GRPO step) into chunks of at most a
given number of rows, runs a decode on each and stitches the results back in input order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from onerec_dist.sid.prefix_index import PrefixIndex

# (level, node [R], beams per prompt) -> [R, K_level] bool mask, or None for "no restriction at this level".
LevelMask = Callable[[int, torch.Tensor, int], "torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class AllowedPrefixes:
    """Row b may only decode items whose first m codes are one of ``codes[offsets[b]:offsets[b + 1]]``, unless
    ``unrestricted[b]``: such a row (a user without a cached set) decodes the whole catalogue in the same batch,
    Think-Ahead's fallback; its range must be empty."""

    offsets: torch.Tensor  # [B + 1] int64, non-decreasing, offsets[0] = 0, offsets[B] = P
    codes: torch.Tensor  # [P, m] int64, the prefixes of all rows, row after row
    unrestricted: torch.Tensor | None = None  # [B] bool; None: every row is restricted

    def __post_init__(self):
        offsets, codes = self.offsets, self.codes
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"allowed_prefixes.offsets must be a 1-D tensor [B + 1], got {_describe(offsets)}")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] < 1:
            raise ValueError(f"allowed_prefixes.codes must be a 2-D tensor [P, m] with m >= 1, got {_describe(codes)}")
        object.__setattr__(self, "offsets", offsets.long())
        object.__setattr__(self, "codes", codes.long())
        ends = self.offsets.tolist()
        if ends[0] != 0 or ends[-1] != codes.shape[0] or any(b < a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"allowed_prefixes.offsets must rise from 0 to P={codes.shape[0]} (CSR), got {ends[:8]}"
                             + ("..." if len(ends) > 8 else ""))
        free = self.unrestricted
        free = torch.zeros(len(ends) - 1, dtype=torch.bool) if free is None else torch.as_tensor(free, dtype=torch.bool)
        if tuple(free.shape) != (len(ends) - 1,):
            raise ValueError(f"allowed_prefixes.unrestricted must be [B={len(ends) - 1}] bool, got {_describe(free)}")
        if bool((free & (self.offsets.diff() > 0)).any()):
            raise ValueError("an unrestricted row of allowed_prefixes must have no prefixes")
        object.__setattr__(self, "unrestricted", free)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[Sequence[int]] | None], num_levels: int | None = None
                   ) -> AllowedPrefixes:
        """From one list of prefixes (each a list of m codes) per row, None for an unrestricted row; ``num_levels``
        = m when no row has a prefix."""
        unrestricted = torch.tensor([row is None for row in rows], dtype=torch.bool)
        rows = [[] if row is None else row for row in rows]
        flat = [list(p) for row in rows for p in row]
        widths = {len(p) for p in flat} | ({num_levels} if num_levels is not None else set())
        if len(widths) != 1:
            raise ValueError("allowed prefixes must all have the same number of levels m, got lengths "
                             f"{sorted(widths)}")
        width = widths.pop()
        counts = torch.tensor([0] + [len(row) for row in rows], dtype=torch.long)
        codes = torch.tensor(flat, dtype=torch.long).view(-1, width)
        return cls(counts.cumsum(0), codes, unrestricted)

    @classmethod
    def union_of_groups(cls, prefixes: torch.Tensor, group_size: int) -> AllowedPrefixes:
        """The union of the prefixes of every group of ``group_size`` consecutive rows of ``prefixes`` [R, b, m]
        (e.g. ``decode_prefixes(...).prefixes`` over T rationales per user: R = users * T), dead slots (-1) dropped.
        Each user's prefixes come out sorted and unique (Think-Ahead's cached prefix set)."""
        if prefixes.dim() != 3 or prefixes.shape[0] % group_size:
            raise ValueError(f"prefixes must be [users * group_size={group_size}, b, m], got {tuple(prefixes.shape)}")
        width = prefixes.shape[2]
        groups = prefixes.reshape(prefixes.shape[0] // group_size, -1, width).cpu()  # [U, T*b, m]
        rows = []
        for group in groups:
            live = group[(group >= 0).all(1)]
            rows.append(torch.unique(live, dim=0).tolist() if live.numel() else [])
        return cls.from_lists(rows, num_levels=width)

    @property
    def num_rows(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def counts(self) -> torch.Tensor:
        """[B] number of prefixes of each row."""
        return self.offsets.diff()

    def select(self, rows: Sequence[int]) -> AllowedPrefixes:
        """The sets of ``rows`` (in that order)."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=self.offsets.device)
        starts, counts = self.offsets[rows_t], self.counts()[rows_t]  # [b], [b]
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [b + 1] of the selection
        # prefix j of the selection = starts[its row] + (j - offsets[its row])
        take = torch.arange(int(offsets[-1]), device=counts.device) + torch.repeat_interleave(starts - offsets[:-1],
                                                                                             counts)
        return AllowedPrefixes(offsets, self.codes[take], self.unrestricted.to(rows_t.device)[rows_t])


class _PrefixKeys:
    """Sorted keys ``row * num_nodes(l) + node`` of every ancestor (levels 0..m) of every allowed prefix."""

    def __init__(self, index: PrefixIndex, allowed: AllowedPrefixes):
        device = index.device
        codes = allowed.codes.to(device)  # [P, m]
        rows = torch.repeat_interleave(torch.arange(allowed.num_rows, device=device), allowed.counts().to(device))
        self.index, self.num_levels, self.rows = index, allowed.num_levels, rows  # rows [P]
        self.nodes = [index.root(codes.shape[0])]  # per level l: [P] node of each prefix's first l codes
        for level in range(allowed.num_levels):
            self.nodes.append(index.advance(level, self.nodes[-1], codes[:, level]))
        self.keys = [torch.unique(rows * index.num_nodes(l) + node.clamp(min=0))
                     for l, node in enumerate(self.nodes)]  # sorted [<= P] per level

    def contains(self, level: int, row: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """[...] bool: (row, node at ``level``) is an ancestor of (or is) one of the row's prefixes; node -1: False."""
        keys = self.keys[level]
        if keys.numel() == 0:
            return torch.zeros_like(node, dtype=torch.bool)
        query = row * self.index.num_nodes(level) + node.clamp(min=0)
        pos = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        return (keys[pos] == query) & (node >= 0)


def check_allowed_prefixes(index: PrefixIndex, allowed: AllowedPrefixes, num_rows: int,
                           start_codes: torch.Tensor) -> None:
    """Raise ValueError (naming the row) unless every row has a non-empty set of catalogue prefixes of one length
    m <= L that agrees with its partial ID ``start_codes`` [B, l0]. Host syncs: call once, before decoding."""
    if not isinstance(allowed, AllowedPrefixes):
        raise ValueError(f"allowed_prefixes must be an AllowedPrefixes (CSR offsets + codes), got "
                         f"{type(allowed).__name__}")
    if allowed.num_rows != num_rows:
        raise ValueError(f"allowed_prefixes has {allowed.num_rows} rows for {num_rows} prompts")
    if allowed.num_levels > index.num_levels:
        raise ValueError(f"allowed prefixes have m={allowed.num_levels} levels, the catalogue IDs L={index.num_levels}")
    empty = ((allowed.counts() == 0) & ~allowed.unrestricted).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"allowed_prefixes row {empty[0]} is empty ({len(empty)} empty rows): mark a row without a "
                         "set unrestricted (None in from_lists) to decode it over the whole catalogue (the fallback)")
    keys = _PrefixKeys(index, allowed)
    dead = (keys.nodes[-1] < 0).nonzero().flatten().tolist()
    if dead:
        row = int(keys.rows[dead[0]])
        raise ValueError(f"allowed_prefixes row {row}: prefix {allowed.codes[dead[0]].tolist()} is the start of no "
                         f"catalogue item ({len(dead)} such prefixes; was the set built for another ID table?)")
    depth = min(start_codes.shape[1], allowed.num_levels)
    if depth:
        start_node = index.nodes_of_prefix(start_codes[:, :depth].to(index.device))  # [B] at level depth
        ok = keys.contains(depth, torch.arange(num_rows, device=index.device), start_node)
        ok |= allowed.unrestricted.to(index.device)
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(f"start_codes row {row} = {start_codes[row].tolist()} lies below none of the row's "
                             "allowed prefixes")


def prefix_constraint(index: PrefixIndex, allowed: AllowedPrefixes) -> LevelMask:
    """The level mask of ``allowed`` (module docstring); call ``check_allowed_prefixes`` first."""
    keys = _PrefixKeys(index, allowed)
    unrestricted = allowed.unrestricted.to(index.device)  # [B]

    def mask(level: int, node: torch.Tensor, beams: int) -> torch.Tensor | None:
        if level >= keys.num_levels:
            return None
        child = children(index, level, node)  # [R, K_l]
        row = (torch.arange(node.shape[0], device=node.device) // beams)[:, None]  # [R, 1] prompt of each beam row
        return keys.contains(level + 1, row, child) | unrestricted[row]

    return mask


def children(index: PrefixIndex, level: int, node: torch.Tensor) -> torch.Tensor:
    """[R, K_level] child node of each node [R] for every code at ``level``; -1 where no item continues so."""
    size = index.codebook_sizes[level]
    codes = torch.arange(size, device=node.device).repeat(node.shape[0])  # [R*K]
    return index.advance(level, node.repeat_interleave(size), codes).view(node.shape[0], size)


def all_of(*masks: LevelMask | None) -> LevelMask | None:
    """A level mask that is the AND of ``masks`` (Nones skipped); None when there is nothing to AND."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None

    def mask(level: int, node: torch.Tensor, beams: int) -> torch.Tensor | None:
        out = None
        for part in (m(level, node, beams) for m in masks):
            if part is not None:
                out = part if out is None else out & part
        return out

    return mask


# ---------------------------------------------------------------------------------------------- row chunking


def row_chunks(lengths: Sequence[int], rows_per_chunk: int | None) -> list[list[int]]:
    """Row indices of each chunk. Without a budget one chunk of all rows in order; with one, rows sorted by length
    (longest first, stable) so that a chunk's prompts pad to similar lengths, cut into ``rows_per_chunk`` rows."""
    if rows_per_chunk is None or rows_per_chunk >= len(lengths):
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + rows_per_chunk] for i in range(0, len(order), rows_per_chunk)]


def run_in_row_chunks(fn, rows_per_chunk: int | None, prompts: list[list[int]], **per_row):
    """``fn(prompts, **per_row)`` on chunks of rows; returns fn's dataclass result with every field [B, ...] in input
    order. Per-row arguments may be None, lists, tensors [B, ...] or ``AllowedPrefixes``."""
    chunks = row_chunks([len(p) for p in prompts], rows_per_chunk)
    if len(chunks) == 1:
        return fn(prompts, **per_row)
    results = [fn([prompts[i] for i in rows], **{name: _take(value, rows) for name, value in per_row.items()})
               for rows in chunks]
    order = torch.tensor([i for rows in chunks for i in rows])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())  # position of input row i in the concatenated chunks
    fields = {f.name: torch.cat([getattr(r, f.name) for r in results]) for f in dataclasses.fields(results[0])}
    return type(results[0])(**{name: value[inverse.to(value.device)] for name, value in fields.items()})


def _take(value, rows: list[int]):
    if value is None:
        return None
    if isinstance(value, AllowedPrefixes):
        return value.select(rows)
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, device=value.device)]
    return [value[i] for i in rows]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
