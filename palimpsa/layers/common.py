"""Pieces shared by every mixer: short conv, norms, gate initialisers and the layer shell around a recurrence.

The shell is the same for every fixed-memory member of the family, so that an ablation changes
only the recurrence: ``q, k = L2norm(SiLU(ShortConv(W x)))`` (the Mamba2 pair skips the L2 norm, as Mamba2
does), ``v = SiLU(ShortConv(W_v x))``, then
``o + D_h * v -> gated RMSNorm(., W_g x) -> o_proj``. Parameter names are shared too, which is what lets a
Mamba2 checkpoint load straight into MetaMamba2 (see ``palimpsa.conversion``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.backends import resolve_backend
from palimpsa.config import MixerConfig

Cache = dict[str, Any]  # a mixer's generation cache: conv tails and recurrent state (or KV cache)

L2_EPS = 1e-6


def l2norm(x: Tensor, eps: float = L2_EPS) -> Tensor:
    """Unit-norm keys/queries keep ``k (x) k`` and the delta-rule steps bounded. The norm is taken in at least
    fp32 and the result keeps ``x``'s dtype: under CUDA autocast ``rsqrt`` is an fp32-listed op, and a 16-bit
    ``x`` would otherwise leave as fp32 q and k next to a 16-bit v."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedRMSNorm(RMSNorm):
    """RMSNorm over each head's value dim, times ``SiLU(gate)``: the output gate of the shell."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x) * F.silu(gate)


class FullGatedRMSNorm(RMSNorm):
    """RMSNorm over all ``H * V`` channels of ``o * SiLU(gate)``: Mamba2's output norm (gate first)."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        B, T, H, V = x.shape
        return super().forward((x * F.silu(gate)).reshape(B, T, H * V)).view(B, T, H, V)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, as ``size`` shifted multiply-adds in the ``[B, T, C]`` layout.

    Why not ``conv1d``: its depthwise kernels and the two transposes around them took a tenth of a small
    model's training step on a GPU, while the shifted sums are elementwise work that ``torch.compile`` fuses.
    Products and sums run in fp32 whatever the input dtype. The cache is the last ``size - 1`` inputs
    (``[B, C, size - 1]``); the full and the step-by-step forward do the very same elementwise operations on
    ``[cache, x]``, so generation with a cache matches the full forward bit for bit.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        nn.init.uniform_(self.weight, -1 / math.sqrt(size), 1 / math.sqrt(size))

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        past = x.new_zeros(B, self.size - 1, C) if cache is None else cache.transpose(1, 2).to(x.dtype)
        xp = torch.cat([past, x], dim=1)  # [B, size - 1 + T, C]
        w = self.weight[:, 0, :]
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # [C, size]
        y = xp[:, :T] * w[:, 0]
        for j in range(1, self.size):
            y = y + xp[:, j : j + T] * w[:, j]
        return y.to(x.dtype), xp[:, T:].transpose(1, 2)


def gate_parameter(value: Tensor) -> nn.Parameter:
    """A gate parameter (A, dt bias, D, prior, scales), marked so weight decay never pulls it to 0."""
    param = nn.Parameter(value)
    param._no_weight_decay = True  # read by palimpsa.training.optim.decays
    return param


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


DT_FLOOR = 1e-4  # smallest dt at init
A_RAMPS = {"small": (0.01, 0.16), "very_small": (0.001, 0.016), "normal": (1.0, 16.0)}


def init_dt_bias(num_heads: int, dt_min: float, dt_max: float, forgetting: str = "random") -> Tensor:
    """Bias such that ``softplus(bias) = dt``, with ``dt ~ logU(dt_min, dt_max)`` (Mamba2's init, "random")
    or, for the ramps, ``dt`` log-spaced from ``dt_max`` (head 0) down to ``dt_min`` (last head)."""
    if forgetting == "random":
        log_dt = torch.empty(num_heads).uniform_(math.log(dt_min), math.log(dt_max))
    else:
        ramp = torch.linspace(1.0, 0.0, num_heads, dtype=torch.float64)
        log_dt = (ramp * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).float()
    return inverse_softplus(log_dt.exp().clamp_min(DT_FLOOR))


def init_a_log(num_heads: int, a_min: float, a_max: float, forgetting: str = "random") -> Tensor:
    """``log A_h`` with ``A_h ~ U(a_min, a_max)`` ("random") or the named ramp of :data:`A_RAMPS`."""
    if forgetting == "random":
        return torch.empty(num_heads).uniform_(a_min, a_max).log()
    return torch.linspace(*A_RAMPS[forgetting], num_heads).log()


