"""Constrained beam search over item IDs (OneRec-Think, arXiv:2510.11639, Sec. 3.4 / 4: top-K by beam search over
itemic tokens; the same search scores GRPO rollouts and serves Think-Ahead completions).

Given B prefixes (prompts, or prompts + rationales) of different lengths, and optionally a partial ID to start from,
decode exactly the remaining ID levels with beam width W and return per prefix the top-K items (K <= W), their codes,
their ID tokens, and total and per-level log-probs. Every returned item is a catalogue item by construction: at each
level only codes the prefix index allows can be chosen, so validity is 100 %.

Why it is fast (each choice has a switch, and benchmarks/bench_constrained_decoding.py times each one switched off):
  * ``prefill``: each prefix is prefilled once (B rows, not B*W), and its KV cache is kept ONCE: the W beams'
    ID tokens are fed as the branches of a token tree over the shared prompt (a 4-D attention mask lets each beam
    see the prompt and its own ancestors only; tree attention as in SpecInfer, Miao et al. 2024, Sec. 4). Nothing
    is copied or reordered per level. ``"once"`` instead expands the cache to B*W rows after the prefill and
    reorders it every level (Hugging Face's beam cache); ``"per_beam"`` re-encodes the prompt for every beam, as
    ``generate(num_beams=W)`` does;
  * ``code_logits="slice"``: the step reads only the current level's K_l code columns of the output layer
    (``ItemTokenizer.code_slice``). With normalization="valid" only those K_l rows of the output layer are
    multiplied. With "full" the full row's log-sum-exp needs every logit, so the one [R, V] matmul per level stays,
    but the step (mask, top-k) touches K_l columns, not V; ``"full"`` runs the step over whole vocabulary rows;
  * ``step_impl``: one fused step per level (prefix-index mask + log-softmax + per-row top-k:
    ``onerec_kernels.constrained_step``, Triton on CUDA, the vectorised reference elsewhere) and a small top-k
    across beams; ``"naive"`` is the textbook per-row Python loop. No host sync inside the level loop (checked by
    tests/test_decoding.py).

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

Modes beyond ``decode`` (same decoder, same output layer, prefix index and fused step; tests/test_decoding_modes.py
checks each against brute-force enumeration of the catalogue):
  * ``decode_prefixes(prompts, m)``: beam search over the first m levels, returning prefixes and scores
    (Think-Ahead's offline part; partial.py);
  * ``decode(..., allowed_prefixes=AllowedPrefixes)``: each row only below its own ragged set of m-level prefixes
    (Think-Ahead's online completion; constraints.py); also combines with ``start_codes`` and ``exclude``;
  * ``sample(prompts, K, temperature, generator)``: K distinct items drawn without replacement from the constrained
    distribution by Stochastic Beam Search (Kool et al. 2019; sampling.py);
  * ``score_items(prompts, items | codes)``: teacher-forced log-probs of given candidates (scoring.py);
  * ``row_budget``: at most that many beam rows (prompts x width) per chunk; large batches (the B*G rationale
    prefixes of a GRPO step) run as chunks of prompts of similar length, each with one prefill.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onerec_dist.decoding.constraints import (AllowedPrefixes, all_of, check_allowed_prefixes, prefix_constraint,
                                              run_in_row_chunks)
from onerec_dist.decoding.partial import PrefixResult, finish_prefixes
from onerec_dist.decoding.sampling import SampleResult, stochastic_beam_search
from onerec_dist.decoding.scoring import ScoreResult, candidate_codes, teacher_forced_scores
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenizer
from onerec_kernels.constrained_step import ConstrainedStepOutput, constrained_step, select_beams

NORMALIZATIONS = ("full", "valid")
PREFILLS = ("auto", "tree", "once", "per_beam")
CODE_LOGITS = ("slice", "full")
STEP_IMPLS = ("auto", "triton", "reference", "naive")
TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask (flash-attn does not)
LSE_CHUNK = 32768  # vocabulary rows per output-layer matmul when only the full-vocabulary lse is needed


@dataclass
class DecodeResult:
    items: torch.Tensor  # [B, K] catalogue rows, best first
    codes: torch.Tensor  # [B, K, L] full semantic IDs (start codes included)
    token_ids: torch.Tensor  # [B, K, L] their ID tokens
    scores: torch.Tensor  # [B, K] total log-prob of the decoded levels
    level_logprobs: torch.Tensor  # [B, K, L - l0] per-level step log-probs


def output_layer(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer's weight [V, H] and bias [V] (or None): the one way the decoder reads them.

    Under DeepSpeed ZeRO-3 a parameter outside a gather is an empty placeholder (its full shape in ``ds_shape``);
    decode inside ``DeepSpeedStrategy.gathered_parameters()``, which makes the weights whole for the duration.
    """
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and hasattr(param, "ds_shape") and param.numel() != param.ds_shape.numel():
            raise ValueError(f"the output layer's {name} is partitioned by DeepSpeed ZeRO-3 (local {param.numel()} "
                             f"of {param.ds_shape.numel()} values): decode inside strategy.gathered_parameters()")
    return weight, bias


