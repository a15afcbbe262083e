"""Schemas of the training engine's configs: ``trainer`` (conf/trainer/default.yaml) and ``deepspeed``
(conf/deepspeed/default.yaml).

Pure: no deepspeed / ray import. ``from_mapping`` (onerec_dist.config) validates types and ``Literal`` choices;
``__post_init__`` validates ranges and contradictions; ``check_resources`` checks the trainer config against the
machines Ray sees (the counts are arguments, so the check is testable without a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from onerec_dist.config import from_mapping, from_section, require

LR_SCHEDULES = ("constant", "cosine", "linear")

# Dense peak FLOP/s per device used for the MFU estimate when trainer.peak_tflops is null (bf16 tensor-core numbers
# from the vendors' data sheets; fp32 runs reach far less, so their MFU reads low). Matched as substrings of
# torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                   "V100": 125.0, "T4": 65.0}
# CPUs have no such table: their peak is measured (onerec_dist.training.flops.measured_matmul_peak_flops).
# Ray adds ~65 characters (session_<date>_<time>_<pid>/sockets/plasma_store) under its temp dir; sockets < 107 bytes.
MAX_RAY_TEMP_DIR_LEN = 40


@dataclass
class WandbConfig:
    project: str = "onerec-dist"
    run_name: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"


LOSS_IMPLS = ("auto", "chunked", "full", "liger")


@dataclass
class LossConfig:
    """How the next-token cross-entropy is computed (onerec_dist/training/loss.py); all give the same loss."""

    impl: Literal["auto", "chunked", "full", "liger"] = "auto"
    chunk_size: int = 512

    def __post_init__(self) -> None:
        require(self.chunk_size >= 1, "trainer.loss.chunk_size", f"must be >= 1, got {self.chunk_size}")


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_steps: int = 100
    max_epochs: float | None = None
    batching: Literal["examples", "tokens"] = "examples"
    micro_batch_size: int = 8
    max_tokens: int = 4096
    bucket_window: int = 1024
    pad_to_multiple_of: int = 1
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    checkpoint_every: int = 100
    keep_checkpoints: int | None = 2
    resume: str = "auto"
    max_failures: int = 0
    seed: int = 0
    log_every: int = 10
    validate_every: int = 0
    select_metric: str = "recall@10"
    patience: int | None = None
    export_best: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run_name: str = "train"
    storage_path: str | None = None
    ray_address: str | None = None
    ray_temp_dir: str = "/tmp/ray_onerec"
    peak_tflops: float | None = None
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):  # direct construction with a plain mapping
            self.wandb = from_mapping(WandbConfig, self.wandb, "trainer.wandb")
        if isinstance(self.loss, dict):
            self.loss = from_mapping(LossConfig, self.loss, "trainer.loss")
        for name in ("num_workers", "cpus_per_worker", "max_steps", "micro_batch_size", "max_tokens",
                     "bucket_window", "pad_to_multiple_of", "grad_accum_steps", "log_every"):
            require(getattr(self, name) >= 1, f"trainer.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        require(self.max_epochs is None or self.max_epochs > 0, "trainer.max_epochs", "must be > 0 or null")
        require(self.validate_every >= 0, "trainer.validate_every", "must be >= 0 (0 = no validation)")
        require(self.patience is None or self.patience >= 1, "trainer.patience", "must be >= 1 or null")
        require(0 <= self.min_lr <= self.lr, "trainer.min_lr",
                f"must be in [0, trainer.lr={self.lr}], got {self.min_lr}")
        require(self.warmup_steps >= 0, "trainer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "trainer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "trainer.adam_betas",
                f"must be two numbers in [0, 1), got {self.adam_betas}")
        require(self.adam_eps > 0, "trainer.adam_eps", f"must be > 0, got {self.adam_eps}")
        require(self.grad_clip >= 0, "trainer.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        require(self.checkpoint_every >= 0, "trainer.checkpoint_every",
                f"must be >= 0 (0 disables checkpoints), got {self.checkpoint_every}")
        require(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "trainer.keep_checkpoints",
                f"must be >= 1 or null (keep all), got {self.keep_checkpoints}")
        require(self.max_failures >= -1, "trainer.max_failures",
                f"must be >= 0, or -1 for unlimited retries, got {self.max_failures}")
        require(bool(self.resume), "trainer.resume", "must be 'auto', 'never' or a checkpoint path")
        require(self.peak_tflops is None or self.peak_tflops > 0, "trainer.peak_tflops",
                f"must be > 0 or null (auto), got {self.peak_tflops}")
        require(self.precision != "fp16" or self.use_gpu, "trainer.precision",
                "fp16 is not supported on CPU (DeepSpeed's fp16 loss scaling needs CUDA); use bf16 or fp32, "
                "or set trainer.use_gpu=true")
        require(len(self.ray_temp_dir) <= MAX_RAY_TEMP_DIR_LEN, "trainer.ray_temp_dir",
                f"{self.ray_temp_dir!r} is {len(self.ray_temp_dir)} characters; keep it <= {MAX_RAY_TEMP_DIR_LEN} "
                "(Ray puts session_<date>_<pid>/sockets/... under it and Unix socket paths must stay < 107 bytes)")
        require(bool(self.run_name) and "/" not in self.run_name, "trainer.run_name",
                f"must be a non-empty name without '/', got {self.run_name!r}")

    @property
    def resume_mode(self) -> Literal["auto", "never", "path"]:
        return self.resume if self.resume in ("auto", "never") else "path"


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.offload_optimizer == "none" or self.zero_stage >= 1, "deepspeed.offload_optimizer",
                f"offload_optimizer={self.offload_optimizer!r} needs deepspeed.zero_stage >= 1 (the optimizer state "
                f"is only partitioned, hence offloadable, from stage 1 on); got zero_stage={self.zero_stage}")
        require(self.offload_param == "none" or self.zero_stage == 3, "deepspeed.offload_param",
                f"offload_param={self.offload_param!r} needs deepspeed.zero_stage=3 (only stage 3 partitions the "
                f"parameters); got zero_stage={self.zero_stage}")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_max_live_parameters"):
            require(getattr(self, name) >= 1, f"deepspeed.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.stage3_param_persistence_threshold >= 0, "deepspeed.stage3_param_persistence_threshold",
                f"must be >= 0, got {self.stage3_param_persistence_threshold}")
        owned = sorted(set(self.extra) & ENGINE_OWNED_DS_KEYS)
        require(not owned, "deepspeed.extra", f"keys {owned} are set by the engine from the trainer config "
                f"(trainer.micro_batch_size, grad_accum_steps, precision, grad_clip, lr...); set those instead")


# DeepSpeed config keys generated from TrainerConfig; deepspeed.extra may not override them (two sources of truth).
ENGINE_OWNED_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "optimizer", "scheduler", "fp16", "bf16", "gradient_clipping"}


def trainer_config(mapping: Any) -> TrainerConfig:
    return from_mapping(TrainerConfig, mapping, "trainer")


def deepspeed_config(mapping: Any) -> DeepSpeedConfig:
    return from_mapping(DeepSpeedConfig, mapping, "deepspeed")


def check_stage_warmup(warmup_steps: int | None, name: str) -> None:
    """A stage's own lr warm-up (``<stage>.warmup_steps``): null (trainer.warmup_steps) or an int >= 0."""
    require(warmup_steps is None or (isinstance(warmup_steps, int) and warmup_steps >= 0), name,
            f"must be null (trainer.warmup_steps) or an int >= 0, got {warmup_steps!r}")


