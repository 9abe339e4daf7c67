"""Step-by-step reference of the Palimpsa recurrence (DESIGN §1), exact in float64.

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
