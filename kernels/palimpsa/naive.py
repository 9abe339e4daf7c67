"""Step-by-step reference of the Palimpsa recurrence (math: README.md here), exact in float64.

Layout follows fla: tokens are ``[B, T, H, D]`` and states are ``[B, H, V, K]``.
This is the ground truth every faster form is tested against, so it favours clarity
over speed: one Python loop over time, no fused tricks.
"""

from __future__ import annotations

import torch
from torch import Tensor

PalimpsaState = tuple[Tensor, Tensor]  # (mu, I), each [B, H, V, K]


def _as_head_prior(ip: Tensor | float, num_heads: int, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-head prior precision to shape ``[H]``."""
    ip = torch.as_tensor(ip, dtype=like.dtype, device=like.device)
    return ip.expand(num_heads) if ip.dim() == 0 else ip


def naive_recurrent_palimpsa(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: PalimpsaState | None = None,
    output_final_state: bool = False,
    output_variance: bool = False,
) -> tuple[Tensor, Tensor | None, PalimpsaState | None]:
    """Palimpsa recurrence, one token at a time.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        u: ``[B, T, H, V]`` numerator input (e.g. ``beta * v`` or ``bs * v``).
        beta: ``[B, T, H, V]`` precision gate, ``>= 0``.
        log_alpha: ``[B, T, H]`` log forgetting factor, ``<= 0``.
        ip: prior precision, a scalar or ``[H]``, ``> 0``.
        scale: read-out scale, ``K ** -0.5`` by default.
        initial_state: optional ``(mu_0, I_0)``; defaults to ``(0, Ip)``.
        output_final_state: also return ``(mu_T, I_T)``.
        output_variance: also return ``scale**2 * (1 / I_t) @ q_t**2``.

    Returns:
        ``(y, variance or None, final state or None)`` with ``y`` of shape ``[B, T, H, V]``.
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    scale = K**-0.5 if scale is None else scale
    ip_h = _as_head_prior(ip, H, q)[None, :, None, None]  # [1, H, 1, 1]

    # M = mu * I and Ibar = I - Ip are plain gated linear recurrences; only the read-out divides.
    if initial_state is None:
        M = q.new_zeros(B, H, V, K)
        Ibar = q.new_zeros(B, H, V, K)
    else:
        mu0, I0 = initial_state
        M = (mu0 * I0).to(q.dtype)
        Ibar = (I0 - ip_h).to(q.dtype)

    ys, variances = [], []
    for t in range(T):
        alpha = log_alpha[:, t].exp()[..., None, None]  # [B, H, 1, 1]
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        M = alpha * M + u[:, t, :, :, None] * k_t
        Ibar = alpha * Ibar + beta[:, t, :, :, None] * k_t * k_t
        I = Ibar + ip_h
        q_t = q[:, t, :, None, :]
        ys.append(scale * (M / I * q_t).sum(-1))
        if output_variance:
            variances.append(scale**2 * (q_t * q_t / I).sum(-1))

    y = torch.stack(ys, dim=1)
    variance = torch.stack(variances, dim=1) if output_variance else None
    final_state = None
    if output_final_state:
        I = Ibar + ip_h
        final_state = (M / I, I)
    return y, variance, final_state


def _decay_matrix(g: Tensor) -> Tensor:
    """``D[..., t, j] = exp(G_t - G_j)`` for ``j <= t``, else 0, from cumulative log-decays ``g [..., C]``.

    Masking happens before ``exp`` so the (positive, possibly huge) upper triangle never overflows
    and carries no gradient.
    """
    C = g.shape[-1]
    diff = g[..., :, None] - g[..., None, :]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return diff.masked_fill(~causal, float("-inf")).exp()


def naive_chunk_palimpsa(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: PalimpsaState | None = None,
    output_final_state: bool = False,
    output_variance: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None, PalimpsaState | None]:
    """Chunked Palimpsa: same contract and result as ``naive_recurrent_palimpsa``.

    Inside a chunk with chunk-local ``G_t = sum_{j<=t} log alpha_j``,
    ``M_t = e^{G_t} M_0 + sum_{j<=t} e^{G_t - G_j} u_j (x) k_j``, likewise ``Ibar`` with ``beta_j (x) k_j^2``.
    All ``M_t`` of a chunk come from one batched matmul; the read-out divides elementwise, so the states are
    materialised per token inside the chunk (O(C V K) memory) and carried only across chunk boundaries.
    This is the fast CPU path: vectorised within a chunk, a Python loop only over chunks.
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    scale = K**-0.5 if scale is None else scale
    ip_s = _as_head_prior(ip, H, q)[None, :, None, None]  # [1, H, 1, 1]
    ip_h = ip_s[:, :, None]  # [1, H, 1, 1, 1], broadcasts over the chunk's tokens

    if initial_state is None:
        M = q.new_zeros(B, H, V, K)
        Ibar = q.new_zeros(B, H, V, K)
    else:
        mu0, I0 = initial_state
        M = (mu0 * I0).to(q.dtype)
        Ibar = (I0 - ip_s).to(q.dtype)

    # Heads first: [B, H, T, D].
    qh, kh, uh, bh = (x.transpose(1, 2) for x in (q, k, u, beta))
    gh = log_alpha.transpose(1, 2)
    ys, variances = [], []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        q_c, k_c, u_c, b_c = qh[:, :, s:e], kh[:, :, s:e], uh[:, :, s:e], bh[:, :, s:e]
        g = gh[:, :, s:e].cumsum(-1)  # [B, H, C]
        D = _decay_matrix(g)  # [B, H, C(t), C(j)]
        carry = g.exp()[..., None, None]  # [B, H, C, 1, 1]
        # sum_j D[t, j] a_j (x) b_j  ==  (D[t, :, None] * a)^T @ b, batched over t.
        k_c1 = k_c[:, :, None]  # [B, H, 1, C, K]
        Ms = carry * M[:, :, None] + (D[..., None] * u_c[:, :, None]).transpose(-1, -2) @ k_c1
        Ibs = carry * Ibar[:, :, None] + (D[..., None] * b_c[:, :, None]).transpose(-1, -2) @ (k_c1 * k_c1)
        I = Ibs + ip_h  # [B, H, C, V, K]
        q_t = q_c[:, :, :, None, :]  # [B, H, C, 1, K]
        ys.append(scale * (Ms / I * q_t).sum(-1))
        if output_variance:
            variances.append(scale**2 * (q_t * q_t / I).sum(-1))
        M, Ibar = Ms[:, :, -1], Ibs[:, :, -1]

    y = torch.cat(ys, dim=2).transpose(1, 2)
    variance = torch.cat(variances, dim=2).transpose(1, 2) if output_variance else None
    final_state = None
    if output_final_state:
        I = Ibar + ip_s
        final_state = (M / I, I)
    return y, variance, final_state
