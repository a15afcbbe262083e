"""The distributed training engine: Ray Train + DeepSpeed ZeRO on 2 gloo workers, against single-process references.

Multi-process tests share ONE Ray session (module fixture, short temp dir) and ONE worker group for the equivalence
runs (run_sequence: a worker group costs ~15 s to start on 2 cores, a tiny training ~1-2 s). The model is a tiny
Qwen3 on a learnable toy language: token t is followed by t+1 (mod V), the prompt half of each sequence has no loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from onerec_dist.training.batching import DistributedBatchSampler, collate, sequence_lengths, task_names
from onerec_dist.training.config import (
    DeepSpeedConfig,
    TrainerConfig,
    check_resources,
    deepspeed_config,
    peak_flops_per_worker,
    trainer_config,
)
from onerec_dist.training.engine_api import (
    LRSchedule,
    StepContext,
    StepSource,
    TrainJob,
    causal_lm_loss,
    count_loss_tokens,
    default_param_groups,
    row_restricted_group,
    sampler_step_source,
)

VOCAB = 64
STEPS = 8          # 40 examples / (2 workers x 4 examples) = 5 steps per epoch: runs cross an epoch boundary
WORKERS = 2
TRAINABLE_ROWS = (5, 17, 40)
PROBE = [[3, 4, 5, 6, 7, 8, 9, 10]]


@dataclass
class ToyJob:
    """A TrainJob (a Protocol: no engine base class). Tiny Qwen3 on sequences s, s+1, s+2, ... (mod VOCAB); tasks
    'even' / 'odd' by the first token. ``data_dir``: read the same examples from Arrow shards (memory-mapped)."""

    n_examples: int = 40
    intermediate: int = 64
    trainable_rows: tuple[int, ...] = ()
    with_tokenizer: bool = False
    fail_once_marker: str = ""     # rank 0 raises at its 5th loss call unless this file exists (then creates it)
    data_dir: str = ""

    def build_model(self):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=self.intermediate, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        torch.manual_seed(1234)
        return Qwen3ForCausalLM(config), (toy_tokenizer() if self.with_tokenizer else None)

    def examples(self):
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(self.n_examples):
            start, length = (int(v) for v in (torch.randint(1, VOCAB, (1,), generator=gen),
                                               torch.randint(4, 20, (1,), generator=gen)))
            ids = [(start + i) % VOCAB for i in range(length)]
            labels = [-100] * (length // 2) + ids[length // 2:]
            out.append({"input_ids": ids, "labels": labels, "task": "even" if start % 2 == 0 else "odd"})
        return out

    def step_source(self, ctx: StepContext) -> StepSource:
        from onerec_dist.training.shards import ShardedExamples

        return sampler_step_source(ShardedExamples(self.data_dir) if self.data_dir else self.examples(), ctx)

    def loss_units(self, batch):
        return count_loss_tokens(batch["labels"])

    def save_model_extras(self, model_dir):
        pass

    def configure_trainable(self, model, weight_decay):
        if not self.trainable_rows:
            return default_param_groups(model, weight_decay)
        for param in model.parameters():
            param.requires_grad_(False)
        return [row_restricted_group(model.get_input_embeddings().weight, list(self.trainable_rows))]

    def loss(self, model, batch):
        if self.fail_once_marker:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 5 and torch.distributed.get_rank() == 0 and not os.path.exists(self.fail_once_marker):
                Path(self.fail_once_marker).touch()
                raise RuntimeError("injected failure at step 5")
        return causal_lm_loss(model, batch)

    def final_metrics(self, model):
        probe = torch.tensor(PROBE)
        return {"probe_logits": model(input_ids=probe, use_cache=False).logits.float().tolist()}


def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def trainer(**overrides) -> TrainerConfig:
    base = dict(num_workers=WORKERS, max_steps=STEPS, micro_batch_size=4, grad_accum_steps=1, lr=3e-3,
                lr_schedule="constant", warmup_steps=2, weight_decay=0.01, grad_clip=1.0, precision="fp32",
                checkpoint_every=0, log_every=4, resume="never", seed=0, wandb={"mode": "disabled"})
    return TrainerConfig(**{**base, **overrides})


def reference_losses(job: TrainJob, cfg: TrainerConfig) -> list[float]:
    """Single-process training on the same global batches with torch AdamW: what the engine must reproduce.

    A world-1 sampler with accumulation W x G groups exactly the global micro-batches the W ranks take per step.
    """
    examples = job.examples()
    tasks = task_names(examples)
    sampler = DistributedBatchSampler(sequence_lengths(examples), world_size=1, rank=0,
                                      grad_accum_steps=cfg.num_workers * cfg.grad_accum_steps,
                                      batch_size=cfg.micro_batch_size, seed=cfg.seed)
    return reference_training(job, cfg, lambda: collate([examples[i] for mb in sampler.next_step() for i in mb], tasks))


def reference_training(job: TrainJob, cfg: TrainerConfig, next_global_batch) -> list[float]:
    """Single-process AdamW (+ clipping, schedule) on the batches ``next_global_batch()`` returns, one per step."""
    model, _ = job.build_model()
    groups = job.configure_trainable(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr))
    losses = []
    for _ in range(cfg.max_steps):
        batch = next_global_batch()
        loss = causal_lm_loss(model, batch).loss_sum / count_loss_tokens(batch["labels"])  # mean over loss tokens
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


# ---- pure: configs, schedule, row restriction ------------------------------------------------------------------------
def test_yaml_defaults_document_and_validate_every_field():
    from omegaconf import OmegaConf

    from onerec_dist.cli import CONF_DIR, compose

    cfg = compose([])
    trainer_config(OmegaConf.to_container(cfg.trainer, resolve=True))
    deepspeed_config(OmegaConf.to_container(cfg.deepspeed, resolve=True))
    for group, cls in (("trainer", TrainerConfig), ("deepspeed", DeepSpeedConfig)):
        lines = (CONF_DIR / group / "default.yaml").read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() and not line.lstrip().startswith("#"):
                assert lines[i - 1].lstrip().startswith("#"), f"{group}/default.yaml: {line!r} has no comment above"
        assert set(cls.__dataclass_fields__) == set(OmegaConf.to_container(cfg[group]))


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(ValueError, match=r"deepspeed.offload_optimizer.*needs deepspeed.zero_stage >= 1"):
        deepspeed_config({"zero_stage": 0, "offload_optimizer": "cpu"})
    with pytest.raises(ValueError, match=r"deepspeed.offload_param.*needs deepspeed.zero_stage=3"):
        deepspeed_config({"zero_stage": 2, "offload_param": "cpu"})
    with pytest.raises(ValueError, match=r"deepspeed.zero_stage=4 is not allowed; allowed values: 0, 1, 2, 3"):
        deepspeed_config({"zero_stage": 4})
    with pytest.raises(ValueError, match=r"deepspeed.extra: keys \['bf16'\] are set by the engine"):
        deepspeed_config({"extra": {"bf16": {"enabled": True}}})
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        trainer_config({"precision": "fp16"})
    with pytest.raises(ValueError, match=r"trainer.lr_schedule='step' is not allowed"):
        trainer_config({"lr_schedule": "step"})
    with pytest.raises(ValueError, match=r"trainer.min_lr: must be in \[0, trainer.lr"):
        trainer_config({"lr": 1e-4, "min_lr": 1e-3})
    with pytest.raises(ValueError, match="unknown key"):
        trainer_config({"micro_batch": 3})
    with pytest.raises(ValueError, match="Unix socket paths"):
        trainer_config({"ray_temp_dir": "/tmp/" + "x" * 60})


def test_resource_errors_name_the_counts():
    with pytest.raises(ValueError, match="4 workers x trainer.cpus_per_worker=1 need 4 CPUs but only 2 are available"):
        check_resources(trainer(num_workers=4), gpus=0, cpus=2)
    with pytest.raises(ValueError, match="use_gpu=true but no CUDA GPU is available"):
        check_resources(trainer(use_gpu=True), gpus=0, cpus=8)
    with pytest.raises(ValueError, match="3 workers need 3 GPUs but only 2 are available"):
        check_resources(trainer(use_gpu=True, num_workers=3), gpus=2, cpus=8)
    check_resources(trainer(use_gpu=True), gpus=2, cpus=2)


def test_lr_schedule_worked_values():
    # warm-up 2: steps 0, 1 -> 1/2, 2/2; cosine over the 8 remaining steps to min 0.1: step 2 -> 1, step 6 (half way)
    # -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55, step 10 -> 0.1; linear at step 6 -> 1 - 0.9 * 0.5 = 0.55.
    cosine = LRSchedule("cosine", warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert [cosine(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert LRSchedule("linear", 2, 10, 0.1)(6) == pytest.approx(0.55)
    assert LRSchedule("constant", 0, 10, 0.0)(9) == 1.0


def test_peak_flops_for_mfu():
    from onerec_dist.training.flops import measured_matmul_peak_flops

    assert peak_flops_per_worker(trainer(), "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_worker(trainer(precision="fp32"), None) == measured_matmul_peak_flops("cpu", "fp32") > 1e9
    assert peak_flops_per_worker(trainer(peak_tflops=5.0), "NVIDIA H100") == 5e12


def test_row_restricted_adamw_leaves_other_rows_bit_identical():
    # With weight decay 0.1 and the hook only, AdamW would still shrink frozen rows by lr * wd * w per step;
    # the group's weight_decay=0 keeps them exact. Single process, plain AdamW: the property the engine relies on.
    job = ToyJob(trainable_rows=TRAINABLE_ROWS)
    model, _ = job.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = job.configure_trainable(model, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    batch = collate(job.examples()[:8], ["even", "odd"])
    for _ in range(3):
        optimizer.zero_grad()
        causal_lm_loss(model, batch).loss_sum.backward()
        optimizer.step()
    emb = model.get_input_embeddings().weight.detach()
    other = [r for r in range(VOCAB) if r not in TRAINABLE_ROWS]
    assert torch.equal(emb[other], before["model.embed_tokens.weight"][other])
    assert (emb[list(TRAINABLE_ROWS)] != before["model.embed_tokens.weight"][list(TRAINABLE_ROWS)]).all(dim=1).all()
    for name, value in model.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(value, before[name]), name


def test_default_param_groups_do_not_decay_vectors():
    model, _ = ToyJob().build_model()
    decay, no_decay = default_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_importing_the_package_and_engine_modules_stays_light():
    code = ("import sys, onerec_dist, onerec_dist.distributed, onerec_dist.training.engine_api, "
            "onerec_dist.training.batching, onerec_dist.distributed.ray_job, onerec_dist.distributed.strategy; "
            "bad = [m for m in ('deepspeed', 'ray', 'wandb', 'triton', 'flash_attn') if m in sys.modules]; "
            "assert not bad, bad")
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_deepspeed_config_is_built_from_both_configs():
    from onerec_dist.distributed.strategy import DeepSpeedStrategy

    ds = DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_param="cpu",
                         extra={"zero_optimization": {"round_robin_gradients": True}, "comms_logger": {"enabled": 0}})
    config = DeepSpeedStrategy(trainer(micro_batch_size=3, grad_accum_steps=5, precision="bf16", grad_clip=0.5),
                               ds).deepspeed_config()
    # outside a process group the world size is 1: train_batch_size = 3 x 5 x 1
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (3, 5, 15)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 0.5 and config["zero_allow_untested_optimizer"] is True
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["round_robin_gradients"] is True and zero["reduce_bucket_size"] == ds.reduce_bucket_size  # deep merge
    assert config["comms_logger"] == {"enabled": 0}
    assert "allgather_bucket_size" not in zero  # a stage 1/2 option


def test_attn_implementation_on_cpu_is_sdpa():
    from onerec_dist.distributed.strategy import attn_implementation

    assert attn_implementation("cpu") == "sdpa"


def test_recipes_satisfy_the_protocols_without_inheriting():
    from onerec_dist.training.align_job import AlignJob
    from onerec_dist.training.batching import SamplerStepSource

    assert isinstance(ToyJob(), TrainJob) and TrainJob not in ToyJob.__mro__
    assert isinstance(AlignJob("init", "full", "data", [1, 2]), TrainJob) and TrainJob not in AlignJob.__mro__
    ctx = StepContext(rank=1, world_size=2, trainer=trainer(), pad_token_id=0, model=None, tokenizer=None)
    source = ToyJob().step_source(ctx)
    assert isinstance(source, SamplerStepSource) and isinstance(source, StepSource)
    assert source.task_names == ["even", "odd"]
    # rank 1 takes the global micro-batches 1, 3, 5, ... of the plan (micro-batch size 4)
    examples, batch = ToyJob().examples(), source.next_step()
    plan = source.sampler.global_batches(0)
    expected = collate([examples[i] for i in plan[1]], ["even", "odd"])["input_ids"]
    assert len(batch) == 1 and batch[0]["input_ids"].equal(expected)


class CountingProducer:
    """A producer StepSource (what RL rollouts will be): step k yields one micro-batch of 4 toy-language sequences
    starting at tokens 4k .. 4k+3 (mod VOCAB), 8 tokens each, every token but the first carrying a loss."""

    task_names = ("rollout",)

    def __init__(self):
        self.k = 0

    def batch(self, k: int) -> dict:
        rows = [[(4 * k + r + i) % VOCAB for i in range(8)] for r in range(4)]
        return collate([{"input_ids": x, "labels": x, "task": "rollout"} for x in rows], self.task_names)

    def next_step(self):
        self.k += 1
        return [self.batch(self.k - 1)]

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


@dataclass
class ProducerJob(ToyJob):
    """ToyJob's model and loss, micro-batches from CountingProducer instead of a dataset."""

    def step_source(self, ctx):
        assert ctx.model is not None and ctx.world_size == 1  # a producer gets the engine's model to generate with
        return CountingProducer()