def output_layer_rows(model) -> int:
    """Vocabulary rows V of the output layer, whole or ZeRO-3-partitioned (shape metadata only, no weights read)."""
    weight = model.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


class ConstrainedDecoder:
    """Beam search restricted to catalogue items. ``model`` is any HF causal LM with a plain linear output layer
    whose vocabulary holds the item tokens of ``item_tokenizer``; ``index`` is the prefix index over the
    catalogue's semantic IDs.

    Speed switches (defaults are the fast path; the others exist to measure what each choice buys):
      ``prefill``: "auto" (default: "tree" when the model's attention takes a 4-D mask, i.e. sdpa or eager,
        "once" otherwise) | "tree" | "once" | "per_beam" — see the module docstring;
      ``code_logits``: "slice" (default) | "full";
      ``step_impl``: "auto" (default: Triton on CUDA, reference elsewhere; env ONEREC_CONSTRAINED_STEP_IMPL) |
        "triton" | "reference" | "naive" (per-row Python loop, :func:`naive_constrained_step`).
    Every setting returns the same items in the same order (up to float rounding in near-ties).
    """

    def __init__(self, model, item_tokenizer: ItemTokenizer, index: PrefixIndex, beam_width: int, top_k: int,
                 normalization: str = "full", step_impl: str = "auto", pad_token_id: int = 0,
                 item_codes: torch.Tensor | None = None, prefill: str = "auto", code_logits: str = "slice",
                 row_budget: int | None = None):
        for name, value, allowed in (("normalization", normalization, NORMALIZATIONS), ("prefill", prefill, PREFILLS),
                                     ("code_logits", code_logits, CODE_LOGITS), ("step_impl", step_impl, STEP_IMPLS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; allowed values: {', '.join(allowed)}")
        if not 1 <= beam_width <= index.num_items:
            raise ValueError(f"beam_width={beam_width} must be in [1, number of catalogue items={index.num_items}]")
        if not 1 <= top_k <= beam_width:
            raise ValueError(f"top_k={top_k} must be in [1, beam_width={beam_width}]")
        if row_budget is not None and (isinstance(row_budget, bool) or not isinstance(row_budget, int)
                                       or row_budget < 1):
            raise ValueError(f"row_budget={row_budget!r} must be None (all prompts at once) or an int >= 1")
        if list(index.codebook_sizes) != list(item_tokenizer.codebook_sizes):
            raise ValueError(f"prefix index codebook sizes {list(index.codebook_sizes)} differ from the item "
                             f"tokenizer's {item_tokenizer.codebook_sizes}")
        vocab = output_layer_rows(model)
        highest = int(item_tokenizer.item_token_ids().max())
        if highest >= vocab:
            raise ValueError(f"the model's vocabulary ({vocab} rows) lacks the item tokens (ids up to {highest}); "
                             "extend it with onerec_dist.sid.vocab.extend_vocabulary")
        attention = getattr(model.config, "_attn_implementation", None)
        if prefill == "auto":
            prefill = "tree" if attention in TREE_ATTENTION else "once"
        elif prefill == "tree" and attention not in TREE_ATTENTION:
            raise ValueError(f"prefill='tree' needs an attention implementation that takes a 4-D mask "
                             f"({', '.join(TREE_ATTENTION)}); the model uses {attention!r}: use prefill='once'")
        device = model.get_output_embeddings().weight.device
        self.model, self.item_tokenizer, self.index = model, item_tokenizer, index.to(device)
        # [N, L] codes of every catalogue row; needed only for ``exclude``.
        self.item_codes = None if item_codes is None else torch.as_tensor(item_codes, dtype=torch.long).to(device)
        self.beam_width, self.top_k, self.normalization = beam_width, top_k, normalization
        self.step_impl, self.pad_token_id = step_impl, pad_token_id
        self.prefill, self.code_logits = prefill, code_logits  # prefill resolved: "tree" | "once" | "per_beam"
        self.code_slices = [item_tokenizer.code_slice(level) for level in range(item_tokenizer.num_levels)]
        self.lse_chunk = LSE_CHUNK
        # Most beam rows (prompts x beams) decoded at once; larger batches run in chunks of prompts of similar length.
        self.row_budget = row_budget
        self._item_nodes = None  # [N, L+1] node of every item at every level, built on first exclusion

    # ------------------------------------------------------------------------------------------ model calls

    def _level_logits(self, hidden: torch.Tensor, level: int):
        """Logits the step ranks, the full-vocabulary lse [R] (normalization="full", else None), and the column of
        code 0 in those logits: [R, K_l] and 0 with code_logits="slice", [R, V] and the level's offset with "full"."""
        weight, bias = output_layer(self.model)  # [V, H], [V] or None
        start, stop = self.code_slices[level]
        if self.code_logits == "full":  # the step ranks whole vocabulary rows
            full = F.linear(hidden, weight, bias).float()  # [R, V]
            return full, torch.logsumexp(full, dim=-1) if self.normalization == "full" else None, start
        code_bias = None if bias is None else bias[start:stop]
        if self.normalization == "valid":  # K_l rows of the output layer only
            return F.linear(hidden, weight[start:stop], code_bias).float(), None, 0
        if weight.shape[0] <= self.lse_chunk:  # one [R, V] matmul; the step reads a strided K_l-column view of it
            full = F.linear(hidden, weight, bias).float()  # [R, V]
            return full[:, start:stop], torch.logsumexp(full, dim=-1), 0
        # Large vocabularies (151k for Qwen3): the lse still needs every logit, but chunks of the vocabulary bound
        # the temporary to [R, lse_chunk] instead of [R, V] (1 GB in fp32 at R = 1600 rows).
        step = self.lse_chunk
        chunk_lse = [torch.logsumexp(F.linear(hidden, weight[c:c + step], None if bias is None else bias[c:c + step])
                                     .float(), dim=-1) for c in range(0, weight.shape[0], step)]  # n_chunks x [R]
        norm_lse = torch.logsumexp(torch.stack(chunk_lse, -1), dim=-1)  # [R]
        return F.linear(hidden, weight[start:stop], code_bias).float(), norm_lse, 0

    def _step(self, logits, allowed, beam_scores, k, norm_lse, offset) -> ConstrainedStepOutput:
        """Top-k codes per row. With code_logits="full" the rows are whole vocabulary rows: the level's mask is placed
        at its token ids (``offset`` = id of code 0) and the winning token ids are mapped back to codes."""
        if self.code_logits == "full":
            wide = allowed.new_zeros(logits.shape)  # [R, V]
            wide[:, offset:offset + allowed.shape[1]] = allowed
            allowed = wide
        if self.step_impl == "naive":
            step = naive_constrained_step(logits, allowed, beam_scores, k, norm_lse)
        else:
            step = constrained_step(logits, allowed, beam_scores, k, norm_lse, impl=self.step_impl)
        if self.code_logits == "full":
            codes = torch.where(step.topk_codes >= 0, step.topk_codes - offset, -1)
            step = ConstrainedStepOutput(step.topk_scores, codes, step.row_lse)
        return step

    # ------------------------------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], start_codes: torch.Tensor | None = None,
               exclude: list[list[int]] | None = None,
               allowed_prefixes: AllowedPrefixes | None = None) -> DecodeResult:
        """Top-K items per prompt. ``start_codes`` [B, l0] starts from a partial ID (Think-Ahead); ``exclude``
        lists catalogue rows per prompt that must not be returned; ``allowed_prefixes`` restricts row b to items
        below its own m-level prefixes (Think-Ahead's online completion, constraints.py). Slots beyond the number
        of reachable items hold item -1 and score -inf."""
        start_codes = self._validate(prompts, start_codes, exclude, allowed_prefixes)
        return run_in_row_chunks(self._decode_rows, self._rows_per_chunk(self.beam_width), prompts,
                                 start_codes=start_codes, exclude=exclude, allowed_prefixes=allowed_prefixes)

    @torch.no_grad()
    def decode_prefixes(self, prompts: list[list[int]], num_levels: int, start_codes: torch.Tensor | None = None,
                        exclude: list[list[int]] | None = None,
                        allowed_prefixes: AllowedPrefixes | None = None) -> PrefixResult:
        """Beam search over the first ``num_levels`` = m levels only: the top-K m-level prefixes per prompt with
        their scores (Think-Ahead's offline part, partial.py). Other arguments as in :meth:`decode`."""
        start_codes = self._validate(prompts, start_codes, exclude, allowed_prefixes)
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or not (
                start_codes.shape[1] < num_levels <= self.index.num_levels):
            raise ValueError(f"num_levels={num_levels!r} must be an int in (l0={start_codes.shape[1]}, "
                             f"L={self.index.num_levels}]")
        return run_in_row_chunks(functools.partial(self._decode_rows, stop_level=num_levels),
                                 self._rows_per_chunk(self.beam_width), prompts, start_codes=start_codes,
                                 exclude=exclude, allowed_prefixes=allowed_prefixes)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], num_samples: int, temperature: float = 1.0,
               generator: torch.Generator | None = None, start_codes: torch.Tensor | None = None,
               exclude: list[list[int]] | None = None,
               allowed_prefixes: AllowedPrefixes | None = None) -> SampleResult:
        """``num_samples`` distinct items per prompt, drawn without replacement from the constrained item
        distribution at ``temperature`` (Stochastic Beam Search, Kool et al. 2019; sampling.py). ``generator``
        (on the model's device) makes draws repeatable; other arguments as in :meth:`decode`."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not (
                1 <= num_samples <= self.index.num_items):
            raise ValueError(f"num_samples={num_samples!r} must be an int in [1, number of catalogue items="
                             f"{self.index.num_items}]")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
            raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
        start_codes = self._validate(prompts, start_codes, exclude, allowed_prefixes)

        def sample_rows(prompts, start_codes, exclude, allowed_prefixes):
            node, available, beams = self._start(prompts, start_codes, exclude, allowed_prefixes, num_samples)
            return stochastic_beam_search(self, beams, node, start_codes, available, num_samples, float(temperature),
                                          generator)

        return run_in_row_chunks(sample_rows, self._rows_per_chunk(num_samples), prompts, start_codes=start_codes,
                                 exclude=exclude, allowed_prefixes=allowed_prefixes)

    @torch.no_grad()
    def score_items(self, prompts: list[list[int]], items: torch.Tensor | None = None,
                    codes: torch.Tensor | None = None) -> ScoreResult:
        """Teacher-forced log-prob of given candidates after each prompt, under this decoder's normalization:
        ``items`` [B, C] catalogue rows (needs ``item_codes``) or ``codes`` [B, C, L] (scoring.py)."""
        self._validate(prompts, None, None, None)
        codes = candidate_codes(self.index, self.item_codes, items, codes, len(prompts))  # [B, C, L]

        def score_rows(prompts, codes):
            no_start = codes.new_empty(len(prompts), 0)
            beams = self._beams(*self._left_pad(prompts, no_start, codes.device), codes.shape[1])
            return teacher_forced_scores(self, beams, codes)

        return run_in_row_chunks(score_rows, self._rows_per_chunk(codes.shape[1]), prompts, codes=codes)

    def _decode_rows(self, prompts, start_codes, exclude, allowed_prefixes, stop_level=None):
        """Beam search over one chunk of (validated) rows; ``stop_level`` m for a partial decode."""
        node, available, beams = self._start(prompts, start_codes, exclude, allowed_prefixes, self.beam_width)
        return self._search(beams, node, start_codes, available, stop_level)

    def _start(self, prompts, start_codes, exclude, allowed_prefixes, width):
        """Start nodes [B], the per-level mask of exclusion and allowed prefixes (or None), the prefilled beams."""
        num_prompts, device = len(prompts), start_codes.device
        node = self.index.nodes_of_prefix(start_codes) if start_codes.shape[1] else self.index.root(num_prompts)
        available = all_of(self._exclusion(exclude, num_prompts, device) if exclude is not None else None,
                           prefix_constraint(self.index, allowed_prefixes) if allowed_prefixes is not None else None)
        return node, available, self._beams(*self._left_pad(prompts, start_codes, device), width)

    def _beams(self, ids, mask, pos, width):
        state_class = _TreeBeams if self.prefill == "tree" else _CopiedBeams
        return state_class(self.model.get_decoder(), ids, mask, pos, width, self.prefill == "per_beam")

    def _rows_per_chunk(self, width: int) -> int | None:
        return None if self.row_budget is None else max(1, self.row_budget // width)

    def _validate(self, prompts, start_codes, exclude, allowed_prefixes) -> torch.Tensor:
        """Check every input once, before any chunk runs (host syncs allowed); returns start_codes [B, l0]."""
        start_codes = self._check_inputs(prompts, start_codes, exclude, self.index.device)
        if start_codes.shape[1]:
            node = self.index.nodes_of_prefix(start_codes)
            if bool((node < 0).any()):
                bad = int((node < 0).nonzero()[0, 0])
                raise ValueError(f"start_codes row {bad} = {start_codes[bad].tolist()} is the start of no catalogue "
                                 "item")
        if allowed_prefixes is not None:
            check_allowed_prefixes(self.index, allowed_prefixes, len(prompts), start_codes)
        return start_codes

    def _search(self, beams, node, start_codes, available, stop_level=None) -> DecodeResult | PrefixResult:
        """The level loop: device work only, no host sync (no .item(), .tolist(), bool(tensor), nonzero); checked by
        tests/test_decoding.py::test_no_host_sync_in_the_level_loop. Stops after level ``stop_level`` - 1 (default
        L; a partial decode returns prefixes)."""
        stop = self.index.num_levels if stop_level is None else stop_level
        num_prompts, width = start_codes.shape[0], self.beam_width
        device = node.device
        hidden = beams.hidden  # [B, H] last prompt position
        prompt_row = torch.arange(num_prompts, device=device)[:, None]  # [B, 1]
        beam_scores = torch.zeros(num_prompts, device=device)  # [B] one live beam per prompt before level l0
        codes_so_far = start_codes.new_empty(num_prompts, 0)  # [R, l]
        step_logprobs = torch.zeros(num_prompts, 0, device=device)  # [R, l]
        for level in range(start_codes.shape[1], stop):
            beams_in = node.shape[0] // num_prompts  # 1 on the first decoded level, W after
            logits, norm_lse, offset = self._level_logits(hidden, level)
            allowed = self.index.allowed_codes(level, node)  # [R, K_l]
            mask = None if available is None else available(level, node, beams_in)
            if mask is not None:
                allowed &= mask
            k = min(width, allowed.shape[1])
            step = self._step(logits, allowed, beam_scores, k, norm_lse, offset)
            cand_scores = step.topk_scores.view(num_prompts, beams_in, k)  # [B, beams_in, k]
            cand_codes = step.topk_codes.view(num_prompts, beams_in, k)
            short = -(-width // beams_in) - k  # fewer candidates than beams (narrow first level): pad dead ones
            if short > 0:
                cand_scores = F.pad(cand_scores, (0, short), value=float("-inf"))
                cand_codes = F.pad(cand_codes, (0, short), value=-1)
            scores, parent, codes = select_beams(cand_scores, cand_codes, width)  # [B, W] each
            src = (parent + prompt_row * beams_in).view(-1)  # [B*W] row each new beam continues
            node = self.index.advance(level, node[src], codes.view(-1))  # [B*W]
            new_scores = scores.view(-1)  # [B*W]
            gained = torch.where(torch.isinf(new_scores), new_scores, new_scores - beam_scores[src])  # [B*W]
            step_logprobs = torch.cat([step_logprobs[src], gained[:, None]], 1)
            codes_so_far = torch.cat([codes_so_far[src], codes.view(-1, 1)], 1)  # [B*W, l+1]
            beam_scores = new_scores
            if level + 1 < stop:
                hidden = beams.feed(src, parent, self._code_tokens(level, codes.view(-1)))  # [B*W, H]
        if stop < self.index.num_levels:
            return finish_prefixes(self, node, beam_scores, codes_so_far, step_logprobs, start_codes, num_prompts,
                                   width, self.top_k)
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
        start, _ = self.code_slices[level]
        return codes.clamp(min=0) + start  # a dead beam's -1 feeds a harmless valid token; its score stays -inf

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


# ---------------------------------------------------------------------------------------------- beam KV layouts


class _TreeBeams:
    """prefill="tree": one KV-cache row per prompt, the beams' ID tokens fed as branches of a token tree over it.

    Cache columns: the T prompt positions, then W columns per fed level (beam w's token of fed level s sits in column
    T + s*W + w). Each beam's query sees the prompt's real tokens, its ancestors' columns and its own column; ``tree``
    [B, W, s*W] marks the ancestors and follows the parent beams each level, so nothing in the cache is copied or
    reordered: a level costs one cache append of B*W tokens (B rows), not a copy of B*W prompt caches.
    """

    def __init__(self, body, ids, mask, pos, width, per_beam=False):
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.body, self.cache = body, out.past_key_values
        self.hidden = out.last_hidden_state[:, -1]  # [B, H]
        self.dtype = self.hidden.dtype  # the additive mask must match the attention's dtype
        blocked = torch.finfo(self.dtype).min
        prompt_bias = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(mask == 0, blocked)
        self.prompt_bias = prompt_bias[:, None, None, :]  # [B, 1, 1, T]: 0 on real tokens, min on padding
        self.next_pos = pos[:, -1:] + 1  # [B, 1] position of the next fed token (positions count real tokens)
        self.tree = torch.zeros(ids.shape[0], 1, 0, dtype=torch.bool, device=ids.device)  # [B, beams, s*W]
        self.own = torch.eye(width, dtype=torch.bool, device=ids.device)  # [W, W] each beam sees its own token
        self.blocked_tree = torch.full((), blocked, dtype=self.dtype, device=ids.device)

    def feed(self, src: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Append the W beams' tokens [B*W] (parents ``parent`` [B, W]); returns their hidden states [B*W, H]."""
        batch, width = parent.shape
        ancestors = self.tree.gather(1, parent[:, :, None].expand(-1, -1, self.tree.shape[2]))  # [B, W, s*W]
        self.tree = torch.cat([ancestors, self.own.expand(batch, -1, -1)], 2)  # [B, W, (s+1)*W]
        tree_bias = torch.where(self.tree, 0.0, self.blocked_tree).to(self.dtype)[:, None]  # [B, 1, W, (s+1)*W]
        bias = torch.cat([self.prompt_bias.expand(-1, -1, width, -1), tree_bias], 3)  # [B, 1, W, T + (s+1)*W]
        out = self.body(input_ids=tokens.view(batch, width), attention_mask=bias,
                        position_ids=self.next_pos.expand(-1, width), past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        self.cache = out.past_key_values
        return out.last_hidden_state.reshape(batch * width, -1)


class _CopiedBeams:
    """prefill="once" (prefill B rows, expand the cache to B*W rows at the first level) or "per_beam" (prefill B*W
    rows, HF generate's way). One cache row per beam, reordered to the surviving beams every level."""

    def __init__(self, body, ids, mask, pos, width, per_beam=False):
        if per_beam:  # every beam re-encodes its prompt
            ids, mask, pos = (t.repeat_interleave(width, 0) for t in (ids, mask, pos))  # [B*W, T]
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        hidden = out.last_hidden_state[:, -1]  # [B or B*W, H]
        self.hidden = hidden[::width] if per_beam else hidden  # [B, H]: the W copies are identical
        self.body, self.cache, self.mask, self.pos = body, out.past_key_values, mask, pos
        self.row_scale = width if per_beam else 1  # prompt b sits in cache row b * row_scale before the first feed

    def feed(self, src: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        rows = src * self.row_scale  # [B*W]
        self.row_scale = 1
        self.cache.reorder_cache(rows)  # expand (first level) or reorder: copies every beam's whole cache
        self.mask = torch.cat([self.mask[rows], self.mask.new_ones(rows.shape[0], 1)], 1)  # [B*W, t+1]
        self.pos = self.pos[rows, -1:] + 1  # [B*W, 1]
        out = self.body(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                        past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]  # [B*W, H]


def naive_constrained_step(logits: torch.Tensor, allowed: torch.Tensor, beam_scores: torch.Tensor, k: int,
                           norm_lse: torch.Tensor | None = None) -> ConstrainedStepOutput:
    """The unfused textbook step, kept as an ablation baseline (step_impl="naive"): per row, gather its allowed
    codes, log-softmax them and stable-sort. Same contract as ``onerec_kernels.constrained_step`` (ties go to the
    lower code; empty slots score -inf with code -1), at one host sync per row."""
    rows = logits.shape[0]
    scores = torch.full((rows, k), float("-inf"), device=logits.device)
    codes = torch.full((rows, k), -1, dtype=torch.long, device=logits.device)
    row_lse = torch.full((rows,), float("-inf"), device=logits.device)
    for row in range(rows):
        valid = allowed[row].nonzero().squeeze(-1)  # [n] allowed codes, ascending
        if valid.numel() == 0:
            continue
        values = logits[row, valid].float()  # [n]
        row_lse[row] = torch.logsumexp(values, 0)
        norm = row_lse[row] if norm_lse is None else norm_lse[row]
        order = torch.sort(values, descending=True, stable=True).indices[:k]  # stable: equal logits keep index order
        best = values[order]
        step = torch.where(best == float("-inf"), best, best - norm)  # an allowed -inf logit has log-prob -inf
        scores[row, : order.numel()] = beam_scores[row] + step
        codes[row, : order.numel()] = valid[order]
    return ConstrainedStepOutput(scores, codes, row_lse)
