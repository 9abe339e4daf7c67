"""Mesa: full K x K precision per head, read out through an exact linear solve."""

from kernels.mesa.naive import MesaState, naive_chunk_mesa, naive_recurrent_mesa
from kernels.mesa.ops import mesa

__all__ = ["MesaState", "mesa", "naive_chunk_mesa", "naive_recurrent_mesa"]
