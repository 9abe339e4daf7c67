"""Float64-exact references for DeltaNet and Gated DeltaNet (``[B, T, H, D]``, states ``[B, H, V, K]``).

``S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``y_t = scale * S_t q_t``;
``alpha = 1`` (DeltaNet) when ``log_alpha`` is None. The layers L2-normalise ``k``; these ops do not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.gla.naive import decay_matrix


def naive_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(Gated) delta rule one token at a time; ``beta`` and ``log_alpha`` are ``[B, T, H]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(q.dtype)
    ys = []
    for t in range(T):
        if log_alpha is not None:
            S = log_alpha[:, t].exp()[..., None, None] * S
        k_t = k[:, t, :, :, None]  # [B, H, K, 1]
        b_t = beta[:, t, :, None, None]
        # S (I - b k k^T) + b v k^T == S + b (v - S k) k^T
        S = S + b_t * (v[:, t, :, :, None] - S @ k_t) @ k_t.transpose(-1, -2)
        ys.append(scale * (S @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, dim=1), (S if output_final_state else None)


def naive_chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Chunked (gated) delta rule via the UT/WY representation; same result as the recurrent form.

    Writing ``w_t = beta_t (v_t - alpha_t S_{t-1} k_t)`` turns the update into the GLA recurrence
    ``S_t = alpha_t S_{t-1} + w_t k_t^T``. Inside a chunk (``D[t, j] = e^{G_t - G_j}``) the ``w`` solve the
    unit lower-triangular system
    ``(I + tril_{-1}(diag(beta) (K K^T) * D)) W = diag(beta) (V - e^{G} K S_0^T)``, after which
    output and state follow the simple-GLA chunk formulas with values ``W``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(q.dtype)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    bh = beta.transpose(1, 2)[..., None]  # [B, H, T, 1]
    gh = q.new_zeros(B, H, T) if log_alpha is None else log_alpha.transpose(1, 2)
    ys = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        q_c, k_c, v_c, b_c = qh[:, :, s:e], kh[:, :, s:e], vh[:, :, s:e], bh[:, :, s:e]
        g = gh[:, :, s:e].cumsum(-1)
        D = decay_matrix(g)
        eg = g.exp()[..., None]
        A = (b_c * (k_c @ k_c.transpose(-1, -2)) * D).tril(-1)
        eye = torch.eye(e - s, dtype=q.dtype, device=q.device)
        rhs = b_c * (v_c - eg * (k_c @ S.transpose(-1, -2)))
        W = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        intra = ((q_c @ k_c.transpose(-1, -2)) * D) @ W
        ys.append(scale * (eg * (q_c @ S.transpose(-1, -2)) + intra))
        w_last = (g[..., -1:] - g).exp()[..., None]
        S = g[..., -1].exp()[..., None, None] * S + (W * w_last).transpose(-1, -2) @ k_c
    y = torch.cat(ys, dim=2).transpose(1, 2)
    return y, (S if output_final_state else None)
