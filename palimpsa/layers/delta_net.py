"""DeltaNet and Gated DeltaNet, the first-order solution:
``mu_t = alpha_t mu_{t-1}(I - beta_t k k^T) + beta_t v k^T``.

``beta = sigmoid(W_b x)`` per head; Gated DeltaNet forgets Mamba2-style (``alpha = exp(-A dt)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels.delta_rule import delta_rule
from palimpsa.config import MixerConfig
from palimpsa.layers.common import DtGate, MixerShell


class DeltaNet(MixerShell):
    op_name = "delta_rule"
    gated = False

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        self.w_beta = nn.Linear(d_model, cfg.num_heads, bias=False)
        if self.gated:
            self.dt_gate = DtGate(cfg, d_model)

    def core(self, x, q, k, v, state, output_final_state):
        beta = torch.sigmoid(self.w_beta(x))
        return delta_rule(
            q, k, v, beta, self.log_alpha(x), self.scale, initial_state=state,
            output_final_state=output_final_state, backend=self.cfg.backend,
        )  # fmt: skip

    def log_alpha(self, x: Tensor) -> Tensor | None:
        return self.dt_gate(x)[1] if self.gated else None


class GatedDeltaNet(DeltaNet):
    op_name = "gated_delta_rule"
    gated = True
