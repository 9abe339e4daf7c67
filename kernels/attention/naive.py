"""Causal softmax attention (Transformer++ mixer), the non-fixed-memory reference of the family."""

from __future__ import annotations

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, None]:
    """``y_t = sum_{j<=t} softmax_j(scale * q_t . k_j) v_j`` written out; returns ``(y, None)`` (no state)."""
    T, K = q.shape[1], q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    logits = scale * torch.einsum("bthk,bshk->bhts", q, k)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshv->bthv", p, v), None
