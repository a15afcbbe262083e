"""Model FLOPs per token and MFU (onerec_dist/training/flops.py): worked numbers, and the N_trainable term."""

from __future__ import annotations

import pytest
import torch

from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.training.engine_api import restrict_rows
from onerec_dist.training.flops import (
    attention_flops_per_token,
    matmul_param_counts,
    mean_causal_context,
    measured_matmul_peak_flops,
    mfu,
    model_flops_per_token,
    training_flops_per_token,
)


def test_flops_per_token_worked_by_hand():
    # N = 1e6, all trainable, no attention: 2N + 2N + 2N = 6e6 (the classic 6N).
    assert model_flops_per_token(1e6, 1e6) == 6e6
    # Frozen base (LoRA-like, 1% trainable): 4e6 + 2e4 = 4.02e6, so MFU at the same tokens/s is 0.67 of full's.
    assert model_flops_per_token(1e6, 1e4) == 4.02e6
    # Attention: L=2, H=4, d_h=16, C=64.5 (causal T=128): 12 * 2 * 4 * 16 * 64.5 = 99,072.
    assert attention_flops_per_token(2, 4, 16, 64.5) == 99_072
    assert model_flops_per_token(1e6, 1e6, layers=2, heads=4, head_dim=16, context=64.5) == 6e6 + 99_072
    with pytest.raises(ValueError, match="n_trainable"):
        model_flops_per_token(10, 11)


def test_mean_causal_context_worked_by_hand():
    # One sequence of 4: queries see 1, 2, 3, 4 keys -> mean 2.5 = (4 + 1) / 2.
    assert mean_causal_context([4]) == 2.5
    # Lengths 1 and 3: keys 1 | 1, 2, 3 -> 7 over 4 tokens = 1.75 (token-weighted, not the mean of 1 and 2).
    assert mean_causal_context([1, 3]) == 1.75
    assert mean_causal_context([]) == 0.0


def test_mfu_worked_by_hand():
    # 6e6 FLOPs/token x 1000 tokens/s = 6e9 FLOP/s of a 6e10 peak -> 0.1.
    assert mfu(6e6, 1000.0, 6e10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer_from_corpus(["a b c d e f g h"] * 4, vocab_size=300)


def _counts(model):
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return embed, total


def test_param_counts_tied_untied_and_the_trainable_term(tokenizer):
    torch.manual_seed(0)
    tied = build_tiny_model(tokenizer, "tiny", tie_word_embeddings=True)
    embed, total = _counts(tied)  # a tied head is one tensor: parameters() yields it once
    assert matmul_param_counts(tied) == (total, total)  # the tied table is the head: its matmul counts
    untied = build_tiny_model(tokenizer, "tiny", tie_word_embeddings=False)
    embed_u, total_u = _counts(untied)
    assert matmul_param_counts(untied) == (total_u - embed_u, total_u - embed_u)  # the input lookup has no FLOPs

    # LoRA-like: everything frozen except the q projections -> N_trainable = their size.
    for p in tied.parameters():
        p.requires_grad_(False)
    q = [layer.self_attn.q_proj.weight for layer in tied.model.layers]
    for w in q:
        w.requires_grad_(True)
    n, trainable = matmul_param_counts(tied)
    assert (n, trainable) == (total, sum(w.numel() for w in q))

    # Token warm-up: only 10 rows of the tied table train -> 10 x hidden elements.
    for w in q:
        w.requires_grad_(False)
    head = tied.get_input_embeddings().weight
    restrict_rows(head, list(range(5, 15)))
    assert matmul_param_counts(tied) == (total, 10 * head.shape[1])


def test_training_flops_drop_for_warmup(tokenizer):
    # Same model and data: full fine-tuning counts 6N + attention; warm-up 4N + 2 x 10 x hidden + attention.
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, "tiny", tie_word_embeddings=True)
    n, _ = matmul_param_counts(model)
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 2.5  # T = 4 -> C = 2.5
    assert training_flops_per_token(model, [4]) == pytest.approx(6 * n + attention)
    for p in model.parameters():
        p.requires_grad_(False)
    restrict_rows(model.get_input_embeddings().weight, list(range(10)))
    warm = training_flops_per_token(model, [4])
    assert warm == pytest.approx(4 * n + 2 * 10 * cfg.hidden_size + attention)
    assert warm < 0.7 * (6 * n + attention)  # MFU at equal tokens/s drops by about a third


def test_measured_peak_is_a_plausible_gemm_rate():
    # A 256^3 GEMM (33.5 MFLOP) on any CPU of this century takes between ~1 us (33 TFLOP/s) and 1 s (33 MFLOP/s).
    peak = measured_matmul_peak_flops("cpu", "fp32", 256, 3)
    assert 3.3e7 < peak < 3.3e13
    with pytest.raises(ValueError, match="precision"):
        measured_matmul_peak_flops("cpu", "fp8")
