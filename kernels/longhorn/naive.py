"""Float64-exact reference for Longhorn (layout ``[B, T, H, D]``, states ``[B, H, V, K]``).

Longhorn reads the state update as one step of online regression: row ``i`` of ``S`` minimises
``||s - s_{t-1}||^2 + beta_{t,i} (s . k_t - v_{t,i})^2``, whose exact solution is
``s_t = s_{t-1} + eps_{t,i} (v_{t,i} - s_{t-1} . k_t) k_t`` with ``eps_t = beta_t / (1 + beta_t (k_t . k_t))``
(a delta rule with a per-row step). Longhorn keeps only the diagonal of ``k_t k_t^T`` in the forgetting term
so that the transition is elementwise (scan-friendly):
``S_t = (1 - eps_t (x) k_t^2) * S_{t-1} + (eps_t * v_t) (x) k_t``. No extra forget gate, no metaplasticity.
Since ``eps_{t,i} k_{t,m}^2 < 1`` the decay stays in ``(0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_recurrent_longhorn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Longhorn, one token at a time; ``beta`` is ``[B, T, H, V]`` (``>= 0``), ``y_t = scale * S_t q_t``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, V, K) if initial_state is None else initial_state.to(q.dtype)
    ys = []
    for t in range(T):
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        b_t = beta[:, t, :, :, None]  # [B, H, V, 1]
        eps = b_t / (1 + b_t * (k_t * k_t).sum(-1, keepdim=True))
        S = (1 - eps * k_t * k_t) * S + eps * v[:, t, :, :, None] * k_t
        ys.append(scale * (S @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, dim=1), (S if output_final_state else None)
