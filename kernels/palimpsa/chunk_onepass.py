"""One-pass backward of the chunked Palimpsa op: one elementwise walk per chunk, then tensor-core corrections.

Selected by ``chunk.CONFIG["backward"] = "one_pass"`` (and by the default "auto" from K x V = 2048);
``chunk.py`` holds the forward, the two-pass backward and the scan over chunks that both use (math and
notation: README.md here). The walk runs in Triton (``_walk_bwd``) or in CUDA C++ (``walk_cuda.py``,
``CONFIG["onepass_walk"]``).

Why one walk is enough. The decay is one scalar per head and token, so inside a chunk of ``L`` tokens with
chunk-local cumulative log-decays ``G_t`` the adjoint of the state after token ``t`` splits exactly into

    dS_t = dS_t^loc + e^{G_L - G_t} E_c

where ``dS^loc`` is the reverse recurrence started from zero at the chunk's end (it sees only the chunk's own
read-outs) and ``E_c`` is the adjoint on the state after the chunk (everything later). Every gradient that
reads ``dS_t`` is linear in it, so the per-token work is done once, from zero, in parallel over chunks, and
``E_c`` enters afterwards through rank-one-per-token terms that are tensor-core products:

    du_t    += e^{G_L - G_t} E^M_c k_t                 (k E^M^T: [C, K] x [K, V])
    dbeta_t += e^{G_L - G_t} E^I_c k_t^2               ((k * k) E^I^T)
    dk_t    += e^{G_L - G_t} (E^M_c^T u_t + 2 k_t * E^I_c^T beta_t)   (u E^M, beta E^I: [C, V] x [V, K])

(``dq_t`` reads only token ``t``'s read-out: no correction.)

d log alpha and the Ip gradient without per-element work. With ``c_t`` the cumulative log-decay from the
sequence's start, ``M_t`` depends on ``c`` only through ``e^{c_t - c_j}`` factors, and the read-out is
homogeneous of degree 0 in ``(M, I)`` (the variance of degree -1). That gives, exactly,

    dL/dc_t = -Ip z_t - <dvar_t, var_t> - <u_t, du_t> - <beta_t, dbeta_t>   (+ <dS_T, S_T> at the end)

with ``z_t`` the sum over the whole ``[V, K]`` state of the read-out's direct adjoint on ``I_t``
(``-g_t M_t / I_t^2`` and the variance's ``-w_t q_t^2 / I_t^2``) and ``dS_T`` the final state's gradient;
``d log alpha_s = sum_{t >= s} dL/dc_t`` within the sequence and the kernel's ``Ip`` gradient is
``sum_t z_t`` (the initial and final states' share is torch's, in ``chunk_palimpsa``). The walk forms the
``dS^loc`` part of each ``dL/dc_t`` from sums it makes anyway, the correction kernel the ``E_c`` part from its
products: no per-element buffer, no atomic. Each chunk sums its own tokens (float64, ``C`` scalars); the rest
of the sequence enters through chunk totals. With ``X_c = <E_c, S after chunk c>`` (``d log alpha`` at the
next chunk's first token) a chunk's total is

    X_{c-1} - X_c = <pull_c, S_0> - <E_c, Delta_c>,   <E_c, Delta_c> = sum_t e^{G_L - G_t} y_t

(``S_0`` the state before the chunk, ``Delta_c`` what its tokens add to the state, ``y_t`` below): two inner
products the walk and the correction form anyway, and ``_dla_tails`` sums them from each sequence's last
chunk back (float64, starting from ``<dS_T, S_T>`` on the final state). No boundary state is read after the
walk, so the walk writes its pulls over them (``CONFIG["onepass_reuse_states"]``). Accuracy: the terms
cancel to ``alpha_s <dS_s, S_{s-1}>``, so the error is absolute rather than relative to ``d log alpha_s``:
the fp32 rounding of ``|<u_t, du_t>|``-sized terms inside the chunk plus one pair of inner products per later
chunk. In the interpreter against float64 (norm-relative, chunks of 16): 2.5e-7 at 35 tokens and 5.4e-7 at
400 with ordinary gates, 2.4e-6 and 1.7e-6 with extreme ones (alpha = e^-30 next to 1 - 1e-7, Ip = 1e-4
next to 1e4), as with ``X_c`` read from the next boundary state; summing the chunks' per-token terms instead
gave 1.4e-6 and 1.7e-5 at 400, growing with the tokens after ``s``. The per-element form gives 5e-8.
``CONFIG["onepass_dla"] = "direct"`` takes that form instead: ``alpha_s <dS_s^loc, S_{s-1}>`` per element
in the walk (three more FP32 ops per element-token), plus ``alpha_s e^{G_L - G_s} <E_c, S_{s-1}> = e^{G_L}
<E_c, S_0> + sum_{j < s} e^{G_L - G_j} y_j`` from the correction's products, ``y_j = <k_j, E^M^T u_j> +
<k_j^2, E^I^T beta_j>``.

Kernels (per chunk ``c`` of ``C`` tokens, head ``h``)
  1. ``_walk_bwd`` per (V block, chunk, head): walk the chunk backwards from a zero adjoint in sub-chunks of
     ``S = CONFIG["onepass_sub"]`` tokens; the state before each sub-chunk comes from the chunk's boundary
     state by one masked product, its S tokens are replayed elementwise and kept on chip. Per token: the
     local ``du, dbeta`` (sums over K, complete), ``dk, dq`` (sums over V; atomic in fp32 across V blocks),
     this V block's share of the walk's part of ``dL/dc_t``; per chunk: its pull on the start state,
     ``alpha_1 dS_1^loc = sum_t e^{G_t} D_t`` (over the boundary state with ``onepass_reuse_states``),
     ``<pull, S_0>`` and its share of the ``Ip`` gradient.
  2. ``chunk._scan_bwd``: reverse scan over chunks, ``E_{c-1} = pull_c + e^{G_L} E_c``.
  3. ``_correct_bwd`` per (chunk, head): the four products above, added in place to ``du, dbeta, dk``; the
     ``E_c`` part of ``dL/dc_t``, ``-e^{G_L - G_t} y_t``; the chunk's reverse sum (plus ``<dS_T, S_T>`` in
     a sequence's last chunk) and its total from the two inner products.
  4. ``_dla_tails`` per (sequence, head): each chunk's sum plus the later chunks' totals, ``d log alpha``.

Against the two-pass backward this drops ``_local_bwd`` (a second elementwise replay of every token) and the
per-row d-log-alpha buffer (``[T, H, V]`` fp32); the walk needs no ``E_c`` so it has no cross-chunk input.
Memory: the pulls and then ``E_c`` live in the saved boundary states' buffers (a second backward through the
same graph then raises; ``CONFIG["onepass_reuse_states"] = False`` keeps the states), and the fp32 ``dq``
summed over V blocks is rounded to the input dtype before the scan and the correction allocate.
The walk's local ``du, dbeta`` (and ``dk`` when one V block covers V) are stored in the gradients' dtype and
corrected in place: exact for fp32 inputs, one extra rounding for 16-bit ones (as fla adds its bf16 parts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.palimpsa.chunk import CONFIG, RCP_ASM, _bv, _chunk_span, _scan_bwd, _to_chunk_end, num_warps
from kernels.palimpsa.utils import SequenceLayout, dot_precision, next_pow2


@triton.jit
def _walk_bwd(
    q, k, u, beta, la, om, ip, hm, hi, do, dvar,
    dq, dk, du, db, dc, dip, ps, lm, li, cu, chunk_index, scale, TT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, SUB: tl.constexpr, HAS_DVAR: tl.constexpr, ATOMIC: tl.constexpr,
    DLA_DIRECT: tl.constexpr, FAST_RCP: tl.constexpr, PREC: tl.constexpr,
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
    g_c = tl.load(la + (t0 + tc) * H + h, mask=mtc, other=0.0).to(tl.float32)
    gc = tl.cumsum(g_c, axis=0)
    # the chunk's own adjoint, from zero at its end: later chunks enter in _correct_bwd
    gm = tl.zeros([BV, BK], dtype=tl.float32)
    gi = tl.zeros([BV, BK], dtype=tl.float32)
    a_next = 1.0  # alpha of the token after the current one, inside the chunk
    zacc = tl.zeros([BV], dtype=tl.float64)  # rows of the direct I-adjoint over the chunk: the Ip gradient
    n_sub = tl.cdiv(L, SUB)
    for jj in range(n_sub):
        s0 = (n_sub - 1 - jj) * SUB
        # the state before the sub-chunk, straight from the chunk's boundary state: one product each
        g_b = tl.sum(tl.where(tc == s0 - 1, gc, 0.0), axis=0)
        w = tl.exp(tl.where(tc < s0, g_b - gc, float("-inf")))  # 0 from s0 on, and never an overflow
        e_b = tl.exp(g_b)
        k_c = tl.load(
            k + ((t0 + tc) * H + h)[:, None] * K + ok[None, :], mask=mtc[:, None] & mk[None, :], other=0.0
        ).to(tl.float32)
        rows_vc = ((t0 + tc) * H + h)[:, None] * V + ov[None, :]
        u_c = tl.load(u + rows_vc, mask=mtc[:, None] & mv[None, :], other=0.0).to(tl.float32)
        b_c = tl.load(beta + rows_vc, mask=mtc[:, None] & mv[None, :], other=0.0).to(tl.float32)
        m_t = sm * e_b + tl.dot(tl.trans(u_c * w[:, None]), k_c, input_precision=PREC)
        # the precision itself, I = Ibar + Ip: the prior enters each token's update as one scalar
        i_t = si * e_b + p + tl.dot(tl.trans(b_c * w[:, None]), k_c * k_c, input_precision=PREC)
        # replay the sub-chunk elementwise, keeping every token's state on chip (tokens past L leave it as is)
        ms = ()
        is_ = ()
        alphas = ()  # each token's decay, for the walk (which reads k, u, beta again: held, they would spill)
        for r in tl.static_range(SUB):
            tok = t0 + s0 + r
            ok_t = s0 + r < L
            mkt = ok < tl.where(ok_t, K, 0)  # (a scalar condition folded into the bound, not and-ed on)
            mvt = ov < tl.where(ok_t, V, 0)
            o_k, o_v = (tok * H + h) * K + ok, (tok * H + h) * V + ov
            a_r = tl.exp(tl.load(la + tok * H + h, mask=ok_t, other=0.0).to(tl.float32))
            c_r = tl.load(om + tok * H + h, mask=ok_t, other=0.0) * p  # (1 - alpha) Ip
            k_r = tl.load(k + o_k, mask=mkt, other=0.0).to(tl.float32)
            u_r = tl.load(u + o_v, mask=mvt, other=0.0).to(tl.float32)
            b_r = tl.load(beta + o_v, mask=mvt, other=0.0).to(tl.float32)
            m_t = a_r * m_t + u_r[:, None] * k_r[None, :]
            i_t = a_r * i_t + (b_r[:, None] * (k_r * k_r)[None, :] + c_r)
            ms = ms + (m_t,)
            is_ = is_ + (i_t,)
            alphas = alphas + (a_r,)
        # walk the sub-chunk backwards
        for rr in tl.static_range(SUB):
            r = SUB - 1 - rr
            tok = t0 + s0 + r
            ok_t = s0 + r < L
            m_t = ms[SUB - 1 - rr]  # indexed by the constant expression itself: a named index is a tensor
            i_t = is_[SUB - 1 - rr]
            mkt = ok < tl.where(ok_t, K, 0)
            mvt = ov < tl.where(ok_t, V, 0)
            o_k, o_v = (tok * H + h) * K + ok, (tok * H + h) * V + ov
            qt = tl.load(q + o_k, mask=mkt, other=0.0).to(tl.float32)
            kt = tl.load(k + o_k, mask=mkt, other=0.0).to(tl.float32)
            ut = tl.load(u + o_v, mask=mvt, other=0.0).to(tl.float32)
            bt = tl.load(beta + o_v, mask=mvt, other=0.0).to(tl.float32)
            sdo = scale * tl.load(do + o_v, mask=mvt, other=0.0).to(tl.float32)
            if FAST_RCP:
                rcp = tl.inline_asm_elementwise(
                    RCP_ASM, "=r,r", [i_t], dtype=tl.float32, is_pure=True, pack=1
                )
            else:
                rcp = 1.0 / i_t
            mu = m_t * rcp
            d_m = sdo[:, None] * qt[None, :] * rcp
            d_i = -d_m * mu
            x_q = sdo[:, None] * mu
            if HAS_DVAR:
                wv = tl.load(dvar + o_v, mask=mvt, other=0.0).to(tl.float32)
                wr = (scale * scale * wv)[:, None] * rcp
                x_v = wr * (qt * qt)[None, :]  # sums to <dvar_t, var_t>
                d_i -= x_v * rcp
                x_q += 2.0 * qt[None, :] * wr
            else:
                x_v = tl.zeros_like(d_i)
            if DLA_DIRECT:
                # the local part of d log alpha_{t+1} = alpha_{t+1} <dS_{t+1}, S_t>, this block's rows
                x_v = a_next * (gm * m_t + gi * (i_t - p))
            # reverse recurrence dS_t = D_t + alpha_{t+1} dS_{t+1}, from zero at the chunk's end
            gm = d_m + a_next * gm
            gi = d_i + a_next * gi
            a_next = alphas[SUB - 1 - rr]
            # du, dbeta, the rows of z_t and of <dvar_t, var_t> (or of d log alpha) all sum over K: one joint
            # reduction
            x_u = gm * kt[None, :]
            x_b = gi * (kt * kt)[None, :]
            zu, bw = tl.split(tl.sum(tl.join(tl.join(d_i, x_u), tl.join(x_b, x_v)), axis=1))
            z_r, du_t = tl.split(zu)
            db_t, v_r = tl.split(bw)
            zacc += z_r.to(tl.float64)
            if DLA_DIRECT:
                c_t = tl.sum(v_r, axis=0)
                tl.store(dc + (iv * TT + tok + 1) * H + h, c_t, mask=s0 + r + 1 < L)
            else:
                # this block's rows of dL/dc_t = -Ip z_t - <dvar_t, var_t> - <u_t, du_t> - <beta_t, dbeta_t>
                c_t = -tl.sum(p * z_r + v_r + ut * du_t + bt * db_t, axis=0)
                tl.store(dc + (iv * TT + tok) * H + h, c_t, mask=ok_t)
            tl.store(du + o_v, du_t.to(du.dtype.element_ty), mask=mvt)
            tl.store(db + o_v, db_t.to(db.dtype.element_ty), mask=mvt)
            # dk and dq both sum over V: one joint reduction
            x_k = gm * ut[:, None] + gi * (2.0 * bt)[:, None] * kt[None, :]
            dk_t, dq_t = tl.split(tl.sum(tl.join(x_k, x_q), axis=0))
            if ATOMIC:
                tl.atomic_add(dk + o_k, dk_t, mask=mkt, sem="relaxed")
                tl.atomic_add(dq + o_k, dq_t, mask=mkt, sem="relaxed")
            else:
                tl.store(dk + o_k, dk_t.to(dk.dtype.element_ty), mask=mkt)
                tl.store(dq + o_k, dq_t.to(dq.dtype.element_ty), mask=mkt)
    if DLA_DIRECT:  # the chunk's first token reads the boundary state
        tl.store(dc + (iv * TT + t0) * H + h, a_next * tl.sum(gm * sm + gi * si))
    # the chunk's pull on its start state: alpha_1 dS_1^loc = sum_t e^{G_t} D_t
    tl.store(lm + base + s_vk, a_next * gm, mask=mvk)
    tl.store(li + base + s_vk, a_next * gi, mask=mvk)
    tl.store(dip + (iv * tl.num_programs(1) + ic) * H + h, tl.sum(zacc, axis=0))
    # <pull, S_0>: the chunk's sum of the dS^loc part of dL/dc_t, as one inner product (the identity's tail)
    p_s = a_next * tl.sum(gm * sm + gi * si)
    tl.store(ps + (iv * tl.num_programs(1) + ic) * H + h, p_s.to(tl.float64))


@triton.jit
def _correct_bwd(
    k, u, beta, la, hm, hi, hTm, hTi, dhm, dhi, du, db, dk, dc, ps, dla, tot, cu, chunk_index, TT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NV: tl.constexpr, HAS_DFINAL: tl.constexpr, DLA_DIRECT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    ic, h = tl.program_id(0), tl.program_id(1)
    t0, L = _chunk_span(cu, chunk_index, ic, C)
    n = tl.load(chunk_index + ic * 2)
    last = t0 + L >= tl.load(cu + n + 1)
    tc = tl.arange(0, C)
    mt = tc < L
    rows = (t0 + tc) * H + h
    g = tl.load(la + rows, mask=mt, other=0.0).to(tl.float32)
    g_l = tl.sum(g, axis=0)
    w = tl.where(mt, _to_chunk_end(la, t0 + tc, t0 + L, h, H), 0.0)  # e^{G_L - G_t}, token t to the end
    base = (ic.to(tl.int64) * H + h) * V * K
    if DLA_DIRECT:  # the state before the chunk
        s_mp, s_ip, s_off, v_s = hm, hi, base, V
    else:
        # a sequence's last chunk: the final state, read only with a final-state gradient (E_c is that
        # gradient there, and zero without one); every other chunk's tail comes from the later chunks' sums
        # (_dla_tails), and the boundary states' buffers may hold E_c by now
        s_mp, s_ip, s_off = hTm, hTi, (n.to(tl.int64) * H + h) * V * K
        v_s = tl.where(last & HAS_DFINAL, V, 0)  # (a scalar condition folded into the bound)
    e_s = 0.0  # <E_c, S>, S the state before the chunk (direct form) or the final state (identity)
    # du and dbeta sum over K: per V block, products accumulated over K blocks
    for v0 in range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < V
        pu = tl.zeros([C, BV], dtype=tl.float32)
        pb = tl.zeros([C, BV], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ok = k0 + tl.arange(0, BK)
            mk = ok < K
            k_c = tl.load(k + rows[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            k_c = k_c.to(tl.float32)
            o_vk = ov[:, None] * K + ok[None, :]
            m_vk = mv[:, None] & mk[None, :]
            e_m = tl.load(dhm + base + o_vk, mask=m_vk, other=0.0)
            e_i = tl.load(dhi + base + o_vk, mask=m_vk, other=0.0)
            pu += tl.dot(k_c, tl.trans(e_m), input_precision=PREC)
            pb += tl.dot(k_c * k_c, tl.trans(e_i), input_precision=PREC)
            m_s = (ov[:, None] < v_s) & mk[None, :]
            s_m = tl.load(s_mp + s_off + o_vk, mask=m_s, other=0.0)
            s_i = tl.load(s_ip + s_off + o_vk, mask=m_s, other=0.0)
            e_s += tl.sum(e_m * s_m + e_i * s_i)
        o_cv = rows[:, None] * V + ov[None, :]
        m_cv = mt[:, None] & mv[None, :]
        du_c = tl.load(du + o_cv, mask=m_cv, other=0.0).to(tl.float32) + w[:, None] * pu
        db_c = tl.load(db + o_cv, mask=m_cv, other=0.0).to(tl.float32) + w[:, None] * pb
        tl.store(du + o_cv, du_c.to(du.dtype.element_ty), mask=m_cv)
        tl.store(db + o_cv, db_c.to(db.dtype.element_ty), mask=m_cv)
    # dk sums over V: per K block, products accumulated over V blocks; and E_c's part of dL/dc_t
    cc = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok < K
        pk = tl.zeros([C, BK], dtype=tl.float32)
        pb = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < V
            o_cv = rows[:, None] * V + ov[None, :]
            m_cv = mt[:, None] & mv[None, :]
            u_c = tl.load(u + o_cv, mask=m_cv, other=0.0).to(tl.float32)
            b_c = tl.load(beta + o_cv, mask=m_cv, other=0.0).to(tl.float32)
            o_vk = base + ov[:, None] * K + ok[None, :]
            e_m = tl.load(dhm + o_vk, mask=mv[:, None] & mk[None, :], other=0.0)
            e_i = tl.load(dhi + o_vk, mask=mv[:, None] & mk[None, :], other=0.0)
            pk += tl.dot(u_c, e_m, input_precision=PREC)
            pb += tl.dot(b_c, e_i, input_precision=PREC)
        o_ck = rows[:, None] * K + ok[None, :]
        m_ck = mt[:, None] & mk[None, :]
        k_c = tl.load(k + o_ck, mask=m_ck, other=0.0).to(tl.float32)
        dk_c = tl.load(dk + o_ck, mask=m_ck, other=0.0).to(tl.float32) + w[:, None] * (pk + 2.0 * k_c * pb)
        tl.store(dk + o_ck, dk_c.to(dk.dtype.element_ty), mask=m_ck)
        # <u_t, E^M k_t> + <beta_t, E^I k_t^2> = <k_t, E^M^T u_t> + <k_t^2, E^I^T beta_t>
        cc += tl.sum(k_c * (pk + k_c * pb), axis=1)
    d_w = tl.zeros([C], dtype=tl.float64)  # the walk's part, summed over its V blocks
    for j in tl.static_range(NV):
        d_w += tl.load(dc + (j * TT + t0 + tc) * H + h, mask=mt, other=0.0).to(tl.float64)
    y = (w * cc).to(tl.float64)
    if DLA_DIRECT:
        # alpha_s e^{G_L - G_s} <E_c, S_{s-1}> = e^{G_L} <E_c, S_0> + sum_{j < s} e^{G_L - G_j} y_j
        d_la = d_w + tl.exp(g_l).to(tl.float64) * e_s.to(tl.float64) + (tl.cumsum(y, axis=0) - y)
    else:
        # d log alpha_s = sum_{t >= s} dL/dc_t: the chunk's own tokens here (float64), the later chunks' in
        # _dla_tails from each chunk's total
        d_la = tl.cumsum(d_w - y, axis=0, reverse=True) + e_s.to(tl.float64)
        # the chunk's total, sum_t dL/dc_t = <pull, S_0> - <E_c, the chunk's own additions> (+ the final
        # state's term): two inner products, not C per-token sums, carry the rounding into the tail
        p_s = tl.zeros([1], dtype=tl.float64)
        for j in tl.static_range(NV):
            p_s += tl.load(ps + (j * tl.num_programs(0) + ic) * H + h)
        tl.store(tot + ic * H + h + tl.arange(0, 1), p_s - tl.sum(y, axis=0) + e_s.to(tl.float64))
    tl.store(dla + rows, d_la, mask=mt)


@triton.jit
def _dla_tails(
    local, tot, dla, cu, chunk_offsets, H: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """``d log alpha`` of the identity: each chunk's own part (``local``, float64) plus the totals of the
    sequence's later chunks, summed in float64 from its last chunk back."""
    inh = tl.program_id(0)
    n, h = inh // H, inh % H
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    boff = tl.load(chunk_offsets + n).to(tl.int64)
    nt = tl.cdiv(eos - bos, C)
    tc = tl.arange(0, C)
    tail = tl.zeros([1], dtype=tl.float64)
    for j in range(nt):
        i = nt - 1 - j
        tok = bos + i * C + tc
        m = tok < eos
        d_la = tl.load(local + tok * H + h, mask=m, other=0.0) + tail
        tl.store(dla + tok * H + h, d_la.to(dla.dtype.element_ty), mask=m)
        tail += tl.load(tot + (boff + i) * H + h)


