"""Linear attention: the family member with ``alpha = 1`` and ``beta = 0`` (no forgetting, no importance)."""

from __future__ import annotations

from kernels.gla import linear_attention
from palimpsa.layers.common import MixerShell


class LinearAttention(MixerShell):
    op_name = "linear_attention"

    def core(self, x, q, k, v, state, output_final_state):
        return linear_attention(
            q, k, v, self.scale, initial_state=state, output_final_state=output_final_state,
            backend=self.cfg.backend,
        )  # fmt: skip
