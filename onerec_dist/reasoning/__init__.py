"""Reasoning activation (OneRec-Think, arXiv:2510.11639, Sec. 4.2; OneReason's three-level cognition): the answer
format with a think block (cot_format), pruned-context bootstrapping (prune), rationale teachers (teachers/), the
leak lint (lint) and the bootstrap that ties them together (bootstrap). Pure: no ray, deepspeed or
torch.distributed here."""
