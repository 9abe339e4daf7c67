"""Dispatch for Longhorn.

Its transition is elementwise per state entry, so no matmul chunk form exists; the recurrent torch form
already does the O(T V K) elementwise work a chunk form would, and serves every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.longhorn.naive import naive_recurrent_longhorn


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def longhorn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``S_t = (1 - eps_t (x) k_t^2) * S_{t-1} + (eps_t * v_t) (x) k_t``; see ``naive_recurrent_longhorn``."""
    resolve_backend("longhorn", q.device, backend)  # validates the request; always "torch"
    return naive_recurrent_longhorn(q, k, v, beta, scale, initial_state, output_final_state)
