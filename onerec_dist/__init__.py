"""onerec-dist: train reasoning generative recommenders (OneRec-Think / OneReason) at cluster scale.

Importing the package is cheap: deepspeed, ray, triton, wandb and flash_attn are imported only inside
``onerec_dist.distributed`` and the kernels' dispatch, and only when used.
"""

__version__ = "0.1.0"
