"""Float64-exact reference for Mesa (layout ``[B, T, H, D]``; ``G [B, H, V, K]``, ``Hm [B, H, K, K]``).

Full ``K x K`` precision per head: ``Hm_t = alpha_t Hm_{t-1} + (1 - alpha_t) Ip Id + beta_t k_t k_t^T``
(``Hm_0 = Ip Id``), ``G_t = alpha_t G_{t-1} + beta_t v_t k_t^T`` and ``y_t = scale * G_t Hm_t^{-1} q_t``
by an exact linear solve. ``Hm - Ip Id`` and ``G`` are plain gated linear recurrences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.gla.naive import decay_matrix

MesaState = tuple[Tensor, Tensor]  # (G [B, H, V, K], Hm [B, H, K, K])


def _prior_eye(ip: Tensor | float, H: int, K: int, like: Tensor) -> Tensor:
    """``Ip * Id`` per head, shape ``[1, H, K, K]``."""
    ip = torch.as_tensor(ip, dtype=like.dtype, device=like.device)
    ip = ip.expand(H) if ip.dim() == 0 else ip
    return ip[None, :, None, None] * torch.eye(K, dtype=like.dtype, device=like.device)


def _initial(q: Tensor, V: int, prior: Tensor, initial_state: MesaState | None) -> MesaState:
    B, _, H, K = q.shape
    if initial_state is None:
        return q.new_zeros(B, H, V, K), q.new_zeros(B, H, K, K)
    G0, Hm0 = initial_state
    return G0.to(q.dtype), (Hm0 - prior).to(q.dtype)


def naive_recurrent_mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: MesaState | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, MesaState | None]:
    """Mesa one token at a time, one ``linalg.solve`` per step; ``beta``, ``log_alpha`` are ``[B, T, H]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    prior = _prior_eye(ip, H, K, q)
    G, Hbar = _initial(q, V, prior, initial_state)
    ys = []
    for t in range(T):
        alpha = log_alpha[:, t].exp()[..., None, None]
        k_t = k[:, t, :, :, None]  # [B, H, K, 1]
        b_t = beta[:, t, :, None, None]
        Hbar = alpha * Hbar + b_t * k_t @ k_t.transpose(-1, -2)
        G = alpha * G + b_t * v[:, t, :, :, None] @ k_t.transpose(-1, -2)
        x = torch.linalg.solve(Hbar + prior, q[:, t, :, :, None])
        ys.append(scale * (G @ x)[..., 0])
    return torch.stack(ys, dim=1), ((G, Hbar + prior) if output_final_state else None)


def naive_chunk_mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: MesaState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, MesaState | None]:
    """Chunked Mesa: all ``Hm_t`` of a chunk from one matmul, one batched solve ``x_t = Hm_t^{-1} q_t``,
    then the simple-GLA chunk read-out ``y_t = scale * G_t x_t`` with values ``beta_j v_j``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    prior = _prior_eye(ip, H, K, q)
    G, Hbar = _initial(q, V, prior, initial_state)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    bvh = (beta[..., None] * v).transpose(1, 2)  # [B, H, T, V]
    bh = beta.transpose(1, 2)[..., None]
    gh = log_alpha.transpose(1, 2)
    ys = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        q_c, k_c, bv_c, b_c = qh[:, :, s:e], kh[:, :, s:e], bvh[:, :, s:e], bh[:, :, s:e]
        g = gh[:, :, s:e].cumsum(-1)
        D = decay_matrix(g)
        eg = g.exp()[..., None, None]  # [B, H, C, 1, 1]
        # Hbar_t = e^{G_t} Hbar_0 + sum_j D[t, j] beta_j k_j k_j^T
        bk = (D[..., None] * (b_c * k_c)[:, :, None]).transpose(-1, -2)  # [B, H, C(t), K, C(j)]
        Hbars = eg * Hbar[:, :, None] + bk @ k_c[:, :, None]
        x = torch.linalg.solve(Hbars + prior[:, :, None], q_c[..., None])[..., 0]  # [B, H, C, K]
        inter = eg[..., 0] * (x @ G.transpose(-1, -2))
        intra = ((x @ k_c.transpose(-1, -2)) * D) @ bv_c
        ys.append(scale * (inter + intra))
        w_last = (g[..., -1:] - g).exp()[..., None]
        G = g[..., -1].exp()[..., None, None] * G + (bv_c * w_last).transpose(-1, -2) @ k_c
        Hbar = Hbars[:, :, -1]
    y = torch.cat(ys, dim=2).transpose(1, 2)
    return y, ((G, Hbar + prior) if output_final_state else None)
