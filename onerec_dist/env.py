"""Environment defaults that keep runs offline and clean; applied by the CLI and the tests (setdefault only)."""

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}


def apply_offline_defaults() -> None:
    import torch  # noqa: F401  (cheap once loaded; needed to tell whether CUDA exists)

    for key, value in OFFLINE_DEFAULTS.items():
        if key == "DS_ACCELERATOR" and torch.cuda.is_available():
            continue
        os.environ.setdefault(key, value)
