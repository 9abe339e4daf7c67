"""The (gated) delta rule on the fused-chunk Triton walk of ``kernels/gla/chunk.py``.

Per chunk starting from ``S_0`` the delta rule is the GLA recurrence with values ``W = U - W_k S_0^T``
(``kernels/delta_rule/chunk_torch.py`` derives it): the WY pieces

    U = (I + A)^{-1} diag(beta) V,   W_k = (I + A)^{-1} diag(beta) e^{G} K,
    A = tril_{-1}(diag(beta) (K K^T) * D)

do not depend on the state. Two autograd functions, each a Triton forward and backward:

1. ``kernels/delta_rule/wy.py``: ``U`` and ``W_k`` of every chunk in parallel (one program per chunk and
   head, the ``[C, C]`` matrices on chip), and their backward to ``k``, ``v``, ``beta`` and ``G``;
2. ``kernels/gla/chunk.py``: the walk over each sequence's chunks with the state on chip, values
   ``W = U - W_k S_0^T``; its backward hands ``dU = dW`` and ``dW_k = -dW S_0`` to the first.

Autograd adds the two paths' gradients of ``k`` and ``log alpha``; the chunk-local cumulative sum ``G`` of
``log alpha`` for the first is a torch ``cumsum`` over a ``[NT, H, C]`` view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.delta_rule.wy import wy_pieces_triton
from kernels.gla.chunk import (
    ChunkWalkFunction,
    check_chunk_size,
    default_chunk_size,
    flatten_tokens,
    layout_for,
)
from kernels.palimpsa.utils import SequenceLayout


def chunk_major(x: Tensor, layout: SequenceLayout, chunk_size: int) -> Tensor:
    """Flattened tokens ``[1, TT, H, *D]`` -> every chunk of every sequence, ``[NT, H, C, *D]``, with zero
    rows past a sequence's end."""
    TT, H = x.shape[1:3]
    C = chunk_size
    seq, within = layout.chunk_index.long().unbind(1)
    cu = layout.cu_seqlens.long()
    start = cu[seq] + within * C
    idx = start[:, None] + torch.arange(C, device=x.device)
    idx = torch.where(idx < cu[seq + 1][:, None], idx, TT).reshape(-1)  # TT: the zero row appended below
    rows = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])[idx]  # [NT * C, H, *D]
    rows = rows.reshape(layout.num_chunks, C, H, *x.shape[3:])
    return rows.transpose(1, 2)


def _chunk_major_dense(x: Tensor, B: int, chunk_size: int) -> Tensor:
    """The same for a plain batch of ``B`` sequences: padding and a view instead of a gather."""
    _, TT, H = x.shape[:3]
    T = TT // B
    n = -(-T // chunk_size)
    x = x.reshape(B, T, *x.shape[2:])
    if n * chunk_size > T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, n * chunk_size - T))
    return x.reshape(B * n, chunk_size, H, *x.shape[3:]).transpose(1, 2)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(Gated) delta rule, WY pieces and the walk in Triton; same contract as ``naive_recurrent_delta_rule``.
    With ``cu_seqlens`` the batch is flattened (``B == 1``) and the states are ``[N, H, V, K]``. ``y`` comes
    back in the inputs' dtype, the final state in fp32. ``chunk_size``: 64, 32 when K or V is above 128
    (``default_chunk_size``)."""
    B, T, H, K = q.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(K, v.shape[-1], state_values=True)
    check_chunk_size(chunk_size)
    scale = K**-0.5 if scale is None else float(scale)
    layout = layout_for(B, T, cu_seqlens, chunk_size, q.device)
    q, k = flatten_tokens(q), flatten_tokens(k.to(q.dtype))
    la = flatten_tokens(q.new_zeros(B, T, H, dtype=torch.float32) if log_alpha is None else log_alpha.float())

    G = None
    if log_alpha is not None:
        G = (
            _chunk_major_dense(la, B, chunk_size)
            if cu_seqlens is None
            else chunk_major(la, layout, chunk_size)
        )
        G = G.cumsum(-1).contiguous()  # [NT, H, C]
    U, Wk = wy_pieces_triton(k, flatten_tokens(v), flatten_tokens(beta), G, layout, chunk_size)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    y, ht = ChunkWalkFunction.apply(q, k, U, Wk, la, h0, scale, layout, output_final_state, chunk_size)
    return y.view(B, T, H, -1), ht
