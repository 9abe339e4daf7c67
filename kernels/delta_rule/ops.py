"""Dispatch for DeltaNet / Gated DeltaNet: fla's chunk kernels where trustworthy, else our chunked form."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.delta_rule.naive import naive_chunk_delta_rule, naive_recurrent_delta_rule


def _fla_delta_rule(q, k, v, beta, log_alpha, scale, initial_state, output_final_state):
    # fla keeps states as [B, H, K, V]; ours are [B, H, V, K].
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    common = dict(scale=scale, initial_state=h0, output_final_state=output_final_state)
    if log_alpha is None:
        from fla.ops.delta_rule import chunk_delta_rule

        # fla's ungated chunk kernel refuses float32 inputs: run it in bfloat16, hand back the caller's dtype.
        low = torch.bfloat16 if q.dtype == torch.float32 else q.dtype
        y, ht = chunk_delta_rule(q.to(low), k.to(low), v.to(low), beta=beta.to(low), **common)
        y = y.to(q.dtype)
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        y, ht = chunk_gated_delta_rule(q, k, v, g=log_alpha, beta=beta, **common)
    return y, (None if ht is None else ht.transpose(-1, -2))


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` on the resolved backend.

    ``log_alpha=None`` is DeltaNet, otherwise Gated DeltaNet. ``backend``: ``"auto"`` | ``"fla"`` |
    ``"torch"`` (chunked) | ``"reference"`` (step by step).
    """
    args = (q, k, v, beta, log_alpha, scale, initial_state, output_final_state)
    if backend == "reference":
        return naive_recurrent_delta_rule(*args)
    op = "delta_rule" if log_alpha is None else "gated_delta_rule"
    if resolve_backend(op, q.device, backend) == "fla":
        return _fla_delta_rule(*args)
    return naive_chunk_delta_rule(*args)
