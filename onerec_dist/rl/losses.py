"""The GRPO policy loss on rationale tokens: clipped policy ratio, k3 KL to a frozen reference, aggregation.

Shapes: N rollouts (sequences) of T response positions; ``mask`` [N, T] is 1 on the rationale tokens that carry a
loss (prompt and padding 0); ``advantages`` [N] is the rollout's group-relative advantage (advantages.py), shared by
its tokens (outcome supervision, DeepSeekMath arXiv:2402.03300 Sec. 4.1.2).

Per token t of rollout i (DeepSeekMath Eq. 3; PPO, Schulman et al. 2017, Eq. 7; OneRec-Think Sec. 4.3):
    rho = exp(logp - logp_old)
    pg  = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)
    kl  = exp(logp_ref - logp) - (logp_ref - logp) - 1      (k3: unbiased, >= 0; Schulman 2020, DeepSeekMath Eq. 4)
    loss_t = pg + beta * kl

Aggregation (verl's ``loss_agg_mode``). The engine's contract (onerec_dist/training/engine_api.py) is that a
micro-batch returns a *sum* and the engine divides by the number of loss units of the whole global batch; so each
mode is a (numerator, units) pair, and 1 micro-batch of 4 rollouts gives the same loss and gradient as 4 of 1:
- ``token-mean``: sum_i sum_t loss_it / (tokens of the global batch). Every token weighs the same (verl's default,
  and the issue's "token-mean over the global batch"); long rationales are not down-weighted per token.
- ``seq-mean-token-sum``: sum_i (sum_t loss_it) / (rollouts). A rollout weighs by its length.
- ``seq-mean-token-mean``: sum_i (mean_t loss_it) / (rollouts): the original GRPO's 1/|o_i| (DeepSeekMath Eq. 3),
  which Dr. GRPO (arXiv:2503.20783 Sec. 3.1) shows biases towards long wrong answers.
Rollouts without any loss token are neither a unit nor a contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_CLAMP = 10.0  # verl clamps the k3 estimate to [-10, 10]: a token with logp << logp_ref would blow up exp()


# ------------------------------------------------------------------------------------------------ per-token pieces
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[N, T] fp32 log pi(tokens | prefix) from logits [N, T, V] (the logits that predict ``tokens``)."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)                      # [N, T]
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[N, T] entropy of the next-token distribution: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, T] k3 estimate of KL(pi || pi_ref) per sampled token: r - log r - 1 with r = pi_ref / pi."""
    log_ratio = ref_logprobs - logprobs
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO surrogate loss [N, T] and a bool [N, T] that is True where the clipped term was taken
    (its gradient is 0 there: the clip fraction counts these). ``clip_high`` None = ``clip_low`` (symmetric)."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)                                        # [N, T]
    adv = advantages.unsqueeze(-1)                                                    # [N, 1]
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    return torch.maximum(unclipped, clipped), clipped > unclipped


# ------------------------------------------------------------------------------------------------ aggregation
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> tuple[torch.Tensor, int]:
    """(numerator, units) of ``mode`` for one micro-batch: the loss of the global batch is
    sum of numerators / sum of units over all its micro-batches (see the module docstring)."""
    mask = mask.to(per_token.dtype)
    token_sums = (per_token * mask).sum(dim=-1)                                       # [N]
    tokens = mask.sum(dim=-1)                                                         # [N]
    if mode == "token-mean":
        return token_sums.sum(), int(tokens.sum())
    has_tokens = tokens > 0                                                           # [N]
    if mode == "seq-mean-token-sum":
        return token_sums.sum(), int(has_tokens.sum())
    if mode == "seq-mean-token-mean":
        return (token_sums / tokens.clamp(min=1)).sum(), int(has_tokens.sum())
    raise ValueError(f"loss_agg_mode={mode!r} is not allowed; allowed values: {LOSS_AGG_MODES}")


def aggregate_mean(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """The mode's mean over this batch alone (numerator / units): the loss of a batch that is the whole step."""
    numerator, units = aggregate(per_token, mask, mode)
    return numerator / max(units, 1)


# ------------------------------------------------------------------------------------------------ the GRPO loss
@dataclass
class GRPOLoss:
    """One micro-batch. ``loss_sum`` (with grad) / global ``units`` is the step's loss; the other fields are
    detached sums over loss tokens, to be all-reduced and divided by the global ``tokens`` for logging."""

    loss_sum: torch.Tensor      # [] differentiable
    units: int                  # tokens (token-mean) or rollouts (seq-mean-*) of this micro-batch
    tokens: int                 # loss tokens of this micro-batch
    pg_sum: torch.Tensor        # [] policy-gradient term summed over tokens
    kl_sum: torch.Tensor        # [] k3 KL summed over tokens
    clipped_tokens: int         # tokens where the clipped ratio was taken (clip fraction = clipped / tokens)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
              kl_coef: float = 1e-3, mode: str = "token-mean") -> GRPOLoss:
    """GRPO loss of one micro-batch (module docstring); ``ref_logprobs`` None or ``kl_coef`` 0 = no KL term.

    Paper defaults (OneRec-Think Sec. 4.3): clip 0.2, KL coefficient 1e-3.
    """
    pg, was_clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)   # [N, T]
    use_kl = ref_logprobs is not None and kl_coef != 0
    kl = k3_kl(logprobs, ref_logprobs) if use_kl else torch.zeros_like(pg)           # [N, T]
    numerator, units = aggregate(pg + kl_coef * kl, mask, mode)
    weight = mask.to(pg.dtype)
    return GRPOLoss(loss_sum=numerator, units=units, tokens=int(mask.sum()),
                    pg_sum=(pg.detach() * weight).sum(), kl_sum=(kl.detach() * weight).sum(),
                    clipped_tokens=int((was_clipped & mask.bool()).sum()))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
