"""Mamba2 in the family's shell: simple GLA with ``q = C``, ``k = B``, ``u = dt * x``, ``alpha = exp(-A dt)``.

C and B go through the same short conv and SiLU as every other member but, as in Mamba2, no L2 norm
(``qk_norm``: with unit-norm C and B the read-out ``dt``-scaled sum starts far below the ``D`` skip and
MQAR stalls near chance). Parameter names match MetaMamba2 so a checkpoint converts in place.
"""

from __future__ import annotations

from torch import Tensor

from kernels.gla import simple_gla
from palimpsa.config import MixerConfig
from palimpsa.layers.common import DtGate, MixerShell


class Mamba2(MixerShell):
    op_name = "simple_gla"

    def __init__(self, cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5):
        super().__init__(cfg, d_model, layer_idx, norm_eps)
        self.dt_gate = DtGate(cfg, d_model)

    def core(self, x, q, k, v, state, output_final_state):
        dt, log_alpha = self.dt_gate(x)
        u = dt[..., None] * v
        return simple_gla(
            q, k, u, log_alpha, self.scale, initial_state=state, output_final_state=output_final_state,
            backend=self.cfg.backend,
        )  # fmt: skip

    def log_alpha(self, x: Tensor) -> Tensor:
        return self.dt_gate(x)[1]
