"""Dispatch for DeltaNet / Gated DeltaNet over the backends of ``kernels.backends``."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.delta_rule.chunk_torch import chunk_delta_rule_torch
from kernels.delta_rule.naive import naive_recurrent_delta_rule
from kernels.gla.varlen import per_sequence


def _fla_delta_rule(q, k, v, beta, log_alpha, scale, initial_state, output_final_state, cu_seqlens=None):
    # fla keeps states as [B, H, K, V]; ours are [B, H, V, K].
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    common = dict(scale=scale, initial_state=h0, output_final_state=output_final_state)
    if cu_seqlens is not None:
        common["cu_seqlens"] = cu_seqlens.long()
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


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``S_t = alpha_t S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T`` on the resolved backend.

    ``log_alpha=None`` is DeltaNet, otherwise Gated DeltaNet; ``beta`` and ``log_alpha`` are ``[B, T, H]``.
    ``backend``: ``"auto"`` | ``"fla"`` | ``"triton"`` | ``"torch"`` (chunked) | ``"reference"`` (step by
    step), see ``kernels.backends``. With ``cu_seqlens`` (``[N + 1]`` offsets) the batch is flattened
    (``B == 1``) and the states are ``[N, H, V, K]``.
    """
    args = (q, k, v, beta, log_alpha, scale, initial_state, output_final_state)
    impl = resolve_backend("delta_rule" if log_alpha is None else "gated_delta_rule", q.device, backend)
    if impl == "triton":
        from kernels.delta_rule.chunk import chunk_delta_rule

        return chunk_delta_rule(*args, cu_seqlens=cu_seqlens)
    if impl == "fla":
        return _fla_delta_rule(*args, cu_seqlens)
    fn = naive_recurrent_delta_rule if impl == "reference" else chunk_delta_rule_torch
    if cu_seqlens is None:
        return fn(*args)
    return per_sequence(fn, [q, k, v, beta, log_alpha], scale, initial_state, output_final_state, cu_seqlens)
