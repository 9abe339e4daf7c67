"""Which implementation an op runs on: the one vocabulary of the project, resolved here and only here.

Every op (Palimpsa, simple GLA / Mamba2, linear attention, (gated) delta rule, Longhorn, Mesa, softmax
attention) takes the same requests, and every layer records what its request resolved to:

- ``"reference"``: the step-by-step recurrence (float-exact, slow);
- ``"torch"``: our torch forms, any device (for Palimpsa the faster of its recurrent and chunked forms
  for the sequence length at hand);
- ``"triton"``: our Triton kernels (Palimpsa, simple GLA, the delta rules), CUDA tensors, or CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``);
- ``"fla"``: fla's chunk kernels (simple GLA, linear attention, the delta rules);
- ``"auto"``: fla where it is trusted, else ours in Triton on CUDA when triton is installed, else torch.

fla is trusted only where it is importable, the tensors are on CUDA and its kernels give correct gradients
there. Known-bad combinations are refused up front (fla's gated chunk backward miscompiles on Hopper with
Triton in [3.4.0, 3.7.1)); everything else is checked once per (op, device) by comparing fla's gradients
with our float32 torch chunked form on a small problem. The ops without an fla kernel run in torch (or as
the reference). The resolved name and the reason belong in the run's params, see ``explain_backend``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch

FLA_OPS = frozenset({"simple_gla", "linear_attention", "delta_rule", "gated_delta_rule"})
TRITON_OPS = FLA_OPS | {"palimpsa"}  # ops with Triton kernels of ours
TORCH_ONLY_OPS = frozenset({"longhorn", "mesa", "attention"})
OPS = TRITON_OPS | TORCH_ONLY_OPS
REQUESTS = ("auto", "fla", "triton", "torch", "reference")
# Ops whose fla chunk backward goes through the gated dq/dk/dg kernel hit by the Hopper miscompile.
_GATED_FLA_OPS = frozenset({"simple_gla", "linear_attention", "gated_delta_rule"})
_HOPPER_BAD_TRITON = ((3, 4, 0), (3, 7, 1))  # [low, high)
PROBE_RTOL = 2e-2


class BackendError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def known_bad_reason(op: str, capability: tuple[int, int], triton_version: str) -> str | None:
    """Why fla must not run ``op`` on a GPU of this compute capability with this Triton, or None."""
    low, high = _HOPPER_BAD_TRITON
    if op in _GATED_FLA_OPS and capability[0] == 9 and low <= _version_tuple(triton_version) < high:
        return f"fla gated chunk backward is wrong on Hopper (sm_90) with triton {triton_version} < 3.7.1"
    return None


def _fla_importable() -> bool:
    return importlib.util.find_spec("fla") is not None


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def explain_backend(op: str, device: torch.device | str, requested: str = "auto") -> tuple[str, str]:
    """``(backend, reason)``: the implementation that runs, one of ``"fla"``, ``"triton"``, ``"torch"``,
    ``"reference"``, and why; both go in the run's params.

    Raises ``ValueError`` for an unknown op or request and ``BackendError`` when ``"fla"`` or ``"triton"``
    was requested but cannot be used.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r} for {op}; expected one of {list(REQUESTS)}")
    device = torch.device(device)
    if requested in ("torch", "reference"):
        return requested, f"requested {requested}"
    if requested == "triton":
        reason = _triton_unusable_reason(op, device)
        if reason is not None:
            raise BackendError(f"backend 'triton' requested for {op} but unavailable: {reason}")
        return "triton", "requested triton"
    reason = _fla_unusable_reason(op, device)
    if reason is None:
        return "fla", "fla installed, CUDA, gradients checked against torch"
    if requested == "fla":
        raise BackendError(f"backend 'fla' requested for {op} but unavailable: {reason}")
    if device.type == "cuda" and _triton_unusable_reason(op, device) is None:
        return "triton", f"our Triton kernels; fla not used: {reason}"
    return "torch", reason


