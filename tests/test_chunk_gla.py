"""Chunked simple GLA against the float64 step-by-step recurrence: the vectorized torch form in float64
(to 1e-10) and the fused-chunk Triton kernels in float32 under Triton's interpreter (to 1e-4 relative).

Every case draws fresh random inputs and checks ``y``, the final state and the gradients of ``q, k, v,
log_alpha`` and the initial state through a random linear functional of both outputs. Chunks of 16 put
several chunks, and a partial last one, into the short sequences.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from chunk_cases import assert_close, inputs, outputs_and_grads, per_sequence  # noqa: E402

from kernels.gla import (  # noqa: E402
    chunk_simple_gla_torch,
    linear_attention,
    naive_recurrent_simple_gla,
    simple_gla,
)

CASES = [(1, 8, 16), (37, 16, 8), (70, 8, 16)]  # (T, K, V)


def _run(fn, with_init=True, **kw):
    def run(q, k, v, log_alpha, h0=None):
        return fn(q, k, v, log_alpha, initial_state=h0 if with_init else None, output_final_state=True, **kw)

    return run


def _check(fn, x, dtype, tol, with_init=True, **kw):
    if not with_init:
        x = {n: t for n, t in x.items() if n != "h0"}
    want = outputs_and_grads(_run(naive_recurrent_simple_gla, with_init), x, torch.float64)
    got = outputs_and_grads(_run(fn, with_init, **kw), x, dtype)
    assert_close(got, want, tol)


# ---------------------------------------------------------------- torch form, float64


@pytest.mark.parametrize("gate", ["normal", "zero", "strong"])
@pytest.mark.parametrize(("T", "K", "V"), CASES)
def test_torch_form_matches_float64_recurrence(T, K, V, gate):
    x = inputs(2, T, 2, K, V, seed=T * 31 + K, gate=gate)
    _check(chunk_simple_gla_torch, x, torch.float64, 1e-10, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_torch_form_any_chunk_size_and_no_initial_state(chunk_size):
    x = inputs(2, 21, 2, 6, 5, seed=chunk_size)
    _check(chunk_simple_gla_torch, x, torch.float64, 1e-10, with_init=False, chunk_size=chunk_size)


def test_torch_form_keeps_16_bit_outputs_and_fp32_states():
    x = inputs(1, 40, 2, 16, 16, seed=3)
    q, k, v = (x[n].bfloat16() for n in "qkv")
    y, S = chunk_simple_gla_torch(q, k, v, x["log_alpha"].float(), output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y_ref, S_ref = naive_recurrent_simple_gla(q.double(), k.double(), v.double(), x["log_alpha"],
                                              output_final_state=True)  # fmt: skip
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2
    assert ((S.double() - S_ref).norm() / S_ref.norm()).item() < 1e-5


def test_dispatch_torch_and_reference():
    x = inputs(2, 19, 2, 4, 3, seed=7)
    args = (x["q"], x["k"], x["v"], x["log_alpha"])
    ref = naive_recurrent_simple_gla(*args, initial_state=x["h0"], output_final_state=True)
    for backend in ("torch", "reference", "auto"):
        got = simple_gla(*args, initial_state=x["h0"], output_final_state=True, backend=backend)
        assert_close({"y": got[0], "S": got[1]}, {"y": ref[0], "S": ref[1]}, 1e-12)


# ---------------------------------------------------------------- Triton kernels, interpreter, float32


def _chunk_simple_gla():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
        pytest.skip("triton was imported without its interpreter and there is no GPU")
    from kernels.gla.chunk import chunk_simple_gla

    return chunk_simple_gla


@pytest.mark.parametrize(("T", "K", "V"), [*CASES, (37, 5, 80)])  # V = 80: two V blocks
def test_triton_matches_float64_recurrence(T, K, V):
    x = inputs(2, T, 2, K, V, seed=T * 17 + V)
    _check(_chunk_simple_gla(), x, torch.float32, 1e-4, chunk_size=16)


@pytest.mark.parametrize(
    ("T", "K", "V", "chunk_size"),
    [(150, 16, 32, 64), (100, 64, 64, 64), (40, 48, 20, 32)],  # the baselines' heads; full tiles; K = 48
)
def test_triton_larger_chunks_and_heads(T, K, V, chunk_size):
    x = inputs(1, T, 2, K, V, seed=T + K)
    _check(_chunk_simple_gla(), x, torch.float32, 1e-4, chunk_size=chunk_size)


@pytest.mark.parametrize("gate", ["zero", "strong"])
def test_triton_linear_attention_and_strong_decays(gate):
    x = inputs(2, 45, 2, 16, 16, seed=11, gate=gate)
    _check(_chunk_simple_gla(), x, torch.float32, 1e-4, chunk_size=16)


def test_triton_without_initial_state_through_the_dispatch():
    x = inputs(2, 33, 2, 8, 8, seed=13)
    _chunk_simple_gla()
    _check(simple_gla, x, torch.float32, 1e-4, with_init=False, backend="triton")


def test_triton_variable_length_batch_matches_each_sequence():
    fn = _chunk_simple_gla()
    lens = [9, 1, 40]
    cu = torch.tensor([0, 9, 10, 50], dtype=torch.int32)
    x = inputs(1, sum(lens), 2, 8, 16, seed=5, N=len(lens))

    def varlen(q, k, v, log_alpha, h0):
        return fn(q, k, v, log_alpha, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16)

    want = outputs_and_grads(per_sequence(_run(naive_recurrent_simple_gla), cu), x, torch.float64)
    assert_close(outputs_and_grads(varlen, x, torch.float32), want, 1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_variable_length_batch_through_the_dispatch(backend):
    """``cu_seqlens`` on every backend: the Triton walk natively, the others one sequence at a time."""
    if backend == "triton":
        _chunk_simple_gla()
    dtype, tol = (torch.float32, 1e-4) if backend == "triton" else (torch.float64, 1e-10)
    cu = torch.tensor([0, 70, 75, 90], dtype=torch.int32)
    x = inputs(1, 90, 2, 8, 8, seed=19, N=3)
    got = outputs_and_grads(_run(simple_gla, backend=backend, cu_seqlens=cu), x, dtype)
    want = outputs_and_grads(per_sequence(_run(naive_recurrent_simple_gla), cu), x, torch.float64)
    assert_close(got, want, tol)


def test_linear_attention_through_the_triton_dispatch():
    _chunk_simple_gla()
    x = inputs(2, 40, 2, 8, 8, seed=23, gate="zero")
    x.pop("log_alpha")

    def run(fn, **kw):
        return lambda q, k, v, h0: fn(q, k, v, initial_state=h0, output_final_state=True, **kw)

    got = outputs_and_grads(run(linear_attention, backend="triton"), x, torch.float32)
    want = outputs_and_grads(run(linear_attention, backend="reference"), x, torch.float64)
    assert_close(got, want, 1e-4)


def test_triton_keeps_16_bit_outputs_and_fp32_states():
    fn = _chunk_simple_gla()
    x = inputs(1, 40, 2, 16, 16, seed=3)
    q, k, v = (x[n].bfloat16() for n in "qkv")
    y, S = fn(q, k, v, x["log_alpha"].float(), output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y_ref, S_ref = chunk_simple_gla_torch(q, k, v, x["log_alpha"].float(), output_final_state=True)
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2
    assert ((S - S_ref).norm() / S_ref.norm()).item() < 1e-3


def test_triton_wide_heads_take_the_small_tiles():
    """K = 256: chunks of 32 by default (``default_chunk_size``), V blocks of 16 (three of them for V = 48)
    and two pipelining stages (``walk_config``), the configuration that fits an H200's shared memory."""
    x = inputs(1, 41, 1, 256, 48, seed=31)
    _check(_chunk_simple_gla(), x, torch.float32, 1e-4)