def stage_trainer(trainer: dict, clear: Sequence[str] = (), **overrides: Any) -> dict:
    """``trainer`` (a plain mapping of trainer.*) with a stage's own settings (align.warmup.lr, reasoning.sft.max_steps,
    rl.lr, rl.warmup_steps, ...) replacing it where they are not None, and the keys in ``clear`` set to None. A stage
    lr below trainer.lr scales min_lr down with it (the run's min_lr / lr ratio), so rl.lr = 1e-5 under
    trainer.lr = 1e-3, min_lr = 1e-4 anneals to 1e-6 instead of being refused as min_lr > lr; a higher stage lr (the
    warm-up's) keeps the run's min_lr."""
    trainer = dict(trainer)
    lr, min_lr = overrides.get("lr"), trainer.get("min_lr", 0.0)
    if lr is not None and trainer.get("lr"):
        trainer["min_lr"] = min(min_lr, min_lr * lr / trainer["lr"])
    trainer.update({key: value for key, value in overrides.items() if value is not None})
    trainer.update({key: None for key in clear})
    return trainer


def stage_engine_configs(cfg, clear: Sequence[str] = (), **overrides: Any) -> tuple[TrainerConfig, DeepSpeedConfig]:
    """The validated trainer / deepspeed configs of one training stage of the composed run ``cfg``: trainer.* with
    the stage's settings (``stage_trainer``), deepspeed.* as it is. Every stage on the engine (align, CoT SFT, RL)
    builds its configs here."""
    from omegaconf import OmegaConf

    trainer = stage_trainer(OmegaConf.to_container(cfg.trainer, resolve=True), clear, **overrides)
    return trainer_config(trainer), deepspeed_config(OmegaConf.to_container(cfg.deepspeed, resolve=True))


