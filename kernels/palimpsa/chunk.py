"""Chunked Triton forward and backward of the Palimpsa recurrence (DESIGN §1).

Sequences are flattened to ``[1, total_T, H, D]`` and cut into chunks of ``C`` tokens (fla's varlen
convention; a plain batch is ``B`` sequences of ``T``). Only chunk-boundary states reach device memory.

Forward
  1. ``_states_fwd``: per (sequence, head, V block) walk the chunks; ``M`` and ``Ibar`` advance by one
     tensor-core product per chunk, ``(u * e^{G_C - G_j})^T @ k``; the state *before* each chunk is stored.
  2. ``_output_fwd``: per (chunk, head, V block), in parallel, replay the chunk token by token from its
     boundary state (on chip) and read out ``y`` (and the variance).

Backward, with ``D_t`` the direct gradients of token ``t``'s read-out on ``(M_t, Ibar_t)``
  3. ``_local_bwd``: per chunk in parallel, ``L_c = sum_t e^{G_t} D_t``, the chunk's own pull on its
     start state.
  4. ``_scan_bwd``: a reverse scan over chunks gives ``E_c``, the gradient on the state after chunk ``c``
     coming from later tokens (and the final state), and the gradient on the initial state.
  5. ``_main_bwd``: per (chunk, head, V block), walk the chunk backwards token by token, carrying
     ``dM_t, dIbar_t`` from ``E_c``. The forward state after token ``t`` comes straight from the chunk's
     boundary state by one masked tensor-core product, ``e^{G_t} S + (u * w_t)^T @ k`` (or, with
     ``CONFIG["main_sub"] = S``, one product per ``S`` tokens and an elementwise replay in between), so no
     per-token state is ever stored; then ``du, dbeta, dk, dq``, ``d log alpha`` and the ``Ip`` gradient.

``d log alpha_t = alpha_t <dS_t, S_{t-1}>`` is formed per token from the same on-chip states (no
cumulative sums, so no cancellation across the sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.palimpsa.utils import SequenceLayout, dot_precision, next_pow2, sequence_layout


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
        gc = tl.cumsum(g, axis=0)
        gl = tl.sum(g, axis=0)
        w = tl.exp(gl - gc)
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


@triton.jit
def _output_fwd(
    q, k, u, beta, la, ip, hm, hi, y, var, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STORE_VAR: tl.constexpr,
):  # fmt: skip
    iv, ic, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    base = (ic.to(tl.int64) * H + h) * V * K
    sm = tl.load(hm + base + ov[:, None] * K + ok[None, :], mask=mvk, other=0.0)
    si = tl.load(hi + base + ov[:, None] * K + ok[None, :], mask=mvk, other=0.0)
    p = tl.load(ip + h).to(tl.float32)
    # token t's inputs are loaded during token t-1, so the loads' latency hides behind the arithmetic
    lan = tl.load(la + t0 * H + h).to(tl.float32)
    kn = tl.load(k + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    qn = tl.load(q + (t0 * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
    un = tl.load(u + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    bn = tl.load(beta + (t0 * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    for t in range(L):
        tok = t0 + t
        a, kt, qt, ut, bt = tl.exp(lan), kn, qn, un, bn
        nxt = tl.minimum(tok + 1, t0 + L - 1)  # past the chunk's end: reload the last token, unused
        lan = tl.load(la + nxt * H + h).to(tl.float32)
        kn = tl.load(k + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        qn = tl.load(q + (nxt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        un = tl.load(u + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        bn = tl.load(beta + (nxt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        sm = a * sm + ut[:, None] * kt[None, :]
        si = a * si + bt[:, None] * (kt * kt)[None, :]
        r = 1.0 / (si + p)
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
        r = 1.0 / (si + p)
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
    dq, dk, du, db, dla, dip, cu, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_DVAR: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
    SUB: tl.constexpr,
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
    rows_kc = ((t0 + tc) * H + h)[:, None] * K + ok[None, :]
    k_c = tl.load(k + rows_kc, mask=mtc[:, None] & mk[None, :], other=0.0).to(tl.float32)
    kk_c = k_c * k_c
    rows_vc = ((t0 + tc) * H + h)[:, None] * V + ov[None, :]
    mcv = mtc[:, None] & mv[None, :]
    u_c = tl.load(u + rows_vc, mask=mcv, other=0.0).to(tl.float32)
    b_c = tl.load(beta + rows_vc, mask=mcv, other=0.0).to(tl.float32)
    a_next = 1.0  # alpha of the token after the current one, inside the chunk (E_c already carries it)
    # the Ip gradient sums every element of every token with both signs: fp64 across rows and tokens keeps
    # it at fp32 rounding of the rows instead of growing with the square root of T * V
    dip_acc = tl.sum(tl.zeros([C], dtype=tl.float64), axis=0)
    bm, bi = sm, si  # SUB > 0: the state before the current sub-chunk
    for j in range(L):
        t = L - 1 - j
        tok = t0 + t
        if SUB == 0:
            # forward state after token t, straight from the chunk's boundary state (one product each)
            g_t = tl.sum(tl.where(tc == t, gc, 0.0), axis=0)
            w = tl.where(tc <= t, tl.exp(g_t - gc), 0.0)
            e_t = tl.exp(g_t)
            m_t = sm * e_t + tl.dot(tl.trans(u_c * w[:, None]), k_c, input_precision=PREC)
            i_t = si * e_t + tl.dot(tl.trans(b_c * w[:, None]), kk_c, input_precision=PREC)
        else:
            # one product per sub-chunk of SUB tokens gives the state before it; the sub-chunk's own
            # tokens up to t are replayed elementwise from there, in registers
            s0 = (t // SUB) * SUB
            if (j == 0) | (t % SUB == SUB - 1):
                g_b = tl.sum(tl.where(tc == s0 - 1, gc, 0.0), axis=0)
                w = tl.where(tc < s0, tl.exp(g_b - gc), 0.0)
                e_b = tl.exp(g_b)
                bm = sm * e_b + tl.dot(tl.trans(u_c * w[:, None]), k_c, input_precision=PREC)
                bi = si * e_b + tl.dot(tl.trans(b_c * w[:, None]), kk_c, input_precision=PREC)
            m_t, i_t = bm, bi
            for r in range(s0, t + 1):
                rt = t0 + r
                a_r = tl.exp(tl.load(la + rt * H + h).to(tl.float32))
                k_r = tl.load(k + (rt * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
                u_r = tl.load(u + (rt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
                b_r = tl.load(beta + (rt * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
                m_t = a_r * m_t + u_r[:, None] * k_r[None, :]
                i_t = a_r * i_t + b_r[:, None] * (k_r * k_r)[None, :]
        qt = tl.load(q + (tok * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        kt = tl.load(k + (tok * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        ut = tl.load(u + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        bt = tl.load(beta + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        sdo = scale * tl.load(do + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        r = 1.0 / (i_t + p)
        mu = m_t * r
        d_m = sdo[:, None] * qt[None, :] * r
        d_i = -d_m * mu
        dq_t = tl.sum(sdo[:, None] * mu, axis=0)
        if HAS_DVAR:
            wv = scale * scale * tl.load(dvar + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
            wr = wv[:, None] * r
            d_i -= wr * r * (qt * qt)[None, :]
            dq_t += 2.0 * qt * tl.sum(wr, axis=0)
        dip_acc += tl.sum(tl.sum(d_i, axis=1).to(tl.float64), axis=0)
        # d log alpha_{t+1} = alpha_{t+1} <dS_{t+1}, S_t> (this V block's share); token t+1 < L only
        nxt_la = a_next * tl.sum(tl.sum(gm * m_t + gi * i_t, axis=1), axis=0)
        one = (tc == 0) & (tc + t + 1 < L)  # a single active lane, and only inside the chunk
        _put(dla + (tok + 1) * H + h + tc * 0, nxt_la + tl.zeros([C], dtype=tl.float32), one, ATOMIC)
        # reverse recurrence dS_t = D_t + alpha_{t+1} dS_{t+1}
        gm = d_m + a_next * gm
        gi = d_i + a_next * gi
        a_next = tl.exp(tl.sum(tl.where(tc == t, g_c, 0.0), axis=0))
        du_t = tl.sum(gm * kt[None, :], axis=1)
        db_t = tl.sum(gi * (kt * kt)[None, :], axis=1)
        dk_t = tl.sum(gm * ut[:, None], axis=0) + 2.0 * kt * tl.sum(gi * bt[:, None], axis=0)
        tl.store(du + (tok * H + h) * V + ov, du_t.to(du.dtype.element_ty), mask=mv)
        tl.store(db + (tok * H + h) * V + ov, db_t.to(db.dtype.element_ty), mask=mv)
        if ATOMIC:
            tl.atomic_add(dk + (tok * H + h) * K + ok, dk_t, mask=mk, sem="relaxed")
            tl.atomic_add(dq + (tok * H + h) * K + ok, dq_t, mask=mk, sem="relaxed")
        else:
            tl.store(dk + (tok * H + h) * K + ok, dk_t.to(dk.dtype.element_ty), mask=mk)
            tl.store(dq + (tok * H + h) * K + ok, dq_t.to(dq.dtype.element_ty), mask=mk)
    # the chunk's first token reads the boundary state
    first_la = a_next * tl.sum(tl.sum(gm * sm + gi * si, axis=1), axis=0)
    _put(dla + t0 * H + h + tc * 0, first_la + tl.zeros([C], dtype=tl.float32), tc == 0, ATOMIC)
    tl.store(dip + (iv * tl.num_programs(1) + ic) * H + h, dip_acc)


@triton.jit
def _put(ptr, val, mask, ATOMIC: tl.constexpr):
    """Store, or add when several programs (V blocks) own shares of the same value."""
    if ATOMIC:
        tl.atomic_add(ptr, val, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, val, mask=mask)


# Launch shapes. BK always covers all of K (padded to a power of two); the V blocks below are upper bounds.
CONFIG: dict[str, int] = {
    "states_bv": 64,
    "out_bv": 32,
    "out_warps": 4,
    "local_bv": 32,
    "local_warps": 4,
    "main_bv": 64,
    "main_warps": 8,
    # 0: the reverse walk rebuilds each token's state by a product from the chunk's boundary state;
    # S > 0: one product per S tokens, then an elementwise replay of at most S tokens
    "main_sub": 0,
}


def _bv(V: int, BK: int, cap: int, floor: int = 8) -> int:
    """A V block of at most ``cap``, shrinking as K grows: a ``[BV, BK]`` state tile stays in registers."""
    cap = max(floor, cap * 64 // BK) if BK > 64 else cap
    return min(max(next_pow2(V), floor), cap)


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
        BVo = _bv(V, BK, CONFIG["out_bv"])
        _output_fwd[(triton.cdiv(V, BVo), NT, H)](
            q, k, u, beta, log_alpha, ip, hm, hi, y, var if output_variance else y,
            layout.cu_seqlens, layout.chunk_index, scale,
            H=H, K=K, V=V, C=C, BK=BK, BV=BVo, STORE_VAR=output_variance, num_warps=CONFIG["out_warps"],
        )  # fmt: skip
        ctx.save_for_backward(q, k, u, beta, log_alpha, ip, hm, hi, hTm, hTi)
        ctx.meta = (scale, layout, C, use_init, output_final)
        return y, var, hTm, hTi

    @staticmethod
    def backward(ctx, dy, dvar, dTm, dTi):
        """Steps 3-4 (local pulls, reverse scan over chunks), then step 5 for the per-token gradients."""
        q, k, u, beta, log_alpha, ip, hm, hi, hTm, hTi = ctx.saved_tensors
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
        # 3. local pulls of each chunk on its start state, written where the scan will leave E_c
        dhm = torch.empty_like(hm)
        dhi = torch.empty_like(hi)
        BVl = _bv(V, BK, CONFIG["local_bv"])
        _local_bwd[(triton.cdiv(V, BVl), NT, H)](
            q, k, u, beta, log_alpha, ip, hm, hi, dy, dvar, dhm, dhi, layout.cu_seqlens, layout.chunk_index,
            scale, H=H, K=K, V=V, C=C, BK=BK, BV=BVl, HAS_DVAR=has_dvar, num_warps=CONFIG["local_warps"],
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
    """Step 5: walk each chunk backwards token by token."""
    _, TT, H, K = q.shape
    V = u.shape[-1]
    NT = layout.num_chunks
    BK = max(16, next_pow2(K))
    BVm = _bv(V, BK, CONFIG["main_bv"], floor=16)
    NVm = triton.cdiv(V, BVm)
    atomic = NVm > 1  # dk, dq and d log alpha sum over V blocks
    # gradients written once go straight into the inputs' dtypes; shared ones accumulate in fp32
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(q)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(k)
    du = torch.empty_like(u)
    db = torch.empty_like(beta)
    dla = (torch.zeros if atomic else torch.empty)(log_alpha.shape, device=q.device, dtype=torch.float32)
    dip = q.new_empty(NVm, NT, H, dtype=torch.float64)
    _main_bwd[(NVm, NT, H)](
        q, k, u, beta, log_alpha, ip, hm, hi, dhm, dhi, dy, dvar, dq, dk, du, db, dla, dip,
        layout.cu_seqlens, layout.chunk_index, scale,
        H=H, K=K, V=V, C=C, BK=BK, BV=BVm, HAS_DVAR=has_dvar, ATOMIC=atomic, PREC=dot_precision(q.dtype),
        SUB=CONFIG["main_sub"], num_warps=CONFIG["main_warps"],
    )  # fmt: skip
    return dq, dk, du, db, dla, dip.sum((0, 1))


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