def resolve_backend(op: str, device: torch.device | str, requested: str = "auto") -> str:
    """The implementation ``op`` runs on for this request and device; see ``explain_backend``."""
    return explain_backend(op, device, requested)[0]


def _triton_unusable_reason(op: str, device: torch.device) -> str | None:
    if op not in TRITON_OPS:
        return f"no Triton kernel of ours is used for {op}"
    if not _triton_importable():
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device is {device.type}: Triton needs CUDA (or TRITON_INTERPRET=1 before triton is imported)"
    return None


def _fla_unusable_reason(op: str, device: torch.device) -> str | None:
    if op not in FLA_OPS:
        return f"no fla kernel is used for {op}"
    if device.type != "cuda":
        return f"device is {device.type}, fla needs CUDA"
    if not _fla_importable():
        return "fla is not installed"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(op, index)


@functools.cache
def _probe(op: str, index: int) -> str | None:
    """Static check, then one gradient comparison of fla against our torch chunked form (cached)."""
    import triton

    capability = torch.cuda.get_device_capability(index)
    bad = known_bad_reason(op, capability, triton.__version__)
    if bad is not None:
        return bad
    try:
        err = fla_gradient_error(op, torch.device("cuda", index))
    except Exception as exc:  # fla raising its own guards, missing kernels, compile errors
        return f"fla {op} failed its gradient check: {type(exc).__name__}: {str(exc)[:200]}"
    if err > PROBE_RTOL:
        return f"fla {op} gradients disagree with torch (relative error {err:.2e} > {PROBE_RTOL:.0e})"
    return None


def fla_gradient_error(op: str, device: torch.device, T: int = 128, D: int = 64) -> float:
    """Largest norm-relative error of fla's output, final state and input gradients against our chunked torch
    form in float32 on the same (rounded) inputs. fla runs in float32, except the ungated delta rule, which
    fla only accepts in bfloat16."""
    from kernels.delta_rule.chunk_torch import chunk_delta_rule_torch
    from kernels.delta_rule.ops import _fla_delta_rule
    from kernels.gla.chunk_torch import chunk_simple_gla_torch
    from kernels.gla.ops import _fla_simple_gla

    gen = torch.Generator(device="cpu").manual_seed(0)
    B, H = 2, 2
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    log_alpha = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, D, D, generator=gen)
    low = torch.bfloat16 if op == "delta_rule" else torch.float32
    if op in ("simple_gla", "linear_attention"):
        la = log_alpha if op == "simple_gla" else torch.zeros_like(log_alpha)
        inputs = [q.to(low), k.to(low), v.to(low), la, h0]

        def run(fn, x):
            return fn(x[0], x[1], x[2], x[3], None, x[4], True)

        fns = (_fla_simple_gla, chunk_simple_gla_torch)
    else:
        la = log_alpha if op == "gated_delta_rule" else None
        inputs = [q.to(low), k.to(low), v.to(low), beta.to(low), h0] + ([la] if la is not None else [])

        def run(fn, x):
            return fn(x[0], x[1], x[2], x[3], x[5] if len(x) > 5 else None, None, x[4], True)

        fns = (_fla_delta_rule, chunk_delta_rule_torch)
    gout = torch.randn(B, T, H, D, generator=gen).to(device)
    gstate = torch.randn(B, H, D, D, generator=gen).to(device)
    results = []
    for fn, cast in zip(fns, (None, torch.float32), strict=True):
        x = [(t if cast is None else t.to(cast)).to(device).requires_grad_() for t in inputs]
        y, ht = run(fn, x)
        ((y.float() * gout).sum() + (ht.float() * gstate).sum()).backward()
        results.append([y.detach(), ht.detach()] + [t.grad for t in x])
    err = 0.0
    for a, b in zip(*results, strict=True):
        a, b = a.float(), b.float()
        err = max(err, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    return err
