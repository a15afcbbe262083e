"""K distinct constrained samples per prompt: Stochastic Beam Search (Gumbel-top-k over the ID tree).

Kool, van Hoof and Welling 2019, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick for Sampling
Sequences Without Replacement" (ICML), Sec. 3-4 and Appendix B. Perturbing every item's log-prob with independent
Gumbel noise and keeping the top K gives K samples without replacement (Gumbel-top-k, Sec. 3). Over a sequence tree
the same top K is found level by level, without enumerating the items: a partial ID's perturbed log-prob is the
maximum over the items below it, so the children's perturbed values are drawn conditionally on their maximum being
the parent's (Eq. 10; the stable form of Appendix B is ``conditional_gumbel``), and a beam of width K keeps exactly the
ancestors of the K best items (a node outside the top K of its level has K disjoint better subtrees, each holding a
better item). The result is EXACT sampling without replacement, with beam width K, at beam-search cost.

The distribution sampled. At each level the step distribution is the softmax of logits / T over the codes the
prefix index allows (and ``exclude`` / ``allowed_prefixes`` leave); an item's probability is the product over its
levels: the distribution that constrained ancestral sampling (HF ``generate(do_sample=True,
prefix_allowed_tokens_fn=...)``) draws from. Masking the full-vocabulary softmax and renormalising gives the same
per-level distribution, so ``normalization`` does not change what is sampled; it only sets the reported ``scores``
(the model's log-prob of the sampled item at T = 1, exactly as beam search reports it). ``sample_logprobs`` are the
log-probs under the sampling distribution (temperature T) and ``keys`` the Gumbel keys, for Kool et al.'s
estimators (Sec. 4.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onerec_kernels.constrained_step import constrained_step, select_beams

LOG_HALF = -math.log(2.0)


@dataclass
class SampleResult:
    items: torch.Tensor  # [B, K] catalogue rows, in order of their Gumbel keys (a sample without replacement)
    codes: torch.Tensor  # [B, K, L] full semantic IDs (start codes included)
    token_ids: torch.Tensor  # [B, K, L] their ID tokens
    scores: torch.Tensor  # [B, K] model log-prob of the decoded levels (decoder's normalization, T = 1)
    level_logprobs: torch.Tensor  # [B, K, L - l0] per-level model log-probs
    sample_logprobs: torch.Tensor  # [B, K] log-prob under the sampling distribution (temperature T)
    keys: torch.Tensor  # [B, K] Gumbel keys, descending; -inf: fewer than K items reachable (item -1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); log1mexp(0) = -inf."""
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def conditional_gumbel(perturbed: torch.Tensor, parent_keys: torch.Tensor) -> torch.Tensor:
    """Gumbels ``perturbed`` [R, C] (phi_i + G_i, -inf for impossible children) shifted so that their row maximum
    equals ``parent_keys`` [R] (Kool et al. 2019, Eq. 10, stable form of Appendix B):

        G~_i = -log(exp(-T) - exp(-Z) + exp(-G_i)),  Z = max_i G_i
             = T - max(0, v_i) - log1p(exp(-|v_i|)),  v_i = T - G_i + log1mexp(G_i - Z).

    The argmax child gets exactly T. Rows whose parent is -inf, or without a possible child, give -inf."""
    row_max = perturbed.max(-1, keepdim=True).values  # [R, 1]
    dead = torch.isinf(row_max) | torch.isinf(parent_keys)[:, None]  # [R, 1]
    top = torch.where(dead, 0.0, parent_keys[:, None])  # finite stand-ins keep inf - inf = NaN out
    z = torch.where(dead, 0.0, row_max)
    v = top - perturbed + log1mexp(perturbed - z)  # [R, C]; +inf for an impossible child
    keys = top - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))
    return keys.masked_fill(dead | torch.isinf(perturbed), float("-inf"))


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), U ~ U(0, 1) kept away from 0 (which would give -inf)."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` [R, C] over the allowed codes; -inf elsewhere and in rows with none allowed."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, -1, keepdim=True)  # [R, 1]
    return torch.where(allowed & torch.isfinite(lse), masked - torch.where(torch.isinf(lse), 0.0, lse),
                       float("-inf"))


