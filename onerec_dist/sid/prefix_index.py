"""Prefix index over semantic IDs for constrained decoding: dense tables near the root, a CSR tail below.

Constrained beam search over itemic tokens (OneRec-Think) must know, at every step and for every beam, which codes
may follow the beam's partial ID. A Python trie answers one row at a time and forces a host round trip per step.
This index answers a whole batch with a few gathers, on any device, with no host synchronisation, after STATIC
(Su et al. 2026, "Vectorizing the Trie: Efficient Constrained Decoding for LLM-based Generative Retrieval on
Accelerators", arXiv:2602.22647, Sec. 3): the first ``dense_levels`` levels, where nodes are few and fan-out is
high, are dense ``[num_nodes, K]`` tables (a bool mask and a child table); deeper levels, where nodes are many and
fan-out is low, are a CSR matrix (offsets + sorted child codes). A CSR mask reads a fixed window of ``max_fanout``
slots per row (STATIC's padded gather); a CSR advance compares the code against that window when the fan-out is
small, and binary-searches the node's sorted children (ceil(log2(F + 1)) fixed steps) when it is large, so its cost
stays O(B log F) instead of O(B F).

Node numbering (the contract every method shares):
  * a partial ID of length l (the first l codes of some item) is a node at level l, numbered by its rank among the
    sorted unique length-l prefixes of the catalogue. Level 0 holds the single root node 0; level L's nodes are the
    full IDs, so leaf node i is the i-th item ID in lexicographic order;
  * -1 is the invalid node, a prefix no item has. Every lookup maps -1, any other out-of-range node, and any
    out-of-range code to -1 / an empty mask row, so a dead beam stays dead without a branch on the host;
  * children of a node are contiguous and sorted in the next level's numbering, so
    child = offsets[node] + (rank of the code among the node's children); the CSR offsets ARE the child ids.

Decoding loop, per level l (shapes for R = batch * beams rows)::

    node = index.root(R)                                   # [R] all zeros
    for level in range(index.num_levels):
        allowed = index.allowed_codes(level, node)         # [R, K_level] bool -> constrained_step(...)
        node = index.advance(level, node[src_row], code)   # [R] after the beams are re-selected
    items = index.item_of(node)                            # [R] catalogue row, -1 for a dead beam

Building is one lexicographic sort and one pass per level (torch.sort / cumsum / bincount); it runs on the device
of ``codes``. Lookups are tensor-only: no ``.item()``, no data-dependent shapes, no loop over rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

INVALID = -1
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_MAX_ERROR_ROWS = 5  # how many offending rows an error message lists


def _index_dtype(max_value: int) -> torch.dtype:
    """Smallest signed dtype that holds ids in [-1, max_value]: halves table memory below 2**31 entries."""
    return torch.int32 if max_value <= _INT32_MAX else torch.int64


def _code_dtype(codebook_size: int) -> torch.dtype:
    """Smallest dtype that holds codes in [0, K): one byte per CSR entry for K <= 256."""
    if codebook_size <= 256:
        return torch.uint8
    return torch.int16 if codebook_size <= 2**15 else torch.int32


@dataclasses.dataclass(frozen=True)
class _Level:
    """Transitions from the nodes at one level (prefixes of length l) to their children (length l + 1).

    Dense levels fill ``mask``/``child``; CSR levels fill ``offsets``/``child_codes``; the other pair is None.
    The dense tables carry one extra all-invalid row (index ``num_nodes``) that invalid nodes are pointed at, so a
    lookup is a single row gather with no masking pass afterwards.
    """

    codebook_size: int  # K_l
    num_nodes: int  # nodes at this level (parents)
    num_children_total: int  # nodes at the next level (edges)
    max_fanout: int  # most children of any node at this level
    mask: torch.Tensor | None = None  # [num_nodes + 1, K_l] bool, code may follow the node
    child: torch.Tensor | None = None  # [num_nodes + 1, K_l] int32/int64, child node id or -1
    offsets: torch.Tensor | None = None  # [num_nodes + 1] int32/int64, first child id of each node
    child_codes: torch.Tensor | None = None  # [num_children_total + max_fanout] uint8/int16/int32, sorted per node;
    # the max_fanout padding slots let every window and search step read in bounds without a clamp.
    binary_search: bool = False  # CSR advance: binary search (large fan-out) instead of a window compare

    @property
    def dense(self) -> bool:
        return self.mask is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("mask", "child", "offsets", "child_codes")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(self, device: torch.device | str) -> _Level:
        return dataclasses.replace(self, **{name: t.to(device) for name, t in self.tensors().items()})


class PrefixIndex:
    """Batched, device-resident prefix lookup over a catalogue of unique semantic IDs (see the module docstring).

    Build with :meth:`build`; move with :meth:`to`. ``levels`` are 0..L-1 (a node at level l is a prefix of
    length l and is followed by a code from codebook l); nodes at level L are the full IDs.
    """

    def __init__(self, levels: list[_Level], leaf_item: torch.Tensor, dense_levels: int, build_seconds: float):
        # Built by build(); the constructor only stores the tables.
        self._levels = levels
        self._leaf_item = leaf_item  # [N] int32/int64, catalogue row of leaf node i
        self.dense_levels = dense_levels  # levels stored as dense tables (min of the requested count and L)
        self.build_seconds = build_seconds  # wall time of build(), device-synchronised

    # ----------------------------------------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        codes: torch.Tensor,
        codebook_sizes: int | Sequence[int],
        dense_levels: int = 2,
        window_max_fanout: int = 32,
    ) -> PrefixIndex:
        """Index the catalogue ``codes`` [N, L] (row = item, column = level, codes[:, l] in [0, K_l)).

        ``codebook_sizes`` is K for every level or a list of L sizes. The first ``dense_levels`` levels become
        dense tables (values above L mean all levels). A CSR level whose max fan-out exceeds ``window_max_fanout``
        advances by binary search, otherwise by a window compare (same results; a speed knob). Raises ValueError
        for an empty catalogue, L < 1, non-integer codes, negative or out-of-range codes, and duplicate IDs
        (naming the rows).
        """
        start = time.perf_counter()
        sizes = _validate_codes(codes, codebook_sizes)
        if isinstance(dense_levels, bool) or not isinstance(dense_levels, int) or dense_levels < 0:
            raise ValueError(f"dense_levels must be an int >= 0, got {dense_levels!r}")
        if isinstance(window_max_fanout, bool) or not isinstance(window_max_fanout, int) or window_max_fanout < 0:
            raise ValueError(f"window_max_fanout must be an int >= 0, got {window_max_fanout!r}")
        codes = codes.long()
        num_items, num_levels = codes.shape
        order = _lexicographic_order(codes, sizes)  # [N] catalogue row of the i-th smallest ID
        sorted_codes = codes[order]  # [N, L]
        del codes

        levels = []
        parent = torch.zeros(num_items, dtype=torch.long, device=sorted_codes.device)  # [N] node of row at level l
        opens = torch.zeros(num_items, dtype=torch.bool, device=sorted_codes.device)  # [N] row opens a new prefix
        opens[0] = True
        for level in range(num_levels):
            # A sorted row opens a new length-(l+1) prefix iff it differs from the previous row in codes 0..l.
            opens[1:] |= sorted_codes[1:, level] != sorted_codes[:-1, level]
            first_rows = opens.nonzero().squeeze(1)  # [E] one row per child node, in child-id order
            edge_parent = parent[first_rows]  # [E] non-decreasing
            edge_code = sorted_codes[first_rows, level]  # [E] ascending within each parent
            num_parents = 1 if level == 0 else levels[-1].num_children_total
            layout = "dense" if level < dense_levels else "csr"
            levels.append(_build_level(edge_parent, edge_code, num_parents, sizes[level], layout, window_max_fanout))
            parent = opens.cumsum(0) - 1  # [N] node id of each row at level l + 1
        if int(opens.sum()) != num_items:
            _raise_duplicates(opens, order, sorted_codes)
        leaf_item = order.to(_index_dtype(num_items - 1))  # leaf node i = sorted row i (IDs are unique)
        if leaf_item.device.type == "cuda":
            torch.cuda.synchronize(leaf_item.device)
        return cls(levels, leaf_item, min(dense_levels, num_levels), time.perf_counter() - start)

    def to(self, device: torch.device | str) -> PrefixIndex:
        """A copy of the index with every table on ``device``."""
        levels = [level.to(device) for level in self._levels]
        return PrefixIndex(levels, self._leaf_item.to(device), self.dense_levels, self.build_seconds)

    # ------------------------------------------------------------------------------------------ lookups

    def root(self, batch_size: int) -> torch.Tensor:
        """[batch_size] int64 root nodes (the empty prefix), on the index's device."""
        return torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def allowed_codes(self, level: int, node: torch.Tensor) -> torch.Tensor:
        """[B, K_level] bool: codes that may follow each prefix ``node`` [B] at ``level``; all False for -1."""
        lvl = self._level(level)
        node = _check_batch("node", node)
        valid, safe = _clamp_nodes(node, lvl.num_nodes)  # [B], [B]
        if lvl.dense:
            return lvl.mask.index_select(0, torch.where(valid, safe, lvl.num_nodes))  # [B, K], sentinel row
        codes, in_window, _ = _csr_window(lvl, safe, valid)  # [B, F], [B, F]
        # Slots past a node's children write into a spare column K, which is dropped: a fixed-shape scatter.
        target = codes.long().masked_fill_(~in_window, lvl.codebook_size)  # [B, F]
        mask = torch.zeros(node.shape[0], lvl.codebook_size + 1, dtype=torch.bool, device=node.device)
        mask.scatter_(1, target, True)
        return mask[:, : lvl.codebook_size].contiguous()  # [B, K]

    def advance(self, level: int, node: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """[B] int64 node at ``level + 1`` reached by appending ``code`` [B] to ``node`` [B]; -1 if no item has
        that prefix, if ``node`` is -1, or if ``code`` is outside [0, K_level)."""
        lvl = self._level(level)
        node = _check_batch("node", node)
        code = _check_batch("code", code)
        if code.shape != node.shape:
            raise ValueError(f"code shape {tuple(code.shape)} must equal node shape {tuple(node.shape)}")
        valid, safe = _clamp_nodes(node, lvl.num_nodes)  # [B]
        code = code.long()
        valid = valid & (code >= 0) & (code < lvl.codebook_size)
        safe_code = code.clamp(0, lvl.codebook_size - 1)  # [B]
        if lvl.dense:
            flat = safe * lvl.codebook_size + safe_code  # [B] into the [num_nodes + 1, K] table
            return torch.where(valid, lvl.child.view(-1)[flat].long(), INVALID)  # table holds -1 for non-children
        if lvl.binary_search:
            child, hit = _csr_binary_search(lvl, safe, valid, safe_code)  # [B], [B]
            return torch.where(valid & hit, child, INVALID)
        codes, in_window, first = _csr_window(lvl, safe, valid)  # [B, F]
        # Children are sorted, so the rank of the code among them is the number of smaller children.
        hit = (in_window & (codes == safe_code[:, None])).any(1)  # [B]
        rank = (in_window & (codes < safe_code[:, None])).sum(1)  # [B]
        return torch.where(valid & hit, first + rank, INVALID)

    def item_of(self, node: torch.Tensor) -> torch.Tensor:
        """[B] int64 catalogue row of each full-ID node at level L (``node`` [B]); -1 for invalid nodes."""
        node = _check_batch("node", node)
        valid, safe = _clamp_nodes(node, self.num_items)
        return torch.where(valid, self._leaf_item[safe].long(), INVALID)

    def nodes_of_prefix(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """[B] int64 node at level l of each partial ID in ``prefix_codes`` [B, l] (0 <= l <= L); -1 if no item
        starts with it. Vectorised over rows; loops only over the l levels."""
        if not isinstance(prefix_codes, torch.Tensor) or prefix_codes.dim() != 2:
            raise ValueError(f"prefix_codes must be a 2-D tensor [B, l], got {_describe(prefix_codes)}")
        if prefix_codes.shape[1] > self.num_levels:
            raise ValueError(f"prefix_codes has {prefix_codes.shape[1]} levels, the index has L={self.num_levels}")
        node = self.root(prefix_codes.shape[0])  # [B]
        for level in range(prefix_codes.shape[1]):
            node = self.advance(level, node, prefix_codes[:, level])
        return node

    # ---------------------------------------------------------------------------------------- statistics

    @property
    def num_levels(self) -> int:
        return len(self._levels)

    @property
    def num_items(self) -> int:
        return self._leaf_item.shape[0]

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(level.codebook_size for level in self._levels)

    @property
    def device(self) -> torch.device:
        return self._leaf_item.device

    def num_nodes(self, level: int) -> int:
        """Distinct prefixes of length ``level`` (0..L): 1 at the root, N at level L."""
        if level == self.num_levels:
            return self.num_items
        return self._level(level).num_nodes

    def num_children(self, level: int) -> torch.Tensor:
        """[num_nodes(level)] int64 number of codes that may follow each node at ``level`` (0..L-1)."""
        lvl = self._level(level)
        if lvl.dense:
            return lvl.mask[:-1].sum(1)  # without the sentinel row
        return lvl.offsets.diff().long()

    def max_fanout(self, level: int) -> int:
        """Most children of any node at ``level`` (0..L-1): the CSR window width."""
        return self._level(level).max_fanout

    def nbytes(self) -> int:
        """Bytes held by the index's tensors (the tables only, not Python objects)."""
        tensors = [t for level in self._levels for t in level.tensors().values()] + [self._leaf_item]
        return sum(t.numel() * t.element_size() for t in tensors)

    def stats(self) -> dict:
        """Sizes for logs and benchmarks (plain Python values)."""
        return {
            "num_items": self.num_items,
            "num_levels": self.num_levels,
            "codebook_sizes": list(self.codebook_sizes),
            "dense_levels": self.dense_levels,
            "num_nodes": [self.num_nodes(level) for level in range(self.num_levels + 1)],
            "max_fanout": [self.max_fanout(level) for level in range(self.num_levels)],
            "layout": [_layout_name(level) for level in self._levels],
            "nbytes": self.nbytes(),
            "build_seconds": self.build_seconds,
        }

    def __repr__(self) -> str:
        return (
            f"PrefixIndex(num_items={self.num_items}, codebook_sizes={list(self.codebook_sizes)}, "
            f"dense_levels={self.dense_levels}, nbytes={self.nbytes()}, device={self.device})"
        )

    def _level(self, level: int) -> _Level:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level must be an int in [0, {self.num_levels}), got {level!r}")
        return self._levels[level]


# ------------------------------------------------------------------------------------------------ helpers


def _validate_codes(codes: torch.Tensor, codebook_sizes: int | Sequence[int]) -> list[int]:
    """Check the catalogue and return the L codebook sizes; raise ValueError naming what is wrong."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D integer tensor [N items, L levels], got {_describe(codes)}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    num_items, num_levels = codes.shape
    if num_levels < 1:
        raise ValueError(f"codes must have at least one level (L >= 1), got shape {tuple(codes.shape)}")
    if num_items < 1:
        raise ValueError(f"codes is an empty catalogue (N = 0 items), shape {tuple(codes.shape)}")
    if isinstance(codebook_sizes, int) and not isinstance(codebook_sizes, bool):
        sizes = [codebook_sizes] * num_levels
    elif isinstance(codebook_sizes, Sequence) and not isinstance(codebook_sizes, str):
        sizes = list(codebook_sizes)
    else:
        raise ValueError(f"codebook_sizes must be an int or a list of L={num_levels} ints, got {codebook_sizes!r}")
    if len(sizes) != num_levels:
        raise ValueError(f"codebook_sizes has {len(sizes)} entries, codes has L={num_levels} levels")
    for level, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"codebook_sizes[{level}] must be an int >= 1, got {size!r}")
    sizes_t = torch.tensor(sizes, device=codes.device)  # [L]
    bad = (codes < 0) | (codes >= sizes_t)  # [N, L]
    if bool(bad.any()):
        rows, cols = bad.nonzero()[:_MAX_ERROR_ROWS].T.tolist()
        found = ", ".join(f"row {r} level {c} = {int(codes[r, c])} (K={sizes[c]})" for r, c in zip(rows, cols))
        raise ValueError(f"codes must lie in [0, K_level) and be non-negative; {int(bad.sum())} bad: {found}")
    return sizes


def _lexicographic_order(codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """[N] permutation sorting the rows of ``codes`` [N, L] lexicographically (stable: ties keep row order)."""
    if math.prod(sizes) - 1 <= _INT64_MAX:
        key = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)  # [N] mixed-radix ID
        for level, size in enumerate(sizes):
            key = key * size + codes[:, level]
        return torch.sort(key, stable=True).indices
    # The packed key would overflow int64: radix-sort the columns from the last level to the first.
    order = torch.arange(codes.shape[0], device=codes.device)
    for level in reversed(range(len(sizes))):
        order = order[torch.sort(codes[order, level], stable=True).indices]
    return order


def _build_level(
    edge_parent: torch.Tensor,
    edge_code: torch.Tensor,
    num_parents: int,
    codebook_size: int,
    layout: str,
    window_max_fanout: int,
) -> _Level:
    """Tables for one level ("dense" or "csr") from its edges (child id = edge index), sorted by (parent, code)."""
    num_edges = edge_parent.shape[0]
    num_children = torch.bincount(edge_parent, minlength=num_parents)  # [num_parents]
    max_fanout = int(num_children.max())
    shape = dict(codebook_size=codebook_size, num_nodes=num_parents, num_children_total=num_edges)
    shape["max_fanout"] = max_fanout
    if layout == "dense":  # one more row than nodes: the all-invalid sentinel row for node -1
        mask = torch.zeros(num_parents + 1, codebook_size, dtype=torch.bool, device=edge_parent.device)
        mask[edge_parent, edge_code] = True
        id_dtype = _index_dtype(num_edges - 1)
        child = torch.full((num_parents + 1, codebook_size), INVALID, dtype=id_dtype, device=edge_parent.device)
        child[edge_parent, edge_code] = torch.arange(num_edges, dtype=id_dtype, device=edge_parent.device)
        return _Level(**shape, mask=mask, child=child)
    offsets = torch.zeros(num_parents + 1, dtype=_index_dtype(num_edges), device=edge_parent.device)
    offsets[1:] = num_children.cumsum(0)
    child_codes = torch.zeros(num_edges + max_fanout, dtype=_code_dtype(codebook_size), device=edge_parent.device)
    child_codes[:num_edges] = edge_code
    return _Level(
        **shape, offsets=offsets, child_codes=child_codes, binary_search=max_fanout > window_max_fanout
    )


def _csr_window(lvl: _Level, safe: torch.Tensor, valid: torch.Tensor):
    """The children of each node as a fixed-width row (STATIC's padded gather, Sec. 3.3).

    Returns codes [B, F] in the table's dtype (F = max_fanout; slots past the node's children hold junk),
    in_window [B, F] (slot holds a real child; all False for invalid nodes) and first [B] int64 (first child id).
    """
    first = lvl.offsets[safe].long()  # [B]
    count = torch.where(valid, lvl.offsets[safe + 1].long() - first, 0)  # [B]
    slot = torch.arange(lvl.max_fanout, device=safe.device)  # [F]
    in_window = slot[None, :] < count[:, None]  # [B, F]
    return lvl.child_codes[first[:, None] + slot[None, :]], in_window, first  # padding keeps reads in bounds


def _csr_binary_search(lvl: _Level, safe: torch.Tensor, valid: torch.Tensor, code: torch.Tensor):
    """Lower bound of ``code`` [B] among each node's sorted children, in ceil(log2(F + 1)) fixed steps.

    Returns child [B] int64 (the position found, a child id when hit) and hit [B] bool (the code is a child).
    Invalid nodes get the empty range [first, first). Every step runs on all rows: no data-dependent exit.
    """
    lo = lvl.offsets[safe].long()  # [B] search range [lo, hi)
    end = torch.where(valid, lvl.offsets[safe + 1].long(), lo)  # [B]
    hi = end
    for _ in range(math.ceil(math.log2(lvl.max_fanout + 1))):
        mid = (lo + hi) >> 1  # [B], == lo once the range is empty (then nothing moves)
        right = (lvl.child_codes[mid] < code) & (mid < hi)  # [B] answer lies above mid
        lo = torch.where(right, mid + 1, lo)
        hi = torch.where(right, hi, mid)
    hit = (lo < end) & (lvl.child_codes[lo] == code)  # lo <= num_children_total: padding keeps it in bounds
    return lo, hit


def _layout_name(level: _Level) -> str:
    if level.dense:
        return "dense"
    return "csr+binary_search" if level.binary_search else "csr+window"


def _clamp_nodes(node: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """valid [B] (0 <= node < num_nodes) and safe [B] int64 (node where valid, else 0: always a legal index)."""
    node = node.long()
    valid = (node >= 0) & (node < num_nodes)
    return valid, torch.where(valid, node, 0)


def _check_batch(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Shape/dtype check without touching values (no host sync)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor [B], got {_describe(tensor)}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must have an integer dtype, got {tensor.dtype}")
    return tensor


def _raise_duplicates(opens: torch.Tensor, order: torch.Tensor, sorted_codes: torch.Tensor) -> None:
    """Name the catalogue rows whose full IDs repeat an earlier one (in sorted order), then raise."""
    repeats = (~opens).nonzero().squeeze(1)  # [D] sorted rows equal to the row before them
    pairs = []
    for i in repeats[:_MAX_ERROR_ROWS].tolist():
        rows = sorted([int(order[i - 1]), int(order[i])])
        pairs.append(f"rows {rows[0]} and {rows[1]} share ID {tuple(sorted_codes[i].tolist())}")
    raise ValueError(f"codes must be unique per item; {repeats.numel()} duplicate rows: " + "; ".join(pairs))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
