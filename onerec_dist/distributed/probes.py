"""Small worker-side probes for benchmarks and diagnostics (torch.distributed stays inside this package).

``gather_from_ranks(obj)``: every rank's ``obj`` in rank order (an all-gather of picklable objects over the engine's
process group), ``[obj]`` when no group is initialised (one process). Call it on every rank, e.g. from a TrainJob's
``final_metrics``, which the engine runs on all ranks.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_from_ranks(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (a collective: every rank must call it), or [obj] without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
