"""Fused-chunk Triton forward and backward of simple GLA, and of any recurrence of the same shape whose
values depend on the state through a per-chunk linear map (the delta rule, ``kernels/delta_rule/chunk.py``).

Recurrence, layout ``[B, T, H, D]`` flattened to ``[1, total_T, H, D]`` (fla's varlen convention; a plain
batch is ``B`` sequences of ``T``), states ``[V, K]`` per (sequence, head), fp32:

    S_t = alpha_t S_{t-1} + w_t k_t^T,      y_t = scale * S_t q_t.

Simple GLA has ``w_t = v_t``. The delta rule has, per chunk starting from ``S_0``, ``W = U - W_k S_0^T``
with ``U`` and ``W_k`` computed beforehand for all chunks (they do not depend on the state); the kernels
take them in a chunk-major ``[NT, H, C, D]`` layout (``STATE_VALUES``).

Forward of a chunk of ``C`` tokens, chunk-local ``G_t = sum_{j<=t} log alpha_j``, ``D[t, j] = e^{G_t - G_j}``
for ``j <= t`` (else 0), ``P = (Q K^T) * D``:

    y     = scale * (e^{G} * (Q S_0^T) + P W)
    S_end = e^{G_C} S_0 + (e^{G_C - G} * W)^T K

Backward of the same chunk, given ``dY`` and ``dS_end`` (the gradient on the state after the chunk):

    dP    = scale * (dY W^T) * D
    dW    = scale * P^T dY + (e^{G_C - G} * K) dS_end^T
    dQ    = dP K + scale * (e^{G} * dY) S_0
    dK    = dP^T Q + (e^{G_C - G} * W) dS_end
    dS_0  = e^{G_C} dS_end + scale * (e^{G} * dY)^T Q  [- dW^T W_k]
    dU    = dW,     dW_k = -dW S_0                       (delta rule)

and for the decays, since ``y`` and ``S_end`` depend on ``G`` only through ``e^{G_t} q_t``, ``e^{-G_j} k_j``
and the factor ``e^{G_C}`` of ``S_end``:

    d G_t = q_t . dq_t - k_t . dk_t  (+ <dS_end, S_end> for the last token),
    d log alpha_i = sum_{t >= i in the chunk} d G_t,

a sum that stays inside the chunk, so no cancellation builds up across the sequence.

Design ("fused chunk"): one program per (sequence, head, V block) walks its sequence's chunks in order with
the state on chip, every chunk product a tensor-core ``tl.dot``; the state before each chunk is stored (one
``[V, K]`` tile per chunk, never per token) and the backward walks the chunks in reverse carrying ``dS``,
reading those boundary states back. V blocks are independent rows of the state; the sums over V that ``dq``,
``dk``, ``d log alpha`` and ``dW_k`` need are per-block partials that one torch sum finishes (deterministic,
no atomics). Few and short launches is what matters at the small head sizes of the baselines (K = 16,
V = 32): two kernels per layer per training step (four for the delta rule, with its WY kernels), against
thousands in a torch loop over chunks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.palimpsa.utils import SequenceLayout, next_pow2, sequence_layout


@triton.jit
def _walk_fwd(
    q, k, u, wk, la, h0, hs, ht, y, cu, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STATE_VALUES: tl.constexpr, USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, inh = tl.program_id(0), tl.program_id(1)
    n, h = inh // H, inh % H
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    boff = tl.load(chunk_offsets + n).to(tl.int64)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    tc = tl.arange(0, C)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    # int32 offsets inside a tile, from a scalar int64 base per chunk: token-major [T, H, D] rows,
    # chunk-major [C, D] rows, and the [V, K] state
    o_tk = (tc * H)[:, None] * K + ok[None, :]
    o_tv = (tc * H)[:, None] * V + ov[None, :]
    o_ck = tc[:, None] * K + ok[None, :]
    o_cv = tc[:, None] * V + ov[None, :]
    o_vk = ov[:, None] * K + ok[None, :]
    causal = tc[:, None] >= tc[None, :]
    S = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_INIT:
        S += tl.load(h0 + (n * H + h) * V * K + o_vk, mask=mvk, other=0.0)
    for i in range(tl.cdiv(eos - bos, C)):
        ic = boff + i
        t0 = bos + i * C
        mt = tc < eos - t0
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        tl.store(hs + (ic * H + h) * V * K + o_vk, S, mask=mvk)
        q_c = tl.load(q + (t0 * H + h) * K + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        k_c = tl.load(k + (t0 * H + h) * K + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        g = tl.load(la + t0 * H + h + tc * H, mask=mt, other=0.0).to(tl.float32)
        G = tl.cumsum(g, axis=0)
        G_last = tl.sum(g, axis=0)
        if STATE_VALUES:
            w_c = tl.load(u + (ic * H + h) * C * V + o_cv, mask=m_tv, other=0.0).to(tl.float32)
            wk_c = tl.load(wk + (ic * H + h) * C * K + o_ck, mask=m_tk, other=0.0).to(tl.float32)
            w_c -= tl.dot(wk_c, tl.trans(S), input_precision=PREC)
        else:
            w_c = tl.load(u + (t0 * H + h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        p = tl.dot(q_c, tl.trans(k_c), input_precision=PREC)
        p *= tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        y_c = tl.exp(G)[:, None] * tl.dot(q_c, tl.trans(S), input_precision=PREC)
        y_c += tl.dot(p, w_c, input_precision=PREC)
        tl.store(y + (t0 * H + h) * V + o_tv, (scale * y_c).to(y.dtype.element_ty), mask=m_tv)
        w_end = tl.exp(G_last - G)
        S = tl.exp(G_last) * S + tl.dot(tl.trans(w_c * w_end[:, None]), k_c, input_precision=PREC)
    if STORE_FINAL:
        tl.store(ht + (n * H + h) * V * K + o_vk, S, mask=mvk)


@triton.jit
def _walk_bwd(
    q, k, u, wk, la, hs, dy, dht, dq, dk, du, dwk, dla, dh0, cu, chunk_offsets, scale, TT, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STATE_VALUES: tl.constexpr, USE_DFINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    iv, inh = tl.program_id(0), tl.program_id(1)
    n, h = inh // H, inh % H
    bos, eos = tl.load(cu + n).to(tl.int64), tl.load(cu + n + 1).to(tl.int64)
    boff = tl.load(chunk_offsets + n).to(tl.int64)
    nt = tl.cdiv(eos - bos, C)
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    tc = tl.arange(0, C)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    o_tk = (tc * H)[:, None] * K + ok[None, :]
    o_tv = (tc * H)[:, None] * V + ov[None, :]
    o_ck = tc[:, None] * K + ok[None, :]
    o_cv = tc[:, None] * V + ov[None, :]
    o_vk = ov[:, None] * K + ok[None, :]
    causal = tc[:, None] >= tc[None, :]
    # this V block's partial sums over V (dq, dk, d log alpha, dW_k) go to its own slice
    dq += iv.to(tl.int64) * TT * H * K
    dk += iv.to(tl.int64) * TT * H * K
    dla += iv.to(tl.int64) * TT * H
    dwk += iv.to(tl.int64) * NT * H * C * K
    dS = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_DFINAL:
        dS += tl.load(dht + (n * H + h) * V * K + o_vk, mask=mvk, other=0.0)
    for j in range(nt):
        i = nt - 1 - j
        ic = boff + i
        t0 = bos + i * C
        mt = tc < eos - t0
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        S0 = tl.load(hs + (ic * H + h) * V * K + o_vk, mask=mvk, other=0.0)
        q_c = tl.load(q + (t0 * H + h) * K + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        k_c = tl.load(k + (t0 * H + h) * K + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        dy_c = tl.load(dy + (t0 * H + h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        g = tl.load(la + t0 * H + h + tc * H, mask=mt, other=0.0).to(tl.float32)
        G = tl.cumsum(g, axis=0)
        G_last = tl.sum(g, axis=0)
        w_end = tl.exp(G_last - G)
        if STATE_VALUES:
            w_c = tl.load(u + (ic * H + h) * C * V + o_cv, mask=m_tv, other=0.0).to(tl.float32)
            wk_c = tl.load(wk + (ic * H + h) * C * K + o_ck, mask=m_tk, other=0.0).to(tl.float32)
            w_c -= tl.dot(wk_c, tl.trans(S0), input_precision=PREC)
        else:
            w_c = tl.load(u + (t0 * H + h) * V + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        # the intra-chunk term scale * ((Q K^T) * D) W, one [C, C] matrix at a time: dP gives dq and dk ...
        causal_g = tl.where(causal, G[:, None] - G[None, :], float("-inf"))
        dp = tl.dot(dy_c, tl.trans(w_c), input_precision=PREC) * (scale * tl.exp(causal_g))
        d_q = tl.dot(dp, k_c, input_precision=PREC)
        d_k = tl.dot(tl.trans(dp), q_c, input_precision=PREC)
        # ... and P^T gives dW
        p_t = tl.dot(k_c, tl.trans(q_c), input_precision=PREC) * (scale * tl.exp(tl.trans(causal_g)))
        d_w = tl.dot(p_t, dy_c, input_precision=PREC)
        # the terms through S_0 and S_end
        dy_g = (scale * tl.exp(G))[:, None] * dy_c
        w_d = w_c * w_end[:, None]
        d_w += tl.dot(k_c * w_end[:, None], tl.trans(dS), input_precision=PREC)
        d_q += tl.dot(dy_g, S0, input_precision=PREC)
        d_k += tl.dot(w_d, dS, input_precision=PREC)
        # d log alpha: the chunk's reverse cumulative sum of q.dq - k.dk, plus <dS_end, S_end> for all
        s_end = tl.exp(G_last) * S0 + tl.dot(tl.trans(w_d), k_c, input_precision=PREC)
        d_g = tl.sum(q_c * d_q, axis=1) - tl.sum(k_c * d_k, axis=1)
        d_g = tl.cumsum(d_g, axis=0, reverse=True) + tl.sum(tl.sum(dS * s_end, axis=1), axis=0)
        tl.store(dq + (t0 * H + h) * K + o_tk, d_q, mask=m_tk)
        tl.store(dk + (t0 * H + h) * K + o_tk, d_k, mask=m_tk)
        tl.store(dla + t0 * H + h + tc * H, d_g, mask=mt)
        dS = tl.exp(G_last) * dS + tl.dot(tl.trans(dy_g), q_c, input_precision=PREC)
        if STATE_VALUES:
            # every row of the chunk-major buffers, padding too (zeros there): autograd reads them all
            tl.store(du + (ic * H + h) * C * V + o_cv, d_w.to(du.dtype.element_ty), mask=mv[None, :])
            d_wk = -tl.dot(d_w, S0, input_precision=PREC)
            tl.store(dwk + (ic * H + h) * C * K + o_ck, d_wk, mask=mk[None, :])
            dS -= tl.dot(tl.trans(d_w), wk_c, input_precision=PREC)
        else:
            tl.store(du + (t0 * H + h) * V + o_tv, d_w.to(du.dtype.element_ty), mask=m_tv)
    tl.store(dh0 + (n * H + h) * V * K + o_vk, dS, mask=mvk)


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core products in every case: tf32 for 16-bit inputs (finer than their rounding), and for fp32
    inputs three tf32 products per product ("tf32x3", about fp32 accuracy; plain fp32 "ieee" products do not
    run on tensor cores and spill kilobytes per thread in these kernels)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


NUM_WARPS = 4
MAX_BV = 64  # V block upper bound: the [BV, BK] state and its gradient stay in registers
# The most shared memory one block may use on H100 / H200 (sm_90: 227 KiB). A launch that needs more fails
# with OutOfResources; ``walk_config`` keeps every walk well below it (``kernels.benchmarks.sass_report
# --shared-grid`` measures each configuration, tests/test_kernel_compile.py checks them).
SM90_SHARED_LIMIT = 232448
# Largest [C, D] tile (C * padded head size, in elements) of q, k and (delta rule) W_k that the kernels take:
# 64 x 128. Beyond it even the smallest V blocks without pipelining overflow shared memory (K = 256 at C = 64:
# the walk's backward needs up to 315392 bytes with bf16 inputs, the WY backward 344064).
MAX_TILE = 64 * 128
# Longest chunk: at 128 the [C, C] products overflow too (271360 bytes for the delta rule's fp32 backward at
# K = 16, V = 64).
MAX_CHUNK = 64


class WalkConfig(NamedTuple):
    """Launch constants of one walk: ``BK`` (K padded, never split), ``BV`` (the V block of one program) and
    ``num_stages`` (software pipelining: how many chunks' input tiles are in flight in shared memory)."""

    BK: int
    BV: int
    num_stages: int


def walk_config(K: int, V: int, C: int, dtype: torch.dtype, state_values: bool, backward: bool) -> WalkConfig:
    """The walk's blocks and pipelining depth, chosen so that its shared memory stays below
    ``SM90_SHARED_LIMIT`` with margin (at least 32 KiB left for every K, V in {16, 32, 48, 64, 128, 256}).

    Shared memory is what limits these kernels: every tensor-core product stages an operand tile there (two
    with fp32 inputs, the high and low halves of "tf32x3"), and Triton's pipelining keeps ``num_stages``
    chunks of input tiles in flight. Both grow with the [C, BK] tiles of q and k, hence a rule by C * BK:

    - ``C * BK <= 64 * 64`` (K <= 64 at the default C = 64): V blocks of up to 64 and Triton's default 3
      stages, as before (the baselines' K = 16, V = 32 is unchanged); except the delta rule's backward
      (``state_values``) with fp32 inputs at ``C * BK = 64 * 64``, whose V blocks are at most 32 (with 64:
      262656 bytes, the overflow seen on an H200 at K = V = 64);
    - ``C * BK = 64 * 128`` (K = 128 at C = 64, K = 256 at C = 32): V blocks of 16 and 2 stages (3 stages
      overflow in the forward: 287232 bytes at fp32 with state values);
    - above ``MAX_TILE``, or ``C > MAX_CHUNK``: refused, a smaller ``C`` is needed (``default_chunk_size``).

    ``BV * BK`` stays at most 64 * 64 (the state tile and its gradient live in registers). Measured with
    Triton 3.9 for sm_90 (3.6 gives the same 262656 bytes for the H200's overflow), 4 warps.
    """
    BK = max(16, next_pow2(K))
    if C > MAX_CHUNK or C * BK > MAX_TILE:
        raise ValueError(
            f"chunk_size {C} with K = {K}: the walk's tiles overflow shared memory; use chunk_size <= "
            f"{min(MAX_CHUNK, max(16, MAX_TILE // BK))} (or leave it to default_chunk_size)"
        )
    BV = min(max(16, next_pow2(V)), MAX_BV, max(16, 64 * 64 // BK))
    if C * BK > 64 * 64:
        return WalkConfig(BK, 16, 2)
    if backward and state_values and dtype == torch.float32 and C * BK == 64 * 64:
        BV = min(BV, 32)
    return WalkConfig(BK, BV, 3)


def default_chunk_size(K: int, V: int, state_values: bool) -> int:
    """64, or the largest power of two that keeps the [C, K] tiles (and for the delta rule's WY kernels the
    [C, V] tiles, V whole there) within ``MAX_TILE``: 32 when K (or the delta rule's V) is above 128."""
    D = max(K, V) if state_values else K
    return min(64, max(16, MAX_TILE // max(16, next_pow2(D))))


class ChunkWalkFunction(torch.autograd.Function):
    """Autograd over the two walks. Inputs flattened to ``[1, TT, H, D]``; with ``wk`` given, ``u`` and
    ``wk`` are the delta rule's chunk-major ``U [NT, H, C, V]`` and ``W_k [NT, H, C, K]``, otherwise ``u`` is
    the values ``[1, TT, H, V]``. ``log_alpha`` ``[1, TT, H]`` fp32, ``h0`` ``[N, H, V, K]`` fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, u, wk, log_alpha, h0, scale, layout: SequenceLayout, output_final: bool, C: int):
        _, TT, H, K = q.shape
        V = u.shape[-1]
        state_values = wk is not None
        BK, BV, stages = walk_config(K, V, C, q.dtype, state_values, backward=False)
        N, NT = layout.num_seqs, layout.num_chunks
        hs = q.new_empty(NT, H, V, K, dtype=torch.float32)
        ht = q.new_empty(N, H, V, K, dtype=torch.float32) if output_final else None
        y = q.new_empty(1, TT, H, V)
        _walk_fwd[(triton.cdiv(V, BV), N * H)](
            q, k, u, wk if state_values else u, log_alpha, hs if h0 is None else h0, hs,
            hs if ht is None else ht, y, layout.cu_seqlens, layout.chunk_offsets, scale,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, STATE_VALUES=state_values, USE_INIT=h0 is not None,
            STORE_FINAL=output_final, PREC=dot_precision(q.dtype), num_warps=NUM_WARPS, num_stages=stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, u, wk, log_alpha, hs)
        ctx.meta = (scale, layout, C, h0 is not None)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        q, k, u, wk, log_alpha, hs = ctx.saved_tensors
        scale, layout, C, use_init = ctx.meta
        _, TT, H, K = q.shape
        V = u.shape[-1]
        state_values = wk is not None
        BK, BV, stages = walk_config(K, V, C, q.dtype, state_values, backward=True)
        N, NT = layout.num_seqs, layout.num_chunks
        NV = triton.cdiv(V, BV)
        dy = q.new_zeros(1, TT, H, V) if dy is None else dy.contiguous()
        dq = q.new_empty(NV, TT, H, K, dtype=torch.float32)
        dk = torch.empty_like(dq)
        dla = q.new_empty(NV, TT, H, dtype=torch.float32)
        du = torch.empty_like(u)
        dwk = q.new_empty(NV, *wk.shape, dtype=torch.float32) if state_values else dq
        dh0 = q.new_empty(N, H, V, K, dtype=torch.float32)
        _walk_bwd[(NV, N * H)](
            q, k, u, wk if state_values else u, log_alpha, hs, dy, hs if dht is None else dht.contiguous(),
            dq, dk, du, dwk, dla, dh0, layout.cu_seqlens, layout.chunk_offsets, scale, TT, NT,
            H=H, K=K, V=V, C=C, BK=BK, BV=BV, STATE_VALUES=state_values, USE_DFINAL=dht is not None,
            PREC=dot_precision(q.dtype), num_warps=NUM_WARPS, num_stages=stages,
        )  # fmt: skip
        dwk = _sum_blocks(dwk).to(wk.dtype) if state_values else None
        return (
            _sum_blocks(dq)[None].to(q.dtype), _sum_blocks(dk)[None].to(k.dtype), du, dwk,
            _sum_blocks(dla)[None], dh0 if use_init else None, None, None, None, None,
        )  # fmt: skip


def _sum_blocks(x: Tensor) -> Tensor:
    """The sum of the V blocks' partials (dim 0); a view when there is one block."""
    return x[0] if x.shape[0] == 1 else x.sum(0)


@functools.lru_cache(maxsize=64)
def _dense_layout(B: int, T: int, chunk_size: int, device: torch.device) -> SequenceLayout:
    """A plain batch's layout, built once per shape (a handful of small device tensors)."""
    return sequence_layout(B, T, None, chunk_size, device)


def layout_for(
    B: int, T: int, cu_seqlens: Tensor | None, chunk_size: int, device: torch.device
) -> SequenceLayout:
    """Chunk bookkeeping of a plain batch (cached) or of a varlen batch (``B == 1``)."""
    if cu_seqlens is None:
        return _dense_layout(B, T, chunk_size, device)
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be flattened to B == 1, got B == {B}")
    return sequence_layout(B, T, cu_seqlens, chunk_size, device)


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 16 or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk_size must be a power of two from 16 (tl.dot tiles) to {MAX_CHUNK} (shared memory), "
            f"got {chunk_size}"
        )


def flatten_tokens(x: Tensor) -> Tensor:
    """``[B, T, H, *D]`` -> ``[1, B * T, H, *D]``, contiguous."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Simple GLA through the fused-chunk Triton kernels; same contract as ``naive_recurrent_simple_gla``.

    With ``cu_seqlens`` (``[N + 1]`` token offsets) the batch is flattened (``B == 1``) and the states are
    ``[N, H, V, K]``. ``y`` comes back in the inputs' dtype, the final state in fp32. ``chunk_size``: 64,
    32 for K > 128 (``default_chunk_size``).
    """
    B, T, H, K = q.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(K, v.shape[-1], state_values=False)
    check_chunk_size(chunk_size)
    scale = K**-0.5 if scale is None else float(scale)
    layout = layout_for(B, T, cu_seqlens, chunk_size, q.device)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    q, k, v = flatten_tokens(q), flatten_tokens(k), flatten_tokens(v.to(q.dtype))
    la = flatten_tokens(log_alpha.float())
    y, ht = ChunkWalkFunction.apply(q, k, v, None, la, h0, scale, layout, output_final_state, chunk_size)
    return y.view(B, T, H, -1), ht
