"""Variant v2 of the Triton Palimpsa op (per-row backward), run by Triton's interpreter, against float64.

The same checks as the default variant: outputs and every input gradient through a random linear
functional of all outputs, odd K and V, T not a multiple of the chunk, several V blocks, K > 128, varlen
batches, with and without initial/final states, extreme gates and beta = 0; plus the variant switch.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("triton was imported without its interpreter and there is no GPU", allow_module_level=True)

from test_triton_palimpsa import NAMES, assert_close, forward_backward, make_inputs  # noqa: E402

from kernels.palimpsa import chunk_v2, naive_recurrent_palimpsa, palimpsa_attn  # noqa: E402
from kernels.palimpsa.chunk import chunk_palimpsa  # noqa: E402


def _v2(chunk_size, **extra):
    return lambda *a, **kw: chunk_palimpsa(*a, chunk_size=chunk_size, variant="v2", **extra, **kw)


@pytest.fixture
def rows_per_program():
    """Let a test shrink the V block so that several programs share dk, dq and d log alpha."""
    saved = dict(chunk_v2.CONFIG)
    yield chunk_v2.CONFIG
    chunk_v2.CONFIG.clear()
    chunk_v2.CONFIG.update(saved)


@pytest.mark.parametrize(
    ("shape", "chunk_size", "rows_bv"),
    [
        ((2, 37, 2, 5, 12), 16, 32),  # odd K and V; T % chunk != 0; one V block
        ((1, 40, 1, 48, 20), 32, 8),  # K = 48; 3 V blocks (the last one partial): atomics
        ((1, 18, 1, 130, 7), 16, 32),  # K = 130 > 128
    ],
)
def test_outputs_and_all_gradients_match_float64(shape, chunk_size, rows_bv, rows_per_program):
    rows_per_program["rows_bv"] = rows_bv
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    xs = make_inputs(*shape, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)
    out, grad = forward_backward(_v2(chunk_size), xs, torch.float32, seed)
    assert_close(out + grad, ref_out + ref_grad, NAMES)


def test_without_initial_state_through_the_dispatch_and_the_environment(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    xs = make_inputs(2, 21, 2, 16, 16, gen)
    seed = 11
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed, with_init=False)
    calls = []
    real = chunk_v2._rows_step
    monkeypatch.setattr(chunk_v2, "_rows_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("PALIMPSA_TRITON_VARIANT", "v2")
    triton_attn = lambda *a, **kw: palimpsa_attn(*a, backend="triton", **kw)  # noqa: E731
    out, grad = forward_backward(triton_attn, xs, torch.float32, seed, with_init=False)
    assert calls, "PALIMPSA_TRITON_VARIANT=v2 did not select the v2 backward"
    assert_close(out + grad, ref_out + ref_grad, NAMES[:10])


def test_variable_length_batch_matches_each_sequence(rows_per_program):
    rows_per_program["rows_bv"] = 4  # 3 V blocks of a 10-wide V
    gen = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 9, 10, 40], dtype=torch.int32)
    xs = make_inputs(1, 40, 2, 12, 10, gen, N=3)
    seed = 17
    ref_out, ref_grad = forward_backward(
        lambda *a, **kw: palimpsa_attn(*a, backend="reference", cu_seqlens=cu, **kw), xs, torch.float64, seed
    )
    out, grad = forward_backward(_v2(16, cu_seqlens=cu), xs, torch.float32, seed)
    assert_close(out + grad, ref_out + ref_grad, NAMES)


def test_extreme_gates_stay_finite_and_accurate():
    """alpha near 0 (log -30) and near 1 (log -1e-7), beta = 0 and 50x, Ip of 1e-4 and 1e4."""
    gen = torch.Generator().manual_seed(9)
    xs = make_inputs(1, 35, 2, 8, 12, gen, gates="extreme")
    seed = 23
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)
    out, grad = forward_backward(_v2(16), xs, torch.float32, seed)
    assert_close(out + grad, ref_out + ref_grad, NAMES)


def test_beta_zero_gradients_match_float64():
    """beta = 0 (the gated linear-attention limit): I stays at Ip and every gradient still matches."""
    gen = torch.Generator().manual_seed(13)
    xs = make_inputs(1, 20, 1, 8, 8, gen)
    xs[3] = torch.zeros_like(xs[3])
    seed = 29
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)
    out, grad = forward_backward(_v2(16), xs, torch.float32, seed)
    assert_close(out + grad, ref_out + ref_grad, NAMES)


def test_low_precision_products_with_bf16_inputs():
    """v2-lowp: with bf16 inputs the state products take fp16 operands; errors stay at bf16 rounding."""
    gen = torch.Generator().manual_seed(31)
    xs = make_inputs(1, 40, 1, 16, 16, gen)
    xs[:4] = [x.to(torch.bfloat16).double() for x in xs[:4]]  # the reference sees the rounded inputs
    seed = 37
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)

    def lowp(q, k, u, beta, *rest, **kw):
        q, k, u, beta = (x.to(torch.bfloat16) for x in (q, k, u, beta))
        return chunk_palimpsa(q, k, u, beta, *rest, chunk_size=32, variant="v2-lowp", **kw)

    out, grad = forward_backward(lowp, xs, torch.float32, seed)
    assert_close(out + grad, ref_out + ref_grad, NAMES, out_tol=2e-2, grad_tol=3e-2)


def test_unknown_variant_is_rejected():
    x = torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="unknown Palimpsa Triton variant"):
        chunk_palimpsa(x, x, x, x.abs(), torch.zeros(1, 3, 1), 1.0, variant="v3")
