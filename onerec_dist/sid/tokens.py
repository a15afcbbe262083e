"""Itemic tokens: the text and token-id forms of a semantic ID (OneRec-Think, arXiv:2510.11639, Sec. 3.1).

An item whose semantic ID is the L codes (12, 7, 201, 3) is written, in text and in the LLM vocabulary, as

    <|item_begin|><item_a_12><item_b_7><item_c_201><item_d_3><|item_end|>

one token per level (level letters a, b, c, ... so at most 26 levels) between two boundary tokens. Every level has
its own K_l code tokens, so the same code at two levels is two different tokens.

Token-id layout (the contract the vocabulary extension guarantees and ``ItemTokenizer`` checks): the K_l code tokens
of level l have contiguous ids, code c of level l has id ``level_offset[l] + c``. Mapping codes to ids is then one
add, and constrained decoding at level l needs only the output-layer slice ``code_slice(l)`` (K_l rows), not the
whole vocabulary.

This module imports only torch; the Hugging Face tokenizer is used through ``convert_tokens_to_ids`` /
``convert_ids_to_tokens`` / ``get_added_vocab``, so any HF tokenizer (slow or fast) works.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BEGIN_TOKEN = "<|item_begin|>"
END_TOKEN = "<|item_end|>"
LEVEL_LETTERS = string.ascii_lowercase  # level l is written with letter LEVEL_LETTERS[l]
MAX_LEVELS = len(LEVEL_LETTERS)

# Canonical code token: no leading zeros, so every code has exactly one spelling.
_CODE = r"(?:0|[1-9][0-9]*)"
CODE_TOKEN_RE = re.compile(rf"<item_([a-z])_({_CODE})>")
_SID_TEXT_RE = re.compile(rf"{re.escape(BEGIN_TOKEN)}((?:<item_[a-z]_{_CODE}>)+){re.escape(END_TOKEN)}")


@dataclass(frozen=True, eq=False)
class ItemTokenSpec:
    """How many levels an item ID has and how many codes each level may take.

    ``codebook_size`` is one K for every level or a list of L sizes (RQ codebooks may differ per level).
    """

    num_levels: int
    codebook_size: int | list[int]

    def __post_init__(self) -> None:
        if not isinstance(self.num_levels, int) or not 1 <= self.num_levels <= MAX_LEVELS:
            raise ValueError(f"ItemTokenSpec.num_levels must be an int in [1, {MAX_LEVELS}], got {self.num_levels!r}")
        sizes = self.codebook_size
        if isinstance(sizes, int):
            sizes = [sizes] * self.num_levels
        sizes = list(sizes)
        if len(sizes) != self.num_levels:
            raise ValueError(
                f"ItemTokenSpec.codebook_size has {len(sizes)} entries, expected num_levels={self.num_levels}"
            )
        if not all(isinstance(k, int) and k >= 1 for k in sizes):
            raise ValueError(f"ItemTokenSpec.codebook_size entries must be ints >= 1, got {sizes}")
        # Frozen dataclass: store the normalised per-level list once.
        object.__setattr__(self, "_sizes", tuple(sizes))

    def __eq__(self, other: object) -> bool:
        # ItemTokenSpec(4, 37) == ItemTokenSpec(4, [37] * 4): equal when the per-level sizes are.
        return isinstance(other, ItemTokenSpec) and self._sizes == other._sizes

    def __hash__(self) -> int:
        return hash(self._sizes)

    @property
    def codebook_sizes(self) -> list[int]:
        """K_l for every level l."""
        return list(self._sizes)

    @property
    def num_code_tokens(self) -> int:
        return sum(self._sizes)


def level_letter(level: int) -> str:
    if not 0 <= level < MAX_LEVELS:
        raise ValueError(f"level must be in [0, {MAX_LEVELS}), got {level}")
    return LEVEL_LETTERS[level]


def code_token(level: int, code: int) -> str:
    """``<item_a_12>`` for level 0, code 12."""
    if code < 0:
        raise ValueError(f"code must be >= 0, got {code} at level {level}")
    return f"<item_{level_letter(level)}_{code}>"


def all_item_tokens(spec: ItemTokenSpec) -> list[str]:
    """Begin, end, then every level's code tokens in code order: the order in which they are added to a vocabulary,
    which is what makes each level's ids contiguous."""
    tokens = [BEGIN_TOKEN, END_TOKEN]
    for level, size in enumerate(spec.codebook_sizes):
        tokens.extend(code_token(level, c) for c in range(size))
    return tokens


