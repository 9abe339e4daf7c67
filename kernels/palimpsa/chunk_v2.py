"""Variant ``v2`` of the chunked Triton Palimpsa op: the per-token gradients by value rows, not by tokens.

The forward, the chunks' local pulls and the reverse scan over chunk boundaries are those of ``chunk``
(``backward_with``); only step 5 differs. ``chunk._main_bwd`` walks a chunk token by token: 64 dependent
steps, each with two small products and several block-wide reductions, so it waits on latency.

Here a program owns a chunk (``C`` tokens), a head and a block of value rows and loops over the rows ``v``.
For one row every quantity of the chunk is a ``[C, K]`` tile (tokens x keys), and both recurrences become
products over the token axis, with ``D[t, j] = e^{G_t - G_j}`` (``j < t``) and the boundary state ``S``:

    a_t S_{t-1}[v]  = e^{G_t} S[v] + (D * u[:, v]) @ k            (A_M; A_I likewise with beta, k*k)
    S_t[v]          = A + u[t, v] k_t                             (no product: the diagonal term)
    dS_t[v]         = g_t + (D^T @ g)_t + e^{G_L - G_t} E[v]      (g: token t's direct gradient on S_t)

so each row costs four ``[C, C] x [C, K]`` tensor-core products and elementwise work, with no dependence
between rows except accumulators. ``du, dbeta`` are one reduction over K per row for all ``C`` tokens;
``dk, dq`` accumulate as ``[C, K]`` tiles over the rows and are written once; ``d log alpha_t =
<dS_t, a_t S_{t-1}>`` and the ``Ip`` gradient accumulate as ``[C]`` vectors. There is no per-token step.

Work: ``8 C K`` tensor-core flop per state element per chunk row versus the per-token variant's two
``[BV, C] x [C, K]`` products per token (``4 C K`` per element), so twice the tensor-core flop, but
independent, large products instead of a serial chain of small ones and block-wide barriers.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from kernels.palimpsa.chunk import ChunkPalimpsaFunction, _chunk_span, backward_with
from kernels.palimpsa.utils import dot_precision, next_pow2

# Launch shapes: value rows per program (the grid's V blocks) and warps per program at K <= 64; wider keys
# scale the warps with K (up to 16) so that the seven [C, K] tiles held across rows stay in registers.
CONFIG: dict[str, int] = {"rows_bv": 32, "rows_warps": 8}


@triton.jit
def _mm(a, b, PREC: tl.constexpr, LOWP: tl.constexpr):
    """``a @ b`` in fp32 accumulation; fp16 operands when ``LOWP`` (only for operands bounded by inputs)."""
    if LOWP:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rows_bwd(
    q, k, u, beta, la, ip, hm, hi, dhm, dhi, do, dvar,
    dq, dk, du, db, dla, dip, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DVAR: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
):  # fmt: skip
    iv, ic, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    tc = tl.arange(0, C)
    ok = tl.arange(0, BK)
    mt, mk = tc < L, ok < K
    mtk = mt[:, None] & mk[None, :]
    p = tl.load(ip + h).to(tl.float32)
    g = tl.load(la + (t0 + tc) * H + h, mask=mt, other=0.0).to(tl.float32)
    gc = tl.cumsum(g, axis=0)
    gl = tl.sum(g, axis=0)
    # decay matrices, masked before exp so that no positive exponent is ever formed
    diff = gc[:, None] - gc[None, :]  # G_t - G_j
    low = tc[None, :] < tc[:, None]
    d_low = tl.where(low, tl.exp(tl.where(low, diff, 0.0)), 0.0)  # [t, j] = e^{G_t - G_j}, j < t
    up = tc[None, :] > tc[:, None]
    d_upt = tl.where(up, tl.exp(tl.where(up, -diff, 0.0)), 0.0)  # [t, s] = e^{G_s - G_t}, s > t
    e_start = tl.exp(gc)[:, None]  # decay from the chunk's start state to token t
    e_end = tl.exp(gl - gc)[:, None]  # decay from token t to the chunk's last token
    rows_k = ((t0 + tc) * H + h)[:, None] * K + ok[None, :]
    kc = tl.load(k + rows_k, mask=mtk, other=0.0).to(tl.float32)
    kk = kc * kc
    qc = tl.load(q + rows_k, mask=mtk, other=0.0).to(tl.float32)
    acc_dk = tl.zeros([C, BK], dtype=tl.float32)
    acc_dq = tl.zeros([C, BK], dtype=tl.float32)
    acc_dla = tl.zeros([C], dtype=tl.float32)
    acc_dip = tl.zeros([C], dtype=tl.float32)
    col = (t0 + tc) * (H * V) + h * V  # token t's value row in [T, H, V], plus v
    base = (ic.to(tl.int64) * H + h) * V * K
    v0 = iv * BV
    for v in range(v0, tl.minimum(v0 + BV, V)):
        uv = tl.load(u + col + v, mask=mt, other=0.0).to(tl.float32)
        bv = tl.load(beta + col + v, mask=mt, other=0.0).to(tl.float32)
        sdo = scale * tl.load(do + col + v, mask=mt, other=0.0).to(tl.float32)
        srow = base + v * K + ok
        sm = tl.load(hm + srow, mask=mk, other=0.0)
        si = tl.load(hi + srow, mask=mk, other=0.0)
        em = tl.load(dhm + srow, mask=mk, other=0.0)  # gradient on the state after the chunk, E_c
        ei = tl.load(dhi + srow, mask=mk, other=0.0)
        # a_t S_{t-1} for every token of the chunk, then S_t by the token's own outer-product term
        am = e_start * sm[None, :] + _mm(d_low * uv[None, :], kc, PREC, LOWP)
        ai = e_start * si[None, :] + _mm(d_low * bv[None, :], kk, PREC, LOWP)
        r = 1.0 / (ai + bv[:, None] * kk + p)
        mu = (am + uv[:, None] * kc) * r
        d_m = sdo[:, None] * qc * r
        d_i = -d_m * mu
        acc_dq += sdo[:, None] * mu
        if HAS_DVAR:
            wr = (scale * scale * tl.load(dvar + col + v, mask=mt, other=0.0).to(tl.float32))[:, None] * r
            d_i -= wr * r * (qc * qc)
            acc_dq += 2.0 * qc * wr
        acc_dip += tl.sum(d_i, axis=1)
        # the reverse recurrences dS_t = g_t + alpha_{t+1} dS_{t+1}, all tokens at once
        # (gradients have no fixed range: these two stay at PREC)
        gm = d_m + _mm(d_upt, d_m, PREC, False) + e_end * em[None, :]
        gi = d_i + _mm(d_upt, d_i, PREC, False) + e_end * ei[None, :]
        tl.store(du + col + v, tl.sum(gm * kc, axis=1).to(du.dtype.element_ty), mask=mt)
        tl.store(db + col + v, tl.sum(gi * kk, axis=1).to(db.dtype.element_ty), mask=mt)
        acc_dk += uv[:, None] * gm + (2.0 * bv)[:, None] * kc * gi
        acc_dla += tl.sum(gm * am + gi * ai, axis=1)  # d log alpha_t = <dS_t, alpha_t S_{t-1}>
    tok = t0 + tc
    if ATOMIC:
        tl.atomic_add(dk + rows_k, acc_dk, mask=mtk, sem="relaxed")
        tl.atomic_add(dq + rows_k, acc_dq, mask=mtk, sem="relaxed")
        tl.atomic_add(dla + tok * H + h, acc_dla, mask=mt, sem="relaxed")
    else:
        tl.store(dk + rows_k, acc_dk.to(dk.dtype.element_ty), mask=mtk)
        tl.store(dq + rows_k, acc_dq.to(dq.dtype.element_ty), mask=mtk)
        tl.store(dla + tok * H + h, acc_dla, mask=mt)
    tl.store(dip + (iv * tl.num_programs(1) + ic) * H + h, tl.sum(acc_dip, axis=0))


def _rows_step(
    q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, has_dvar, scale, layout, C, lowp=False
):  # fmt: skip
    """Step 5 of variant v2: per (V block, chunk, head), loop over the block's value rows.

    ``lowp``: with 16-bit inputs, the two state products take fp16 operands (twice tf32's tensor-core rate,
    11 significant bits): decay weights in [0, 1] times ``u``, ``beta``, ``k`` values, which must stay within
    fp16's range (|x| < 65504). The two gradient products keep tf32: gradients have no fixed range.
    """
    _, TT, H, K = q.shape
    V = u.shape[-1]
    NT = layout.num_chunks
    BK = max(16, next_pow2(K))
    BV = min(int(CONFIG["rows_bv"]), V)
    NV = triton.cdiv(V, BV)
    atomic = NV > 1  # dk, dq and d log alpha sum over V blocks
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(q)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(k)
    du = torch.empty_like(u)
    db = torch.empty_like(beta)
    dla = (torch.zeros if atomic else torch.empty)(log_alpha.shape, device=q.device, dtype=torch.float32)
    dip = q.new_empty(NV, NT, H, dtype=torch.float32)
    lowp = lowp and q.dtype in (torch.bfloat16, torch.float16)
    _rows_bwd[(NV, NT, H)](
        q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, dq, dk, du, db, dla, dip,
        layout.cu_seqlens, layout.chunk_index, scale,
        H=H, K=K, V=V, C=C, BK=BK, BV=BV, HAS_DVAR=has_dvar, ATOMIC=atomic, PREC=dot_precision(q.dtype),
        LOWP=lowp, num_warps=min(16, int(CONFIG["rows_warps"]) * max(1, BK // 64)),
    )  # fmt: skip
    return dq, dk, du, db, dla, dip.sum((0, 1))


class ChunkPalimpsaV2Function(ChunkPalimpsaFunction):
    """Same forward and saved tensors as the default variant; the per-token gradients by value rows."""

    @staticmethod
    def backward(ctx, dy, dvar, dTm, dTi):
        return backward_with(ctx, dy, dvar, dTm, dTi, _rows_step)


class ChunkPalimpsaV2LowpFunction(ChunkPalimpsaFunction):
    """Variant v2 with bf16 product operands for 16-bit inputs."""

    @staticmethod
    def backward(ctx, dy, dvar, dTm, dTi):
        return backward_with(ctx, dy, dvar, dTm, dTi, partial(_rows_step, lowp=True))


FUNCTIONS = {"v2": ChunkPalimpsaV2Function, "v2-lowp": ChunkPalimpsaV2LowpFunction}