def check_resources(trainer: TrainerConfig, *, gpus: float, cpus: float) -> None:
    """Raise a ValueError naming the counts when the cluster cannot host trainer.num_workers workers.

    Ray would otherwise wait forever for resources that never appear.
    """
    if trainer.use_gpu:
        require(gpus > 0, "trainer.use_gpu",
                "use_gpu=true but no CUDA GPU is available (torch.cuda / the Ray cluster report 0 GPUs); "
                "set trainer.use_gpu=false to train on CPU")
        require(trainer.num_workers <= gpus, "trainer.num_workers",
                f"{trainer.num_workers} workers need {trainer.num_workers} GPUs but only {gpus:g} are available")
    needed = trainer.num_workers * trainer.cpus_per_worker
    require(needed <= cpus, "trainer.num_workers",
            f"{trainer.num_workers} workers x trainer.cpus_per_worker={trainer.cpus_per_worker} need {needed} CPUs "
            f"but only {cpus:g} are available")


def peak_flops_per_worker(trainer: TrainerConfig, device_name: str | None) -> float:
    """Peak FLOP/s of one worker for the MFU estimate: trainer.peak_tflops, else the GPU table, else a GEMM measured
    on this CPU in the training precision (onerec_dist.training.flops)."""
    if trainer.peak_tflops is not None:
        return trainer.peak_tflops * 1e12
    if device_name:
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in device_name:
                return tflops * 1e12
    from onerec_dist.training.flops import measured_matmul_peak_flops

    return measured_matmul_peak_flops("cpu", trainer.precision)


# ---- the `align` section (conf/align/default.yaml documents every field) -----------------------------------------
@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class WarmupSettings:
    lr: float | None = 1e-3
    max_steps: int | None = None
    warmup_steps: int | None = None
    num_examples: int | None = None


@dataclass
class MultitaskSettings:
    trainable: Literal["full", "lora"] = "full"
    lr: float | None = None
    max_steps: int | None = None
    warmup_steps: int | None = None
    num_examples: int | None = None
    ratios: dict = field(default_factory=dict)
    general_text_path: str | None = None
    max_description_tokens: int = 64
    sequential_format: Literal["window", "whole_sequence"] = "window"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class AlignConfig:
    stage: Literal["warmup", "multitask"] = "warmup"
    max_length: int = 512
    max_history: int | None = None
    max_persona_items: int | None = 20
    verify_warmup: bool = True
    validation_users: int | None = 1000
    validation_beam: int = 20
    build_processes: int | None = None
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    multitask: MultitaskSettings = field(default_factory=MultitaskSettings)

    def __post_init__(self) -> None:
        require(self.max_length >= 16, "align.max_length", "must be >= 16")
        require(self.validation_users is None or self.validation_users >= 1, "align.validation_users",
                "must be >= 1 or null (all)")
        require(self.validation_beam >= 10, "align.validation_beam", "must be >= 10 (Recall@10 needs 10 items)")
        require(self.build_processes is None or self.build_processes >= 1, "align.build_processes",
                f"must be an int >= 1 (1 = serial) or null (min(4, CPU count / 2)), got {self.build_processes!r}")
        for name, settings in (("warmup", self.warmup), ("multitask", self.multitask)):
            check_stage_warmup(settings.warmup_steps, f"align.{name}.warmup_steps")


def align_config(cfg) -> AlignConfig:
    """The validated ``align`` section of a composed config."""
    return from_section(AlignConfig, cfg, "align")

