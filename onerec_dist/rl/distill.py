"""On-policy distillation of a domain teacher into one student (OneReason's "unify" step; the reverse-KL on-policy
distillation of Agarwal et al. 2024, GKD, arXiv:2306.13649 Sec. 3, and Lu & Thinking Machines 2025, "On-Policy
Distillation"): the student samples, the teacher scores every sampled token.

Shapes: N sampled sequences of T positions; ``mask`` [N, T] is 1 on the rationale tokens the student sampled (and
the </think> it wrote), 0 on prompt and padding. Log-probs are of the sampled token at each position.

Per token t of sequence i, with pi_s the student now, pi_old the student that sampled, pi_T the teacher:
    A_t = log pi_T(x_t) - log pi_old(x_t)                   (advantage: minus the per-token reverse KL estimate)
    w_t = min(pi_s(x_t) / pi_old(x_t), c)                   (truncated importance weight, Ionides 2008; as TIS)
    loss = -(1 / |mask|) sum_{i,t} mask_it * w_it * A_it * log pi_s(x_it)     (w and A are constants: detached)
Its gradient is -mean_t w_t A_t grad log pi_s(x_t): a policy gradient whose per-token reward is A_t. Since
E_{x~pi_s}[log pi_s(x) - log pi_T(x)] = KL(pi_s || pi_T), the mean of -A over sampled tokens is an unbiased (k1)
estimate of the per-token reverse KL, which the update lowers. With one update per sample batch pi_s = pi_old at
the update, so w = 1 (kept for several updates per batch, where pi_s drifts from pi_old).

Pure torch: no ray / deepspeed import.
"""

from __future__ import annotations

import torch


def distill_advantages(teacher_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, T] A = log pi_T - log pi_old of the sampled tokens (no gradient)."""
    return (teacher_logprobs - sampling_logprobs).detach()


def truncated_importance_weights(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, cap: float
                                 ) -> torch.Tensor:
    """[N, T] min(pi_s / pi_old, cap) = min(exp(logp - logp_old), cap) (no gradient)."""
    if not cap > 0:
        raise ValueError(f"importance-weight cap must be > 0, got {cap}")
    return torch.exp(logprobs.detach() - sampling_logprobs.detach()).clamp(max=cap)


def distill_loss(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                 mask: torch.Tensor, cap: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean loss (module docstring) and statistics: ``reverse_kl`` (the k1 estimate mean(logp_old - logp_T)
    over the masked tokens), ``advantage`` (its negative), ``weight_mean``, ``truncated_share`` (tokens whose weight
    hit the cap) and ``tokens``. ``logprobs`` [N, T] carries the gradient; the other two are constants."""
    mask = mask.to(logprobs.dtype)
    tokens = mask.sum()
    denominator = tokens.clamp(min=1.0)
    advantages = distill_advantages(teacher_logprobs, sampling_logprobs)             # [N, T]
    weights = truncated_importance_weights(logprobs, sampling_logprobs, cap)          # [N, T]
    loss = -(weights * advantages * logprobs * mask).sum() / denominator
    ratio = torch.exp(logprobs.detach() - sampling_logprobs.detach())
    stats = {"reverse_kl": float((-advantages * mask).sum() / denominator),
             "advantage": float((advantages * mask).sum() / denominator),
             "weight_mean": float((weights * mask).sum() / denominator),
             "truncated_share": float(((ratio > cap).to(mask.dtype) * mask).sum() / denominator),
             "tokens": float(tokens)}
    return loss, stats


def exact_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of KL(pi_s || pi_T) = sum_v p_s(v) (log p_s(v) - log p_T(v)), over the whole
    vocabulary (no sampling noise): the quantity distillation lowers, for reports and tests. Logits [N, T, V]."""
    student = torch.log_softmax(student_logits.float(), dim=-1)                      # [N, T, V]
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)                      # [N, T, V]
    per_position = (student.exp() * (student - teacher)).sum(-1)                      # [N, T]
    mask = mask.to(per_position.dtype)
    return float((per_position * mask).sum() / mask.sum().clamp(min=1.0))
