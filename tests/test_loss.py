"""The chunked cross-entropy equals today's full-logits loss (values, per-task sums, gradients) on a tiny Qwen3, and
the dispatch between full / chunked / liger falls back or fails as documented (onerec_dist/training/loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onerec_dist.config import from_mapping
from onerec_dist.training import loss as loss_module
from onerec_dist.training.batching import IGNORE_INDEX
from onerec_dist.training.config import LossConfig, TrainerConfig
from onerec_dist.training.engine_api import causal_lm_loss
from onerec_dist.training.loss import causal_lm_loss_sums, chunked_token_losses, resolve_impl, unwrap_model

VOCAB = 97  # odd, so no chunk boundary lines up with anything


def tiny_qwen3(tied: bool, seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                         **overrides)
    return Qwen3ForCausalLM(config).float().eval()


def make_batch(lengths=(13, 9, 5), prompt=(4, 2, 1), seed=1) -> dict:
    """Right-padded batch: odd lengths; the first ``prompt`` tokens of each example and the padding are -100."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_len = len(lengths), max(lengths)
    input_ids = torch.randint(0, VOCAB, (batch_size, max_len), generator=generator)
    attention_mask = torch.zeros(batch_size, max_len, dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX)
    for row, (length, prompt_len) in enumerate(zip(lengths, prompt)):
        attention_mask[row, :length] = 1
        labels[row, prompt_len:length] = input_ids[row, prompt_len:length]
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_ids": torch.tensor([0, 1, 0][:batch_size]), "task_names": ["a", "b"]}


def loss_and_grads(model, batch, impl: str, chunk_size: int = 1024):
    """(LossSums, grad of the final hidden states [B, L, H], {param name: grad}) for one backward of loss_sum."""
    model.zero_grad(set_to_none=True)
    captured = []

    def capture_grad(module, args, out):
        out.register_hook(captured.append)  # returns None: the module's output stays as it is

    hook = unwrap_model(model).model.norm.register_forward_hook(capture_grad)
    sums = causal_lm_loss_sums(model, batch, LossConfig(impl=impl, chunk_size=chunk_size))
    sums.loss_sum.backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sums, captured[-1], grads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 512])
def test_chunked_equals_full_loss_and_gradients(tied, chunk_size):
    model = tiny_qwen3(tied)
    batch = make_batch()
    full, full_hidden_grad, full_grads = loss_and_grads(model, batch, "full")
    chunked, chunked_hidden_grad, chunked_grads = loss_and_grads(model, batch, "chunked", chunk_size)
    # loss tokens: labels[:, 1:] not -100 -> example 0: positions 4..12 = 9, example 1: 2..8 = 7, example 2: 1..4 = 4
    assert full.task_counts.tolist() == [9 + 4, 7]
    torch.testing.assert_close(chunked.task_counts, full.task_counts)
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.task_sums, full.task_sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.task_sums.sum(), full.loss_sum.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_hidden_grad, full_hidden_grad, atol=1e-5, rtol=1e-5)
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    body_name = "model.layers.0.mlp.up_proj.weight"
    assert set(chunked_grads) == set(full_grads) and {head_name, body_name} <= set(full_grads)
    for name in (head_name, body_name):
        assert full_grads[name].abs().sum() > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_engine_api_causal_lm_loss_delegates_with_the_same_contract():
    model, batch = tiny_qwen3(tied=True), make_batch()
    default = causal_lm_loss(model, batch)                        # None -> auto -> chunked on CPU
    full = causal_lm_loss(model, batch, LossConfig(impl="full"))
    torch.testing.assert_close(default.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-5)
    assert default.task_sums.shape == default.task_counts.shape == (2,)
    assert not default.task_sums.requires_grad and default.loss_sum.requires_grad


@pytest.mark.parametrize("wrap", [False, True], ids=["linear_function", "other_head_checkpointed"])
def test_chunked_token_losses_match_cross_entropy_on_random_tensors(wrap):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 1000, bias=True)
    head = torch.nn.Sequential(linear) if wrap else linear   # not a plain Linear -> the checkpointed per-chunk path
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (11,))
    reference = F.cross_entropy(linear(hidden), targets, reduction="none")          # [11]
    upstream = torch.rand(11)                                                        # a non-uniform d loss / d token
    params = (hidden, linear.weight, linear.bias)
    grads_ref = torch.autograd.grad((reference * upstream).sum(), params)
    chunked = chunked_token_losses(head, hidden, targets, chunk_size=4)              # chunks of 4, 4, 3
    grads = torch.autograd.grad((chunked * upstream).sum(), params)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)
    empty = chunked_token_losses(head, hidden[:0], targets[:0], chunk_size=4)       # a micro-batch without loss
    assert empty.shape == (0,) and empty.requires_grad


