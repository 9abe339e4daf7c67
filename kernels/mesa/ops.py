"""Dispatch for Mesa: the torch chunked form (one batched solve per chunk), or the step-by-step reference."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.mesa.naive import MesaState, naive_chunk_mesa, naive_recurrent_mesa


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def mesa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: MesaState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, MesaState | None]:
    """Mesa, ``y_t = scale * G_t Hm_t^{-1} q_t`` by an exact solve.

    ``backend``: ``"auto"`` / ``"torch"`` (chunked) / ``"reference"`` (step by step).
    """
    args = (q, k, v, beta, log_alpha, ip, scale, initial_state, output_final_state)
    if backend == "reference":
        return naive_recurrent_mesa(*args)
    resolve_backend("mesa", q.device, backend)  # validates the request; always "torch"
    return naive_chunk_mesa(*args)
