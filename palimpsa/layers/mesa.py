"""Mesa: full ``K x K`` precision per head with prior ``Ip``, Mamba2-style forgetting, ``beta`` per head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kernels.mesa import mesa
from palimpsa.config import MixerConfig
from palimpsa.layers.common import DtGate, MixerShell, gate_parameter


class Mesa(MixerShell):
    op_name = "mesa"

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        self.dt_gate = DtGate(cfg, d_model)
        self.w_beta = nn.Linear(d_model, cfg.num_heads, bias=False)
        ip_log = torch.full((cfg.num_heads,), math.log(cfg.ip))
        if cfg.ip_trainable:
            self.ip_log = gate_parameter(ip_log)
        else:
            self.register_buffer("ip_log", ip_log)

    def core(self, x, q, k, v, state, output_final_state):
        beta = torch.sigmoid(self.w_beta(x))
        return mesa(
            q, k, v, beta, self.log_alpha(x), self.ip_log.exp(), self.scale, initial_state=state,
            output_final_state=output_final_state, backend=self.cfg.backend,
        )  # fmt: skip

    def log_alpha(self, x: Tensor) -> Tensor:
        return self.dt_gate(x)[1]
