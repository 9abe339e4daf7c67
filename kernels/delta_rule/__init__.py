"""DeltaNet (``log_alpha=None``) and Gated DeltaNet: the first-order (delta rule) solution."""

from kernels.delta_rule.chunk_torch import chunk_delta_rule_torch
from kernels.delta_rule.naive import naive_chunk_delta_rule, naive_recurrent_delta_rule
from kernels.delta_rule.ops import delta_rule

__all__ = ["chunk_delta_rule_torch", "delta_rule", "naive_chunk_delta_rule", "naive_recurrent_delta_rule"]
