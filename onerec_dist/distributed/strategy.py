"""DeepSpeedStrategy: the one object that talks to DeepSpeed (OpenRLHF-style). Recipes and the worker loop call
``prepare / backward / step / save_checkpoint / load_checkpoint / export_hf / all_reduce`` and never the engine.

Runs inside a Ray Train worker, whose torch.distributed group (gloo on CPU, nccl on GPU) DeepSpeed wraps.
deepspeed is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import os
import random
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


class DeepSpeedStrategy:
    def __init__(self, trainer: TrainerConfig, ds: DeepSpeedConfig):
        self.trainer, self.ds = trainer, ds
        self.engine = None
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
        schedule = LRSchedule(t.lr_schedule, t.warmup_steps, t.max_steps, t.min_lr / t.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.deepspeed_config(), dist_init_required=False)
        return self.engine

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


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
