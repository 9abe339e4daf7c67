"""Vectorized chunked (gated) delta rule in plain torch: exact, differentiable by autograd, CPU and CUDA.

The update ``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` is the GLA recurrence
``S_t = alpha_t S_{t-1} + w_t k_t^T`` with ``w_t = beta_t (v_t - alpha_t S_{t-1} k_t)``. In a chunk starting
from ``S_0``, with chunk-local ``G_t = sum_{j<=t} log alpha_j`` and ``D[t, j] = e^{G_t - G_j}`` (``j <= t``),
the ``w`` solve the unit lower-triangular system

    (I + A) W = diag(beta) V - diag(beta) e^{G} K S_0^T,     A = tril_{-1}(diag(beta) (K K^T) * D),

so ``W = U - W_k S_0^T`` with the state-independent WY pieces

    U = (I + A)^{-1} diag(beta) V,     W_k = (I + A)^{-1} diag(beta) e^{G} K,

computed for all chunks at once (one batched triangular solve). The chunk's output and its state after are

    y     = scale * (e^{G} * (Q S_0^T) + ((Q K^T) * D) W)
    S_C   = e^{G_C} S_0 + W^T K_d = S_0 M + R,     K_d = e^{G_C - G} * K,
    M     = e^{G_C} I - W_k^T K_d,     R = U^T K_d,

so the only sequential work is ``S <- S M_n + R_n``, one batched product per chunk. ``A`` is strictly lower
triangular; the solve never reads its diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.gla.chunk_torch import carry_states, compute_dtype, from_chunks, to_chunks
from kernels.gla.naive import decay_matrix


def wy_pieces(k: Tensor, v: Tensor, beta: Tensor, G: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(U [..., C, V], W_k [..., C, K])`` of every chunk from ``k [..., C, K]``, ``v [..., C, V]``,
    ``beta [..., C]`` and the chunk-local cumulative log-decay ``G [..., C]`` (None: no decay)."""
    kk = k @ k.transpose(-1, -2)
    if G is not None:
        kk = kk * decay_matrix(G)
    A = (beta[..., None] * kk).tril(-1)
    ek = k if G is None else G.exp()[..., None] * k
    rhs = beta[..., None] * torch.cat([v, ek], dim=-1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    return X.split([v.shape[-1], k.shape[-1]], dim=-1)


def _transition(S: Tensor, M: Tensor, R: Tensor) -> Tensor:
    """``S M + R`` for ``S, R [B, H, V, K]``, ``M [B, H, K, K]``: one batched product-and-add."""
    return torch.baddbmm(R.flatten(0, 1), S.flatten(0, 1), M.flatten(0, 1)).view_as(R)


def chunk_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """(Gated) delta rule, same contract as ``naive_recurrent_delta_rule``; ``y`` in the inputs' dtype, the
    final state ``[B, H, V, K]`` in fp32 (fp64 for fp64 inputs)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    qc, kc, vc = (to_chunks(x, chunk_size, dt) for x in (q, k, v))
    bc = to_chunks(beta, chunk_size, dt)  # [B, H, N, C]; 0 on padding, so padded rows of U, W_k are 0
    G = None if log_alpha is None else to_chunks(log_alpha, chunk_size, dt).cumsum(-1)
    U, Wk = wy_pieces(kc, vc, bc, G)
    if G is None:
        Kd, eye_decay, D, eG = kc, torch.eye(K, dtype=dt, device=q.device), None, None
    else:
        G_last = G[..., -1:]
        Kd = (G_last - G).exp()[..., None] * kc
        eye_decay = G_last.exp()[..., None] * torch.eye(K, dtype=dt, device=q.device)
        D, eG = decay_matrix(G), G.exp()[..., None]
    M = eye_decay - Wk.transpose(-1, -2) @ Kd  # [B, H, N, K, K]: the chunk's transition
    R = U.transpose(-1, -2) @ Kd  # [B, H, N, V, K]
    S0 = q.new_zeros(B, H, V, K, dtype=dt) if initial_state is None else initial_state.to(dt)
    states, S = carry_states(_transition, S0, M, R)
    St = states.transpose(-1, -2)
    W = U - Wk @ St
    qk = qc @ kc.transpose(-1, -2)
    inter = qc @ St
    if G is None:
        qk = qk.tril()
    else:
        qk, inter = qk * D, eG * inter
    y = inter + qk @ W
    return from_chunks(scale * y, T).to(q.dtype), (S if output_final_state else None)
