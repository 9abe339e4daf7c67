"""Triton kernels for the delta rule's WY pieces, every chunk in parallel, forward and backward.

Per chunk of ``C`` tokens (chunk-local cumulative log-decay ``G``, ``D[t, j] = e^{G_t - G_j}``):

    A   = tril_{-1}(diag(beta) (K K^T) * D)            strictly lower triangular, [C, C]
    T   = (I + A)^{-1}                                 unit lower triangular
    U   = T diag(beta) V,     W_k = T diag(beta) e^{G} K

(``kernels/delta_rule/chunk_torch.py`` says why these are the pieces). ``T`` is built by forward
substitution, one row per step, ``T_i = e_i - sum_{j<i} A_ij T_j``, which is backward stable; everything
else is a tensor-core product. The backward, given ``dU`` and ``dW_k``, with ``X = [U | W_k]`` and
``R = [diag(beta) V | diag(beta) e^{G} K]`` (so ``X = T R``):

    Y   = T^T [dU | dW_k]              (= dR)
    dA  = -tril_{-1}(Y X^T)
    dv  = beta * Y_v,    dk += beta e^{G} * Y_k,    dbeta += <Y_v, v> + e^{G} <Y_k, k>
    and through A = beta_t (k_t . k_j) D_tj:
    dbeta_t += sum_j dA_tj (k_t . k_j) D_tj,    dk += (M + M^T) K  with  M = diag(beta) dA * D,
    dG_t += beta_t e^{G_t} <Y_k, k>_t + sum_j (dA * A)_tj - sum_i (dA * A)_it.

One program per (chunk, head) keeps the chunk's ``[C, C]`` matrices on chip: none of them reaches device
memory, where the batched torch form writes and reads several per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.gla.chunk import MAX_TILE, dot_precision
from kernels.palimpsa.utils import SequenceLayout, next_pow2


@triton.jit
def _chunk_span(cu, chunk_index, ic, C: tl.constexpr):
    """First token and length of global chunk ``ic``."""
    n = tl.load(chunk_index + ic * 2)
    i = tl.load(chunk_index + ic * 2 + 1)
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    t0 = bos + i.to(tl.int64) * C
    return t0, tl.minimum(eos - t0, C)


@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr):
    """``(I + A)^{-1}`` of a strictly lower-triangular ``[C, C]`` tile: row ``i`` is
    ``e_i - sum_{j<i} A_ij T_j``, the rows above it being final."""
    r = tl.arange(0, C)
    T = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(r[:, None] == i, A, 0.0), axis=0)  # row i of A, by column j
        t_i = tl.sum(a_i[:, None] * T, axis=0)
        T = tl.where(r[:, None] == i, T - t_i[None, :], T)
    return T


@triton.jit
def _chunk_a(k_c, b_c, G_c, C: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr):
    """``(A, K K^T * D)`` of a chunk, both zero on and above the diagonal."""
    tc = tl.arange(0, C)
    strict = tc[:, None] > tc[None, :]
    kk = tl.dot(k_c, tl.trans(k_c), input_precision=PREC)
    if GATED:
        kk *= tl.exp(tl.where(strict, G_c[:, None] - G_c[None, :], float("-inf")))
    else:
        kk = tl.where(strict, kk, 0.0)
    return b_c[:, None] * kk, kk


@triton.jit
def _wy_fwd(
    k, v, beta, g, u, wk, cu, chunk_index,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATED: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    ic, h = tl.program_id(0), tl.program_id(1)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    tc = tl.arange(0, C)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mt, mk, mv = tc < L, ok < K, ov < V
    rows = (t0 + tc) * H + h
    k_c = tl.load(k + rows[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0).to(
        tl.float32
    )
    v_c = tl.load(v + rows[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.0).to(
        tl.float32
    )
    b_c = tl.load(beta + rows, mask=mt, other=0.0).to(tl.float32)
    crow = (ic.to(tl.int64) * H + h) * C + tc  # chunk-major rows
    # G has every row of the chunk (past a sequence's end it stays at its last value, so no exponent > 0)
    G_c = tl.load(g + crow) if GATED else tl.zeros([C], dtype=tl.float32)
    A, _ = _chunk_a(k_c, b_c, G_c, C, GATED, PREC)
    T = _unit_lower_inverse(A, C)
    u_c = tl.dot(T, b_c[:, None] * v_c, input_precision=PREC)
    wk_c = tl.dot(T, (b_c * tl.exp(G_c))[:, None] * k_c, input_precision=PREC)
    # every row, padding included (zeros there: beta is 0 past the sequence's end)
    tl.store(u + crow[:, None] * V + ov[None, :], u_c, mask=mv[None, :])
    tl.store(wk + crow[:, None] * K + ok[None, :], wk_c, mask=mk[None, :])


@triton.jit
def _wy_bwd(
    k, v, beta, g, u, wk, du, dwk, dk, dv, db, dg, cu, chunk_index,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATED: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    ic, h = tl.program_id(0), tl.program_id(1)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    tc = tl.arange(0, C)
    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mt, mk, mv = tc < L, ok < K, ov < V
    m_tk = mt[:, None] & mk[None, :]
    m_tv = mt[:, None] & mv[None, :]
    rows = (t0 + tc) * H + h
    k_c = tl.load(k + rows[:, None] * K + ok[None, :], mask=m_tk, other=0.0).to(tl.float32)
    v_c = tl.load(v + rows[:, None] * V + ov[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_c = tl.load(beta + rows, mask=mt, other=0.0).to(tl.float32)
    crow = (ic.to(tl.int64) * H + h) * C + tc
    # G has every row of the chunk (past a sequence's end it stays at its last value, so no exponent > 0)
    G_c = tl.load(g + crow) if GATED else tl.zeros([C], dtype=tl.float32)
    e_g = tl.exp(G_c)
    A, kkd = _chunk_a(k_c, b_c, G_c, C, GATED, PREC)
    T = _unit_lower_inverse(A, C)
    u_c = tl.load(u + crow[:, None] * V + ov[None, :], mask=mv[None, :], other=0.0)
    wk_c = tl.load(wk + crow[:, None] * K + ok[None, :], mask=mk[None, :], other=0.0)
    du_c = tl.load(du + crow[:, None] * V + ov[None, :], mask=mv[None, :], other=0.0)
    dwk_c = tl.load(dwk + crow[:, None] * K + ok[None, :], mask=mk[None, :], other=0.0)
    # through X = T R: dR = T^T dX
    y_v = tl.dot(tl.trans(T), du_c, input_precision=PREC)
    y_k = tl.dot(tl.trans(T), dwk_c, input_precision=PREC)
    yk_k = tl.sum(y_k * k_c, axis=1)
    d_v = b_c[:, None] * y_v
    d_k = (b_c * e_g)[:, None] * y_k
    d_b = tl.sum(y_v * v_c, axis=1) + e_g * yk_k
    # through T = (I + A)^{-1}: dA = -dR X^T on the strictly lower triangle
    strict = tc[:, None] > tc[None, :]
    d_a = tl.dot(y_v, tl.trans(u_c), input_precision=PREC) + tl.dot(y_k, tl.trans(wk_c), input_precision=PREC)
    d_a = tl.where(strict, -d_a, 0.0)
    # through A = beta_t (k_t . k_j) D_tj
    d_b += tl.sum(d_a * kkd, axis=1)
    if GATED:
        m = d_a * b_c[:, None] * tl.exp(tl.where(strict, G_c[:, None] - G_c[None, :], float("-inf")))
    else:
        m = d_a * b_c[:, None]
    d_k += tl.dot(m, k_c, input_precision=PREC) + tl.dot(tl.trans(m), k_c, input_precision=PREC)
    tl.store(dk + rows[:, None] * K + ok[None, :], d_k.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dv + rows[:, None] * V + ov[None, :], d_v.to(dv.dtype.element_ty), mask=m_tv)
    tl.store(db + rows, d_b.to(db.dtype.element_ty), mask=mt)
    if GATED:
        da_a = d_a * A
        d_g = b_c * e_g * yk_k + tl.sum(da_a, axis=1) - tl.sum(da_a, axis=0)
        tl.store(dg + crow, d_g)  # every row: the cumulative sum's backward reads them all (0 on padding)


NUM_WARPS = 4


def wy_blocks(K: int, V: int, C: int) -> tuple[int, int]:
    """``(BK, BV)``: K and V whole, padded to powers of two (at least 16 for ``tl.dot``). The [C, K] and
    [C, V] tiles stay within ``MAX_TILE`` (64 x 128) elements: at 64 x 256 the backward overflows shared
    memory on sm_90 (344064 bytes at K = V = 256 with bf16 inputs; 278528 at K = 256, V = 128)."""
    BK, BV = max(16, next_pow2(K)), max(16, next_pow2(V))
    if C * max(BK, BV) > MAX_TILE:
        raise ValueError(
            f"chunk_size {C} with K = {K}, V = {V}: the WY kernels' [C, K] and [C, V] tiles overflow shared "
            f"memory; use chunk_size <= {max(16, MAX_TILE // max(BK, BV))}"
        )
    return BK, BV


class WYFunction(torch.autograd.Function):
    """``(U, W_k)``, chunk-major ``[NT, H, C, D]`` fp32, from flattened ``k [1, TT, H, K]``,
    ``v [1, TT, H, V]``, ``beta [1, TT, H]`` and the chunk-local cumulative log-decay ``G [NT, H, C]`` fp32
    (None: ungated)."""

    @staticmethod
    def forward(ctx, k, v, beta, G, layout: SequenceLayout, C: int):
        _, TT, H, K = k.shape
        V = v.shape[-1]
        NT = layout.num_chunks
        BK, BV = wy_blocks(K, V, C)
        u = k.new_empty(NT, H, C, V, dtype=torch.float32)
        wk = k.new_empty(NT, H, C, K, dtype=torch.float32)
        gated = G is not None
        _wy_fwd[(NT, H)](
            k, v, beta, G if gated else u, u, wk, layout.cu_seqlens, layout.chunk_index,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, GATED=gated, PREC=dot_precision(k.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(k, v, beta, G, u, wk)
        ctx.meta = (layout, C)
        return u, wk

    @staticmethod
    def backward(ctx, du, dwk):
        k, v, beta, G, u, wk = ctx.saved_tensors
        layout, C = ctx.meta
        _, TT, H, K = k.shape
        V = v.shape[-1]
        NT = layout.num_chunks
        BK, BV = wy_blocks(K, V, C)
        gated = G is not None
        du = torch.zeros_like(u) if du is None else du.contiguous()
        dwk = torch.zeros_like(wk) if dwk is None else dwk.contiguous()
        # tokens past every chunk's end do not exist, so every token's row is written
        dk, dv, db = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
        dg = torch.empty_like(G) if gated else None
        _wy_bwd[(NT, H)](
            k, v, beta, G if gated else u, u, wk, du, dwk, dk, dv, db, dg if gated else u,
            layout.cu_seqlens, layout.chunk_index,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, GATED=gated, PREC=dot_precision(k.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        return dk, dv, db, dg, None, None


def wy_pieces_triton(
    k: Tensor, v: Tensor, beta: Tensor, G: Tensor | None, layout: SequenceLayout, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The Triton counterpart of ``chunk_torch.wy_pieces``, on flattened tokens; see ``WYFunction``."""
    return WYFunction.apply(k.contiguous(), v.contiguous(), beta.contiguous(), G, layout, chunk_size)