def stochastic_beam_search(decoder, beams, node, start_codes, available, num_samples: int, temperature: float,
                           generator: torch.Generator | None) -> SampleResult:
    """The level loop of Stochastic Beam Search (module docstring) with beam width ``num_samples``. ``decoder`` is
    a ConstrainedDecoder (its output layer, prefix index and step implementation are used)."""
    index = decoder.index
    num_prompts, width = start_codes.shape[0], num_samples
    device = node.device
    hidden = beams.hidden  # [B, H]
    prompt_row = torch.arange(num_prompts, device=device)[:, None]  # [B, 1]
    keys = torch.zeros(num_prompts, device=device)  # root key: any constant (the Gumbel-max order ignores the max)
    sample_lp = torch.zeros(num_prompts, device=device)  # [R] log q(partial ID) under the sampling distribution
    model_lp = torch.zeros(num_prompts, device=device)  # [R] model log-prob (decoder's normalization)
    codes_so_far = start_codes.new_empty(num_prompts, 0)  # [R, l]
    step_logprobs = torch.zeros(num_prompts, 0, device=device)  # [R, l]
    step_impl = "reference" if decoder.step_impl == "naive" else decoder.step_impl
    for level in range(start_codes.shape[1], index.num_levels):
        beams_in = node.shape[0] // num_prompts
        logits, norm_lse, offset = decoder._level_logits(hidden, level)
        size = index.codebook_sizes[level]
        code_logits = logits[:, offset:offset + size].float()  # [R, K_l]
        allowed = index.allowed_codes(level, node)  # [R, K_l]
        if available is not None:
            mask = available(level, node, beams_in)
            if mask is not None:
                allowed &= mask
        child_lp = sample_lp[:, None] + masked_log_softmax(code_logits / temperature, allowed)  # [R, K_l]
        if norm_lse is None:
            model_step = masked_log_softmax(code_logits, allowed)
        else:
            model_step = (code_logits - norm_lse[:, None]).masked_fill(~allowed, float("-inf"))
        child_keys = conditional_gumbel(child_lp + gumbel_noise(child_lp.shape, generator, device), keys)  # [R, K_l]
        k = min(width, size)
        # The fused step as a masked top-k: keys as logits, beam score 0, norm 0 -> scores are the keys themselves.
        zeros = torch.zeros(node.shape[0], device=device)
        step = constrained_step(child_keys, allowed, zeros, k, zeros, impl=step_impl)
        cand_keys = step.topk_scores.view(num_prompts, beams_in, k)
        cand_codes = step.topk_codes.view(num_prompts, beams_in, k)
        short = -(-width // beams_in) - k  # fewer candidates than samples: pad dead ones
        if short > 0:
            cand_keys = F.pad(cand_keys, (0, short), value=float("-inf"))
            cand_codes = F.pad(cand_codes, (0, short), value=-1)
        new_keys, parent, codes = select_beams(cand_keys, cand_codes, width)  # [B, W] each
        src = (parent + prompt_row * beams_in).view(-1)  # [B*W]
        flat_codes = codes.view(-1)
        dead = torch.isinf(new_keys.view(-1))  # [B*W]
        pick = (src, flat_codes.clamp(min=0))
        sample_lp = child_lp[pick].masked_fill(dead, float("-inf"))
        gained = model_step[pick].masked_fill(dead, float("-inf"))  # [B*W]
        model_lp = model_lp[src] + gained
        step_logprobs = torch.cat([step_logprobs[src], gained[:, None]], 1)
        codes_so_far = torch.cat([codes_so_far[src], flat_codes[:, None]], 1)
        node = index.advance(level, node[src], flat_codes.masked_fill(dead, -1))
        keys = new_keys.view(-1)
        if level + 1 < index.num_levels:
            hidden = beams.feed(src, parent, decoder._code_tokens(level, flat_codes))
    full_codes = torch.cat([start_codes.repeat_interleave(width, 0), codes_so_far], 1).view(num_prompts, width, -1)
    return SampleResult(
        items=index.item_of(node).view(num_prompts, width),
        codes=full_codes,
        token_ids=decoder.item_tokenizer.encode(full_codes.clamp(min=0), validate=False),
        scores=model_lp.view(num_prompts, width),
        level_logprobs=step_logprobs.view(num_prompts, width, -1),
        sample_logprobs=sample_lp.view(num_prompts, width),
        keys=keys.view(num_prompts, width),
    )
