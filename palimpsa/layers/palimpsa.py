"""Palimpsa and MetaMamba2: the shell around the Palimpsa recurrence (``kernels/palimpsa/README.md``).

Gates, per token and head (``[B, T, H]`` unless marked ``V``):

- ``paper``:    ``alpha = 1 - gamma / N_h``, ``gamma = sigmoid(w_gamma . x)``, ``N_h = n_init * exp(logN_h)``;
                precision gate ``gate[V] = gamma * sigmoid(W_up W_down x)``.
- ``official``: ``alpha = exp(-A_h dt)``, ``dt = softplus(w_dt . x + dt_bias)``; ``bs = sigmoid(w_bs . x)``;
                ``gate[V] = sigmoid(W_up W_down x) * softplus(b_scale_h) * bs``.

Numerator ``u = gate * v`` (``beta_v``, "no forgetting entails no input") or ``u = bs * v`` (``bs_v``).
The precision gate that feeds the importance state is ``beta = gate`` (times ``|g_h|`` with
``plasticity_gain``); ``metaplastic=false`` sets ``beta = 0`` and leaves the numerator alone, so that
ablation removes the importance state and nothing else (``I_t == Ip``: the Mamba2 limit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.palimpsa import fused_recurrent_palimpsa, palimpsa_attn
from palimpsa.config import MixerConfig
from palimpsa.layers.common import DtGate, MixerShell, gate_parameter, inverse_softplus

ALPHA_FLOOR = 1e-6  # paper gates: alpha >= this, so log alpha stays finite


def abs_with_unit_slope(g: Tensor) -> Tensor:
    """``|g|`` whose derivative at ``g == 0`` is ``+1`` (torch's ``abs`` gives 0 there).

    A converted layer starts at ``g = 0``; this keeps ``beta >= 0`` while the first optimizer step still
    moves ``g`` away from zero, whichever sign the gradient has.
    """
    return torch.where(g >= 0, g, -g)


class _MetaplasticBase(MixerShell):
    """What Palimpsa and MetaMamba2 share: the prior ``Ip``, the low-rank precision gate and the op call."""

    op_name = "palimpsa"

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        H, V = cfg.num_heads, cfg.head_v_dim
        ip_log = torch.full((H,), math.log(cfg.ip))
        if cfg.ip_trainable:
            self.ip_log = gate_parameter(ip_log)
        else:  # a buffer: saved with the model, never handed to the optimizer
            self.register_buffer("ip_log", ip_log)
        self.beta_down = nn.Linear(d_model, cfg.beta_rank, bias=False)
        self.beta_up = nn.Linear(cfg.beta_rank, H * V, bias=False)
        if cfg.plasticity_gain:
            self.beta_gain = gate_parameter(torch.zeros(H))
        self.last_variance: Tensor | None = None

    @property
    def ip(self) -> Tensor:
        return self.ip_log.exp()

    def _low_rank_gate(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return torch.sigmoid(self.beta_up(self.beta_down(x))).view(B, T, self.num_heads, self.head_v_dim)

    def _precision(self, gate: Tensor) -> Tensor:
        if not self.cfg.metaplastic:
            return torch.zeros_like(gate)
        if self.cfg.plasticity_gain:
            return gate * abs_with_unit_slope(self.beta_gain)[:, None]
        return gate

    def recurrence_inputs(self, x: Tensor, v: Tensor) -> dict[str, Tensor]:
        """``u [B,T,H,V]``, ``beta [B,T,H,V]``, ``log_alpha [B,T,H]``."""
        raise NotImplementedError

    def core(self, x, q, k, v, state, output_final_state):
        r = self.recurrence_inputs(x, v)
        if q.is_cuda and state is not None and not torch.is_grad_enabled():  # prefill or decode
            y, var, final = fused_recurrent_palimpsa(
                q, k, r["u"], r["beta"], r["log_alpha"], self.ip, self.scale, initial_state=state,
                output_final_state=output_final_state, output_variance=self.cfg.output_variance,
            )  # fmt: skip
        else:
            y, var, final = palimpsa_attn(
                q, k, r["u"], r["beta"], r["log_alpha"], self.ip, self.scale, initial_state=state,
                output_final_state=output_final_state, output_variance=self.cfg.output_variance,
                backend=self.cfg.backend,
            )  # fmt: skip
        self.last_variance = var  # the read-out's uncertainty, [B, T, H, V], when output_variance
        return y, final

    def importance(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        if not self.cfg.metaplastic:
            return None
        q, k, v, _ = self.project(x)
        _, (_, I) = self.core(x, q, k, v, None, True)
        return I, self.ip


class Palimpsa(_MetaplasticBase):
    """Gated linear attention with a per-synapse precision (importance) state."""

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        H = cfg.num_heads
        if cfg.gates == "official":
            self.dt_gate = DtGate(cfg, d_model)
            self.b_scale = gate_parameter(inverse_softplus(torch.full((H,), cfg.b_scale_init)))
        else:
            self.w_gamma = nn.Linear(d_model, H, bias=False)
            self.logN = gate_parameter(torch.empty(H).uniform_(-math.log(4), math.log(4)))
        if cfg.gates == "official" or cfg.resolved_numerator == "bs_v":
            self.w_bs = nn.Linear(d_model, H, bias=False)

    def forget(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(log_alpha, gamma_or_bs)`` per head; the second factor scales the precision gate."""
        if self.cfg.gates == "official":
            _, log_alpha = self.dt_gate(x)
            return log_alpha, torch.sigmoid(self.w_bs(x))
        gamma = torch.sigmoid(self.w_gamma(x))
        # N_h >= 1 keeps alpha = 1 - gamma / N in (0, 1) even when n_init * exp(logN) drifts below 1; the
        # floor on alpha matters only where sigmoid saturates to 1 in finite precision (log 0 = -inf).
        N = (self.cfg.n_init * self.logN.exp()).clamp_min(1.0)
        return torch.log1p(-(gamma / N).clamp_max(1 - ALPHA_FLOOR)), gamma

    def log_alpha(self, x: Tensor) -> Tensor:
        return self.forget(x)[0]

    def recurrence_inputs(self, x: Tensor, v: Tensor) -> dict[str, Tensor]:
        log_alpha, factor = self.forget(x)
        gate = self._low_rank_gate(x) * factor[..., None]
        if self.cfg.gates == "official":
            gate = gate * F.softplus(self.b_scale)[:, None]
        if self.cfg.resolved_numerator == "beta_v":
            u = gate * v
        else:
            bs = factor if self.cfg.gates == "official" else torch.sigmoid(self.w_bs(x))
            u = bs[..., None] * v
        return {"u": u, "beta": self._precision(gate), "log_alpha": log_alpha}


class MetaMamba2(_MetaplasticBase):
    """Mamba2 with an importance state: ``q = C``, ``k = B``, ``u = Ip * dt * x``, ``beta ~ dt``.

    The numerator carries ``Ip`` so that the mean ``mu = M / I`` equals Mamba2's state exactly while
    ``beta == 0`` (``I == Ip``), for any prior: this is the Ip -> infinity Mamba2 limit
    (``kernels/palimpsa/README.md``) taken at fixed output scale, and what makes Mamba2 -> MetaMamba2
    conversion function-preserving.
    Parameter names match :class:`palimpsa.layers.mamba2.Mamba2`.
    """

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        self.dt_gate = DtGate(cfg, d_model)
        self.b_scale = gate_parameter(inverse_softplus(torch.full((cfg.num_heads,), cfg.b_scale_init)))

    def log_alpha(self, x: Tensor) -> Tensor:
        return self.dt_gate(x)[1]

    def recurrence_inputs(self, x: Tensor, v: Tensor) -> dict[str, Tensor]:
        dt, log_alpha = self.dt_gate(x)
        u = (self.ip[:, None] * dt[..., None]) * v
        gate = self._low_rank_gate(x) * (dt[..., None] * F.softplus(self.b_scale)[:, None])
        return {"u": u, "beta": self._precision(gate), "log_alpha": log_alpha}