def max_vocab_rows(fn, vocab: int, hidden_size: int) -> int:
    """Largest number of rows of any [..., vocab] tensor an op produces while ``fn`` runs (forward and backward),
    leaving out the transposed [hidden, vocab] weight view."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == vocab \
                        and tuple(tensor.shape) != (hidden_size, vocab):
                    Record.rows = max(Record.rows, tensor.numel() // vocab)
            return out

    with Record():
        fn()
    return Record.rows


@pytest.mark.parametrize("tied", [True, False])
def test_no_vocabulary_sized_tensor_beyond_a_chunk(tied):
    """The memory claim, op by op: the chunked loss never makes a [rows, V] tensor with more rows than a chunk
    (or B = 3: the last position's logits and their check), in forward or backward; the full path makes B x L."""
    model, batch = tiny_qwen3(tied), make_batch()
    chunked = max_vocab_rows(lambda: causal_lm_loss_sums(model, batch, LossConfig("chunked", 5)).loss_sum.backward(),
                             VOCAB, 32)
    full = max_vocab_rows(lambda: causal_lm_loss_sums(model, batch, LossConfig("full")).loss_sum.backward(),
                          VOCAB, 32)
    assert chunked == 5 and full == 3 * 13


def test_lm_head_is_called_once_per_micro_batch_whatever_the_token_count():
    """ZeRO-3 gathers a module's parameters at each call (a collective): ranks must call the head equally often.
    Plain Linear head: 1 call (last-position logits) + 1 (check) + 1 (the chunked loss), for 20, 4 or 0 loss tokens."""
    model = tiny_qwen3(tied=False)
    for lengths, prompt in (((13, 9, 5), (4, 2, 1)), ((5, 3, 2), (4, 2, 1)), ((5, 3, 2), (5, 3, 2))):
        calls = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        causal_lm_loss_sums(model, make_batch(lengths, prompt), LossConfig("chunked", 3)).loss_sum.backward()
        hook.remove()
        assert len(calls) == 3


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["body", "lora_head"])
def test_no_grad_and_peft_wrapped_model(targets):
    """peft wrapper unwrapped; a LoRA-wrapped head (not a plain Linear) takes the checkpointed per-chunk path."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_qwen3(tied=False), peft.LoraConfig(r=2, target_modules=targets))
    batch = make_batch()
    with torch.no_grad():
        full = causal_lm_loss_sums(model, batch, LossConfig(impl="full"))
        chunked = causal_lm_loss_sums(model, batch, LossConfig(impl="chunked", chunk_size=3))
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-5)
    _, _, full_grads = loss_and_grads(model, batch, "full")
    _, _, chunked_grads = loss_and_grads(model, batch, "chunked", 3)
    lora = [name for name in full_grads if "lora_" in name]
    assert lora and set(full_grads) == set(lora)  # only the adapters train
    for name in lora:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-5, rtol=1e-5, msg=name)


# ---- dispatch --------------------------------------------------------------------------------------------------------
def test_auto_falls_back_to_chunked_without_liger_or_cuda(monkeypatch):
    model = tiny_qwen3(tied=True)
    head = model.get_output_embeddings()
    monkeypatch.setattr(loss_module, "liger_available", lambda: False)
    assert resolve_impl("auto", model, head) == "chunked"
    with pytest.raises(ValueError, match="liger-kernel is not installed"):
        resolve_impl("liger", model, head)
    monkeypatch.setattr(loss_module, "liger_available", lambda: True)   # installed, but the tensors are on CPU
    assert resolve_impl("auto", model, head) == "chunked"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_impl("liger", model, head)
    assert resolve_impl("full", model, head) == "full"
    assert resolve_impl("chunked", model, head) == "chunked"
    with pytest.raises(ValueError, match="trainer.loss.impl='fused'"):
        resolve_impl("fused", model, head)


def test_auto_uses_full_when_the_model_transforms_its_logits():
    model = tiny_qwen3(tied=True)
    model.config.final_logit_softcapping = 30.0          # Gemma-2 style: the hidden-state paths would skip it
    head = model.get_output_embeddings()
    assert resolve_impl("auto", model, head) == "full"
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        resolve_impl("chunked", model, head)


def test_auto_uses_full_without_logits_to_keep():
    class NoLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            raise AssertionError("not called")

    assert resolve_impl("auto", NoLogitsToKeep(), torch.nn.Linear(2, 3)) == "full"
    with pytest.raises(ValueError, match="no logits_to_keep"):
        resolve_impl("chunked", NoLogitsToKeep(), torch.nn.Linear(2, 3))


def test_hidden_state_check_catches_a_head_that_is_not_the_models():
    model, batch = tiny_qwen3(tied=False), make_batch()
    wrong_head = torch.nn.Linear(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match="not the LM head's input"):
        loss_module.hidden_state_loss(model, batch, wrong_head, "chunked", 4)


def test_trainer_loss_config_validation():
    assert TrainerConfig().loss == LossConfig(impl="auto", chunk_size=512)
    assert from_mapping(TrainerConfig, {"loss": {"impl": "chunked", "chunk_size": 256}}, "trainer").loss.chunk_size \
        == 256
    with pytest.raises(ValueError, match="trainer.loss.impl='fused' is not allowed"):
        from_mapping(TrainerConfig, {"loss": {"impl": "fused"}}, "trainer")
    with pytest.raises(ValueError, match="trainer.loss.chunk_size"):
        from_mapping(TrainerConfig, {"loss": {"chunk_size": 0}}, "trainer")


def test_liger_path_bookkeeping_with_a_stand_in_kernel(monkeypatch):
    """Liger needs CUDA; its bookkeeping around the kernel (one differentiable total, per-task sums from no-grad
    passes, the last task as total - others) runs here with a torch stand-in that has liger's call signature."""
    import sys
    import types

    class StandInFusedLinearCrossEntropy:
        def __init__(self, ignore_index: int, reduction: str):
            self.ignore_index, self.reduction = ignore_index, reduction

        def __call__(self, weight, hidden, target, bias=None):
            return F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    package = types.ModuleType("liger_kernel")
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.LigerFusedLinearCrossEntropyLoss = StandInFusedLinearCrossEntropy
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    model, batch = tiny_qwen3(tied=False), make_batch()
    full, _, full_grads = loss_and_grads(model, batch, "full")
    model.zero_grad(set_to_none=True)
    liger = loss_module.hidden_state_loss(model, batch, model.lm_head, "liger", chunk_size=4)
    liger.loss_sum.backward()
    torch.testing.assert_close(liger.loss_sum, full.loss_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(liger.task_sums, full.task_sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(liger.task_counts, full.task_counts)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], atol=1e-5, rtol=1e-5, msg=name)
