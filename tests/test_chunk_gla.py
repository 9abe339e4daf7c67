"""Chunked simple GLA against the float64 step-by-step recurrence: the vectorized torch form in float64
(to 1e-10) and the fused-chunk Triton kernels in float32 under Triton's interpreter (to 1e-4 relative).

Every case draws fresh random inputs and checks ``y``, the final state and the gradients of ``q, k, v,
log_alpha`` and the initial state through a random linear functional of both outputs. Chunks of 16 put
several chunks, and a partial last one, into the short sequences.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from chunk_cases import assert_close, inputs, outputs_and_grads  # noqa: E402

from kernels.gla import chunk_simple_gla_torch, naive_recurrent_simple_gla, simple_gla  # noqa: E402

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