def sid_to_text(codes: Sequence[int] | torch.Tensor) -> str:
    """``[12, 7]`` -> ``"<|item_begin|><item_a_12><item_b_7><|item_end|>"``."""
    if isinstance(codes, torch.Tensor):
        codes = codes.tolist()
    codes = [int(c) for c in codes]
    if not 1 <= len(codes) <= MAX_LEVELS:
        raise ValueError(f"a semantic ID must have 1..{MAX_LEVELS} codes, got {len(codes)}")
    return BEGIN_TOKEN + "".join(code_token(level, c) for level, c in enumerate(codes)) + END_TOKEN


def text_to_sid(text: str, spec: ItemTokenSpec | None = None) -> list[int]:
    """Inverse of ``sid_to_text``. The text must be exactly one item (no spaces, levels a, b, c, ... in order);
    with ``spec`` the level count and code ranges are checked too. Raises ValueError otherwise."""
    match = _SID_TEXT_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not an item: {text!r}; expected {BEGIN_TOKEN}<item_a_N><item_b_N>...{END_TOKEN} with canonical codes"
        )
    codes = []
    for level, (letter, code) in enumerate(CODE_TOKEN_RE.findall(match.group(1))):
        if letter != LEVEL_LETTERS[level]:
            raise ValueError(f"not an item: {text!r}; code {level} has level letter {letter!r}, expected "
                             f"{LEVEL_LETTERS[level]!r}")
        codes.append(int(code))
    if spec is not None:
        if len(codes) != spec.num_levels:
            raise ValueError(f"item {text!r} has {len(codes)} levels, spec has {spec.num_levels}")
        for level, (code, size) in enumerate(zip(codes, spec.codebook_sizes)):
            if code >= size:
                raise ValueError(f"item {text!r}: code {code} at level {level} is outside [0, {size})")
    return codes


