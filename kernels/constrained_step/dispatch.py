"""Choose the Triton kernel or the PyTorch reference for the constrained beam-search step.

impl="auto" runs Triton for CUDA tensors when triton imports, the reference otherwise; the environment variable
ONEREC_CONSTRAINED_STEP_IMPL (auto | triton | reference) replaces "auto". An explicit impl argument wins over the
variable. Triton on CPU tensors only works in the Triton interpreter (TRITON_INTERPRET=1, as the tests set).
triton is imported only when the Triton path is chosen.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import ConstrainedStepOutput, constrained_step_reference

ENV_VAR = "ONEREC_CONSTRAINED_STEP_IMPL"
IMPLS = ("auto", "triton", "reference")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ("triton" or "reference") that `constrained_step` runs for tensors on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if impl not in IMPLS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "reference"
    if impl == "triton":
        if not _triton_importable():
            raise ValueError("impl='triton' was requested but triton is not installed; use impl='reference'")
        if device.type != "cuda" and not _interpreter_on():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got device {device}) or the Triton interpreter "
                "(set TRITON_INTERPRET=1 before triton is imported); use impl='reference' on CPU"
            )
    return impl


def constrained_step(
    logits: torch.Tensor,
    allowed: torch.Tensor,
    beam_scores: torch.Tensor,
    k: int,
    norm_lse: torch.Tensor | None = None,
    impl: str = "auto",
) -> ConstrainedStepOutput:
    """One constrained beam-search step: the k best allowed codes of every row, best first.

    logits [R, C] fp32/bf16/fp16, allowed [R, C] bool, beam_scores [R] fp32 (-inf for dead beams), 1 <= k <= C,
    norm_lse [R] fp32 or None (None: log-softmax over the allowed codes only).
    Returns (topk_scores [R, k] fp32, topk_codes [R, k] int64, row_lse [R] fp32); contract in reference.py.
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if resolve_impl(impl, logits.device) == "triton":
        from .triton_kernel import constrained_step_triton  # lazy: importing the package must not import triton

        return constrained_step_triton(logits, allowed, beam_scores, k, norm_lse)
    return constrained_step_reference(logits, allowed, beam_scores, k, norm_lse)
