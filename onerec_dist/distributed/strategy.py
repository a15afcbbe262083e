"""DeepSpeedStrategy: the one object that talks to DeepSpeed (OpenRLHF-style). Recipes and the worker loop call
``prepare / backward / step / save_checkpoint / load_checkpoint / export_hf / all_reduce`` and never the engine.
For RL it also hosts the frozen reference policy (``prepare_reference``), gathers ZeRO-3-partitioned weights for
generation (``gathered_parameters``) and moves Python objects between ranks (``broadcast_object``,
``all_gather_object``).

Runs inside a Ray Train worker, whose torch.distributed group (gloo on CPU, nccl on GPU) DeepSpeed wraps.
deepspeed is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from onerec_dist.distributed import checkpoint as ckpt
from onerec_dist.training.config import DeepSpeedConfig, TrainerConfig
from onerec_dist.training.engine_api import LRSchedule

# DeepSpeed prints its throughput line every steps_per_print steps; the worker loop does its own logging.
_NEVER = 10**12
# Parameter dtypes of a reference policy (``reference_dtype``); fp16 needs CUDA, as for training.
REFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attn_implementation(device: torch.device | str | None = None) -> str:
    """flash_attention_2 when flash_attn is installed and the device is CUDA, else PyTorch SDPA."""
    is_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "flash_attention_2" if is_cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def disable_shm_op_build() -> None:
    """Stop DeepSpeed's comm backend from JIT-compiling its C++ shared-memory all-reduce (~23 s on 2 cores).

    The op only serves inference all-reduce. ``import deepspeed.comm.torch as m`` would bind ``m`` to the real
    ``torch`` (deepspeed.comm re-exports it), so the module is patched through sys.modules.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts; ZeRO-3 partitioned parameters report their full size in ds_numel."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


class ReferencePolicy:
    """The frozen policy an RL loss compares the actor to (the KL penalty of GRPO, OneRec-Think Sec. 4.3).

    Called like the model (``reference(input_ids=..., attention_mask=...)``), always in eval mode under no_grad.
    ``kind``:
      * ``"engine"``: its own copy, an optimizer-less DeepSpeed ZeRO-3 engine (partitioned like the actor);
      * ``"module"``: its own copy, a plain frozen module on this rank's device (ZeRO 0-2: weights are whole);
      * ``"disabled_adapters"``: no copy: the LoRA actor with its adapters switched off (peft ``disable_adapter``),
        i.e. the base model the adapters were put on.
    """

    KINDS = ("engine", "module", "disabled_adapters")

    def __init__(self, model: Any, kind: str, dtype: torch.dtype):
        if kind not in self.KINDS:
            raise ValueError(f"ReferencePolicy kind={kind!r}; allowed: {', '.join(self.KINDS)}")
        self.model, self.kind, self.dtype = model, kind, dtype  # model: engine, module, or the actor engine

    @property
    def module(self) -> torch.nn.Module:
        """The bare module (the engine's ``module``; for disabled adapters, the peft actor)."""
        return getattr(self.model, "module", self.model)

    def __call__(self, **inputs: Any) -> Any:
        with torch.no_grad():
            if self.kind != "disabled_adapters":
                return self.model(**inputs)
            actor = self.module
            was_training = actor.training
            actor.eval()  # the actor may be mid-training: no dropout in reference log-probs
            try:
                with actor.disable_adapter():
                    return self.model(**inputs)
            finally:
                actor.train(was_training)


