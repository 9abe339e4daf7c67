"""Softmax attention, Transformer++ style (rotary positions, no biases): the non-fixed-memory reference.

The generation cache is the key/value history; a query block attends to all cached keys plus the causal
part of its own block, so prefill-then-step equals the full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.attention import attention
from kernels.backends import resolve_backend
from palimpsa.config import MixerConfig
from palimpsa.layers.common import Cache

ROPE_BASE = 10000.0


def rotary(x: Tensor, start: int, base: float = ROPE_BASE) -> Tensor:
    """Rotate pairs ``(x[..., :K/2], x[..., K/2:])`` of ``x [B, T, H, K]`` by position ``start + t``."""
    T, K = x.shape[1], x.shape[-1]
    half = K // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    pos = torch.arange(start, start + T, dtype=torch.float64, device=x.device)
    angle = (pos[:, None] * inv_freq[None]).to(x.dtype)  # [T, K/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    op_name = "attention"

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, d_model, bias=False)
        self.o_proj.is_residual_out = True

    def backend_name(self, device: torch.device | str) -> str:
        return resolve_backend(self.op_name, device, self.cfg.backend)

    def forward(self, x: Tensor, cache: Cache | None = None, use_cache: bool = False):
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        start = 0 if cache is None else cache["k"].shape[1]
        q = rotary(self.q_proj(x).view(B, T, H, K), start)
        k = rotary(self.k_proj(x).view(B, T, H, K), start)
        v = self.v_proj(x).view(B, T, H, V)
        if cache is None:
            o, _ = attention(q, k, v, backend=self.cfg.backend)
            k_all, v_all = k, v
        else:
            k_all = torch.cat([cache["k"].to(k.dtype), k], dim=1)
            v_all = torch.cat([cache["v"].to(v.dtype), v], dim=1)
            # Query t (absolute start + t) sees keys 0 .. start + t.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask, scale=K**-0.5
            ).transpose(1, 2)
        out = self.o_proj(o.reshape(B, T, H * V))
        return out, ({"k": k_all, "v": v_all} if use_cache else None)

    def log_alpha(self, x: Tensor) -> None:
        return None

    def importance(self, x: Tensor) -> None:
        return None
