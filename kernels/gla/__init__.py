"""Mamba2 / simple GLA (scalar decay per head and token) and linear attention (no decay)."""

from kernels.gla.chunk_torch import chunk_simple_gla_torch
from kernels.gla.naive import decay_matrix, naive_chunk_simple_gla, naive_recurrent_simple_gla
from kernels.gla.ops import linear_attention, simple_gla

__all__ = [
    "chunk_simple_gla_torch",
    "decay_matrix",
    "linear_attention",
    "naive_chunk_simple_gla",
    "naive_recurrent_simple_gla",
    "simple_gla",
]