def test_a_producer_step_source_drives_the_training_loop(tmp_path, monkeypatch):
    # run_one (the worker loop, no Ray) on one gloo rank, ZeRO-0: every step's micro-batch comes from the producer,
    # so the losses equal single-process AdamW on the producer's batches 0..7; its state (k = 8) is checkpointed.
    import socket

    import torch.distributed as dist

    from onerec_dist.distributed.worker import SUMMARY_FILE, run_one

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for var, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(var, value)
    cfg = trainer(num_workers=1, checkpoint_every=STEPS, micro_batch_size=4)
    try:
        run_one({"job": ProducerJob(), "trainer": cfg, "deepspeed": DeepSpeedConfig(zero_stage=0),
                 "output_dir": str(tmp_path)}, publish="directory", resume_dir=None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    producer = CountingProducer()
    expected = reference_training(ProducerJob(), cfg, lambda: producer.next_step()[0])
    assert summary["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert summary["tasks"] == ["rollout"] and summary["tokens"] == STEPS * 4 * 8
    assert summary["loss_last"] < summary["loss_first"]
    state = torch.load(Path(summary["checkpoint_dir"]) / "client_state" / "rank0.pt", weights_only=False)
    assert state["step_source"] == {"k": STEPS}


# ---- multi-process ---------------------------------------------------------------------------------------------------
RUNS = {  # name: (job, trainer overrides, deepspeed overrides)
    "zero0": (ToyJob(), {}, {"zero_stage": 0}),
    "zero2": (ToyJob(), {}, {"zero_stage": 2}),
    "zero3": (ToyJob(), {}, {"zero_stage": 3}),
    "zero2_accum": (ToyJob(), {"micro_batch_size": 1, "grad_accum_steps": 4}, {"zero_stage": 2}),
    # stop / resume read the examples from memory-mapped Arrow shards: the same losses as zero2's in-memory list
    "stop3": (ToyJob(data_dir="<shards>"), {"max_steps": 3, "checkpoint_every": 3}, {"zero_stage": 2}),
    "resume3": (ToyJob(data_dir="<shards>"), {"resume": "<stop3>"}, {"zero_stage": 2}),
    "rows_zero3": (ToyJob(trainable_rows=TRAINABLE_ROWS), {"weight_decay": 0.1, "lr": 1e-2}, {"zero_stage": 3}),
    "bf16_ckpt": (ToyJob(), {"precision": "bf16", "grad_checkpointing": True}, {"zero_stage": 2}),
    "tokens": (ToyJob(), {"batching": "tokens", "max_tokens": 48, "bucket_window": 16, "lr": 1e-2},
               {"zero_stage": 1, "offload_optimizer": "cpu"}),
}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    from onerec_dist.distributed.ray_job import run_sequence

    from onerec_dist.training.shards import write_examples

    root = tmp_path_factory.mktemp("seq")
    write_examples(ToyJob().examples(), root / "shards", examples_per_shard=16)  # 3 shards: 16, 16, 8 examples
    specs = []
    for name, (job, t_over, ds_over) in RUNS.items():
        if job.data_dir == "<shards>":
            job = replace(job, data_dir=str(root / "shards"))
        t_over = dict(t_over)
        if str(t_over.get("resume", "")).startswith("<"):
            t_over["resume"] = str(root / t_over["resume"].strip("<>") / "checkpoints")
        specs.append((job, trainer(**t_over), DeepSpeedConfig(**ds_over), root / name))
    summaries = run_sequence(specs)
    return {name: {**s, "trainer": spec[1]} for name, s, spec in zip(RUNS, summaries, specs)}


@pytest.mark.slow
def test_engine_matches_single_process_reference(runs):
    # Same init, same global batches, sum of token losses / global loss tokens, AdamW + clipping + warm-up:
    # the 2-rank ZeRO-2 run must reproduce the single-process losses step by step.
    expected = reference_losses(ToyJob(), runs["zero2"]["trainer"])
    assert runs["zero2"]["losses"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert runs["zero2"]["loss_last"] < runs["zero2"]["loss_first"] - 0.05  # and it learns the toy language


@pytest.mark.slow
@pytest.mark.parametrize("other", ["zero0", "zero3", "zero2_accum"])
def test_zero_stages_and_accumulation_give_the_same_losses(runs, other):
    # (a) ZeRO-0/2/3 with the same global batch; (b) micro-batch 1 x accumulation 4 == micro-batch 4 x 1.
    assert runs[other]["losses"] == pytest.approx(runs["zero2"]["losses"], rel=1e-5, abs=1e-6)
    assert runs[other]["steps"] == STEPS


@pytest.mark.slow
def test_stopped_and_resumed_run_continues_exactly(runs):
    # (c) stop after step 3 (max_steps=3), resume from its checkpoint with max_steps=8: sampler position, optimizer
    # moments, LR schedule (warm-up) and RNG all continue, so every loss equals the uninterrupted run's.
    assert runs["stop3"]["steps"] == 3 and Path(runs["stop3"]["checkpoint_dir"]).name == "checkpoint_step00000003"
    resumed = runs["resume3"]
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == STEPS
    assert resumed["losses"][:3] == runs["stop3"]["losses"]
    assert resumed["losses"] == pytest.approx(runs["zero2"]["losses"], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_row_restricted_training_moves_only_those_rows(runs):
    # (d) ZeRO-3, weight_decay=0.1 in the trainer: only rows 5, 17, 40 of the (tied) embedding may change; every
    # other element of every parameter of the exported model is bit-identical to the initial model.
    from transformers import Qwen3ForCausalLM

    initial = ToyJob().build_model()[0].state_dict()
    exported = Qwen3ForCausalLM.from_pretrained(runs["rows_zero3"]["export_dir"]).state_dict()
    assert exported.keys() == initial.keys()
    rows = list(TRAINABLE_ROWS)
    others = [r for r in range(VOCAB) if r not in rows]
    for name, value in exported.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(value[others], initial[name][others]), name
            assert (value[rows] != initial[name][rows]).any(dim=1).all(), name
        else:
            assert torch.equal(value, initial[name]), name
    assert runs["rows_zero3"]["trainable_params"] == VOCAB * 32  # the embedding matrix; the hook picks the rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_exported_model_reproduces_trained_logits(runs, name):
    # (e) the consolidated export (ZeRO-3: gathered from the partitions) loads with plain transformers and gives the
    # logits the trained engine computed on the probe after training.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs[name]["export_dir"]).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits
    trained = torch.tensor(runs[name]["final_metrics"]["probe_logits"])
    assert torch.allclose(logits, trained, atol=1e-5, rtol=1e-5)
    initial = ToyJob().build_model()[0].eval()
    with torch.no_grad():
        assert not torch.allclose(initial(input_ids=torch.tensor(PROBE)).logits, trained, atol=1e-3)


@pytest.mark.slow
def test_bf16_with_checkpointing_tracks_fp32(runs):
    # bf16 forward (8-bit mantissa, rel. error ~4e-3) with fp32 master weights: close to fp32, not equal.
    bf16, fp32 = runs["bf16_ckpt"]["losses"], runs["zero2"]["losses"]
    assert bf16 == pytest.approx(fp32, rel=3e-2)
    assert bf16 != pytest.approx(fp32, rel=1e-6, abs=0)


@pytest.mark.slow
def test_token_budget_run_counts_the_planned_tokens(runs):
    # ZeRO-1 + CPU optimizer offload, length-bucketed batches of <= 48 padded tokens: the run's token count equals
    # the sampler's plan for those 8 steps (both ranks), and the per-task losses and MFU are reported.
    summary, cfg = runs["tokens"], runs["tokens"]["trainer"]
    examples = ToyJob().examples()
    samplers = [DistributedBatchSampler(sequence_lengths(examples), world_size=WORKERS, rank=r, max_tokens=48,
                                        window=16, seed=cfg.seed) for r in range(WORKERS)]
    planned = sum(len(examples[i]["input_ids"]) for _ in range(STEPS) for s in samplers for mb in s.next_step()
                  for i in mb)
    assert summary["tokens"] == planned
    assert summary["loss_last"] < summary["loss_first"]
    row = summary["log"][-1]
    assert row["step"] == STEPS and set(row) >= {"loss/even", "loss/odd", "lr", "grad_norm", "mfu"}
    assert 0 < summary["mfu"] < 1 and summary["tokens_per_s_per_worker"] > 0


@pytest.mark.slow
def test_run_training_survives_a_worker_failure(ray_local, runs, tmp_path):
    # run_training end to end: Ray checkpoints every 3 steps; rank 0 dies at step 5; Ray restarts the worker group,
    # which resumes from get_checkpoint() (step 3); the losses equal the uninterrupted run's. wandb logs offline.
    from onerec_dist.distributed.ray_job import run_training

    job = ToyJob(with_tokenizer=True, fail_once_marker=str(tmp_path / "failed_once"))
    cfg = trainer(checkpoint_every=3, max_failures=1, wandb={"mode": "offline", "project": "test"})
    summary = run_training(job, cfg, DeepSpeedConfig(zero_stage=2), tmp_path / "out")
    assert (tmp_path / "failed_once").exists()
    assert summary["losses"] == pytest.approx(runs["zero2"]["losses"], rel=1e-6, abs=1e-7)
    ckpt = Path(summary["checkpoint_dir"])
    assert ckpt.name == "checkpoint_step00000008"
    meta = json.loads((ckpt / "onerec_checkpoint.json").read_text())
    assert meta["world_size"] == WORKERS and meta["zero_stage"] == 2 and meta["step"] == STEPS
    assert sorted(p.name for p in (ckpt / "client_state").iterdir()) == ["rank0.pt", "rank1.pt"]
    export = Path(summary["export_dir"])
    assert (export / "tokenizer.json").exists() and (export / "config.json").exists()
    assert list((tmp_path / "out").glob("wandb/offline-run-*"))
    assert math.isfinite(summary["seconds"]) and summary["tokens"] > 0


@pytest.mark.slow
def test_run_training_resource_errors(ray_local, tmp_path):
    # (f) the shared local cluster has 2 CPUs and no GPU: clear errors before any worker starts.
    from onerec_dist.distributed.ray_job import run_training

    with pytest.raises(ValueError, match="3 workers x trainer.cpus_per_worker=1 need 3 CPUs but only 2"):
        run_training(ToyJob(), trainer(num_workers=3), DeepSpeedConfig(), tmp_path)
    with pytest.raises(ValueError, match="use_gpu=true but no CUDA GPU"):
        run_training(ToyJob(), trainer(use_gpu=True), DeepSpeedConfig(), tmp_path)


@pytest.mark.slow
def test_resume_from_bad_checkpoints_fails_clearly(runs, tmp_path):
    # (f) corrupt or mismatched checkpoints are refused on the driver, naming what is wrong.
    from onerec_dist.distributed.checkpoint import CheckpointError, verify_checkpoint
    from onerec_dist.distributed.ray_job import run_training

    good = Path(runs["stop3"]["checkpoint_dir"])
    def attempt(path, **overrides):
        ds = DeepSpeedConfig(zero_stage=overrides.pop("zero_stage", 2))
        return run_training(ToyJob(), trainer(resume=str(path), **overrides), ds, tmp_path / "out")

    with pytest.raises(ValueError, match="zero_stage: checkpoint 2, this run 3"):
        attempt(good, zero_stage=3)
    with pytest.raises(ValueError, match="world_size: checkpoint 2, this run 1"):
        attempt(good, num_workers=1)
    truncated = shutil.copytree(good, tmp_path / "truncated")
    shard = truncated / "step3" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"corrupt: step3/mp_rank_00_model_states.pt has 100 bytes, rank 0 wrote"):
        attempt(truncated)
    missing = shutil.copytree(good, tmp_path / "missing")
    (missing / "step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match="incomplete: step3/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        attempt(missing)
    garbage = shutil.copytree(good, tmp_path / "garbage")
    (garbage / "onerec_checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        attempt(garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint"):
        attempt(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"num_params: checkpoint \d+, this run 1"):
        verify_checkpoint(good, {"num_params": 1})


@pytest.mark.slow
def test_resume_with_a_different_model_fails_in_the_workers_with_a_clear_error(runs, tmp_path):
    # The parameter count is only known once the workers built the model: their CheckpointError (a ValueError) comes
    # back from Ray as a plain ValueError naming both counts, not as a Ray traceback.
    from onerec_dist.distributed.ray_job import run_training

    good = runs["stop3"]["checkpoint_dir"]
    with pytest.raises(ValueError, match=r"num_params: checkpoint 20672, this run 26816"):
        run_training(ToyJob(intermediate=96), trainer(resume=good), DeepSpeedConfig(zero_stage=2), tmp_path)
