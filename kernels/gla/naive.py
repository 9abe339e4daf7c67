"""Float64-exact references for Mamba2 / simple GLA (scalar per-head decay) and linear attention.

Layout ``[B, T, H, D]``, states ``[B, H, V, K]``. Linear attention is simple GLA with ``log_alpha = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decay_matrix(g: Tensor) -> Tensor:
    """``D[..., t, j] = exp(G_t - G_j)`` for ``j <= t``, else 0, from cumulative log-decays ``g [..., C]``.

    Masking before ``exp`` keeps the positive upper triangle from overflowing and from carrying gradient.
    """
    C = g.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def naive_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``S_t = alpha_t S_{t-1} + v_t k_t^T``, ``y_t = scale * S_t q_t``, one token at a time.

    ``log_alpha`` is ``[B, T, H]`` (``<= 0``); ``initial_state`` is ``[B, H, V, K]``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(q.dtype)
    ys = []
    for t in range(T):
        alpha = log_alpha[:, t].exp()[..., None, None]
        S = alpha * S + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(scale * (S @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, dim=1), (S if output_final_state else None)


def naive_chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Chunked simple GLA, same result as ``naive_recurrent_simple_gla``.

    With chunk-local ``G_t = sum_{j<=t} log alpha_j`` and ``D[t, j] = e^{G_t - G_j}`` (``j <= t``):
    ``y = scale * (e^{G} * (Q S_0^T) + ((Q K^T) * D) V)`` and
    ``S_C = e^{G_C} S_0 + sum_j e^{G_C - G_j} v_j k_j^T``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(q.dtype)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    gh = log_alpha.transpose(1, 2)
    ys = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        q_c, k_c, v_c = qh[:, :, s:e], kh[:, :, s:e], vh[:, :, s:e]
        g = gh[:, :, s:e].cumsum(-1)
        inter = g.exp()[..., None] * (q_c @ S.transpose(-1, -2))
        intra = ((q_c @ k_c.transpose(-1, -2)) * decay_matrix(g)) @ v_c
        ys.append(scale * (inter + intra))
        w = (g[..., -1:] - g).exp()[..., None]  # e^{G_C - G_j} <= 1
        S = g[..., -1].exp()[..., None, None] * S + (v_c * w).transpose(-1, -2) @ k_c
    y = torch.cat(ys, dim=2).transpose(1, 2)
    return y, (S if output_final_state else None)
