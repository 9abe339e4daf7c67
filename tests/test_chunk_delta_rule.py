"""Chunked (gated) delta rule against the float64 step-by-step recurrence: the vectorized torch form in
float64 (to 1e-10) and the Triton path (WY kernels, then the walk) in float32 under Triton's interpreter
(to 1e-4 relative).

Every case draws fresh random inputs and checks ``y``, the final state and the gradients of ``q, k, v,
beta, log_alpha`` and the initial state through a random linear functional of both outputs. ``k`` is unit
norm, as the layers make it. DeltaNet is ``log_alpha=None``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from chunk_cases import assert_close, inputs, outputs_and_grads, per_sequence  # noqa: E402

from kernels.delta_rule import chunk_delta_rule_torch, delta_rule, naive_recurrent_delta_rule  # noqa: E402

CASES = [(1, 8, 16), (37, 16, 8), (70, 8, 16)]  # (T, K, V)


def _leaves(x: dict, gated: bool, with_init: bool = True) -> dict:
    drop = ({"log_alpha"} if not gated else set()) | ({"h0"} if not with_init else set())
    return {n: t for n, t in x.items() if n not in drop}


def _run(fn, **kw):
    def run(q, k, v, beta, log_alpha=None, h0=None):
        return fn(q, k, v, beta, log_alpha, initial_state=h0, output_final_state=True, **kw)

    return run


def _check(fn, x, dtype, tol, **kw):
    want = outputs_and_grads(_run(naive_recurrent_delta_rule), x, torch.float64)
    got = outputs_and_grads(_run(fn, **kw), x, dtype)
    assert_close(got, want, tol)


# ---------------------------------------------------------------- torch form, float64


@pytest.mark.parametrize("gate", ["none", "normal", "zero", "strong"])
@pytest.mark.parametrize(("T", "K", "V"), CASES)
def test_torch_form_matches_float64_recurrence(T, K, V, gate):
    x = inputs(2, T, 2, K, V, seed=T * 29 + K, gate="normal" if gate == "none" else gate, delta=True)
    _check(chunk_delta_rule_torch, _leaves(x, gate != "none"), torch.float64, 1e-10, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_torch_form_any_chunk_size_and_no_initial_state(chunk_size):
    x = inputs(2, 21, 2, 6, 5, seed=chunk_size, delta=True)
    leaves = _leaves(x, gated=True, with_init=False)
    _check(chunk_delta_rule_torch, leaves, torch.float64, 1e-10, chunk_size=chunk_size)


def test_torch_form_keeps_16_bit_outputs_and_fp32_states():
    x = inputs(1, 40, 2, 16, 16, seed=3, delta=True)
    q, k, v, beta = (x[n].bfloat16() for n in ("q", "k", "v", "beta"))
    la = x["log_alpha"].float()
    y, S = chunk_delta_rule_torch(q, k, v, beta, la, output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y_ref, S_ref = naive_recurrent_delta_rule(*(t.double() for t in (q, k, v, beta)), x["log_alpha"],
                                              output_final_state=True)  # fmt: skip
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-2
    assert ((S.double() - S_ref).norm() / S_ref.norm()).item() < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_dispatch_torch_and_reference(gated):
    x = inputs(2, 19, 2, 4, 3, seed=7, delta=True)
    args = (x["q"], x["k"], x["v"], x["beta"], x["log_alpha"] if gated else None)
    ref = naive_recurrent_delta_rule(*args, initial_state=x["h0"], output_final_state=True)
    for backend in ("torch", "reference", "auto"):
        got = delta_rule(*args, initial_state=x["h0"], output_final_state=True, backend=backend)
        assert_close({"y": got[0], "S": got[1]}, {"y": ref[0], "S": ref[1]}, 1e-12)


# ---------------------------------------------------------------- Triton path, interpreter, float32


def _chunk_delta_rule():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
        pytest.skip("triton was imported without its interpreter and there is no GPU")
    from kernels.delta_rule.chunk import chunk_delta_rule

    return chunk_delta_rule


@pytest.mark.parametrize("gated", [False, True])
def test_triton_wy_pieces_match_the_torch_solve(gated):
    """The WY kernels alone: ``U``, ``W_k`` and the gradients of ``k, v, beta, log_alpha`` through them."""
    _chunk_delta_rule()
    from kernels.delta_rule.chunk import _chunk_major_dense
    from kernels.delta_rule.chunk_torch import wy_pieces
    from kernels.delta_rule.wy import wy_pieces_triton
    from kernels.gla.chunk import flatten_tokens, layout_for

    B, T, C = 2, 40, 16
    x = inputs(B, T, 2, 8, 16, seed=29, delta=True)
    leaves = {n: x[n] for n in ("k", "v", "beta")} | ({"log_alpha": x["log_alpha"]} if gated else {})

    def chunks(t):
        return _chunk_major_dense(flatten_tokens(t), B, C)

    def torch_solve(k, v, beta, log_alpha=None):
        G = None if log_alpha is None else chunks(log_alpha).cumsum(-1)
        return wy_pieces(chunks(k), chunks(v), chunks(beta), G)

    def triton_kernels(k, v, beta, log_alpha=None):
        G = None if log_alpha is None else chunks(log_alpha).cumsum(-1).contiguous()
        layout = layout_for(B, T, None, C, k.device)
        return wy_pieces_triton(*(flatten_tokens(t) for t in (k, v, beta)), G, layout, C)

    want = outputs_and_grads(torch_solve, leaves, torch.float64)
    assert_close(outputs_and_grads(triton_kernels, leaves, torch.float32), want, 1e-5)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("T", "K", "V"), [*CASES, (37, 5, 80)])  # V = 80: two V blocks
def test_triton_matches_float64_recurrence(T, K, V, gated):
    x = inputs(2, T, 2, K, V, seed=T * 13 + V, delta=True)
    _check(_chunk_delta_rule(), _leaves(x, gated), torch.float32, 1e-4, chunk_size=16)


@pytest.mark.parametrize(
    ("T", "K", "V", "chunk_size"),
    [(150, 16, 32, 64), (100, 64, 64, 64), (40, 48, 20, 32)],  # the baselines' heads; full tiles; K = 48
)
def test_triton_larger_chunks_and_heads(T, K, V, chunk_size):
    x = inputs(1, T, 2, K, V, seed=T + K, delta=True)
    _check(_chunk_delta_rule(), _leaves(x, gated=True), torch.float32, 1e-4, chunk_size=chunk_size)


@pytest.mark.parametrize(("K", "V"), [(256, 20), (24, 256)])
def test_triton_wide_heads_take_the_small_tiles(K, V):
    """K or V = 256: chunks of 32 by default (the WY kernels' [C, K] and [C, V] tiles), and for K = 256 V
    blocks of 16 and two pipelining stages (``walk_config``): what fits an H200's shared memory."""
    x = inputs(1, 37, 1, K, V, seed=K + V, delta=True)
    _check(_chunk_delta_rule(), _leaves(x, gated=True), torch.float32, 1e-4)


def test_triton_rejects_chunks_too_large_for_wide_values():
    fn = _chunk_delta_rule()
    q, v = torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 256)
    with pytest.raises(ValueError, match="overflow shared memory"):
        fn(q, q, v, torch.rand(1, 8, 1), chunk_size=64)


