"""Longhorn: online regression with a diagonal closed form; a vector step size ``beta [V]`` per head."""

from __future__ import annotations

import torch
from torch import nn

from kernels.longhorn import longhorn
from palimpsa.config import MixerConfig
from palimpsa.layers.common import MixerShell


class Longhorn(MixerShell):
    op_name = "longhorn"

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        self.w_beta = nn.Linear(d_model, cfg.num_heads * cfg.head_v_dim, bias=False)

    def core(self, x, q, k, v, state, output_final_state):
        B, T, H, V = v.shape
        beta = torch.sigmoid(self.w_beta(x)).view(B, T, H, V)
        return longhorn(
            q, k, v, beta, self.scale, initial_state=state, output_final_state=output_final_state,
            backend=self.cfg.backend,
        )  # fmt: skip
