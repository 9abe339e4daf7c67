"""Backend resolution for baseline ops: fla only where trusted, torch everywhere else."""

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
    assert resolve_backend(op, "cpu", "reference") == "torch"


def test_requesting_fla_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(BackendError, match="simple_gla.*unavailable"):
        resolve_backend("simple_gla", CPU, "fla")
    with pytest.raises(BackendError, match="no fla kernel"):
        resolve_backend("mesa", CPU, "fla")
    with pytest.raises(BackendError):
        simple_gla(*(torch.randn(1, 4, 1, 2) for _ in range(3)), torch.zeros(1, 4, 1), backend="fla")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        resolve_backend("simple_gla", CPU, "triton")
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


def test_missing_fla_on_cuda_falls_back(monkeypatch):
    """Without fla, a CUDA device still resolves (to torch) and says why; no CUDA needed for this path."""
    monkeypatch.setattr(backends, "_fla_importable", lambda: False)
    assert explain_backend("gated_delta_rule", torch.device("cuda", 0)) == ("torch", "fla is not installed")
    with pytest.raises(BackendError, match="not installed"):
        resolve_backend("gated_delta_rule", torch.device("cuda", 0), "fla")
