"""Extend any Hugging Face causal LM's vocabulary with itemic tokens (OneRec-Think, arXiv:2510.11639, Sec. 3.1).

``extend_vocabulary`` adds ``<|item_begin|>``, ``<|item_end|>`` and the L x K code tokens as special tokens (the BPE
never splits them), grows the embedding matrices to a multiple of 64 rows, and initialises the new rows:

  * ``"mean"``: the mean of the existing token rows plus N(0, noise_std^2) noise, the usual recipe for new tokens
    (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models");
  * ``"semantic"``: code c of level l starts at the mean, over the items whose ID has code c at level l, of the
    item's title embedding (the mean of the LM's own rows for the title's tokens), so that the new tokens start near
    the words they stand for (the itemic-textual alignment that OneRec-Think's token warm-up then trains).
    Codes no item uses, and the boundary tokens, fall back to mean + noise.

Rows of tokens that existed before are never written (bit-identical afterwards). Untied output embeddings are
initialised the same way from the output matrix; tied ones stay one tensor.

Run it before wrapping the model for distributed training (DeepSpeed ZeRO-3 shards the matrices).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from onerec_dist.data.types import Catalogue
from onerec_dist.sid.tokens import (
    BEGIN_TOKEN,
    CODE_TOKEN_RE,
    END_TOKEN,
    ItemTokenizer,
    ItemTokenSpec,
    all_item_tokens,
)

INIT_METHODS = ("mean", "semantic")
_GATHER_CHUNK = 1 << 16  # title tokens gathered per step: bounds the [chunk, d] float32 temporary


def extend_vocabulary(
    model,
    tokenizer,
    spec: ItemTokenSpec,
    init: Literal["mean", "semantic"] = "mean",
    catalogue: Catalogue | None = None,
    semantic_ids: np.ndarray | torch.Tensor | None = None,
    noise_std: float = 0.02,
    pad_to_multiple_of: int = 64,
    seed: int = 0,
) -> ItemTokenizer:
    """Add the spec's item tokens to ``tokenizer`` and ``model`` (both modified in place); return their
    ItemTokenizer.

    ``semantic_ids`` [N, L] defaults to ``catalogue.semantic_ids``; ``"semantic"`` init needs both the IDs and the
    catalogue's titles. The IDs, when known, must fit the spec (L levels, codes < K_l).
    """
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
    sids = _resolve_semantic_ids(spec, catalogue, semantic_ids)  # [N, L] or None
    if init == "semantic" and (catalogue is None or sids is None):
        raise ValueError(
            "init='semantic' needs a catalogue with titles and semantic IDs (catalogue.semantic_ids or semantic_ids=)"
        )
    _check_no_item_tokens(tokenizer)

    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    old_rows = input_emb.weight.shape[0]
    old_len = len(tokenizer)  # rows [0, old_len) are real tokens; the mean is taken over them
    if old_len > old_rows:
        raise ValueError(f"the tokenizer has {old_len} tokens but the model's input embeddings only {old_rows} rows")
    tied = output_emb is None or output_emb.weight is input_emb.weight

    # Title token ids use the vocabulary as it is now, before the item tokens exist.
    titles = _title_token_ids(tokenizer, catalogue, sids) if init == "semantic" else None

    tokenizer.add_special_tokens({"extra_special_tokens": all_item_tokens(spec)}, replace_extra_special_tokens=False)
    item_tokenizer = ItemTokenizer(tokenizer, spec)  # raises unless every level's ids are contiguous

    # Never shrink: checkpoints such as Qwen3 already carry spare rows beyond len(tokenizer).
    new_rows = math.ceil(max(len(tokenizer), old_rows) / pad_to_multiple_of) * pad_to_multiple_of
    if new_rows != old_rows:
        model.resize_token_embeddings(new_rows, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    if tied and output_emb is not None and output_emb.weight is not input_emb.weight:
        raise RuntimeError("resize_token_embeddings untied the input and output embeddings")

    # Rows to write: every item token, plus rows added by the resize that no token uses (padding).
    item_rows = item_tokenizer.item_token_ids()
    padding = torch.arange(old_rows, new_rows)
    padding = padding[~torch.isin(padding, item_rows)]
    generator = torch.Generator().manual_seed(seed)
    matrices = [input_emb.weight] if tied else [input_emb.weight, output_emb.weight]
    for weight in matrices:
        _init_new_rows(weight, old_len, item_tokenizer, item_rows, padding, titles, sids, noise_std, generator)
    return item_tokenizer


def new_token_row_ids(item_tokenizer: ItemTokenizer) -> torch.Tensor:
    """Embedding rows of the item tokens (begin, end, all codes), ascending: the rows token warm-up trains. [R]"""
    return item_tokenizer.item_token_ids()


def _resolve_semantic_ids(
    spec: ItemTokenSpec, catalogue: Catalogue | None, semantic_ids: np.ndarray | torch.Tensor | None
) -> torch.Tensor | None:
    """The IDs to use ([N, L] long) checked against the spec and the catalogue, or None when none are known."""
    if semantic_ids is None and catalogue is not None:
        semantic_ids = catalogue.semantic_ids
    if semantic_ids is None:
        return None
    sids = torch.as_tensor(np.asarray(semantic_ids) if not isinstance(semantic_ids, torch.Tensor) else semantic_ids)
    if sids.dim() != 2 or sids.shape[1] != spec.num_levels:
        raise ValueError(f"semantic_ids must have shape [N, num_levels={spec.num_levels}], got {tuple(sids.shape)}")
    if sids.dtype.is_floating_point or sids.dtype == torch.bool:
        raise ValueError(f"semantic_ids must be integers, got {sids.dtype}")
    sids = sids.long().cpu()
    if catalogue is not None and sids.shape[0] != len(catalogue):
        raise ValueError(f"semantic_ids has {sids.shape[0]} rows but the catalogue {len(catalogue)} items")
    if sids.numel() and int(sids.min()) < 0:
        raise ValueError(f"semantic_ids has negative codes (min {int(sids.min())})")
    for level, size in enumerate(spec.codebook_sizes):
        top = int(sids[:, level].max()) if sids.shape[0] else -1
        if top >= size:
            raise ValueError(
                f"the spec's codebook_size does not cover the semantic IDs: level {level} has code {top} but "
                f"codebook size {size} (codes must be < {size})"
            )
    return sids


def _check_no_item_tokens(tokenizer) -> None:
    """ValueError if the vocabulary already has item tokens (a second extension would break contiguity)."""
    vocab = tokenizer.get_vocab()
    conflicts = [t for t in vocab if t in (BEGIN_TOKEN, END_TOKEN) or CODE_TOKEN_RE.fullmatch(t)]
    if conflicts:
        raise ValueError(
            f"the tokenizer already contains {len(conflicts)} item tokens (e.g. {sorted(conflicts)[:3]}); it was "
            "extended before: wrap it with ItemTokenizer(tokenizer, spec) or ItemTokenizer.from_tokenizer(tokenizer)"
        )


def _title_token_ids(tokenizer, catalogue: Catalogue, sids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened title token ids and, for each, its item index: ([T], [T]). Items without a title have none."""
    encoded = tokenizer(list(catalogue.titles), add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)  # [N]
    if int(lengths.sum()) == 0:
        raise ValueError("init='semantic' needs item titles, but every catalogue title is empty")
    token_ids = torch.tensor([t for ids in encoded for t in ids], dtype=torch.long)  # [T]
    item_of_token = torch.repeat_interleave(torch.arange(len(encoded)), lengths)  # [T]
    return token_ids, item_of_token