@pytest.mark.parametrize("gate", ["zero", "strong"])
def test_triton_linear_attention_and_strong_decays(gate):
    x = inputs(2, 45, 2, 16, 16, seed=11, gate=gate, delta=True)
    _check(_chunk_delta_rule(), _leaves(x, gated=True), torch.float32, 1e-4, chunk_size=16)


def test_triton_without_initial_state_through_the_dispatch():
    x = inputs(2, 33, 2, 8, 8, seed=13, delta=True)
    _chunk_delta_rule()
    _check(delta_rule, _leaves(x, gated=True, with_init=False), torch.float32, 1e-4, backend="triton")


@pytest.mark.parametrize("gated", [False, True])
def test_triton_variable_length_batch_matches_each_sequence(gated):
    fn = _chunk_delta_rule()
    lens = [9, 1, 40]
    cu = torch.tensor([0, 9, 10, 50], dtype=torch.int32)
    x = _leaves(inputs(1, sum(lens), 2, 8, 16, seed=5, delta=True, N=len(lens)), gated)

    def varlen(q, k, v, beta, log_alpha=None, h0=None):
        return fn(q, k, v, beta, log_alpha, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                  chunk_size=16)  # fmt: skip

    want = outputs_and_grads(per_sequence(_run(naive_recurrent_delta_rule), cu), x, torch.float64)
    assert_close(outputs_and_grads(varlen, x, torch.float32), want, 1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_variable_length_batch_through_the_dispatch(backend):
    """``cu_seqlens`` on every backend: the Triton walk natively, the others one sequence at a time."""
    if backend == "triton":
        _chunk_delta_rule()
    dtype, tol = (torch.float32, 1e-4) if backend == "triton" else (torch.float64, 1e-10)
    cu = torch.tensor([0, 70, 75, 90], dtype=torch.int32)
    x = inputs(1, 90, 2, 8, 8, seed=19, delta=True, N=3)
    got = outputs_and_grads(_run(delta_rule, backend=backend, cu_seqlens=cu), x, dtype)
    want = outputs_and_grads(per_sequence(_run(naive_recurrent_delta_rule), cu), x, torch.float64)
    assert_close(got, want, tol)


def test_triton_keeps_16_bit_outputs_and_fp32_states():
    fn = _chunk_delta_rule()
    x = inputs(1, 40, 2, 16, 16, seed=3, delta=True)
    q, k, v, beta = (x[n].bfloat16() for n in ("q", "k", "v", "beta"))
    y, S = fn(q, k, v, beta, x["log_alpha"].float(), output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y_ref, S_ref = chunk_delta_rule_torch(q, k, v, beta, x["log_alpha"].float(), output_final_state=True)
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2
    assert ((S - S_ref).norm() / S_ref.norm()).item() < 1e-3
