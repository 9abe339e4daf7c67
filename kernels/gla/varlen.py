"""Variable-length batches on the dense-batch implementations (reference and torch): one call per sequence.

A varlen batch is flattened to ``B == 1`` with ``cu_seqlens`` (``[N + 1]`` token offsets); states are
``[N, H, V, K]``. The Triton kernels walk such a batch natively; this loop serves the other backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def per_sequence(
    fn: Callable[..., tuple[Tensor, Tensor | None]],
    tokens: list[Tensor | None],
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``fn(*tokens[n], scale, initial_state[n], output_final_state)`` for each sequence ``n``, outputs
    concatenated; ``tokens`` are ``[1, total_T, ...]`` tensors (or None, passed through)."""
    B = tokens[0].shape[0]
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be flattened to B == 1, got B == {B}")
    bounds = cu_seqlens.tolist()
    ys, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = [None if x is None else x[:, bos:eos] for x in tokens]
        init = None if initial_state is None else initial_state[n : n + 1]
        y, final = fn(*part, scale, init, output_final_state)
        ys.append(y)
        finals.append(final)
    return torch.cat(ys, dim=1), (torch.cat(finals) if output_final_state else None)
