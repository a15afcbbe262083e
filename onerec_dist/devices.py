"""The one device resolver: a config's ``device`` string (``auto`` or any torch device) -> ``torch.device``."""

from __future__ import annotations


def resolve_device(name: str = "auto", allow_mps: bool = False):
    """'auto' -> cuda when available, else (with ``allow_mps``) mps, else cpu; anything else as given.

    mps only on request: the sentence encoder runs there, but the decoder's kernels and bf16 paths are not tested on
    it."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
