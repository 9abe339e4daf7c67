"""Palimpsa: gated linear attention with a per-synapse precision (importance) state."""

from kernels.palimpsa.naive import PalimpsaState, naive_chunk_palimpsa, naive_recurrent_palimpsa
from kernels.palimpsa.ops import fused_recurrent_palimpsa, palimpsa_attn

__all__ = [
    "PalimpsaState",
    "fused_recurrent_palimpsa",
    "naive_chunk_palimpsa",
    "naive_recurrent_palimpsa",
    "palimpsa_attn",
]
