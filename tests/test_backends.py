"""Backend resolution for baseline ops: fla where trusted, then our Triton kernels on CUDA, else torch."""

from __future__ import annotations

import pytest
import torch

from kernels import backends
from kernels.backends import BackendError, explain_backend, known_bad_reason, resolve_backend
from kernels.gla import simple_gla

CPU = torch.device("cpu")


@pytest.mark.parametrize("op", sorted(backends.FLA_OPS | backends.TORCH_ONLY_OPS))
def test_cpu_resolves_to_torch_with_a_reason(op):
    backend, reason = explain_backend(op, CPU)
    assert backend == "torch" and reason
    assert resolve_backend(op, "cpu", "torch") == "torch"
    assert resolve_backend(op, "cpu", "reference") == "reference"


def test_requesting_fla_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(BackendError, match="simple_gla.*unavailable"):
        resolve_backend("simple_gla", CPU, "fla")
    with pytest.raises(BackendError, match="no fla kernel"):
        resolve_backend("mesa", CPU, "fla")
    with pytest.raises(BackendError):
        simple_gla(*(torch.randn(1, 4, 1, 2) for _ in range(3)), torch.zeros(1, 4, 1), backend="fla")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_backend("simple_gla", CPU, "cuda")
    with pytest.raises(ValueError, match="unknown op 'mamba3'"):
        resolve_backend("mamba3", CPU)


@pytest.mark.parametrize(
    ("op", "capability", "triton", "bad"),
    [
        ("simple_gla", (9, 0), "3.6.0", True),
        ("gated_delta_rule", (9, 0), "3.4.0", True),
        ("gated_delta_rule", (9, 0), "3.7.0", True),
        ("gated_delta_rule", (9, 0), "3.7.1", False),
        ("gated_delta_rule", (9, 0), "3.3.1", False),
        ("simple_gla", (8, 0), "3.6.0", False),
        ("simple_gla", (10, 0), "3.6.0", False),
        ("delta_rule", (9, 0), "3.6.0", False),
    ],
)
def test_known_bad_hopper_triton_range(op, capability, triton, bad):
    reason = known_bad_reason(op, capability, triton)
    assert (reason is not None) == bad
    if bad:
        assert "Hopper" in reason and triton in reason


def test_missing_fla_on_cuda_falls_back_to_our_triton_then_torch(monkeypatch):
    """Without fla, a CUDA device resolves to our Triton kernels, or to torch without triton, and says why;
    no CUDA needed for this path."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "_fla_importable", lambda: False)
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    backend, reason = explain_backend("gated_delta_rule", cuda)
    assert backend == "triton" and "fla is not installed" in reason
    assert resolve_backend("simple_gla", cuda, "triton") == "triton"
    assert resolve_backend("mesa", cuda) == "torch"
    with pytest.raises(BackendError, match="not installed"):
        resolve_backend("gated_delta_rule", cuda, "fla")
    monkeypatch.setattr(backends, "_triton_importable", lambda: False)
    assert explain_backend("gated_delta_rule", cuda) == ("torch", "fla is not installed")
    with pytest.raises(BackendError, match="triton is not installed"):
        resolve_backend("delta_rule", cuda, "triton")


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_triton_importable", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs CUDA"):
        resolve_backend("simple_gla", CPU, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert explain_backend("delta_rule", CPU, "triton") == ("triton", "requested triton")
    assert resolve_backend("simple_gla", CPU) == "torch"  # auto never picks the interpreter
    with pytest.raises(BackendError, match="no Triton kernel"):
        resolve_backend("mesa", CPU, "triton")