def _title_embeddings(weight: torch.Tensor, titles: tuple[torch.Tensor, torch.Tensor], num_items: int):
    """Mean embedding row of each item's title tokens: ([N, d] float32, has_title [N] bool)."""
    token_ids, item_of_token = titles
    device = weight.device
    sums = torch.zeros(num_items, weight.shape[1], dtype=torch.float32, device=device)  # [N, d]
    for start in range(0, token_ids.numel(), _GATHER_CHUNK):
        ids = token_ids[start : start + _GATHER_CHUNK].to(device)
        sums.index_add_(0, item_of_token[start : start + _GATHER_CHUNK].to(device), weight[ids].float())
    counts = torch.bincount(item_of_token, minlength=num_items).to(device)  # [N]
    has_title = counts > 0
    return sums / counts.clamp(min=1).unsqueeze(1), has_title


@torch.no_grad()
def _init_new_rows(
    weight: torch.Tensor,
    old_len: int,
    item_tokenizer: ItemTokenizer,
    item_rows: torch.Tensor,
    padding: torch.Tensor,
    titles: tuple[torch.Tensor, torch.Tensor] | None,
    sids: torch.Tensor | None,
    noise_std: float,
    generator: torch.Generator,
) -> None:
    """Write mean + noise into the item and padding rows, then (semantic) the title means into used code rows."""
    mean = weight[:old_len].float().mean(0)  # [d]
    rows = torch.cat([item_rows, padding])  # [R]
    noise = torch.randn(rows.numel(), weight.shape[1], generator=generator) * noise_std  # [R, d]
    weight[rows.to(weight.device)] = (mean + noise.to(weight.device)).to(weight.dtype)
    if titles is None:
        return
    title_emb, has_title = _title_embeddings(weight, titles, sids.shape[0])  # [N, d], [N]
    sids = sids.to(weight.device)[has_title]  # [N', L]
    title_emb = title_emb[has_title]  # [N', d]
    for level, size in enumerate(item_tokenizer.codebook_sizes):
        code_sums = torch.zeros(size, weight.shape[1], dtype=torch.float32, device=weight.device)  # [K, d]
        code_sums.index_add_(0, sids[:, level], title_emb)
        counts = torch.bincount(sids[:, level], minlength=size)  # [K]
        used = counts > 0
        start, _ = item_tokenizer.code_slice(level)
        code_rows = start + used.nonzero().squeeze(1)
        weight[code_rows] = (code_sums[used] / counts[used].unsqueeze(1)).to(weight.dtype)
