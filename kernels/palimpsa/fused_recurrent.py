"""Fused recurrent Triton kernel for inference: prefill and single-token decode with state in and out.

One program per (sequence, head, V block) holds ``M`` and ``Ibar`` in registers and walks the tokens; no
backward. For long prefills the chunked forward is faster (it parallelises over chunks), so the entry point
in ``ops`` sends prompts longer than ``PREFILL_CHUNKED_MIN`` there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.palimpsa.utils import next_pow2


@triton.jit
def _recurrent_fwd(
    q, k, u, beta, la, ip, h0m, h0i, y, var, hTm, hTi, T, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_VAR: tl.constexpr,
):  # fmt: skip
    iv, inh = tl.program_id(0), tl.program_id(1)
    n, h = inh // H, inh % H
    ov = iv * BV + tl.arange(0, BV)
    ok = tl.arange(0, BK)
    mv, mk = ov < V, ok < K
    mvk = mv[:, None] & mk[None, :]
    s_vk = (n * H + h) * V * K + ov[:, None] * K + ok[None, :]
    p = tl.load(ip + h).to(tl.float32)
    sm = tl.zeros([BV, BK], dtype=tl.float32)
    si = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_INIT:  # the state travels as (mu, I)
        i0 = tl.load(h0i + s_vk, mask=mvk, other=1.0)
        sm += tl.load(h0m + s_vk, mask=mvk, other=0.0) * i0
        si += tl.where(mvk, i0 - p, 0.0)
    for t in range(T):
        tok = n.to(tl.int64) * T + t
        a = tl.exp(tl.load(la + tok * H + h).to(tl.float32))
        kt = tl.load(k + (tok * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        qt = tl.load(q + (tok * H + h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        ut = tl.load(u + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        bt = tl.load(beta + (tok * H + h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        sm = a * sm + ut[:, None] * kt[None, :]
        si = a * si + bt[:, None] * (kt * kt)[None, :]
        r = 1.0 / (si + p)
        yt = tl.sum(sm * r * qt[None, :], axis=1) * scale
        tl.store(y + (tok * H + h) * V + ov, yt.to(y.dtype.element_ty), mask=mv)
        if STORE_VAR:
            vt = tl.sum(r * (qt * qt)[None, :], axis=1) * (scale * scale)
            tl.store(var + (tok * H + h) * V + ov, vt.to(var.dtype.element_ty), mask=mv)
    if STORE_FINAL:
        ifin = si + p
        tl.store(hTm + s_vk, sm / ifin, mask=mvk)
        tl.store(hTi + s_vk, ifin, mask=mvk)


def recurrent_palimpsa_fwd(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor,
    scale: float,
    initial_state: tuple[Tensor, Tensor] | None,
    output_final_state: bool,
    output_variance: bool,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
    """Token-by-token forward of ``[B, T, H, *]`` inputs; ``ip`` is a float32 ``[H]`` tensor."""
    B, T, H, K = q.shape
    V = u.shape[-1]
    q, k, u, beta, log_alpha = (x.contiguous() for x in (q, k, u, beta, log_alpha))
    BK = max(16, next_pow2(K))
    BV = min(max(next_pow2(V), 8), 32 if BK <= 64 else 16 if BK <= 128 else 8)
    y = torch.empty_like(u, dtype=q.dtype)
    var = torch.empty_like(y) if output_variance else None
    final = None
    if output_final_state:
        final = (q.new_empty(B, H, V, K, dtype=torch.float32), q.new_empty(B, H, V, K, dtype=torch.float32))
    use_init = initial_state is not None
    h0 = tuple(s.float().contiguous() for s in initial_state) if use_init else (y, y)
    out = final if final is not None else (y, y)
    _recurrent_fwd[(triton.cdiv(V, BV), B * H)](
        q, k, u, beta, log_alpha, ip, h0[0], h0[1], y, y if var is None else var, out[0], out[1], T,
        scale,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INIT=use_init, STORE_FINAL=output_final_state,
        STORE_VAR=output_variance, num_warps=4,
    )  # fmt: skip
    return y, var, final
