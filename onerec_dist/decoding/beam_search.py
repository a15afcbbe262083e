"""Constrained beam search over item IDs (OneRec-Think, arXiv:2510.11639, Sec. 3.4 / 4: top-K by beam search over
itemic tokens; the same search scores GRPO rollouts and serves Think-Ahead completions).

Given B prefixes (prompts, or prompts + rationales) of different lengths, and optionally a partial ID to start from,
decode exactly the remaining ID levels with beam width W and return per prefix the top-K items (K <= W), their codes,
their ID tokens, and total and per-level log-probs. Every returned item is a catalogue item by construction: at each
level only codes the prefix index allows can be chosen, so validity is 100 %.

Why it is fast (each choice is measured by benchmarks/bench_constrained_decoding.py):
  * each prefix is prefilled once; its KV cache is expanded to the W beams afterwards (no re-encoding per beam);
  * logits are computed only over the current level's code slice of the output layer (``ItemTokenizer.code_slice``)
    when scores are normalised over valid codes; full-vocabulary normalisation needs the full row's log-sum-exp;
  * one fused step per level (prefix-index mask + log-softmax + per-row top-k: ``onerec_kernels.constrained_step``,
    Triton on CUDA) and a small top-k across beams; no Python loop over rows, no host sync inside the loop.

Score normalisation (``normalization``):
  * ``"full"`` — step log-prob = log_softmax over the FULL vocabulary, masked to valid codes. The semantics of the
    public code (HF ``generate(num_beams, prefix_allowed_tokens_fn)``), and what a model trained with plain token
    cross-entropy over the full vocabulary optimises, so training and decoding agree. Returned log-probs are the true
    model probabilities of the IDs.
  * ``"valid"`` — log_softmax over the codes valid at that step only (probability renormalised over the prefix-index
    children). Cheaper (no full-vocabulary matmul) and ranks differently: a prefix whose children share little mass is
    not penalised. Training consequence: to make training and decoding agree, train with the same restricted softmax
    (a constrained cross-entropy over valid codes); with plain cross-entropy, mass the model puts on non-item tokens
    is ignored at decode time.

Exclusion (``exclude``, e.g. the user's history): an excluded item is never returned. It is enforced at every level
by counting, per prefix node, the catalogue items below it minus the excluded ones; a prefix whose items are all
excluded is masked, so beams never walk into a dead end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenizer
from onerec_kernels.constrained_step import constrained_step, select_beams

NORMALIZATIONS = ("full", "valid")


@dataclass
class DecodeResult:
    items: torch.Tensor  # [B, K] catalogue rows, best first
    codes: torch.Tensor  # [B, K, L] full semantic IDs (start codes included)
    token_ids: torch.Tensor  # [B, K, L] their ID tokens
    scores: torch.Tensor  # [B, K] total log-prob of the decoded levels
    level_logprobs: torch.Tensor  # [B, K, L - l0] per-level step log-probs


class ConstrainedDecoder:
    """Beam search restricted to catalogue items. ``model`` is any HF causal LM whose vocabulary holds the item
    tokens of ``item_tokenizer``; ``index`` is the prefix index over the catalogue's semantic IDs."""

    def __init__(self, model, item_tokenizer: ItemTokenizer, index: PrefixIndex, beam_width: int, top_k: int,
                 normalization: str = "full", step_impl: str = "auto", pad_token_id: int = 0,
                 item_codes: torch.Tensor | None = None):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}; allowed values: {', '.join(NORMALIZATIONS)}")
        if not 1 <= beam_width <= index.num_items:
            raise ValueError(f"beam_width={beam_width} must be in [1, number of catalogue items={index.num_items}]")
        if not 1 <= top_k <= beam_width:
            raise ValueError(f"top_k={top_k} must be in [1, beam_width={beam_width}]")
        if list(index.codebook_sizes) != list(item_tokenizer.codebook_sizes):
            raise ValueError(f"prefix index codebook sizes {list(index.codebook_sizes)} differ from the item "
                             f"tokenizer's {item_tokenizer.codebook_sizes}")
        vocab = model.get_output_embeddings().weight.shape[0]
        highest = int(item_tokenizer.item_token_ids().max())
        if highest >= vocab:
            raise ValueError(f"the model's vocabulary ({vocab} rows) lacks the item tokens (ids up to {highest}); "
                             "extend it with onerec_dist.sid.vocab.extend_vocabulary")
        device = model.get_output_embeddings().weight.device
        self.model, self.item_tokenizer, self.index = model, item_tokenizer, index.to(device)
        # [N, L] codes of every catalogue row; needed only for ``exclude``.
        self.item_codes = None if item_codes is None else torch.as_tensor(item_codes, dtype=torch.long).to(device)
        self.beam_width, self.top_k, self.normalization = beam_width, top_k, normalization
        self.step_impl, self.pad_token_id = step_impl, pad_token_id
        self._item_nodes = None  # [N, L+1] node of every item at every level, built on first exclusion

    # ------------------------------------------------------------------------------------------ model calls

    def _body(self):
        return self.model.get_decoder()

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self._body()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1], out.past_key_values  # [R, H], cache

    def _level_logits(self, hidden: torch.Tensor, level: int):
        """Code logits [R, K_l] of ``level`` and, for full normalisation, the full-vocabulary lse [R]."""
        weight = self.model.get_output_embeddings().weight  # [V, H]
        start, stop = self.item_tokenizer.code_slice(level)
        if self.normalization == "full":
            full = F.linear(hidden, weight).float()  # [R, V]
            return full[:, start:stop], torch.logsumexp(full, dim=-1)
        return F.linear(hidden, weight[start:stop]).float(), None  # [R, K_l]

    # ------------------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], start_codes: torch.Tensor | None = None,
               exclude: list[list[int]] | None = None) -> DecodeResult:
        """Top-K items per prompt. ``start_codes`` [B, l0] starts from a partial ID (Think-Ahead); ``exclude``
        lists catalogue rows per prompt that must not be returned."""
        num_prompts, width = len(prompts), self.beam_width
        device = self.model.get_output_embeddings().weight.device
        start_codes = self._check_inputs(prompts, start_codes, exclude, device)
        first_level = start_codes.shape[1]
        node = self.index.nodes_of_prefix(start_codes) if first_level else self.index.root(num_prompts)
        if first_level and bool((node < 0).any()):  # one host sync, before the loop
            bad = int((node < 0).nonzero()[0, 0])
            raise ValueError(f"start_codes row {bad} = {start_codes[bad].tolist()} is the start of no catalogue item")
        available = self._exclusion(exclude, num_prompts, device) if exclude is not None else None

        ids, mask, pos = self._left_pad(prompts, start_codes, device)  # [B, T]
        hidden, cache = self._forward(ids, mask, pos, None)  # [B, H]
        beam_scores = torch.zeros(num_prompts, device=device)  # [B] one live beam per prompt before level l0
        codes_so_far = start_codes.new_empty(num_prompts, 0)  # [R, l]
        step_logprobs = torch.zeros(num_prompts, 0, device=device)  # [R, l]
        for level in range(first_level, self.index.num_levels):
            rows = node.shape[0]  # B on the first decoded level, B*W after
            logits, norm_lse = self._level_logits(hidden, level)
            allowed = self.index.allowed_codes(level, node)  # [R, K_l]
            if available is not None:
                allowed &= available(level, node, rows // num_prompts)
            k = min(width, logits.shape[1])
            step = constrained_step(logits, allowed, beam_scores, k, norm_lse, impl=self.step_impl)
            beams_in = rows // num_prompts
            cand_scores = step.topk_scores.view(num_prompts, beams_in, k)  # [B, beams_in, k]
            cand_codes = step.topk_codes.view(num_prompts, beams_in, k)
            short = -(-width // beams_in) - k  # fewer candidates than beams (narrow first level): pad dead ones
            if short > 0:
                cand_scores = F.pad(cand_scores, (0, short), value=float("-inf"))
                cand_codes = F.pad(cand_codes, (0, short), value=-1)
            scores, parent, codes = select_beams(cand_scores, cand_codes, width)  # [B, W] each
            src = (parent + torch.arange(num_prompts, device=device)[:, None] * beams_in).view(-1)  # [B*W]
            node = self.index.advance(level, node[src], codes.view(-1))  # [B*W]
            new_scores = scores.view(-1)  # [B*W]
            gained = torch.where(torch.isinf(new_scores), new_scores, new_scores - beam_scores[src])  # [B*W]
            step_logprobs = torch.cat([step_logprobs[src], gained[:, None]], 1)
            codes_so_far = torch.cat([codes_so_far[src], codes.view(-1, 1)], 1)  # [B*W, l+1]
            beam_scores = new_scores
            if level + 1 < self.index.num_levels:
                cache = self._select_cache(cache, src, beams_in)
                token = self._code_tokens(level, codes.view(-1, 1))  # [B*W, 1]
                mask = torch.cat([mask[src], torch.ones_like(token)], 1)
                pos = pos[src, -1:] + 1
                hidden, cache = self._forward(token, mask, pos, cache)
        return self._finish(node, beam_scores, codes_so_far, step_logprobs, start_codes, num_prompts)

    def _finish(self, node, beam_scores, codes_so_far, step_logprobs, start_codes, num_prompts) -> DecodeResult:
        width, top_k = self.beam_width, self.top_k
        items = self.index.item_of(node).view(num_prompts, width)[:, :top_k]  # beams are sorted best first
        full_codes = torch.cat([start_codes.repeat_interleave(width, 0), codes_so_far], 1)
        full_codes = full_codes.view(num_prompts, width, -1)[:, :top_k]  # [B, K, L]
        return DecodeResult(
            items=items,
            codes=full_codes,
            token_ids=self.item_tokenizer.encode(full_codes.clamp(min=0), validate=False),
            scores=beam_scores.view(num_prompts, width)[:, :top_k],
            level_logprobs=step_logprobs.view(num_prompts, width, -1)[:, :top_k],
        )

    # ------------------------------------------------------------------------------------------ helpers

    def _code_tokens(self, level: int, codes: torch.Tensor) -> torch.Tensor:
        start, _ = self.item_tokenizer.code_slice(level)
        return codes.clamp(min=0) + start  # a dead beam's -1 feeds a harmless valid token; its score stays -inf

    @staticmethod
    def _select_cache(cache, src: torch.Tensor, beams_in: int):
        """Expand (first decoded level: one row per prompt -> W beams) or reorder the KV cache to rows ``src``."""
        cache.reorder_cache(src)
        return cache

    def _left_pad(self, prompts, start_codes, device):
        """Prompt + <|item_begin|> + start-code tokens, left-padded. Positions count only real tokens, as in
        HF generate, so the decoder and HF see the same positions."""
        offsets = self.item_tokenizer.level_offset[: start_codes.shape[1]].to(start_codes.device)  # [l0]
        start_tokens = (start_codes + offsets).tolist()  # [B, l0] partial ID tokens
        rows = [list(p) + [self.item_tokenizer.begin_id] + s for p, s in zip(prompts, start_tokens)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):  # once per call, on the host, before any model work
            ids[i, length - len(row):] = torch.tensor(row)
            mask[i, length - len(row):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), pos.to(device)

    def _check_inputs(self, prompts, start_codes, exclude, device) -> torch.Tensor:
        if not prompts:
            raise ValueError("prompts is empty: give at least one prefix")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: every prefix needs at least one token")
        if start_codes is None:
            return torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
        start_codes = torch.as_tensor(start_codes, dtype=torch.long, device=device)
        if start_codes.dim() != 2 or start_codes.shape[0] != len(prompts):
            raise ValueError(f"start_codes must be [B={len(prompts)}, l0], got shape {tuple(start_codes.shape)}")
        if start_codes.shape[1] >= self.index.num_levels:
            raise ValueError(f"start_codes has {start_codes.shape[1]} levels; a partial ID has fewer than "
                             f"L={self.index.num_levels}")
        if exclude is not None and len(exclude) != len(prompts):
            raise ValueError(f"exclude has {len(exclude)} lists for {len(prompts)} prompts")
        return start_codes

    def _exclusion(self, exclude: list[list[int]], num_prompts: int, device):
        """A function (level, node [R], beams) -> [R, K_l] mask of codes whose subtree keeps a non-excluded item."""
        index = self.index
        if self._item_nodes is None or self._item_nodes.device != device:
            codes = self._catalogue_codes(device)  # [N, L]
            self._item_nodes = torch.stack([index.nodes_of_prefix(codes[:, :l]) for l in range(index.num_levels + 1)],
                                           1)  # [N, L+1]
        item_nodes = self._item_nodes
        subtree = [torch.bincount(item_nodes[:, l], minlength=index.num_nodes(l)) for l in range(index.num_levels + 1)]
        rows = torch.tensor([b for b, items in enumerate(exclude) for _ in items], dtype=torch.long, device=device)
        items = torch.tensor([i for items in exclude for i in items], dtype=torch.long, device=device)
        keep = (items >= 0) & (items < index.num_items)
        pairs = torch.unique(rows[keep] * index.num_items + items[keep])  # dedupe repeated history items
        rows, items = pairs // index.num_items, pairs % index.num_items
        excluded = []
        for level in range(index.num_levels + 1):  # sorted keys (prompt, node) -> number of excluded items below
            keys, counts = torch.unique(rows * index.num_nodes(level) + item_nodes[items, level], return_counts=True)
            excluded.append((keys, counts))

        def available(level: int, node: torch.Tensor, beams: int) -> torch.Tensor:
            size = index.codebook_sizes[level]
            rows_r = node.shape[0]
            child = index.advance(level, node.repeat_interleave(size),
                                  torch.arange(size, device=device).repeat(rows_r)).view(rows_r, size)  # [R, K]
            prompt = (torch.arange(rows_r, device=device) // beams)[:, None]  # [R, 1]
            keys, counts = excluded[level + 1]
            query = prompt * index.num_nodes(level + 1) + child.clamp(min=0)  # [R, K]
            pos = torch.searchsorted(keys, query).clamp(max=max(len(keys) - 1, 0))
            found = (keys[pos] == query) if len(keys) else torch.zeros_like(query, dtype=torch.bool)
            gone = torch.where(found, counts[pos] if len(keys) else 0, 0)
            return (child >= 0) & (subtree[level + 1][child.clamp(min=0)] - gone > 0)

        return available

    def _catalogue_codes(self, device) -> torch.Tensor:
        if self.item_codes is None:
            raise ValueError("exclude needs the catalogue codes: pass item_codes=[N, L] to ConstrainedDecoder")
        return self.item_codes.to(device)
