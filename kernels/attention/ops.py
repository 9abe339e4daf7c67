"""Dispatch for causal softmax attention: torch's fused SDPA, or the written-out reference."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kernels.attention.naive import naive_attention
from kernels.backends import resolve_backend


def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, backend: str = "auto"
) -> tuple[Tensor, None]:
    """Causal softmax attention on ``[B, T, H, D]`` via ``F.scaled_dot_product_attention``; ``(y, None)``."""
    if backend == "reference":
        return naive_attention(q, k, v, scale)
    resolve_backend("attention", q.device, backend)  # validates the request; always "torch"
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return y.transpose(1, 2), None
