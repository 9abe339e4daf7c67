"""Chunked Triton forward and backward of the Palimpsa recurrence (math and notation: README.md here).

Sequences are flattened to ``[1, total_T, H, D]`` and cut into chunks of ``C`` tokens (fla's varlen
convention; a plain batch is ``B`` sequences of ``T``). Only chunk-boundary states reach device memory.

Forward
  1. ``_states_fwd``: per (sequence, head, V block) walk the chunks; ``M`` and ``Ibar`` advance by one
     tensor-core product per chunk, ``(u * e^{G_C - G_j})^T @ k``; the state *before* each chunk is stored.
  2. ``_output_fwd``: per (chunk, head, V block), in parallel, replay the chunk token by token from its
     boundary state (on chip) and read out ``y`` (and the variance). It carries the precision itself,
     ``I = Ibar + Ip``, whose update takes the prior as one scalar per token, ``(1 - alpha_t) Ip`` (from
     ``expm1``, exact near ``alpha = 1``), so the read-out needs no add; and ``1 / I`` is one special-function
     op (``rcp.approx``) when compiled. Per element and token: 4 FP32 ops for the two state updates, 2 for
     ``M / I`` into ``y``, one reciprocal. Where nvcc is found the same step runs in CUDA C++
     (``output_fwd.cu``, ``CONFIG["out_kernel"]``), whose token sums over K finish inside a warp.

Backward: two paths, chosen by ``CONFIG["backward"]`` (by default by head size, ``backward_path``). The
two-pass one is steps 3-5 below; the one-pass one (``chunk_onepass.py``) walks each chunk once from a zero
adjoint, runs the scan of step 4, then adds the later chunks' share with four tensor-core products per
chunk, and takes ``d log alpha`` and ``dIp`` from an identity with no per-element work. Two-pass, with
``D_t`` the direct gradients of token ``t``'s read-out on ``(M_t, Ibar_t)``:
  3. ``_local_bwd``: per chunk in parallel, ``L_c = sum_t e^{G_t} D_t``, the chunk's own pull on its
     start state.
  4. ``_scan_bwd``: a reverse scan over chunks gives ``E_c``, the gradient on the state after chunk ``c``
     coming from later tokens (and the final state), and the gradient on the initial state.
  5. ``_main_bwd``: per (chunk, head, V block), walk the chunk backwards in sub-chunks of
     ``S = CONFIG["main_sub"]`` tokens, carrying ``dM_t, dIbar_t`` from ``E_c``. The state before each
     sub-chunk comes straight from the chunk's boundary state by one masked tensor-core product,
     ``e^{G} S + (u * w)^T @ k``; the sub-chunk's S tokens are replayed elementwise from it and their states
     kept on chip (S register tiles), so no per-token state is ever stored. Then ``du, dbeta, dk, dq``,
     ``d log alpha`` and the ``Ip`` gradient.

Inside the walk, only ``dk`` and ``dq`` need a sum over the V rows of all warps per token (one joint
reduction). ``d log alpha_t = alpha_t <dS_t, S_{t-1}>`` is formed per token from the same on-chip states (no
cumulative sums, so no cancellation across the sequence) and left as per-row partials that one torch sum
over V finishes; the ``Ip`` gradient accumulates elementwise and is reduced once per program. These kernels
take ``1 / I`` as a squared ``rsqrt``, as they were measured (kernels/benchmarks/notes.md, run 5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.palimpsa.utils import SequenceLayout, autocast_inputs, dot_precision, next_pow2, sequence_layout


@triton.jit
def _to_chunk_end(la, tok, end, h, H: tl.constexpr):
    """``e^{G_L - G_t}`` for a chunk's tokens ``tok`` (the chunk ends before ``end``; 1 past it): from the sum
    of the later tokens' log-decays itself, not from the difference of two cumulative sums. All are <= 0, so
    its rounding is relative to the sum that sets the weight, where ``G_L - G_t`` loses ``|G_t|``'s last bits
    (relative errors of 6e-5 in the weights after a few dozen gates near e^-30 in one chunk)."""
    g_next = tl.load(la + (tok + 1) * H + h, mask=tok + 1 < end, other=0.0).to(tl.float32)
    return tl.exp(tl.cumsum(g_next, axis=0, reverse=True))


@triton.jit
def _states_fwd(
    k, u, beta, la, h0m, h0i, hm, hi, hTm, hTi, cu, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, inh = tl.program_id(0), tl.program_id(1)
    n, h = inh // H, inh % H
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    boff = tl.load(chunk_offsets + n).to(tl.int64)
    nt = tl.cdiv(eos - bos, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    tc = tl.arange(0, C)
    mvk = (ov[:, None] < V) & (ok[None, :] < K)
    s_vk = ov[:, None] * K + ok[None, :]
    sm = tl.zeros([BV, BK], dtype=tl.float32)
    si = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_INIT:
        sm += tl.load(h0m + (n * H + h) * V * K + s_vk, mask=mvk, other=0.0)
        si += tl.load(h0i + (n * H + h) * V * K + s_vk, mask=mvk, other=0.0)
    for i in range(nt):
        base = ((boff + i) * H + h) * V * K
        tl.store(hm + base + s_vk, sm, mask=mvk)
        tl.store(hi + base + s_vk, si, mask=mvk)
        tok = bos + i * C + tc
        mt = tok < eos
        g = tl.load(la + tok * H + h, mask=mt, other=0.0).to(tl.float32)
        gl = tl.sum(g, axis=0)
        w = _to_chunk_end(la, tok, tl.minimum(eos, bos + i * C + C), h, H)
        kc = tl.load(
            k + (tok * H + h)[:, None] * K + ok[None, :], mask=mt[:, None] & (ok[None, :] < K), other=0.0
        )
        kc = kc.to(tl.float32)
        mtv = mt[:, None] & (ov[None, :] < V)
        uc = tl.load(u + (tok * H + h)[:, None] * V + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
        bc = tl.load(beta + (tok * H + h)[:, None] * V + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
        decay = tl.exp(gl)
        sm = sm * decay + tl.dot(tl.trans(uc * w[:, None]), kc, input_precision=PREC)
        si = si * decay + tl.dot(tl.trans(bc * w[:, None]), kc * kc, input_precision=PREC)
    if STORE_FINAL:
        tl.store(hTm + (n * H + h) * V * K + s_vk, sm, mask=mvk)
        tl.store(hTi + (n * H + h) * V * K + s_vk, si, mask=mvk)


@triton.jit
def _chunk_span(cu, chunk_index, ic, C: tl.constexpr):
    """First token and length of global chunk ``ic``."""
    n = tl.load(chunk_index + ic * 2)
    i = tl.load(chunk_index + ic * 2 + 1)
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    t0 = bos + i.to(tl.int64) * C
    return t0, tl.minimum(eos - t0, C)


# 1 / x for a precision (x > 0) on the special-function unit: one MUFU.RCP (about 1 ulp). Kernels take it
# under a FAST_RCP constant, true when compiled for a GPU; Triton's interpreter runs no inline assembly.
RCP_ASM = tl.constexpr("rcp.approx.ftz.f32 $0, $1;")


@triton.jit
def _output_fwd(
    q, k, u, beta, la, om, ip, hm, hi, y, var, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_VAR: tl.constexpr, FAST_RCP: tl.constexpr,
):  # fmt: skip
    iv, ic, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    base = (ic.to(tl.int64) * H + h) * V * K
    p = tl.load(ip + h).to(tl.float32)
    sm = tl.load(hm + base + ov[:, None] * K + ok[None, :], mask=mvk, other=0.0)
    # the precision itself, I = Ibar + Ip: the prior enters each token's update as one scalar, (1 - alpha) Ip
    si = tl.load(hi + base + ov[:, None] * K + ok[None, :], mask=mvk, other=0.0) + p
    # token t's inputs are loaded during token t-1, so the loads' latency hides behind the arithmetic
    lan = tl.load(la + t0 * H + h).to(tl.float32)
    omn = tl.load(om + t0 * H + h)
    kn = tl.load(k + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    qn = tl.load(q + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    un = tl.load(u + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    bn = tl.load(beta + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    for t in range(L):
        tok = t0 + t
        a, c, kt, qt, ut, bt = tl.exp(lan), omn * p, kn, qn, un, bn
        nxt = tl.minimum(tok + 1, t0 + L - 1)  # past the chunk's end: reload the last token, unused
        lan = tl.load(la + nxt * H + h).to(tl.float32)
        omn = tl.load(om + nxt * H + h)
        kn = tl.load(k + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        qn = tl.load(q + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        un = tl.load(u + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        bn = tl.load(beta + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        sm = a * sm + ut[:, None] * kt[None, :]
        si = a * si + (bt[:, None] * (kt * kt)[None, :] + c)
        if FAST_RCP:
            r = tl.inline_asm_elementwise(RCP_ASM, "=r,r", [si], dtype=tl.float32, is_pure=True, pack=1)
        else:
            r = 1.0 / si
        yt = tl.sum(sm * r * qt[None, :], axis=1) * scale
        tl.store(y + (tok * H + h) * V + ov, yt.to(y.dtype.element_ty), mask=mv)
        if STORE_VAR:
            vt = tl.sum(r * (qt * qt)[None, :], axis=1) * (scale * scale)
            tl.store(var + (tok * H + h) * V + ov, vt.to(var.dtype.element_ty), mask=mv)


@triton.jit
def _local_bwd(
    q, k, u, beta, la, ip, hm, hi, do, dvar, lm, li, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DVAR: tl.constexpr,
):  # fmt: skip
    iv, ic, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    base = (ic.to(tl.int64) * H + h) * V * K
    s_vk = ov[:, None] * K + ok[None, :]
    sm = tl.load(hm + base + s_vk, mask=mvk, other=0.0)
    si = tl.load(hi + base + s_vk, mask=mvk, other=0.0)
    p = tl.load(ip + h).to(tl.float32)
    acc_m = tl.zeros([BV, BK], dtype=tl.float32)
    acc_i = tl.zeros([BV, BK], dtype=tl.float32)
    g = 0.0
    lan = tl.load(la + t0 * H + h).to(tl.float32)
    kn = tl.load(k + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    qn = tl.load(q + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    un = tl.load(u + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    bn = tl.load(beta + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    don = tl.load(do + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    for t in range(L):
        tok = t0 + t
        lat, kt, qt, ut, bt, dot_ = lan, kn, qn, un, bn, don
        nxt = tl.minimum(tok + 1, t0 + L - 1)  # past the chunk's end: reload the last token, unused
        lan = tl.load(la + nxt * H + h).to(tl.float32)
        kn = tl.load(k + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        qn = tl.load(q + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        un = tl.load(u + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        bn = tl.load(beta + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        don = tl.load(do + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        a = tl.exp(lat)
        g += lat
        sm = a * sm + ut[:, None] * kt[None, :]
        si = a * si + bt[:, None] * (kt * kt)[None, :]
        r = tl.math.rsqrt(si + p)  # 1 / I as a squared rsqrt (the two-pass kernels as measured in run 5)
        r = r * r
        dm = (scale * dot_)[:, None] * qt[None, :] * r
        di = -dm * sm * r
        if HAS_DVAR:
            dvt = tl.load(dvar + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
            di -= (scale * scale * dvt)[:, None] * (qt * qt)[None, :] * r * r
        e = tl.exp(g)
        acc_m += e * dm
        acc_i += e * di
    tl.store(lm + base + s_vk, acc_m, mask=mvk)
    tl.store(li + base + s_vk, acc_i, mask=mvk)


@triton.jit
def _scan_bwd(
    la, dhm, dhi, dTm, dTi, d0m, d0i, cu, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
):  # fmt: skip
    iv, inh = tl.program_id(0), tl.program_id(1)
    n, h = inh // H, inh % H
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    boff = tl.load(chunk_offsets + n).to(tl.int64)
    nt = tl.cdiv(eos - bos, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    tc = tl.arange(0, C)
    mvk = (ov[:, None] < V) & (ok[None, :] < K)
    s_vk = ov[:, None] * K + ok[None, :]
    em = tl.zeros([BV, BK], dtype=tl.float32)
    ei = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_DFINAL:
        em += tl.load(dTm + (n * H + h) * V * K + s_vk, mask=mvk, other=0.0)
        ei += tl.load(dTi + (n * H + h) * V * K + s_vk, mask=mvk, other=0.0)
    for j in range(nt):
        i = nt - 1 - j
        base = ((boff + i) * H + h) * V * K
        local_m = tl.load(dhm + base + s_vk, mask=mvk, other=0.0)
        local_i = tl.load(dhi + base + s_vk, mask=mvk, other=0.0)
        tl.store(dhm + base + s_vk, em, mask=mvk)
        tl.store(dhi + base + s_vk, ei, mask=mvk)
        tok = bos + i * C + tc
        decay = tl.exp(tl.sum(tl.load(la + tok * H + h, mask=tok < eos, other=0.0).to(tl.float32), axis=0))
        em = local_m + decay * em
        ei = local_i + decay * ei
    tl.store(d0m + (n * H + h) * V * K + s_vk, em, mask=mvk)
    tl.store(d0i + (n * H + h) * V * K + s_vk, ei, mask=mvk)


@triton.jit
def _main_bwd(
    q, k, u, beta, la, ip, hm, hi, dhm, dhi, do, dvar,
    dq, dk, du, db, zla, dip, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, SUB: tl.constexpr, HAS_DVAR: tl.constexpr, ATOMIC: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    iv, ic, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    tc = tl.arange(0, C)
    mv, mk, mtc = ov < V, ok < K, tc < L
    mvk = mv[:, None] & mk[None, :]
    p = tl.load(ip + h).to(tl.float32)
    base = (ic.to(tl.int64) * H + h) * V * K
    s_vk = ov[:, None] * K + ok[None, :]
    sm = tl.load(hm + base + s_vk, mask=mvk, other=0.0)
    si = tl.load(hi + base + s_vk, mask=mvk, other=0.0)
    gm = tl.load(dhm + base + s_vk, mask=mvk, other=0.0)  # gradient on the state after the chunk, E_c
    gi = tl.load(dhi + base + s_vk, mask=mvk, other=0.0)
    g_c = tl.load(la + (t0 + tc) * H + h, mask=mtc, other=0.0).to(tl.float32)
    gc = tl.cumsum(g_c, axis=0)
    a_next = 1.0  # alpha of the token after the current one, inside the chunk (E_c already carries it)
    dip_acc = tl.zeros([BV, BK], dtype=tl.float32)  # every token's direct pull on Ip, reduced once at the end
    n_sub = tl.cdiv(L, SUB)
    for jj in range(n_sub):
        s0 = (n_sub - 1 - jj) * SUB
        # the state before the sub-chunk, straight from the chunk's boundary state: one product each
        g_b = tl.sum(tl.where(tc == s0 - 1, gc, 0.0), axis=0)
        w = tl.exp(tl.where(tc < s0, g_b - gc, float("-inf")))  # 0 from s0 on, and never an overflow
        e_b = tl.exp(g_b)
        # the chunk's inputs are read again for each product (cache hits) rather than held in registers
        k_c = tl.load(
            k + ((t0 + tc) * H + h)[:, None] * K + ok[None, :], mask=mtc[:, None] & mk[None, :], other=0.0
        ).to(tl.float32)
        kk_c = k_c * k_c
        rows_vc = ((t0 + tc) * H + h)[:, None] * V + ov[None, :]
        u_c = tl.load(u + rows_vc, mask=mtc[:, None] & mv[None, :], other=0.0).to(tl.float32)
        b_c = tl.load(beta + rows_vc, mask=mtc[:, None] & mv[None, :], other=0.0).to(tl.float32)
        m_t = sm * e_b + tl.dot(tl.trans(u_c * w[:, None]), k_c, input_precision=PREC)
        i_t = si * e_b + tl.dot(tl.trans(b_c * w[:, None]), kk_c, input_precision=PREC)
        # replay the sub-chunk elementwise, keeping every token's state on chip (tokens past L leave it as is)
        ms = ()
        is_ = ()
        for r in tl.static_range(SUB):
            tok = t0 + s0 + r
            ok_t = s0 + r < L
            mkt = ok < tl.where(ok_t, K, 0)  # (a scalar condition folded into the bound, not and-ed on)
            mvt = ov < tl.where(ok_t, V, 0)
            a_r = tl.exp(tl.load(la + tok * H + h, mask=ok_t, other=0.0).to(tl.float32))
            k_r = tl.load(k + (tok * H + h) * K + ok, mask=mkt, other=0.0).to(tl.float32)
            u_r = tl.load(u + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
            b_r = tl.load(beta + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
            m_t = a_r * m_t + u_r[:, None] * k_r[None, :]
            i_t = a_r * i_t + b_r[:, None] * (k_r * k_r)[None, :]
            ms = ms + (m_t,)
            is_ = is_ + (i_t,)
        # walk the sub-chunk backwards
        for rr in tl.static_range(SUB):
            r = SUB - 1 - rr
            tok = t0 + s0 + r
            ok_t = s0 + r < L
            m_t = ms[SUB - 1 - rr]  # indexed by the constant expression itself: a named index is a tensor
            i_t = is_[SUB - 1 - rr]
            mkt = ok < tl.where(ok_t, K, 0)
            mvt = ov < tl.where(ok_t, V, 0)
            qt = tl.load(q + (tok * H + h) * K + ok, mask=mkt, other=0.0).to(tl.float32)
            kt = tl.load(k + (tok * H + h) * K + ok, mask=mkt, other=0.0).to(tl.float32)
            ut = tl.load(u + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
            bt = tl.load(beta + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
            sdo = scale * tl.load(do + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
            la_t = tl.load(la + tok * H + h, mask=ok_t, other=0.0).to(tl.float32)
            rcp = tl.math.rsqrt(i_t + p)  # 1 / I as a squared rsqrt (as measured in run 5)
            rcp = rcp * rcp
            mu = m_t * rcp
            d_m = sdo[:, None] * qt[None, :] * rcp
            d_i = -d_m * mu
            x_q = sdo[:, None] * mu
            if HAS_DVAR:
                wv = tl.load(dvar + (tok * H + h) * V + ov, mask=mvt, other=0.0).to(tl.float32)
                wr = (scale * scale * wv)[:, None] * rcp
                d_i -= wr * rcp * (qt * qt)[None, :]
                x_q += 2.0 * qt[None, :] * wr
            dip_acc += d_i
            # d log alpha_{t+1} = alpha_{t+1} <dS_{t+1}, S_t>, this block's rows; summed over V on the host
            x_z = a_next * (gm * m_t + gi * i_t)
            # reverse recurrence dS_t = D_t + alpha_{t+1} dS_{t+1}
            gm = d_m + a_next * gm
            gi = d_i + a_next * gi
            a_next = tl.exp(la_t)
            # du, dbeta and the d log alpha rows all sum over K: one joint reduction
            x_u = gm * kt[None, :]
            x_b = gi * (kt * kt)[None, :]
            zu, bz = tl.split(tl.sum(tl.join(tl.join(x_z, x_u), tl.join(x_b, tl.zeros_like(x_b))), axis=1))
            z_t, du_t = tl.split(zu)
            db_t, _ = tl.split(bz)
            tl.store(zla + ((tok + 1) * H + h) * V + ov, z_t, mask=ov < tl.where(s0 + r + 1 < L, V, 0))
            tl.store(du + (tok * H + h) * V + ov, du_t.to(du.dtype.element_ty), mask=mvt)
            tl.store(db + (tok * H + h) * V + ov, db_t.to(db.dtype.element_ty), mask=mvt)
            # dk and dq both sum over V: one joint reduction
            x_k = gm * ut[:, None] + gi * (2.0 * bt)[:, None] * kt[None, :]
            dk_t, dq_t = tl.split(tl.sum(tl.join(x_k, x_q), axis=0))
            if ATOMIC:
                tl.atomic_add(dk + (tok * H + h) * K + ok, dk_t, mask=mkt, sem="relaxed")
                tl.atomic_add(dq + (tok * H + h) * K + ok, dq_t, mask=mkt, sem="relaxed")
            else:
                tl.store(dk + (tok * H + h) * K + ok, dk_t.to(dk.dtype.element_ty), mask=mkt)
                tl.store(dq + (tok * H + h) * K + ok, dq_t.to(dq.dtype.element_ty), mask=mkt)
    # the chunk's first token reads the boundary state
    z_0 = a_next * tl.sum(gm * sm + gi * si, axis=1)
    tl.store(zla + (t0 * H + h) * V + ov, z_0, mask=mv)
    # fp64 across rows and tokens keeps the Ip gradient at fp32 rounding of the elements
    dip_t = tl.sum(tl.sum(dip_acc.to(tl.float64), axis=1), axis=0)
    tl.store(dip + (iv * tl.num_programs(1) + ic) * H + h, dip_t)


# Launch shapes. BK always covers all of K (padded to a power of two); the V blocks below are upper bounds.
# A "*_warps" of "auto" gives the program about ELEMENTS_PER_THREAD state elements a thread (see num_warps).
CONFIG: dict[str, int | str] = {
    "states_bv": 64,
    "out_bv": 32,
    "out_warps": "auto",
    # the forward read-out (step 2): "triton" (_output_fwd), "cuda" (output_fwd.cu, built with nvcc on first
    # use; chunk_size a multiple of 16, K <= 128) or "auto" (CUDA where it can run, else Triton)
    "out_kernel": "auto",
    "local_bv": 32,
    "local_warps": "auto",
    "main_bv": 64,
    "main_warps": "auto",
    # the reverse walk rebuilds the state before every S tokens by a product from the chunk's boundary state,
    # replays those S tokens elementwise and keeps their states on chip (S register tiles of M and Ibar);
    # H200, design-1 fwd+bwd: S 1 14.0 ms, 2 11.2, 4 10.0, 8 11.5 (kernels/benchmarks/notes.md, run 5)
    "main_sub": 4,
    # "two_pass": steps 3-5 above; "one_pass": chunk_onepass.py (one walk per chunk from a zero adjoint, the
    # scan, tensor-core corrections); "auto": one_pass where its walk runs in CUDA, else from K * V >=
    # AUTO_MIN_STATE. H200, fwd+bwd: one_pass with its Triton walk 1.1x to 1.2x faster than two_pass at the
    # design shapes and the 170M layer, a tie at MQAR's (K * V = 512) and slower in its training step (run
    # 7); with the CUDA walk, MQAR's op 1.55 ms against 2.44 two_pass (notes.md, run 9)
    "backward": "auto",
    "onepass_bv": 64,
    "onepass_warps": "auto",
    "onepass_sub": 4,
    # the one-pass backward's d log alpha: "identity" (no per-element work; its error is absolute, see
    # chunk_onepass) or "direct" (alpha_t <dS_t, S_{t-1}> per element: three more FP32 ops per element-token)
    "onepass_dla": "identity",
    # the one-pass backward with the identity writes its chunk pulls over the saved boundary states (after the
    # walk nothing reads them): its peak memory drops by the states' size, 512 MiB at design-3. A second
    # backward through the same graph (retain_graph=True) then raises; False keeps the states
    "onepass_reuse_states": True,
    # the one-pass backward's walk: "triton" (_walk_bwd), "cuda" (walk_bwd.cu, built with nvcc on first use;
    # identity d log alpha, chunk_size 64, K <= 128) or "auto" (CUDA where it can run, else Triton). H200:
    # the CUDA walk 2.7x to 3.1x faster than the Triton walk from K * V = 2304 up, 1.8x at 512 (notes.md,
    # run 9)
    "onepass_walk": "auto",
    "correct_block": 32,  # V and K blocks of the correction's products (sm_90: no spills up to K = V = 128)
    "correct_warps": 4,
}


ELEMENTS_PER_THREAD = 8
AUTO_MIN_STATE = 2048  # K * V from which "auto" takes the one-pass backward with the Triton walk
MAX_WARPS = {"out_warps": 4, "local_warps": 4, "main_warps": 8, "onepass_warps": 8}


def num_warps(key: str, BK: int, BV: int) -> int:
    """``CONFIG[key]``, or for "auto" enough warps for about 8 elements of the ``[BV, BK]`` state tile a
    thread (1 warp up to ``MAX_WARPS[key]``). Why: every token of a walk is a chain of dependent steps, so a
    program's speed is set by its latency, not its width; small heads (MQAR's K 16, V 32: 512 elements) on
    8 warps spend each token on cross-warp sums for 2 elements a thread, while 2 warps hold 8 and let 4x as
    many programs share a multiprocessor."""
    value = CONFIG[key]
    if value != "auto":
        return int(value)
    want = max(1, BK * BV // (32 * ELEMENTS_PER_THREAD))
    return min(next_pow2(want), MAX_WARPS[key])


def backward_path(K: int, V: int, cuda_walk: bool = False) -> str:
    """``CONFIG["backward"]``, with "auto" resolved for heads of ``K`` x ``V``: the one-pass backward where
    its walk runs in CUDA (``cuda_walk``) or from ``K * V = AUTO_MIN_STATE`` with the Triton walk."""
    choice = CONFIG["backward"]
    if choice not in ("two_pass", "one_pass", "auto"):
        raise ValueError(f"CONFIG['backward'] is 'two_pass', 'one_pass' or 'auto'; got {choice!r}")
    if choice == "auto":
        return "one_pass" if cuda_walk or K * V >= AUTO_MIN_STATE else "two_pass"
    return choice


def _bv(V: int, BK: int, cap: int, floor: int = 8) -> int:
    """A V block of at most ``cap``, shrinking as K grows: a ``[BV, BK]`` state tile stays in registers."""
    cap = max(floor, cap * 64 // BK) if BK > 64 else cap
    return min(max(next_pow2(V), floor), cap)


def _use_cuda_read_out(q: Tensor, k: Tensor, u: Tensor, beta: Tensor, C: int) -> bool:
    """``CONFIG["out_kernel"]``: "triton", "cuda" (an error where it cannot run) or "auto"."""
    choice = CONFIG["out_kernel"]
    if choice not in ("triton", "cuda", "auto"):
        raise ValueError(f"CONFIG['out_kernel'] is 'triton', 'cuda' or 'auto'; got {choice!r}")
    if choice == "triton":
        return False
    from kernels.palimpsa import output_cuda

    return choice == "cuda" or output_cuda.can_run(q, k, u, beta, C)


def _triton_read_out(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor, hm: Tensor,
    hi: Tensor, y: Tensor, var: Tensor | None, scale: float, layout: SequenceLayout, C: int,
) -> None:  # fmt: skip
    _, _, H, K = q.shape
    V = u.shape[-1]
    BK = max(16, next_pow2(K))
    BVo = _bv(V, BK, CONFIG["out_bv"])
    _output_fwd[(triton.cdiv(V, BVo), layout.num_chunks, H)](
        q, k, u, beta, log_alpha, om, ip, hm, hi, y, y if var is None else var,
        layout.cu_seqlens, layout.chunk_index, scale,
        H=H, K=K, V=V, C=C, BK=BK, BV=BVo, STORE_VAR=var is not None, FAST_RCP=q.is_cuda,
        num_warps=num_warps("out_warps", BK, BVo),
    )  # fmt: skip


def _read_out(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor, hm: Tensor,
    hi: Tensor, y: Tensor, var: Tensor | None, scale: float, layout: SequenceLayout, C: int,
) -> None:  # fmt: skip
    """Step 2: ``y`` (and ``var``) from the chunk-boundary states, in CUDA C++ or in Triton."""
    args = (q, k, u, beta, log_alpha, om, ip, hm, hi, y, var, scale, layout, C)
    if not _use_cuda_read_out(q, k, u, beta, C):
        return _triton_read_out(*args)
    from kernels.palimpsa import cuda_build, output_cuda  # built with nvcc on first use

    cuda_build.run_or_fall_back(
        CONFIG["out_kernel"], lambda: output_cuda.output_fwd(*args), lambda: _triton_read_out(*args)
    )
    return None


class ChunkPalimpsaFunction(torch.autograd.Function):
    """Autograd wrapper over the chunked kernels on raw states ``(M, Ibar)``; ``Ip`` is a per-head tensor."""

    @staticmethod
    def forward(ctx, q, k, u, beta, log_alpha, ip, m0, i0, scale, layout, output_final, output_variance, C):
        _, TT, H, K = q.shape
        V = u.shape[-1]
        BK = max(16, next_pow2(K))
        BV = _bv(V, BK, CONFIG["states_bv"], floor=16)
        N, NT = layout.num_seqs, layout.num_chunks
        hm = q.new_empty(NT, H, V, K, dtype=torch.float32)
        hi = torch.empty_like(hm)
        hTm = q.new_empty(N, H, V, K, dtype=torch.float32) if output_final else None
        hTi = torch.empty_like(hTm) if output_final else None
        prec = dot_precision(q.dtype)
        use_init = m0 is not None
        _states_fwd[(triton.cdiv(V, BV), N * H)](
            k, u, beta, log_alpha, m0 if use_init else hm, i0 if use_init else hi, hm, hi,
            hTm if output_final else hm, hTi if output_final else hi, layout.cu_seqlens, layout.chunk_offsets,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, USE_INIT=use_init, STORE_FINAL=output_final, PREC=prec,
            num_warps=4,
        )  # fmt: skip
        y = torch.empty_like(u, dtype=q.dtype)
        var = torch.empty_like(y) if output_variance else None
        om = -torch.expm1(log_alpha.float())  # 1 - alpha, exact where alpha is near 1 ([1, T, H], fp32)
        _read_out(q, k, u, beta, log_alpha, om, ip, hm, hi, y, var, scale, layout, C)
        ctx.save_for_backward(q, k, u, beta, log_alpha, om, ip, hm, hi, hTm, hTi)
        ctx.meta = (scale, layout, C, use_init, output_final)
        return y, var, hTm, hTi

    @staticmethod
    def backward(ctx, dy, dvar, dTm, dTi):
        """Steps 3-4 (local pulls, reverse scan over chunks), then step 5 for the per-token gradients; or the
        one-pass backward of ``chunk_onepass`` (``CONFIG["backward"]``)."""
        if getattr(ctx, "states_reused", False):
            raise RuntimeError(
                "a second backward through the chunked Palimpsa op: its first one-pass backward wrote over "
                "the saved chunk states; set kernels.palimpsa.chunk.CONFIG['onepass_reuse_states'] = False "
                "before the first backward to run several"
            )
        q, k, u, beta, log_alpha, om, ip, hm, hi, hTm, hTi = ctx.saved_tensors
        scale, layout, C, use_init, output_final = ctx.meta
        _, TT, H, K = q.shape
        V = u.shape[-1]
        N, NT = layout.num_seqs, layout.num_chunks
        BK = max(16, next_pow2(K))
        has_dvar = dvar is not None
        dy = torch.zeros_like(u, dtype=q.dtype) if dy is None else dy.contiguous()
        dvar = dvar.contiguous() if has_dvar else dy
        has_dfinal = output_final and (dTm is not None or dTi is not None)
        if has_dfinal:
            dTm = torch.zeros_like(hTm) if dTm is None else dTm.contiguous()
            dTi = torch.zeros_like(hTi) if dTi is None else dTi.contiguous()
        # imported here: chunk_onepass builds on this module's kernels (scan, helpers, CONFIG)
        from kernels.palimpsa.chunk_onepass import cuda_walk_possible, onepass_backward, reuses_states

        cuda_walk = CONFIG["backward"] == "auto" and cuda_walk_possible(q, V, C)
        if backward_path(K, V, cuda_walk) == "one_pass":
            ctx.states_reused = reuses_states()
            dq, dk, du, db, dla, dip, d0m, d0i = onepass_backward(
                q, k, u, beta, log_alpha, om, ip, hm, hi, hTm, hTi, dy, dvar, has_dvar,
                dTm if has_dfinal else None, dTi if has_dfinal else None, scale, layout, C,
            )  # fmt: skip
            return (
                dq, dk, du, db, dla, dip, d0m if use_init else None, d0i if use_init else None,
                None, None, None, None, None,
            )  # fmt: skip
        # 3. local pulls of each chunk on its start state, written where the scan will leave E_c
        dhm = torch.empty_like(hm)
        dhi = torch.empty_like(hi)
        BVl = _bv(V, BK, CONFIG["local_bv"])
        _local_bwd[(triton.cdiv(V, BVl), NT, H)](
            q, k, u, beta, log_alpha, ip, hm, hi, dy, dvar, dhm, dhi, layout.cu_seqlens, layout.chunk_index,
            scale, H=H, K=K, V=V, C=C, BK=BK, BV=BVl, HAS_DVAR=has_dvar,
            num_warps=num_warps("local_warps", BK, BVl),
        )  # fmt: skip
        # 4. reverse scan over chunks
        d0m = q.new_empty(N, H, V, K, dtype=torch.float32)
        d0i = torch.empty_like(d0m)
        BVs = min(max(next_pow2(V), 8), 32)
        _scan_bwd[(triton.cdiv(V, BVs), N * H)](
            log_alpha, dhm, dhi, dTm if has_dfinal else dhm, dTi if has_dfinal else dhi, d0m, d0i,
            layout.cu_seqlens, layout.chunk_offsets, H=H, K=K, V=V, C=C, BK=BK, BV=BVs,
            HAS_DFINAL=has_dfinal, num_warps=4,
        )  # fmt: skip
        # 5. everything per token
        dq, dk, du, db, dla, dip = _main_step(
            q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, has_dvar, scale, layout, C
        )
        dm0 = d0m if use_init else None
        di0 = d0i if use_init else None
        return (
            dq.to(q.dtype), dk.to(k.dtype), du.to(u.dtype), db.to(beta.dtype), dla.to(log_alpha.dtype),
            dip.to(ip.dtype), dm0, di0, None, None, None, None, None,
        )  # fmt: skip


def _main_step(q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, has_dvar, scale, layout, C):
    """Step 5: walk each chunk backwards, ``CONFIG["main_sub"]`` tokens per product."""
    if CONFIG["main_sub"] < 1:
        raise ValueError(f"CONFIG['main_sub'] is the sub-chunk length, at least 1; got {CONFIG['main_sub']}")
    _, TT, H, K = q.shape
    V = u.shape[-1]
    NT = layout.num_chunks
    BK = max(16, next_pow2(K))
    BVm = _bv(V, BK, CONFIG["main_bv"], floor=16)
    NVm = triton.cdiv(V, BVm)
    atomic = NVm > 1  # dk and dq sum over V blocks
    # gradients written once go straight into the inputs' dtypes; shared ones accumulate in fp32
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(q)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(k)
    du = torch.empty_like(u)
    db = torch.empty_like(beta)
    # d log alpha per token and value row (every slot written once); the sum over V is one torch reduction
    zla = torch.empty(u.shape, device=q.device, dtype=torch.float32)
    dip = q.new_empty(NVm, NT, H, dtype=torch.float64)
    _main_bwd[(NVm, NT, H)](
        q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, dq, dk, du, db, zla, dip,
        layout.cu_seqlens, layout.chunk_index, scale,
        H=H, K=K, V=V, C=C, BK=BK, BV=BVm, SUB=CONFIG["main_sub"], HAS_DVAR=has_dvar, ATOMIC=atomic,
        PREC=dot_precision(q.dtype), num_warps=num_warps("main_warps", BK, BVm),
    )  # fmt: skip
    return dq, dk, du, db, zla.sum(-1), dip.sum((0, 1))


def chunk_palimpsa(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    output_variance: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
    """Palimpsa through the chunked Triton kernels; same contract as ``palimpsa_attn``."""
    B, T, H, K = q.shape
    V = u.shape[-1]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch must be flattened to B == 1, got B == {B}")
    scale = K**-0.5 if scale is None else float(scale)
    q, k, u, beta = autocast_inputs(q, k, u, beta)  # the states stay fp32; gradients return in input dtypes
    layout: SequenceLayout = sequence_layout(B, T, cu_seqlens, chunk_size, q.device)
    ip_h = torch.as_tensor(ip, device=q.device, dtype=torch.float32)
    ip_h = ip_h.expand(H) if ip_h.dim() == 0 else ip_h.to(torch.float32)
    m0 = i0 = None
    if initial_state is not None:
        mu0, I0 = initial_state
        m0 = (mu0.float() * I0.float()).contiguous()
        i0 = (I0.float() - ip_h[None, :, None, None]).contiguous()
    flat = [x.reshape(1, B * T, *x.shape[2:]).contiguous() for x in (q, k, u, beta, log_alpha)]
    y, var, hTm, hTi = ChunkPalimpsaFunction.apply(
        *flat, ip_h.contiguous(), m0, i0, scale, layout, output_final_state, output_variance, chunk_size
    )
    y = y.view(B, T, H, V)
    var = var.view(B, T, H, V) if var is not None else None
    final = None
    if output_final_state:
        I_T = hTi + ip_h[None, :, None, None]
        final = (hTm / I_T, I_T)
    return y, var, final
