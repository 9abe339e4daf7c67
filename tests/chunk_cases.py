"""Shared cases for the chunked simple-GLA and delta-rule tests: inputs, and the comparison of outputs and
every input gradient with the float64 step-by-step reference through a random linear functional."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

F64 = torch.float64


def gates(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Per-token log decays: ``"normal"`` (alpha about 0.9), ``"zero"`` (linear attention, alpha = 1) or
    ``"strong"`` (a mix of alpha = e^-30, e^-5, 1 - 1e-7 and normal ones)."""
    la = F.logsigmoid(torch.randn(shape, generator=gen, dtype=F64) + 2.0)
    if kind == "zero":
        return torch.zeros_like(la)
    if kind == "strong":
        sel = torch.rand(shape, generator=gen, dtype=F64)
        la = torch.where(sel < 0.25, -30.0, torch.where(sel < 0.5, -5.0, torch.where(sel < 0.75, -1e-7, la)))
    return la


def inputs(B, T, H, K, V, seed, gate="normal", delta=False, N=None) -> dict[str, torch.Tensor]:
    """``q, k, v, log_alpha, h0`` (and ``beta``, with unit-norm ``k``, for the delta rule), float64."""
    gen = torch.Generator().manual_seed(seed)
    x = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=F64),
        "k": torch.randn(B, T, H, K, generator=gen, dtype=F64) / K**0.5,
        "v": torch.randn(B, T, H, V, generator=gen, dtype=F64),
        "log_alpha": gates((B, T, H), gate, gen),
        "h0": torch.randn(B if N is None else N, H, V, K, generator=gen, dtype=F64),
    }
    if delta:
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=F64)
    return x


def outputs_and_grads(
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    leaves: dict[str, torch.Tensor],
    dtype: torch.dtype,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``y``, the final state and the gradient of every leaf of ``sum <w, y> + <w', S_T>`` (random weights),
    with the leaves cast to ``dtype``; ``run(**leaves)`` returns ``(y, S_T)``."""
    x = {name: t.detach().to(dtype).requires_grad_(True) for name, t in leaves.items()}
    y, final = run(**x)
    gen = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
    if final is not None:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=F64)).sum()
    loss.backward()
    out = {"y": y.detach(), "final": final.detach() if final is not None else None}
    return out | {f"d{name}": t.grad for name, t in x.items()}


def assert_close(got: dict, want: dict, tol: float) -> None:
    """Norm-relative error of every entry at most ``tol``."""
    assert got.keys() == want.keys()
    for name, b in want.items():
        a = got[name]
        if b is None:
            assert a is None, name
            continue
        assert a is not None, f"{name} is missing"
        assert torch.isfinite(a).all(), f"{name} has NaN or inf"
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def per_sequence(run: Callable[..., tuple], cu: torch.Tensor) -> Callable[..., tuple]:
    """The reference for a flattened varlen batch: ``run(**leaves)`` on each sequence, outputs concatenated
    (``y`` along time, final states along the batch)."""

    def varlen(h0: torch.Tensor, **x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ys, finals = [], []
        for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            y, final = run(**{name: t[:, s:e] for name, t in x.items()}, h0=h0[n : n + 1])
            ys.append(y)
            finals.append(final)
        return torch.cat(ys, 1), torch.cat(finals)

    return varlen
