"""The public implementations' decoder, kept as a baseline: Hugging Face ``generate(num_beams=W,
prefix_allowed_tokens_fn=...)`` with a Python trie over the catalogue's ID tokens (MiniOneRec / OneRec-Think code).

Step scores are log-softmax over the full vocabulary, masked to allowed tokens — ``ConstrainedDecoder`` with
``normalization="full"`` returns the same top-K in the same order (tests/test_decoding.py). Sampling settings are
pinned (do_sample=False, temperature/top_p/top_k off) so a model's generation_config cannot change the search —
the "invalid items when generation defaults change" failure users report.
"""

from __future__ import annotations

import torch

from onerec_dist.sid.tokens import ItemTokenizer


class TokenTrie:
    """Python dict trie over ID-token sequences: the public code's ``prefix_allowed_tokens_fn`` backing store."""

    def __init__(self, token_rows: list[list[int]]):
        self.root: dict = {}
        for row in token_rows:
            node = self.root
            for token in row:
                node = node.setdefault(token, {})

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(token)
            if node is None:
                return []
        return list(node)


def build_trie(item_tokenizer: ItemTokenizer, item_codes: torch.Tensor) -> tuple[TokenTrie, dict, int]:
    """(trie, token row -> catalogue row, levels): built once per catalogue, as the public code does."""
    codes = torch.as_tensor(item_codes, dtype=torch.long)
    token_rows = item_tokenizer.encode(codes).tolist()  # [N, L]
    return TokenTrie(token_rows), {tuple(row): i for i, row in enumerate(token_rows)}, codes.shape[1]


def hf_beam_search(model, item_tokenizer: ItemTokenizer, item_codes: torch.Tensor, prompts: list[list[int]],
                   beam_width: int, top_k: int, pad_token_id: int = 0,
                   trie: tuple[TokenTrie, dict, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K items [B, K] (catalogue rows, -1 if the decoded ID is no item) and their scores [B, K].
    ``trie``: ``build_trie``'s result for these codes (else built here, on every call)."""
    trie, lookup, num_levels = trie or build_trie(item_tokenizer, item_codes)
    rows = [list(p) + [item_tokenizer.begin_id] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    device = model.get_output_embeddings().weight.device

    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        generated = input_ids[length:].tolist()
        return trie.allowed(generated) if len(generated) < num_levels else [pad_token_id]

    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), num_beams=beam_width,
        num_return_sequences=top_k, max_new_tokens=num_levels, min_new_tokens=num_levels,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, do_sample=False, temperature=None, top_p=None,
        top_k=None, length_penalty=1.0, pad_token_id=pad_token_id, eos_token_id=None,
        output_scores=True, output_logits=beam_width == 1, return_dict_in_generate=True,
    )
    generated = out.sequences[:, length:length + num_levels].tolist()  # [B*K, L]
    items = torch.tensor([lookup.get(tuple(g), -1) for g in generated]).view(len(prompts), top_k)
    if beam_width == 1:  # HF runs greedy search, which reports raw logits instead of sequence scores
        steps = [torch.log_softmax(lg.float(), -1).gather(1, out.sequences[:, length + t, None])
                 for t, lg in enumerate(out.logits)]
        scores = torch.cat(steps, 1).sum(1).view(len(prompts), top_k).cpu()
    else:
        # sequences_scores = sum of log-probs / length**length_penalty; all have length L, so multiply back.
        scores = out.sequences_scores.view(len(prompts), top_k).float().cpu() * num_levels
    return items, scores
