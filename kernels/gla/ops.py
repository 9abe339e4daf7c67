"""Dispatch for simple GLA / Mamba2 and linear attention over the backends of ``kernels.backends``."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.gla.chunk_torch import chunk_simple_gla_torch
from kernels.gla.naive import naive_recurrent_simple_gla
from kernels.gla.varlen import per_sequence


def _fla_simple_gla(q, k, v, log_alpha, scale, initial_state, output_final_state, cu_seqlens=None):
    from fla.ops.simple_gla import chunk_simple_gla

    # fla keeps states as [B, H, K, V]; ours are [B, H, V, K].
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    y, ht = chunk_simple_gla(
        q, k, v, g=log_alpha, scale=scale, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )  # fmt: skip
    return y, (None if ht is None else ht.transpose(-1, -2))


def _run(op, q, k, v, log_alpha, scale, initial_state, output_final_state, backend, cu_seqlens):
    args = (q, k, v, log_alpha, scale, initial_state, output_final_state)
    impl = resolve_backend(op, q.device, backend)
    if impl == "triton":
        from kernels.gla.chunk import chunk_simple_gla

        return chunk_simple_gla(*args, cu_seqlens=cu_seqlens)
    if impl == "fla":
        return _fla_simple_gla(*args, cu_seqlens)
    fn = naive_recurrent_simple_gla if impl == "reference" else chunk_simple_gla_torch
    if cu_seqlens is None:
        return fn(*args)
    return per_sequence(fn, [q, k, v, log_alpha], scale, initial_state, output_final_state, cu_seqlens)


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Simple GLA (``S_t = alpha_t S_{t-1} + v_t k_t^T``, ``y_t = scale S_t q_t``) on the resolved backend.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``log_alpha [B, T, H]`` (``<= 0``), states ``[B, H, V, K]``.
    ``backend``: ``"auto"`` | ``"fla"`` | ``"triton"`` | ``"torch"`` (chunked) | ``"reference"`` (step by
    step), see ``kernels.backends``. With ``cu_seqlens`` (``[N + 1]`` offsets) the batch is flattened
    (``B == 1``) and the states are ``[N, H, V, K]``.
    """
    return _run(
        "simple_gla", q, k, v, log_alpha, scale, initial_state, output_final_state, backend, cu_seqlens
    )


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention ``S_t = S_{t-1} + v_t k_t^T``: simple GLA with ``log_alpha = 0``."""
    log_alpha = q.new_zeros(q.shape[:3])
    return _run(
        "linear_attention", q, k, v, log_alpha, scale, initial_state, output_final_state, backend, cu_seqlens
    )
