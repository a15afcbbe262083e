"""The strategy's seams for RL (issue 9, sec. 4): a frozen reference policy, ZeRO-3 weights gathered for generation,
object collectives, and ``run_on_workers``.

Pure parts run in one process in milliseconds. The distributed part is ONE ``run_on_workers`` call on 2 gloo workers
under Ray (a worker group costs ~15-20 s to start on 2 cores; the work itself ~10 s): every stage and case runs
inside it and returns numbers; the driver recomputes the expectations from a fresh single-process model and the
consolidated export, and asserts.

The world: a tiny Qwen3 with 3-level item tokens (codebooks 3 x 5 x 7) over 30 catalogue items; the actor trains a
few AdamW steps (lr 1e-2) on "prompt <|item_begin|> item tokens" sequences.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from onerec_dist.decoding.beam_search import ConstrainedDecoder, output_layer, output_layer_rows
from onerec_dist.models import build_tiny_model, build_tokenizer_from_corpus
from onerec_dist.sid.prefix_index import PrefixIndex
from onerec_dist.sid.tokens import ItemTokenSpec
from onerec_dist.sid.vocab import extend_vocabulary
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig

SIZES = [3, 5, 7]
NUM_ITEMS = 30
SEED = 3
TRAIN_STEPS = 3
BEAMS, TOP_K = 6, 4
TEXTS = ["the user bought a red lamp", "blue chair", "a chair and a lamp and a"]


def build_world(tie: bool = True):
    """(model, tokenizer, item_tokenizer, index, codes [N, 3], prompts): identical on every process (fixed seeds)."""
    gen = torch.Generator().manual_seed(SEED)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in SIZES])))  # [105, 3]
    codes = all_ids[torch.randperm(len(all_ids), generator=gen)[:NUM_ITEMS]]  # [N, 3] unique
    tokenizer = build_tokenizer_from_corpus(["the user bought a red lamp and a blue chair"] * 4, vocab_size=300)
    model = build_tiny_model(tokenizer, tie_word_embeddings=tie, seed=SEED)
    item_tok = extend_vocabulary(model, tokenizer, ItemTokenSpec(3, SIZES), seed=SEED)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return model, tokenizer, item_tok, PrefixIndex.build(codes, SIZES), codes, prompts


def probe_batch(prompts, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts [3, T] for logits and greedy generation."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def train_batch(prompts, item_tok, codes, rank: int) -> dict[str, torch.Tensor]:
    """Each prompt followed by <|item_begin|> and the ID tokens of item (rank + i); right-padded, loss on all."""
    rows = [p + [item_tok.begin_id] + item_tok.encode(codes[(rank + i) % len(codes)]).tolist()
            for i, p in enumerate(prompts)]
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer_cfg(**overrides) -> TrainerConfig:
    base = dict(num_workers=2, max_steps=10, micro_batch_size=3, lr=1e-2, lr_schedule="constant", precision="fp32",
                weight_decay=0.0, checkpoint_every=0, resume="never", wandb={"mode": "disabled"})
    return TrainerConfig(**{**base, **overrides})


# ---- pure: one process, no process group ------------------------------------------------------------------------
def strategy_for(zero_stage: int, **trainer_overrides):
    from onerec_dist.distributed.strategy import DeepSpeedStrategy

    return DeepSpeedStrategy(trainer_cfg(**trainer_overrides), DeepSpeedConfig(zero_stage=zero_stage))


def test_reference_deepspeed_config_has_no_optimizer_and_its_own_dtype():
    from onerec_dist.distributed.strategy import DeepSpeedStrategy

    ds = DeepSpeedConfig(zero_stage=3, offload_param="cpu", stage3_param_persistence_threshold=7)
    strategy = DeepSpeedStrategy(trainer_cfg(precision="fp32"), ds)
    config = strategy.reference_deepspeed_config("bf16")
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}  # not the actor's fp32
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not {"optimizer", "scheduler", "zero_allow_untested_optimizer"} & set(config)
    assert config["train_batch_size"] == 1  # 1 micro x 1 accumulation x world 1 (no process group here)


def test_plain_reference_is_a_frozen_copy_in_its_own_dtype():
    model = build_world()[0]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = strategy_for(2)
    reference = strategy.prepare_reference(model, dtype="bf16")
    assert reference.kind == "module" and strategy.reference is reference and not reference.module.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.module.parameters())
    # bf16 is the fp32 weights rounded: within bf16's relative precision 2^-8 of them.
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(value.float(), initial[name], rtol=2**-8, atol=1e-6)
    out = reference(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.grad_fn is None  # no graph: the reference never takes gradients


def test_reference_and_gather_errors_name_the_fix():
    model = build_world()[0]
    with pytest.raises(ValueError, match="reference_dtype='fp8'.*fp32, bf16, fp16"):
        strategy_for(2).prepare_reference(model, dtype="fp8")
    with pytest.raises(ValueError, match="fp16.*use_gpu"):
        strategy_for(2).prepare_reference(model, dtype="fp16")
    with pytest.raises(ValueError, match="call prepare"):
        strategy_for(2).prepare_reference(None)  # LoRA reference before the actor exists
    strategy = strategy_for(2)
    strategy.engine = model  # a prepared actor without adapters
    with pytest.raises(ValueError, match="LoRA"):
        strategy.prepare_reference(None)
    with pytest.raises(ValueError, match="call prepare"):
        with strategy_for(3).gathered_parameters():
            pass


def test_lora_reference_is_the_base_model_and_leaves_the_actor_as_it_was():
    # The reference of a LoRA actor is the actor with its adapters off: W x, not (W + B A) x. With B set non-zero
    # (as after training) the actor's logits move, the reference's equal the base model's exactly.
    from peft import LoraConfig, get_peft_model

    base, _, _, _, _, prompts = build_world()
    base.eval()
    batch = probe_batch(prompts, 0)
    with torch.no_grad():
        base_logits = base(**batch).logits
    actor = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    actor.train()
    strategy = strategy_for(2)
    strategy.engine = actor  # stands in for the DeepSpeed engine: called like the model
    reference = strategy.prepare_reference(None)
    assert reference.kind == "disabled_adapters"
    torch.testing.assert_close(reference(**batch).logits, base_logits, rtol=0, atol=0)
    assert actor.training  # restored after the reference's eval-mode forward
    with torch.no_grad():
        assert (actor(**batch).logits - base_logits).abs().max() > 1e-2  # the adapters are back on
    with pytest.raises(ValueError, match="differs from trainer.precision"):
        strategy.prepare_reference(None, dtype="bf16")


def test_collectives_are_the_identity_on_one_rank():
    strategy = strategy_for(2)
    obj = {"prompts": [[1, 2], [3]], "step": 4}
    assert strategy.broadcast_object(obj) is obj
    assert strategy.all_gather_object(obj) == [obj]
    with pytest.raises(ValueError, match="src=1 is not a rank.*0..0"):
        strategy.broadcast_object(obj, src=1)


def test_gathered_parameters_below_zero3_yields_the_module_in_eval_mode_and_restores_it():
    model = build_world()[0].train()
    strategy = strategy_for(2)
    strategy.engine = model
    with strategy.gathered_parameters() as module:
        assert module is model and not module.training
    assert model.training
    with pytest.raises(RuntimeError, match="inside"):
        with strategy.gathered_parameters():
            raise RuntimeError("failure inside generation")
    assert model.training  # restored on the error path too


def test_decoder_reads_the_output_layer_only_when_whole():
    # A ZeRO-3 parameter outside a gather is an empty placeholder whose full shape is ds_shape. The decoder can be
    # built from the shape, but decoding must refuse to multiply by the placeholder (and point at the gather).
    model, tokenizer, item_tok, index, _, prompts = build_world(tie=False)
    model.eval()
    weight, bias = output_layer(model)
    assert weight is model.lm_head.weight and bias is None
    rows = weight.shape[0]
    decoder = ConstrainedDecoder(model, item_tok, index, BEAMS, TOP_K, pad_token_id=tokenizer.pad_token_id)
    whole = decoder.decode(prompts)
    saved = weight.data
    weight.ds_shape = saved.shape
    weight.data = torch.empty(0)
    try:
        assert output_layer_rows(model) == rows
        ConstrainedDecoder(model, item_tok, index, BEAMS, TOP_K)  # construction needs only the shape
        with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3.*gathered_parameters"):
            decoder.decode(prompts)
    finally:
        weight.data = saved
        del weight.ds_shape
    assert torch.equal(decoder.decode(prompts).items, whole.items)


# ---- 2 gloo workers under Ray -------------------------------------------------------------------------------------
# name: (zero stage, reference source: "copy" (fp32 copy) | "copy_bf16" | "lora" (adapters disabled)). ZeRO 0 and 1
# take the same path as 2 (a plain module reference: the weights are whole).
CASES = {"zero3": (3, "copy"), "zero3_bf16_ref": (3, "copy_bf16"), "zero2": (2, "copy"),
         "zero3_lora": (3, "lora"), "zero2_lora": (2, "lora")}


def _train_steps(strategy, engine, batch, steps: int) -> list[float]:
    engine.train()
    losses = []
    for _ in range(steps):
        loss = engine(**batch).loss
        strategy.backward(loss)
        strategy.step()
        losses.append(float(loss))
    return losses


def _reference_case(parent, zero_stage: int, source: str) -> dict:
    """Actor + reference on one stage: logits of both on the probe after the actor trained TRAIN_STEPS steps."""
    from peft import LoraConfig, get_peft_model

    from onerec_dist.distributed.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(parent.trainer, DeepSpeedConfig(zero_stage=zero_stage))
    strategy.device = parent.device
    actor, tokenizer, item_tok, _, codes, prompts = build_world()
    if source == "lora":
        actor = get_peft_model(actor, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    groups = [{"params": [p for p in actor.parameters() if p.requires_grad]}]
    engine = strategy.prepare(actor, groups)
    if source == "lora":
        reference = strategy.prepare_reference(None)
    else:
        reference = strategy.prepare_reference(build_world()[0], dtype="bf16" if source == "copy_bf16" else "fp32")
    probe = probe_batch(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        before = reference(**probe).logits.float()
    losses = _train_steps(strategy, engine, train_batch(prompts, item_tok, codes, strategy.rank), TRAIN_STEPS)
    engine.eval()
    with torch.no_grad():
        actor_logits = engine(**probe).logits.float()
        reference_logits = reference(**probe).logits.float()
    with strategy.gathered_parameters(reference) as module:
        ref_param_dtype = next(module.parameters()).dtype
    return {"kind": reference.kind, "losses": losses, "reference_before": before, "reference": reference_logits,
            "actor": actor_logits, "reference_param_dtype": str(ref_param_dtype)}


def _decode_on_zero3(strategy, export_dir: str) -> dict:
    """Train a ZeRO-3 actor, decode and generate under the gather, export, and check training goes on after."""
    actor, tokenizer, item_tok, index, codes, prompts = build_world()
    engine = strategy.prepare(actor, [{"params": list(actor.parameters())}])
    batch = train_batch(prompts, item_tok, codes, strategy.rank)
    _train_steps(strategy, engine, batch, TRAIN_STEPS)
    decoder = ConstrainedDecoder(engine.module, item_tok, index, BEAMS, TOP_K, pad_token_id=tokenizer.pad_token_id)
    try:  # outside the gather the output layer is a placeholder: a clear error, not a wrong product
        decoder.decode(prompts)
        ungathered_error = None
    except ValueError as err:
        ungathered_error = str(err)
    probe = probe_batch(prompts, tokenizer.pad_token_id)
    with strategy.gathered_parameters() as module:
        result = decoder.decode(prompts)
        generated = module.generate(**probe, max_new_tokens=4, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        gathered_numel = module.get_output_embeddings().weight.numel()
    local_numel = engine.module.get_output_embeddings().weight.numel()  # partitioned again
    strategy.export_hf(engine, tokenizer, export_dir)
    with torch.no_grad():
        exported_logits = engine(**probe).logits.float()
    after = _train_steps(strategy, engine, batch, 1)  # the re-registered hooks fetch weights for training again
    with torch.no_grad():
        moved = float((engine(**probe).logits.float() - exported_logits).abs().max())
    return {"items": result.items, "scores": result.scores, "generated": generated,
            "ungathered_error": ungathered_error, "gathered_numel": gathered_numel, "local_numel": local_numel,
            "loss_after_gather": after[0], "moved_after_gather": moved}


def rl_seams_worker(strategy, config) -> dict:
    """Everything the Ray test checks, on one rank (the strategy is ZeRO-3)."""
    rank = strategy.rank
    out = {"rank": rank, "world_size": strategy.world_size,
           "broadcast0": strategy.broadcast_object({"from": rank, "payload": [rank] * 3}),
           "broadcast1": strategy.broadcast_object(f"rank{rank}", src=1),
           "gathered": strategy.all_gather_object(("r", rank * 10))}
    out["decode"] = _decode_on_zero3(strategy, config["export_dir"])
    out["cases"] = {name: _reference_case(strategy, stage, source) for name, (stage, source) in CASES.items()}
    return out


@pytest.fixture(scope="module")
def worker_results(ray_local, tmp_path_factory):
    from onerec_dist.distributed.worker_group import run_on_workers

    root = tmp_path_factory.mktemp("rl_seams")
    export_dir = root / "export"
    results = run_on_workers(rl_seams_worker, {"export_dir": str(export_dir)}, trainer_cfg(),
                             DeepSpeedConfig(zero_stage=3), output_dir=root)
    return results, export_dir


@pytest.mark.slow
def test_object_collectives_on_two_ranks(worker_results):
    results, _ = worker_results
    assert [r["rank"] for r in results] == [0, 1] and {r["world_size"] for r in results} == {2}
    for r in results:  # rank 0's object on both ranks; rank 1's when it is the source; all in rank order
        assert r["broadcast0"] == {"from": 0, "payload": [0, 0, 0]}
        assert r["broadcast1"] == "rank1"
        assert r["gathered"] == [("r", 0), ("r", 10)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_reference_keeps_the_initial_logits_while_the_actor_trains(worker_results, case):
    results, _ = worker_results
    model, tokenizer, _, _, _, prompts = build_world()
    model.eval()
    with torch.no_grad():  # the initial model, built in this process
        initial = model(**probe_batch(prompts, tokenizer.pad_token_id)).logits.float()
    stage, source = CASES[case]
    expected_kind = {"lora": "disabled_adapters"}.get(source, "engine" if stage == 3 else "module")
    # bf16 weights: each logit is a sum over 64 hidden units of products with relative error ~2^-8.
    tol = 0.1 if source == "copy_bf16" else 1e-5
    for r in results:
        c = r["cases"][case]
        assert c["kind"] == expected_kind
        assert c["reference_param_dtype"] == ("torch.bfloat16" if source == "copy_bf16" else "torch.float32")
        torch.testing.assert_close(c["reference_before"], initial, rtol=0, atol=tol)
        torch.testing.assert_close(c["reference"], c["reference_before"], rtol=0, atol=0)  # frozen: bit-identical
        assert (c["actor"] - initial).abs().max() > 0.05, "the actor did not train"
        assert c["losses"][-1] < c["losses"][0]


@pytest.mark.slow
def test_zero3_decoding_under_the_gather_equals_the_consolidated_export(worker_results):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results, export_dir = worker_results
    _, _, item_tok, index, _, prompts = build_world()
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    expected = ConstrainedDecoder(exported, item_tok, index, BEAMS, TOP_K,
                                  pad_token_id=tokenizer.pad_token_id).decode(prompts)
    with torch.no_grad():
        generated = exported.generate(**probe_batch(prompts, tokenizer.pad_token_id), max_new_tokens=4,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for r in results:
        d = r["decode"]
        assert d["ungathered_error"] is not None and "gathered_parameters" in d["ungathered_error"]
        assert d["local_numel"] < d["gathered_numel"] == exported.get_output_embeddings().weight.numel()
        assert torch.equal(d["items"], expected.items)
        torch.testing.assert_close(d["scores"], expected.scores, rtol=0, atol=1e-5)
        assert torch.equal(d["generated"], generated)  # HF generate under the gather, greedy
        assert math.isfinite(d["loss_after_gather"]) and d["moved_after_gather"] > 1e-4  # training goes on
