"""The one-pass backward's CUDA walk (``kernels/palimpsa/walk_bwd.cu``), run on the CPU.

No GPU here: the kernel's own source is compiled by the host C++ compiler against a small emulation of the
CUDA built-ins it uses (``cuda_emulator.py``) and launched with the argument list ``walk_cuda.walk_bwd`` gives
the GPU. Checked two ways: every output against the Triton walk (Triton's interpreter) on the same inputs,
and every input gradient of the whole op, with the CUDA walk in its backward, against the float64 recurrence.
The same comparisons on an H200: ``kernels/benchmarks/gpu_check_cudawalk.md``.
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

from kernels.benchmarks.check_cuda import rel, walk_args  # noqa: E402
from kernels.palimpsa import chunk, chunk_onepass, cuda_build, walk_cuda  # noqa: E402
from kernels.palimpsa.chunk import chunk_palimpsa  # noqa: E402

CPU = torch.device("cpu")
OUTPUTS = ["dq", "dk", "du", "dbeta", "dc", "dip", "pull_S0", "pull_M", "pull_I"]


WALK_CASES = {
    # (B, T, H, K, V), dtype, gates, cu_seqlens, variance gradient, sub-chunk
    "K=V=32, T one chunk and a bit": ((1, 80, 2, 32, 32), torch.float32, "normal", None, False, 4),
    "odd K and V (5, 12), S 1": ((1, 100, 1, 5, 12), torch.float32, "normal", None, True, 1),
    "K 48, V 40, variance, S 2": ((2, 100, 2, 48, 40), torch.float32, "normal", None, True, 2),
    "V over two blocks (atomic dk, dq)": ((1, 70, 1, 64, 72), torch.float32, "normal", None, False, 4),
    "varlen, 3 sequences": ((1, 150, 1, 16, 40), torch.float32, "normal", [0, 20, 97, 150], True, 4),
    "extreme gates": ((1, 130, 2, 32, 48), torch.float32, "extreme", None, True, 4),
    "bf16": ((1, 100, 1, 32, 32), torch.bfloat16, "normal", None, False, 4),
}


@pytest.mark.parametrize("case", list(WALK_CASES))
def test_cuda_walk_matches_the_triton_walk(case):
    shape, dtype, gates, cu, has_dvar, sub = WALK_CASES[case]
    args = walk_args(*shape, dtype, gates, cu, has_dvar, sub, device=CPU)
    want = chunk_onepass._triton_walk(*args)
    got = walk_cuda.walk_bwd(*args, launcher=cuda_emulator.launch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the stored gradients round differently
    for name, a, b in zip(OUTPUTS, got[:9], want[:9], strict=True):
        if name in ("dc", "dip", "pull_S0"):  # per V block: the two walks may cut V differently
            a, b = a.sum(0), b.sum(0)
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("walk", ["triton", "cuda"])
def test_walk_writes_its_pulls_over_the_boundary_states(walk):
    """``in_place``: the pulls land in the boundary states' buffers, equal to those written to fresh ones (a
    thread or program reads its elements of the state before it overwrites them); V over two blocks."""
    args = walk_args(1, 150, 2, 48, 72, torch.float32, "normal", None, True, 4, device=CPU)
    run = (
        chunk_onepass._triton_walk
        if walk == "triton"
        else functools.partial(walk_cuda.walk_bwd, launcher=cuda_emulator.launch)
    )
    want = run(*args)
    hm, hi = args[7].clone(), args[8].clone()
    got = run(*args[:7], hm, hi, *args[9:], in_place=True)
    assert got[7] is hm and got[8] is hi
    for name, a, b in zip(OUTPUTS, got[:9], want[:9], strict=True):
        assert torch.equal(a, b), name


def test_whole_backward_with_the_cuda_walk_matches_float64(config, monkeypatch):
    """Every input gradient of the op with the CUDA walk in its backward (variance, varlen with a short last
    chunk, several chunks) against autograd through the float64 recurrence."""
    config.update(backward="one_pass", onepass_walk="cuda", onepass_sub=4)
    monkeypatch.setattr(
        walk_cuda, "walk_bwd", functools.partial(walk_cuda.walk_bwd, launcher=cuda_emulator.launch)
    )
    xs, cu = varlen_inputs(seed=3)
    xs = [x.requires_grad_(True) for x in xs]
    g = torch.Generator().manual_seed(30)
    wy, wv = (torch.randn(xs[2].shape, generator=g, dtype=torch.float64) for _ in range(2))

    def grads(fn):
        for x in xs:
            x.grad = None
        y, var = fn()
        ((y.double() * wy).sum() + (var.double() * wv).sum()).backward()
        return [x.grad.clone() for x in xs]

    got = grads(
        lambda: chunk_palimpsa(
            *(x.float() for x in xs[:4]), xs[4].float(), xs[5].float(), output_variance=True, cu_seqlens=cu
        )[:2]
    )

    want = grads(lambda: reference(xs, cu))
    for name, a, b in zip(["dq", "dk", "du", "dbeta", "dlog_alpha", "dIp"], got, want, strict=True):
        assert rel(a, b) < 1e-4, (name, rel(a, b))


def test_walk_choice_is_checked(config):
    args = walk_args(1, 64, 1, 16, 16, torch.float32, device=CPU)
    xs = args[:11]
    config["onepass_walk"] = "fast"
    with pytest.raises(ValueError, match="onepass_walk"):
        chunk_onepass._use_cuda_walk(xs[0], 16, 64, direct=False)
    config["onepass_walk"] = "cuda"
    with pytest.raises(walk_cuda.CudaUnavailable, match="identity"):
        chunk_onepass._use_cuda_walk(xs[0], 16, 64, direct=True)
    with pytest.raises(walk_cuda.CudaUnavailable, match="CUDA tensors"):
        walk_cuda.walk_bwd(*args)
    config["onepass_walk"] = "auto"  # no GPU here: the Triton walk
    assert chunk_onepass._use_cuda_walk(xs[0], 16, 64, direct=False) is False


@pytest.mark.parametrize(
    ("K", "C", "sub", "reason"),
    [(256, 64, 4, "K = 256"), (64, 32, 4, "chunk_size 32"), (64, 64, 8, "sub-chunk length 8")],
)
def test_unsupported_shapes_are_named(K, C, sub, reason):
    assert reason in walk_cuda.unsupported_reason(K, 64, C, torch.bfloat16, sub)
    assert walk_cuda.unsupported_reason(64, 64, 64, torch.bfloat16, 4) is None


def test_backward_path_follows_head_size(config):
    """ "auto" takes the one-pass backward where its walk runs in CUDA, else from K * V = AUTO_MIN_STATE
    (where each measured faster)."""
    config["backward"] = "auto"
    assert chunk.backward_path(16, 32) == "two_pass"
    assert chunk.backward_path(16, 32, cuda_walk=True) == "one_pass"
    assert chunk.backward_path(48, 48) == "one_pass"
    q = torch.zeros(1, 64, 1, 16)  # CPU: no CUDA walk, whatever the settings
    assert not chunk_onepass.cuda_walk_possible(q, 32, 64)
    config["backward"] = "two_pass"
    assert chunk.backward_path(64, 64) == "two_pass"
    config["backward"] = "one pass"
    with pytest.raises(ValueError, match="CONFIG\\['backward'\\]"):
        chunk.backward_path(64, 64)


def test_auto_falls_back_to_the_triton_walk_once_with_a_warning(config, monkeypatch):
    """A CUDA walk that cannot run (here: CPU tensors) under "auto" warns once and the Triton walk's
    gradients come back; under "cuda" it is an error."""
    monkeypatch.setattr(chunk_onepass, "_use_cuda_walk", lambda *a: True)
    monkeypatch.setattr(cuda_build, "_GAVE_UP", [])
    config.update(backward="one_pass", onepass_walk="auto")
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 70, 1, 16, generator=g), torch.randn(1, 70, 1, 16, generator=g) / 4]
    xs += [torch.randn(1, 70, 1, 16, generator=g), torch.rand(1, 70, 1, 16, generator=g)]
    xs += [torch.nn.functional.logsigmoid(torch.randn(1, 70, 1, generator=g) + 2), torch.ones(1)]
    xs = [x.requires_grad_(True) for x in xs]

    def grads():
        for x in xs:
            x.grad = None
        chunk_palimpsa(*xs)[0].sum().backward()
        return [x.grad.clone() for x in xs]

    with pytest.warns(UserWarning, match="CUDA tensors"):
        fallback = grads()
    assert cuda_build._GAVE_UP and not walk_cuda.can_run(xs[0], 16, 64, 4)
    config["onepass_walk"] = "triton"
    for a, b in zip(fallback, grads(), strict=True):
        assert torch.equal(a, b)
    config["onepass_walk"] = "cuda"
    with pytest.raises(walk_cuda.CudaUnavailable, match="CUDA tensors"):
        grads()


def test_a_device_with_less_shared_memory_keeps_the_walk_on_triton(monkeypatch):
    """The CUDA walk needs ~214 KiB of shared memory a block at K = V = 64; on a device that offers less
    (99 KiB on sm_86 and sm_89) "auto" must not pick it, and launching it anyway names the reason."""
    from types import SimpleNamespace

    from kernels.palimpsa import output_cuda

    props = SimpleNamespace(shared_memory_per_block_optin=99 * 1024)
    monkeypatch.setattr(cuda_build.torch.cuda, "get_device_properties", lambda device: props)
    walk = walk_cuda.walk_shape(64, 64, torch.bfloat16, 4, has_dvar=False)
    read_out = output_cuda.output_shape(64, 64, 64, torch.bfloat16, store_var=True)
    assert not cuda_build.fits(walk, torch.device("cuda", 0))
    assert cuda_build.fits(read_out, torch.device("cuda", 0))
    monkeypatch.setattr(cuda_build.torch.cuda, "current_device", lambda: 0)
    with pytest.raises(cuda_build.CudaUnavailable, match="shared memory"):
        cuda_build.launch_on_gpu(walk, (1, 1, 1), [])