def _use_cuda_walk(q: Tensor, V: int, C: int, direct: bool) -> bool:
    """``CONFIG["onepass_walk"]``: "triton", "cuda" (an error where it cannot run) or "auto"."""
    choice = CONFIG["onepass_walk"]
    if choice not in ("triton", "cuda", "auto"):
        raise ValueError(f"CONFIG['onepass_walk'] is 'triton', 'cuda' or 'auto'; got {choice!r}")
    if choice == "triton":
        return False
    from kernels.palimpsa import walk_cuda

    if choice == "cuda":
        if direct:
            raise walk_cuda.CudaUnavailable("the CUDA walk computes d log alpha by the identity only")
        return True
    return not direct and cuda_walk_possible(q, V, C)


def cuda_walk_possible(q: Tensor, V: int, C: int) -> bool:
    """True where the settings allow the CUDA walk and it can run here (``chunk.backward_path``'s "auto"
    takes the one-pass backward there at any head size)."""
    if CONFIG["onepass_walk"] == "triton" or CONFIG["onepass_dla"] == "direct":
        return False
    from kernels.palimpsa import walk_cuda

    return walk_cuda.can_run(q, V, C, CONFIG["onepass_sub"])


def _triton_walk(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor,
    hm: Tensor, hi: Tensor, dy: Tensor, dvar: Tensor, has_dvar: bool, scale: float, layout: SequenceLayout,
    C: int, sub: int, in_place: bool = False,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``_walk_bwd`` over every (V block, chunk, head): ``dq, dk, du, db, dc, dip``, ``ps`` (``<pull, S_0>``
    per V block), the chunks' pulls (over ``hm, hi`` when ``in_place``: a program reads its tile of the
    boundary state before it writes the pull there) and the number of V blocks."""
    _, TT, H, K = q.shape
    V = u.shape[-1]
    NT = layout.num_chunks
    BK = max(16, next_pow2(K))
    BV = _bv(V, BK, CONFIG["onepass_bv"], floor=16)
    NV = triton.cdiv(V, BV)
    atomic = NV > 1  # dk and dq sum over V blocks
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(q)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32) if atomic else torch.empty_like(k)
    du = torch.empty_like(u)
    db = torch.empty_like(beta)
    dc = q.new_empty(NV, TT, H, dtype=torch.float32)  # the walk's part of dL/dc_t, per V block
    dip = q.new_empty(NV, NT, H, dtype=torch.float64)
    ps = torch.empty_like(dip)  # <pull, S_0> per V block
    # the chunks' pulls; the scan turns them into E_c in place
    dhm, dhi = (hm, hi) if in_place else (torch.empty_like(hm), torch.empty_like(hi))
    _walk_bwd[(NV, NT, H)](
        q, k, u, beta, log_alpha, om, ip, hm, hi, dy, dvar, dq, dk, du, db, dc, dip, ps, dhm, dhi,
        layout.cu_seqlens, layout.chunk_index, scale, TT,
        H=H, K=K, V=V, C=C, BK=BK, BV=BV, SUB=sub, HAS_DVAR=has_dvar, ATOMIC=atomic,
        DLA_DIRECT=CONFIG["onepass_dla"] == "direct", FAST_RCP=q.is_cuda, PREC=dot_precision(q.dtype),
        num_warps=num_warps("onepass_warps", BK, BV),
    )  # fmt: skip
    return dq, dk, du, db, dc, dip, ps, dhm, dhi, NV


def _check_settings() -> None:
    """The one-pass settings, checked before the backward marks or writes anything."""
    if CONFIG["onepass_sub"] < 1:
        raise ValueError(
            f"CONFIG['onepass_sub'] is the sub-chunk length, at least 1; got {CONFIG['onepass_sub']}"
        )
    if CONFIG["onepass_dla"] not in ("identity", "direct"):
        raise ValueError(f"CONFIG['onepass_dla'] is 'identity' or 'direct'; got {CONFIG['onepass_dla']!r}")
    if not isinstance(CONFIG["onepass_reuse_states"], bool):
        raise ValueError(
            f"CONFIG['onepass_reuse_states'] is True or False; got {CONFIG['onepass_reuse_states']!r}"
        )


def reuses_states() -> bool:
    """True where the one-pass backward writes its chunk pulls over the saved boundary states (its identity
    form reads no boundary state after the walk): ``CONFIG["onepass_reuse_states"]``. Raises on an invalid
    one-pass setting, so a backward that fails on one leaves the saved states usable."""
    _check_settings()
    return CONFIG["onepass_reuse_states"] and CONFIG["onepass_dla"] == "identity"


def onepass_backward(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor,
    hm: Tensor, hi: Tensor, hTm: Tensor | None, hTi: Tensor | None, dy: Tensor, dvar: Tensor, has_dvar: bool,
    dTm: Tensor | None, dTi: Tensor | None, scale: float, layout: SequenceLayout, C: int,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``dq, dk, du, dbeta, d log alpha, dIp, dM_0, dIbar_0`` (input dtypes; ``om``: ``1 - alpha`` per token;
    ``dTm``/``dTi``: the final raw states' gradients, both given or both ``None``). With ``reuses_states()``
    ``hm`` and ``hi`` hold the scan's ``E_c`` afterwards."""
    in_place = reuses_states()  # checks the settings first
    direct = CONFIG["onepass_dla"] == "direct"
    _, TT, H, K = q.shape
    V = u.shape[-1]
    N, NT = layout.num_seqs, layout.num_chunks
    BK = max(16, next_pow2(K))
    prec = dot_precision(q.dtype)
    walk_args = (q, k, u, beta, log_alpha, om, ip, hm, hi, dy, dvar, has_dvar, scale, layout, C)
    sub = CONFIG["onepass_sub"]
    if _use_cuda_walk(q, V, C, direct):
        from kernels.palimpsa import cuda_build, walk_cuda  # built with nvcc on first use

        dq, dk, du, db, dc, dip, ps, dhm, dhi, NV = cuda_build.run_or_fall_back(
            CONFIG["onepass_walk"],
            lambda: walk_cuda.walk_bwd(*walk_args, sub, in_place),
            lambda: _triton_walk(*walk_args, sub, in_place),
        )
    else:
        dq, dk, du, db, dc, dip, ps, dhm, dhi, NV = _triton_walk(*walk_args, sub, in_place)
    dq = dq.to(q.dtype)  # final (no correction): an fp32 sum over V blocks goes before the next buffers come
    has_dfinal = dTm is not None
    d0m = q.new_empty(N, H, V, K, dtype=torch.float32)
    d0i = torch.empty_like(d0m)
    BVs = min(max(next_pow2(V), 8), 32)
    _scan_bwd[(triton.cdiv(V, BVs), N * H)](
        log_alpha, dhm, dhi, dTm if has_dfinal else dhm, dTi if has_dfinal else dhi, d0m, d0i,
        layout.cu_seqlens, layout.chunk_offsets, H=H, K=K, V=V, C=C, BK=BK, BV=BVs,
        HAS_DFINAL=has_dfinal, num_warps=4,
    )  # fmt: skip
    BKc = min(max(16, next_pow2(K)), CONFIG["correct_block"])
    BVc = min(max(16, next_pow2(V)), CONFIG["correct_block"])
    # d log alpha in float64: whole (direct form), or each chunk's own part and its total (identity)
    dla = torch.empty(log_alpha.shape, device=q.device, dtype=torch.float64)
    tot = q.new_empty(NT, H, dtype=torch.float64)
    _correct_bwd[(NT, H)](
        k, u, beta, log_alpha, hm, hi, hTm if has_dfinal else hm, hTi if has_dfinal else hi, dhm, dhi,
        du, db, dk, dc, ps, dla, tot, layout.cu_seqlens, layout.chunk_index, TT,
        H=H, K=K, V=V, C=C, BK=BKc, BV=BVc, NV=NV, HAS_DFINAL=has_dfinal, DLA_DIRECT=direct, PREC=prec,
        num_warps=CONFIG["correct_warps"],
    )  # fmt: skip
    if not direct:
        local, dla = dla, torch.empty(log_alpha.shape, device=q.device, dtype=log_alpha.dtype)
        _dla_tails[(N * H,)](local, tot, dla, layout.cu_seqlens, layout.chunk_offsets, H=H, C=C)
    return (
        dq,
        dk.to(k.dtype),
        du,
        db,
        dla.to(log_alpha.dtype),
        dip.sum((0, 1)).to(ip.dtype),
        d0m,
        d0i,
    )