def test_walk_config_keeps_the_baselines_and_shrinks_what_overflowed():
    """The launch constants (no kernel runs): the baselines' K = 16, V = 32 as before (V block 32, Triton's
    default 3 stages, chunks of 64), and the delta rule's fp32 backward at K = V = 64, which needed 262656
    bytes of shared memory on sm_90 with V blocks of 64, now in blocks of 32."""
    _chunk_simple_gla()
    from kernels.gla.chunk import WalkConfig, default_chunk_size, walk_config

    for dtype in (torch.bfloat16, torch.float32):
        for state_values in (False, True):
            assert default_chunk_size(16, 32, state_values) == 64
            for backward in (False, True):
                assert walk_config(16, 32, 64, dtype, state_values, backward) == WalkConfig(16, 32, 3)
    assert walk_config(64, 64, 64, torch.float32, True, backward=True) == WalkConfig(64, 32, 3)
    assert walk_config(64, 64, 64, torch.bfloat16, True, backward=True) == WalkConfig(64, 64, 3)
    assert walk_config(128, 128, 64, torch.float32, True, backward=True) == WalkConfig(128, 16, 2)
    assert default_chunk_size(256, 16, False) == default_chunk_size(16, 256, True) == 32
    assert default_chunk_size(16, 256, False) == default_chunk_size(128, 128, True) == 64
    assert walk_config(256, 256, 32, torch.bfloat16, False, backward=False) == WalkConfig(256, 16, 2)
    with pytest.raises(ValueError, match="chunk_size <= 32"):
        walk_config(256, 16, 64, torch.float32, False, backward=False)
    with pytest.raises(ValueError, match="chunk_size <= 64"):
        walk_config(16, 32, 128, torch.bfloat16, False, backward=False)


def test_triton_rejects_bad_chunk_sizes_and_unflattened_varlen():
    fn = _chunk_simple_gla()
    q = torch.randn(2, 8, 1, 4)
    for chunk_size in (24, 128):
        with pytest.raises(ValueError, match="power of two"):
            fn(q, q, q, q[..., 0], chunk_size=chunk_size)
    with pytest.raises(ValueError, match="B == 1"):
        fn(q, q, q, q[..., 0], cu_seqlens=torch.tensor([0, 8]))
    wide = torch.randn(1, 8, 1, 256)
    with pytest.raises(ValueError, match="overflow shared memory"):
        fn(wide, wide, q, q[..., 0], chunk_size=64)
