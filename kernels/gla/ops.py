"""Dispatch for simple GLA / Mamba2 and linear attention: fla's chunk kernel where trustworthy, else torch."""

from __future__ import annotations

from torch import Tensor

from kernels.backends import resolve_backend
from kernels.gla.naive import naive_chunk_simple_gla, naive_recurrent_simple_gla


def _fla_simple_gla(q, k, v, log_alpha, scale, initial_state, output_final_state):
    from fla.ops.simple_gla import chunk_simple_gla

    # fla keeps states as [B, H, K, V]; ours are [B, H, V, K].
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, ht = chunk_simple_gla(
        q, k, v, g=log_alpha, scale=scale, initial_state=h0, output_final_state=output_final_state
    )
    return y, (None if ht is None else ht.transpose(-1, -2))


def simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Simple GLA (``S_t = alpha_t S_{t-1} + v_t k_t^T``, ``y_t = scale S_t q_t``) on the resolved backend.

    ``backend``: ``"auto"`` | ``"fla"`` | ``"torch"`` (chunked) | ``"reference"`` (step by step).
    """
    args = (q, k, v, log_alpha, scale, initial_state, output_final_state)
    if backend == "reference":
        return naive_recurrent_simple_gla(*args)
    if resolve_backend("simple_gla", q.device, backend) == "fla":
        return _fla_simple_gla(*args)
    return naive_chunk_simple_gla(*args)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention ``S_t = S_{t-1} + v_t k_t^T``: simple GLA with ``log_alpha = 0``."""
    log_alpha = q.new_zeros(q.shape[:3])
    return simple_gla(q, k, v, log_alpha, scale, initial_state, output_final_state, backend)