class ItemTokenizer:
    """Vectorised codes <-> token ids for one tokenizer whose vocabulary holds the spec's item tokens.

    Built by ``onerec_dist.sid.vocab.extend_vocabulary`` (which adds the tokens), or directly from a tokenizer that
    already has them (e.g. after ``from_pretrained``; see ``from_tokenizer``). Checks that every level's code ids are
    contiguous and raises ValueError if not.
    """

    def __init__(self, tokenizer, spec: ItemTokenSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        tokens = all_item_tokens(spec)
        ids = _lookup_ids(tokenizer, tokens)
        self.begin_id, self.end_id = ids[0], ids[1]
        offsets, start = [], 2
        for level, size in enumerate(spec.codebook_sizes):
            level_ids = ids[start : start + size]
            if level_ids != list(range(level_ids[0], level_ids[0] + size)):
                raise ValueError(
                    f"the {size} code tokens of level {level} ({code_token(level, 0)}..) do not have contiguous ids "
                    "in the tokenizer; add them with onerec_dist.sid.vocab.extend_vocabulary"
                )
            offsets.append(level_ids[0])
            start += size
        self.level_offset = torch.tensor(offsets, dtype=torch.long)  # [L]
        self.codebook_sizes_t = torch.tensor(spec.codebook_sizes, dtype=torch.long)  # [L]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ItemTokenizer":
        """Infer the spec from the item tokens a tokenizer already has (levels a.., codes 0..K_l-1)."""
        found: dict[int, set[int]] = {}
        for token in tokenizer.get_added_vocab():
            match = CODE_TOKEN_RE.fullmatch(token)
            if match:
                found.setdefault(LEVEL_LETTERS.index(match.group(1)), set()).add(int(match.group(2)))
        if not found:
            raise ValueError("the tokenizer has no item tokens (<item_a_0>, ...); run extend_vocabulary first")
        num_levels = max(found) + 1
        sizes = []
        for level in range(num_levels):
            codes = found.get(level, set())
            if codes != set(range(len(codes))) or not codes:
                raise ValueError(f"the tokenizer's level-{level} item tokens are not exactly codes 0..K-1")
            sizes.append(len(codes))
        return cls(tokenizer, ItemTokenSpec(num_levels, sizes))

    @property
    def num_levels(self) -> int:
        return self.spec.num_levels

    @property
    def codebook_sizes(self) -> list[int]:
        return self.spec.codebook_sizes

    def code_slice(self, level: int) -> tuple[int, int]:
        """[start, stop) of level ``level``'s code tokens in the vocabulary / output layer."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level}")
        start = int(self.level_offset[level])
        return start, start + self.spec.codebook_sizes[level]

    def item_token_ids(self) -> torch.Tensor:
        """All item-token ids (begin, end, every code token), ascending. [2 + sum K_l]"""
        ranges = [torch.arange(*self.code_slice(level)) for level in range(self.num_levels)]
        return torch.cat([torch.tensor([self.begin_id, self.end_id]), *ranges]).sort().values

    def encode(self, codes: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Codes [..., L] -> token ids [..., L]. ``validate`` checks code ranges (one host sync; off in hot loops)."""
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"codes must have last dim num_levels={self.num_levels}, got shape {tuple(codes.shape)}")
        codes = codes.long()
        if validate:
            bad = (codes < 0) | (codes >= self.codebook_sizes_t.to(codes.device))  # [..., L]
            if bool(bad.any()):
                row = bad.reshape(-1, self.num_levels).any(-1).nonzero()[0, 0].item()
                raise ValueError(
                    f"codes row {row} = {codes.reshape(-1, self.num_levels)[row].tolist()} is outside the codebook "
                    f"sizes {self.codebook_sizes}"
                )
        return codes + self.level_offset.to(codes.device)  # [..., L]

    def encode_with_boundaries(self, codes: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Codes [..., L] -> token ids [..., L + 2] with the begin and end tokens around each item."""
        ids = self.encode(codes, validate)  # [..., L]
        begin = ids.new_full((*ids.shape[:-1], 1), self.begin_id)
        end = ids.new_full((*ids.shape[:-1], 1), self.end_id)
        return torch.cat([begin, ids, end], dim=-1)

    def token_level(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Level of each code token, -1 for any other token (boundaries included). Same shape as the input."""
        level = torch.full_like(token_ids, -1, dtype=torch.long)
        for lv in range(self.num_levels):  # L <= 26 range compares, no lookup table of vocabulary size
            start, stop = self.code_slice(lv)
            level = torch.where((token_ids >= start) & (token_ids < stop), lv, level)
        return level

    def token_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Code of each code token (whatever its level), -1 for any other token. Same shape as the input."""
        level = self.token_level(token_ids)
        offset = self.level_offset.to(token_ids.device)[level.clamp(min=0)]
        return torch.where(level >= 0, token_ids.long() - offset, -1)

    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [..., L] -> codes [..., L]; -1 wherever column l is not a level-l code token."""
        if token_ids.shape[-1] != self.num_levels:
            raise ValueError(
                f"token_ids must have last dim num_levels={self.num_levels}, got shape {tuple(token_ids.shape)}"
            )
        expected = torch.arange(self.num_levels, device=token_ids.device)  # [L]
        return torch.where(self.token_level(token_ids) == expected, self.token_code(token_ids), -1)

    def __repr__(self) -> str:
        return (f"ItemTokenizer(num_levels={self.num_levels}, codebook_sizes={self.codebook_sizes}, "
                f"begin_id={self.begin_id}, end_id={self.end_id}, level_offset={self.level_offset.tolist()})")


def _lookup_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of ``tokens``; ValueError naming the missing ones (HF maps unknown tokens to unk or None)."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    back = tokenizer.convert_ids_to_tokens([i if i is not None else 0 for i in ids])
    missing = [t for t, i, b in zip(tokens, ids, back) if i is None or b != t]
    if missing:
        raise ValueError(
            f"the tokenizer lacks {len(missing)} item tokens (first: {missing[:3]}); "
            "add them with onerec_dist.sid.vocab.extend_vocabulary"
        )
    return [int(i) for i in ids]
