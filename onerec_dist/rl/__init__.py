"""The pure math of reasoning RL (GRPO with the Rollout-Beam reward, OneRec-Think arXiv:2510.11639 Sec. 4.3):
rewards from beam-searched semantic IDs (``rewards``), group-relative advantages (``advantages``) and the clipped
policy-ratio loss with a k3 KL penalty and its aggregation modes (``losses``).

Pure: torch only, no ray / deepspeed / torch.distributed import; every function works on one device's tensors.
"""
