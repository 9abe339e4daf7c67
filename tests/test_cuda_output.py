"""The forward read-out in CUDA C++ (``kernels/palimpsa/output_fwd.cu``), run on the CPU.

As for the CUDA walk (``test_cuda_walk.py``): the kernel's own source is compiled by the host C++ compiler
against a small emulation of the CUDA built-ins it uses (``cuda_emulator.py``) and launched with the argument
list ``output_cuda.output_fwd`` gives the GPU. Checked against the Triton read-out (Triton's interpreter) on
the same inputs, and the whole op's outputs with the CUDA read-out against the float64 recurrence. The same
comparison on an H200: ``kernels/benchmarks/gpu_check_cuda.md``.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("triton was imported without its interpreter and there is no GPU", allow_module_level=True)

import cuda_emulator  # noqa: E402
from palimpsa_cases import reference, varlen_inputs  # noqa: E402

from kernels.benchmarks.check_cuda import read_out_args, read_outs, rel, walk_args  # noqa: E402
from kernels.palimpsa import chunk, cuda_build, output_cuda  # noqa: E402
from kernels.palimpsa.chunk import chunk_palimpsa  # noqa: E402

CPU = torch.device("cpu")

CASES = {
    # (B, T, H, K, V), dtype, gates, cu_seqlens, variance
    "K=V=32, T one chunk and a bit": ((1, 80, 2, 32, 32), torch.float32, "normal", None, False),
    "odd K and V (5, 12), variance": ((1, 100, 1, 5, 12), torch.float32, "normal", None, True),
    "K 48, V 40, variance": ((2, 70, 2, 48, 40), torch.float32, "normal", None, True),
    "V over two blocks": ((1, 70, 1, 64, 72), torch.float32, "normal", None, True),
    "K 128: a row across a whole warp": ((1, 40, 1, 128, 40), torch.float32, "normal", None, True),
    "K 128, no variance": ((1, 40, 1, 128, 32), torch.float32, "normal", None, False),
    "K=V=64, no variance": ((1, 40, 1, 64, 64), torch.float32, "normal", None, False),
    "varlen, 3 sequences": ((1, 150, 1, 16, 40), torch.float32, "normal", [0, 20, 97, 150], True),
    "extreme gates": ((1, 130, 2, 32, 48), torch.float32, "extreme", None, True),
    "bf16": ((1, 100, 1, 32, 32), torch.bfloat16, "normal", None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_read_out_matches_the_triton_read_out(case):
    shape, dtype, gates, cu, has_var = CASES[case]
    xs = walk_args(*shape, dtype, gates, cu, has_var, device=CPU)
    want, got = read_out_args(xs), read_out_args(xs)
    if dtype != torch.float32:  # the reference stays fp32 (the interpreter's bf16 stores round toward zero)
        want = (*want[:9], *(None if x is None else x.float() for x in want[9:11]), *want[11:])
    chunk._triton_read_out(*want)
    output_cuda.output_fwd(*got, launcher=cuda_emulator.launch)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: one rounding of each output (at most 2^-9)
    for name, a, b in zip(["y", "var"][: len(read_outs(got))], read_outs(got), read_outs(want), strict=True):
        assert torch.isfinite(a).all(), name  # (NaN-filled before: every element was written)
        assert rel(a, b) < tol, (name, rel(a, b))


def test_whole_forward_with_the_cuda_read_out_matches_float64(config, monkeypatch):
    """The op's y and variance with the CUDA read-out (varlen with a short last chunk, several chunks)
    against the float64 recurrence."""
    config["out_kernel"] = "cuda"
    launch = functools.partial(output_cuda.output_fwd, launcher=cuda_emulator.launch)
    monkeypatch.setattr(output_cuda, "output_fwd", launch)
    xs, cu = varlen_inputs(seed=4)
    y, var = chunk_palimpsa(*(x.float() for x in xs), output_variance=True, cu_seqlens=cu)[:2]
    want_y, want_var = reference(xs, cu)
    assert rel(y, want_y) < 1e-5
    assert rel(var, want_var) < 1e-5


def test_read_out_choice_is_checked(config):
    q, k, u, beta = walk_args(1, 64, 1, 16, 16, torch.float32, device=CPU)[:4]
    config["out_kernel"] = "fast"
    with pytest.raises(ValueError, match="out_kernel"):
        chunk._use_cuda_read_out(q, k, u, beta, 64)
    config["out_kernel"] = "auto"  # no GPU here: the Triton read-out
    assert chunk._use_cuda_read_out(q, k, u, beta, 64) is False
    config["out_kernel"] = "cuda"
    assert chunk._use_cuda_read_out(q, k, u, beta, 64) is True
    with pytest.raises(cuda_build.CudaUnavailable, match="CUDA tensors"):
        chunk_palimpsa(q, k, u, beta, torch.zeros(1, 64, 1), torch.ones(1))


@pytest.mark.parametrize(
    ("K", "C", "dtypes", "reason"),
    [
        (256, 64, [torch.float32] * 4, "K = 256"),
        (64, 40, [torch.float32] * 4, "chunk_size 40"),
        (64, 64, [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16], "dtypes"),
    ],
)
def test_unsupported_read_outs_are_named(K, C, dtypes, reason):
    assert reason in output_cuda.unsupported_reason(K, C, dtypes)
    assert output_cuda.unsupported_reason(64, 32, [torch.float16] * 4) is None


def test_auto_falls_back_to_the_triton_read_out_once_with_a_warning(config, monkeypatch):
    """A CUDA read-out that cannot run (here: CPU tensors) under "auto" warns once and the Triton read-out's
    outputs come back; the next call does not try again."""
    monkeypatch.setattr(chunk, "_use_cuda_read_out", lambda *a: not cuda_build._GAVE_UP)
    monkeypatch.setattr(cuda_build, "_GAVE_UP", [])
    config["out_kernel"] = "auto"
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(1, 70, 1, 16, generator=g), torch.randn(1, 70, 1, 16, generator=g) / 4]
    xs += [torch.randn(1, 70, 1, 16, generator=g), torch.rand(1, 70, 1, 16, generator=g)]
    xs += [torch.nn.functional.logsigmoid(torch.randn(1, 70, 1, generator=g) + 2), torch.ones(1)]
    with pytest.warns(UserWarning, match="CUDA tensors"):
        fallback = chunk_palimpsa(*xs)[0]
    assert cuda_build._GAVE_UP
    config["out_kernel"] = "triton"
    assert torch.equal(fallback, chunk_palimpsa(*xs)[0])
