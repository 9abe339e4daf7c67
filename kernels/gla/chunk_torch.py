"""Vectorized chunked simple GLA in plain torch: exact, differentiable by autograd, on CPU and CUDA.

Every chunk's intra-chunk work runs at once as batched products over a ``[B, H, N, C, D]`` view of the
sequence (``T`` padded up to ``N * C`` with tokens that leave the state unchanged: ``k = v = 0``,
``log alpha = 0``). Only the inter-chunk recurrence of the states is a loop, ``N = T / C`` steps of one
multiply-add each, so the number of kernel launches does not grow with ``T / C`` beyond that loop.

With chunk-local ``G_t = sum_{j<=t} log alpha_j`` and ``D[t, j] = e^{G_t - G_j}`` (``j <= t``), chunk ``n``
starting from state ``S_n``:

    y     = scale * (e^{G} * (Q S_n^T) + ((Q K^T) * D) V)
    S_n+1 = e^{G_C} S_n + (e^{G_C - G} * V)^T K

Every exponent is ``<= 0`` once masked, so nothing overflows however strong the decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.gla.naive import decay_matrix


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit inputs are accumulated in fp32; fp32 and fp64 stay as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def to_chunks(x: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """``[B, T, H, *D]`` -> ``[B, H, N, C, *D]`` in ``dtype``, zero-padding ``T`` up to ``N * C``."""
    B, T, H = x.shape[:3]
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    x = x.to(dtype)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(B, n, chunk_size, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def from_chunks(x: Tensor, T: int) -> Tensor:
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]``, dropping the padding."""
    B, H, N, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]


def carry_states(step, S0: Tensor, *per_chunk: Tensor) -> tuple[Tensor, Tensor]:
    """``S_{n+1} = step(S_n, *(x[:, :, n] for x in per_chunk))`` over the chunks (dim 2 of ``per_chunk``);
    returns the states before each chunk ``[B, H, N, V, K]`` and the final state.

    The per-chunk tensors are unbound once (one backward op for all chunks, where indexing inside the loop
    would allocate a full-size gradient per chunk)."""
    states = []
    S = S0
    for xs in zip(*(x.unbind(2) for x in per_chunk), strict=True):
        states.append(S)
        S = step(S, *xs)
    return torch.stack(states, dim=2), S


def chunk_simple_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Simple GLA, same contract as ``naive_recurrent_simple_gla``; ``y`` in the inputs' dtype, the final
    state ``[B, H, V, K]`` in fp32 (fp64 for fp64 inputs)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (to_chunks(x, chunk_size, dt) for x in (q, k, v))
    G = to_chunks(log_alpha, chunk_size, dt).cumsum(-1)  # [B, H, N, C]
    G_last = G[..., -1]  # [B, H, N]
    # the chunks' own contributions to the state after them, all at once
    R = (vc * (G_last[..., None] - G).exp()[..., None]).transpose(-1, -2) @ kc  # [B, H, N, V, K]
    S0 = q.new_zeros(B, H, V, K, dtype=dt) if initial_state is None else initial_state.to(dt)
    states, S = carry_states(lambda S, d, r: torch.addcmul(r, d, S), S0, G_last.exp()[..., None, None], R)
    inter = G.exp()[..., None] * (qc @ states.transpose(-1, -2))
    y = inter + ((qc @ kc.transpose(-1, -2)) * decay_matrix(G)) @ vc
    return from_chunks(scale * y, T).to(q.dtype), (S if output_final_state else None)
