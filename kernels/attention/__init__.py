"""Causal softmax attention: written-out reference and the fused SDPA entry point."""

from kernels.attention.naive import naive_attention
from kernels.attention.ops import attention

__all__ = ["attention", "naive_attention"]