class DtGate(nn.Module):
    """Mamba2-style forgetting: ``dt = softplus(w_dt . x + dt_bias)``, ``log alpha = -exp(A_log) * dt``.

    ``log alpha`` is formed directly in log space (never ``log(exp(.))``), so it is exact and ``<= 0``.
    """

    def __init__(self, cfg: MixerConfig, d_model: int):
        super().__init__()
        H = cfg.num_heads
        self.w_dt = nn.Linear(d_model, H, bias=cfg.bias)
        self.dt_bias = gate_parameter(init_dt_bias(H, cfg.dt_min, cfg.dt_max, cfg.forgetting))
        self.A_log = gate_parameter(init_a_log(H, cfg.a_init_min, cfg.a_init_max, cfg.forgetting))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(dt, log_alpha)``, each ``[B, T, H]``."""
        dt = F.softplus(self.w_dt(x) + self.dt_bias)
        return dt, -self.A_log.exp() * dt


class MixerShell(nn.Module):
    """Projections, short convs, ``D`` skip, gated output norm; subclasses supply ``core``.

    ``forward(x, cache=None, use_cache=False) -> (out, cache or None)``: ``cache`` holds the conv tails and
    the recurrent state that ``core`` returns, so prefill-then-step equals one full forward.
    """

    op_name = "simple_gla"  # the kernels.backends op whose implementation the config's backend picks

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, K, V = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        self.num_heads, self.head_k_dim, self.head_v_dim = H, K, V
        self.scale = K**-0.5 if cfg.scale is None else cfg.scale  # the read-out's
        self.q_proj = nn.Linear(d_model, H * K, bias=cfg.bias)
        self.k_proj = nn.Linear(d_model, H * K, bias=cfg.bias)
        self.v_proj = nn.Linear(d_model, H * V, bias=cfg.bias)
        if cfg.conv_size > 0:
            self.q_conv = ShortConv(H * K, cfg.conv_size)
            self.k_conv = ShortConv(H * K, cfg.conv_size)
            self.v_conv = ShortConv(H * V, cfg.conv_size)
        self.g_proj = nn.Linear(d_model, H * V, bias=cfg.bias)
        if cfg.d_skip:
            self.D = gate_parameter(torch.ones(H))
        if cfg.output_norm == "head":
            self.o_norm: GatedRMSNorm | FullGatedRMSNorm = GatedRMSNorm(V, norm_eps)
        else:
            self.o_norm = FullGatedRMSNorm(H * V, norm_eps)
        self.o_proj = nn.Linear(H * V, d_model, bias=cfg.bias)
        self.o_proj.is_residual_out = True  # scaled down at init by the model (default init)

    # ----------------------------------------------------------------- pieces
    def _conv(self, name: str, x: Tensor, cache: Cache | None, new: dict[str, Tensor]) -> Tensor:
        if self.cfg.conv_size == 0:
            return x
        conv: ShortConv = getattr(self, f"{name}_conv")
        y, tail = conv(x, None if cache is None else cache["conv"][name])
        new[name] = tail
        return y

    def project(self, x: Tensor, cache: Cache | None = None) -> tuple[Tensor, Tensor, Tensor, dict]:
        """``q, k [B, T, H, K]`` (L2-normed unless ``qk_norm`` is none), ``v [B, T, H, V]``, conv tails."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        tails: dict[str, Tensor] = {}
        q = F.silu(self._conv("q", self.q_proj(x), cache, tails)).view(B, T, H, K)
        k = F.silu(self._conv("k", self.k_proj(x), cache, tails)).view(B, T, H, K)
        v = F.silu(self._conv("v", self.v_proj(x), cache, tails)).view(B, T, H, V)
        if self.cfg.resolved_qk_norm == "l2":
            q, k = l2norm(q), l2norm(k)
        return q, k, v, tails

    def finish(self, x: Tensor, o: Tensor, v: Tensor) -> Tensor:
        B, T, H, V = o.shape
        if self.cfg.d_skip:
            o = o + self.D[:, None] * v
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))

    def backend_name(self, device: torch.device | str) -> str:
        return resolve_backend(self.op_name, device, self.cfg.backend)

    # ----------------------------------------------------------------- API
    def core(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, state: Any, output_final_state: bool
    ) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor, cache: Cache | None = None, use_cache: bool = False):
        q, k, v, tails = self.project(x, cache)
        o, state = self.core(x, q, k, v, None if cache is None else cache["state"], use_cache)
        out = self.finish(x, o, v)
        return out, ({"conv": tails, "state": state} if use_cache else None)

    def log_alpha(self, x: Tensor) -> Tensor | None:
        """``[B, T, H]`` log forgetting factors for diagnostics; None for ungated mixers."""
        return None

    def importance(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(I_T [B, H, V, K], Ip [H])`` at the last token for metaplastic mixers, else None."""
        return None
