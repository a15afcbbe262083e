"""Fused constrained beam-search step (mask + log-softmax + top-k) over one semantic-ID level.

`constrained_step` dispatches to the Triton kernel (triton_kernel.py, imported lazily) or the PyTorch reference
(reference.py); `select_beams` keeps the best candidates across beams. Importing this package does not import triton.
"""

from .dispatch import ENV_VAR, IMPLS, constrained_step, resolve_impl
from .reference import ConstrainedStepOutput, constrained_step_reference, select_beams, validate_inputs

__all__ = [
    "ENV_VAR",
    "IMPLS",
    "ConstrainedStepOutput",
    "constrained_step",
    "constrained_step_reference",
    "resolve_impl",
    "select_beams",
    "validate_inputs",
]