class DeepSpeedStrategy:
    def __init__(self, trainer: TrainerConfig, ds: DeepSpeedConfig):
        self.trainer, self.ds = trainer, ds
        self.engine = None
        self.reference: ReferencePolicy | None = None
        self.device = torch.device("cpu")

    # ---- process group ----------------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Wrap the process group Ray Train created; pick the device; avoid DeepSpeed's hidden C++ builds."""
        os.environ["DS_ACCELERATOR"] = "cuda" if self.trainer.use_gpu else "cpu"
        import deepspeed

        disable_shm_op_build()
        if self.trainer.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(self.trainer.cpus_per_worker)
        deepspeed.init_distributed(dist_backend="nccl" if self.trainer.use_gpu else "gloo", verbose=False)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 on the communication device); returns a new CPU tensor."""
        out = values.detach().to(device=self.device, dtype=torch.float64).clone()
        if dist.is_initialized():
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled; e.g. rollout prompts chosen on rank 0). Identity when
        there is one rank."""
        self._check_src(src)
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled; e.g. per-rank rewards for logging)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _check_src(self, src: int) -> None:
        if not 0 <= src < self.world_size:
            raise ValueError(f"src={src} is not a rank: the world has ranks 0..{self.world_size - 1}")

    # ---- engine -----------------------------------------------------------------------------------------------
    def deepspeed_config(self) -> dict[str, Any]:
        t, ds = self.trainer, self.ds
        micro = t.micro_batch_size if t.batching == "examples" else 1  # token budget: DeepSpeed only logs it
        zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                                "contiguous_gradients": ds.contiguous_gradients,
                                "reduce_bucket_size": ds.reduce_bucket_size}
        if ds.zero_stage in (1, 2):
            zero["allgather_bucket_size"] = ds.allgather_bucket_size
        if ds.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": t.use_gpu}
        if ds.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                        stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                        stage3_max_live_parameters=ds.stage3_max_live_parameters,
                        stage3_gather_16bit_weights_on_model_save=True)  # export_hf gathers the full weights
            if ds.offload_param != "none":
                zero["offload_param"] = {"device": ds.offload_param, "pin_memory": t.use_gpu}
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "train_batch_size": micro * t.grad_accum_steps * self.world_size,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16"},
            # The client optimizer is torch.optim.AdamW: no FusedAdam / DeepSpeedCPUAdam JIT build (~40 s).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": _NEVER,
            "wall_clock_breakdown": False,
        }
        return _deep_merge(config, ds.extra)

    def prepare(self, model: torch.nn.Module, param_groups: list[dict[str, Any]]):
        """Wrap ``model`` in a DeepSpeed engine with AdamW over ``param_groups`` and the LR schedule; returns it.

        The engine is called like the model (``engine(input_ids=...)``); keep using the strategy for the rest.
        """
        import deepspeed

        t = self.trainer
        if t.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(param_groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        # Decays over trainer.max_steps until the loop knows its own budget (set_schedule_length).
        self.lr_schedule = LRSchedule(t.lr_schedule, t.warmup_steps, t.max_steps, t.min_lr / t.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.deepspeed_config(), dist_init_required=False)
        return self.engine

    def set_schedule_length(self, total_steps: int) -> None:
        """End the LR decay at ``total_steps`` (the loop's budget: trainer.max_epochs may end training long before
        trainer.max_steps, and a cosine over max_steps would then never anneal). Call before the first step or after
        loading a checkpoint (LambdaLR restores the schedule's fields with its state)."""
        self.lr_schedule.total_steps = total_steps
        self._warn_about_schedule()

    def _warn_about_schedule(self) -> None:
        warning = self.lr_schedule.warmup_warning()
        if warning and self.is_rank0:
            print(warning, flush=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an already-normalised loss (the worker loop divides by the global token count, so no
        extra 1/grad_accum_steps scaling; DeepSpeed still averages gradients over ranks)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """Call after every micro-batch's backward; the optimizer, clipping and LR step happen at the boundary."""
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ---- reference policy and generation ----------------------------------------------------------------------
    def reference_deepspeed_config(self, dtype: str) -> dict[str, Any]:
        """ZeRO-3 inference config of the reference engine: no optimizer, no gradients (OpenRLHF's
        ``get_eval_ds_config``); the partitioning knobs and parameter offload follow the actor's ``deepspeed``."""
        ds = self.ds
        zero: dict[str, Any] = {"stage": 3, "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                                "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                                "stage3_max_live_parameters": ds.stage3_max_live_parameters}
        if ds.offload_param != "none":
            zero["offload_param"] = {"device": ds.offload_param, "pin_memory": self.trainer.use_gpu}
        # DeepSpeed requires batch sizes even without an optimizer; they are never used (no train step).
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "train_batch_size": self.world_size, "zero_optimization": zero,
                "bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"},
                "steps_per_print": _NEVER, "wall_clock_breakdown": False}

    def prepare_reference(self, model: torch.nn.Module | None = None, dtype: str | None = None) -> ReferencePolicy:
        """Host the frozen reference policy; returns it (also kept as ``self.reference``).

        ``model``: a copy of the initial policy, built like the actor (same seed or checkpoint) before it trains.
        Under ZeRO-3 it becomes an optimizer-less DeepSpeed engine, partitioned like the actor (OpenRLHF's
        ``_ds_init_eval_model``); under ZeRO 0-2 a plain frozen module on this rank's device. ``model=None``: the
        reference is the LoRA actor (``prepare`` first) with its adapters disabled, so no second copy exists.
        ``dtype`` (reference_dtype): "fp32" | "bf16" | "fp16"; default trainer.precision. A disabled-adapter
        reference shares the actor's weights, hence its dtype.
        """
        dtype = dtype or self.trainer.precision
        if dtype not in REFERENCE_DTYPES:
            raise ValueError(f"reference_dtype={dtype!r}; allowed values: {', '.join(REFERENCE_DTYPES)}")
        if dtype == "fp16" and not self.trainer.use_gpu:
            raise ValueError("reference_dtype='fp16' needs trainer.use_gpu=true; use bf16 or fp32 on CPU")
        if model is None:
            self.reference = self._disabled_adapter_reference(dtype)
            return self.reference
        model.requires_grad_(False)
        if self.ds.zero_stage == 3:
            import deepspeed

            engine, _, _, _ = deepspeed.initialize(model=model, config=self.reference_deepspeed_config(dtype),
                                                   dist_init_required=False)
            engine.eval()
            self.reference = ReferencePolicy(engine, "engine", REFERENCE_DTYPES[dtype])
        else:
            model.to(device=self.device, dtype=REFERENCE_DTYPES[dtype]).eval()
            self.reference = ReferencePolicy(model, "module", REFERENCE_DTYPES[dtype])
        return self.reference

    def _disabled_adapter_reference(self, dtype: str) -> ReferencePolicy:
        if self.engine is None:
            raise ValueError("a LoRA reference (prepare_reference(model=None)) is the actor with its adapters "
                             "disabled: call prepare(actor, ...) first")
        if not hasattr(getattr(self.engine, "module", self.engine), "disable_adapter"):
            raise ValueError("prepare_reference(model=None) needs a LoRA (peft) actor; for full fine-tuning pass a "
                             "copy of the initial model")
        if dtype != self.trainer.precision:
            raise ValueError(f"reference_dtype={dtype!r} differs from trainer.precision={self.trainer.precision!r}, "
                             "but a LoRA reference is the actor itself; give a separate model for another dtype")
        return ReferencePolicy(self.engine, "disabled_adapters", REFERENCE_DTYPES[dtype])

    @contextlib.contextmanager
    def gathered_parameters(self, model: Any = None) -> Iterator[torch.nn.Module]:
        """Yield the bare module of ``model`` (default: the actor engine; or a ReferencePolicy / engine) with whole
        weights, in eval mode, for HF ``generate`` and the constrained decoder; the training mode is restored after.

        Under ZeRO-3 the parameters are all-gathered once (``deepspeed.zero.GatheredParameters``, read-only) and the
        engine's per-module fetch/release hooks are removed for the duration, so generation's many small forwards
        neither re-gather nor release weights (DeepSpeed's ``unwrap_model_for_generation``, TRL's
        ``unwrap_model_for_generation``); they are put back even when generation raises. Every rank must enter it
        (the gather is a collective). Below ZeRO-3 the weights are whole already: no gather.
        """
        engine = self.engine if model is None else model.model if isinstance(model, ReferencePolicy) else model
        if engine is None:
            raise ValueError("gathered_parameters: no model given and no actor prepared (call prepare first)")
        module = getattr(engine, "module", engine)
        was_training = module.training
        module.eval()
        try:
            if _is_zero3_partitioned(module):
                with _zero3_generation_context(engine):
                    yield module
            else:
                yield module
        finally:
            module.train(was_training)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict[str, Any],
                        metadata: dict[str, Any]) -> None:
        """Every rank calls this with its *own* staging directory (Ray merges them when they are reported).

        Writes DeepSpeed's shards, this rank's client_state (plus RNG states) and manifest; rank 0 the metadata.
        """
        ckpt_dir = Path(ckpt_dir)
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag)
        path = ckpt.client_state_path(ckpt_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**client_state, "rng": rng_state()}, path)
        if self.is_rank0:
            ckpt.write_metadata(ckpt_dir, {"tag": tag, "world_size": self.world_size, **metadata})
        ckpt.write_manifest(ckpt_dir, self.rank)
        self.barrier()

    def load_checkpoint(self, ckpt_dir: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
        """Verify ``ckpt_dir`` against ``expected`` metadata, load engine + optimizer + LR state, restore this
        rank's RNG states; returns this rank's client_state."""
        ckpt_dir = Path(ckpt_dir)
        meta = ckpt.verify_checkpoint(ckpt_dir, {"world_size": self.world_size, **expected})
        try:
            load_path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=meta["tag"], load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
            client_state = torch.load(ckpt.client_state_path(ckpt_dir, self.rank), weights_only=False)
        except Exception as err:  # DeepSpeed / torch raise many types for unreadable files
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} is corrupt: loading failed with "
                                       f"{type(err).__name__}: {err}") from err
        if load_path is None:
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir}: DeepSpeed found no tag {meta['tag']!r}")
        set_rng_state(client_state.pop("rng"))
        return client_state

    # ---- export -----------------------------------------------------------------------------------------------
    def export_hf(self, model: Any, tokenizer: Any, out_dir: str | Path) -> None:
        """Consolidated ``save_pretrained`` of the trained model (+ tokenizer) by rank 0; every rank must call it.

        ZeRO-3 partitions the weights, so they are gathered module by module onto rank 0 first (the engine's
        consolidated state dict, the same call Accelerate uses); the result loads with plain transformers.
        """
        module = getattr(model, "module", model)  # the engine returned by prepare(), or the bare model
        if hasattr(module, "merge_and_unload"):  # peft (LoRA): export the merged model, loadable without peft
            if self.ds.zero_stage == 3:
                raise ValueError("exporting a LoRA model trained with deepspeed.zero_stage=3 is not supported: "
                                 "use zero_stage 0-2 for LoRA (its adapters are small), or full fine-tuning")
            module = module.merge_and_unload()
        state_dict = self.engine._zero3_consolidated_16bit_state_dict() if self.ds.zero_stage == 3 else None
        if self.is_rank0:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(out_dir, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
        self.barrier()


def _is_zero3_partitioned(module: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 manages ``module``'s parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def _zero3_generation_context(engine: Any) -> Iterator[None]:
    """Whole weights of a ZeRO-3 engine, its module hooks off (see ``DeepSpeedStrategy.gathered_parameters``)."""
    import deepspeed

    if getattr(engine, "optimizer", None) is None:
        raise ValueError("gathered_parameters needs the DeepSpeed engine of a ZeRO-3 model, not its bare module")
    # Training engine: the ZeRO-3 optimizer owns the offload object; inference engine: it is the optimizer.
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for param in module.parameters():  # stale bookkeeping would keep weights live after the hooks return
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(module)  # DeepSpeed >= 0.16.4 (earlier: _register_hooks_recursively)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
