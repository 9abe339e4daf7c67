"""Inputs shared by the CUDA kernels' whole-op tests: a varlen float64 batch, its step-by-step reference."""

from __future__ import annotations

import torch

from kernels.palimpsa import naive_recurrent_palimpsa


def varlen_inputs(seed: int, H: int = 2, K: int = 24, V: int = 20, lens=(70, 150)):
    """``[q, k, u, beta, log_alpha, Ip]`` in float64 for sequences of ``lens`` tokens (several chunks, a short
    last one), packed as one row, with their ``cu_seqlens``."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    xs = [r(1, T, H, K), r(1, T, H, K) / K**0.5, r(1, T, H, V), torch.rand(1, T, H, V, generator=g).double()]
    xs += [torch.nn.functional.logsigmoid(r(1, T, H) + 2.0), torch.rand(H, generator=g).double() + 0.5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return xs, cu


def reference(xs: list[torch.Tensor], cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` and the variance of the float64 step-by-step recurrence, one sequence at a time."""
    ys, vs = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        y, var, _ = naive_recurrent_palimpsa(*(x[:, a:b] for x in xs[:5]), xs[5], output_variance=True)
        ys.append(y)
        vs.append(var)
    return torch.cat(ys, 1), torch.cat(vs, 1)
