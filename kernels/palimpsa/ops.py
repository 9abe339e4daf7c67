"""One entry point for the Palimpsa op: picks the implementation for the device at hand.

``backend`` is resolved by :func:`kernels.backends.explain_backend`: ``"auto"`` (Triton on CUDA tensors, else
torch), ``"reference"`` (the float64-exact recurrence), ``"torch"`` (on CPU the recurrent form for sequences
shorter than ``CPU_CHUNKED_MIN_LEN`` and the chunked torch form for longer ones, whichever is faster; on CUDA
the chunked form) or ``"triton"`` (the Triton kernels; on CPU tensors they run only under
``TRITON_INTERPRET=1``). Triton is imported only when a Triton path is taken, so ``kernels`` stays importable
on machines without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.backends import resolve_backend
from kernels.palimpsa.naive import PalimpsaState, naive_chunk_palimpsa, naive_recurrent_palimpsa
from kernels.palimpsa.utils import autocast_inputs

PREFILL_CHUNKED_MIN = 64  # prompts at least this long go through the chunked forward
# On CPU the step-by-step form wins on short sequences (its per-step state stays in cache), the chunked form
# on long ones (fewer Python steps). Measured fwd+bwd, one thread: B,T,H,K=V = 32,64,2,32: recurrent 160 ms,
# chunked 220 ms; 4,256,2,32: recurrent 248 ms, chunked 133 ms.
CPU_CHUNKED_MIN_LEN = 128


def _per_sequence(fn, q, k, u, beta, log_alpha, ip, scale, init, output_final_state, output_variance, cu):
    """Run a dense-batch implementation on each sequence of a flattened varlen batch (reference paths)."""
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch must be flattened to B == 1, got B == {q.shape[0]}")
    bounds = cu.tolist()
    ys, vs, finals = [], [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        init_n = None if init is None else (init[0][n : n + 1], init[1][n : n + 1])
        part = [x[:, bos:eos] for x in (q, k, u, beta, log_alpha)]
        y, v, f = fn(*part, ip, scale, init_n, output_final_state, output_variance)
        ys.append(y)
        vs.append(v)
        finals.append(f)
    y = torch.cat(ys, dim=1)
    var = torch.cat(vs, dim=1) if output_variance else None
    final = None
    if output_final_state:
        final = (torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
    return y, var, final


def torch_form(device: torch.device, seq_len: int):
    """The torch form of the recurrence that is faster for this length on this device."""
    if device.type != "cuda" and seq_len < CPU_CHUNKED_MIN_LEN:
        return naive_recurrent_palimpsa
    return naive_chunk_palimpsa


@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def palimpsa_attn(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: PalimpsaState | None = None,
    output_final_state: bool = False,
    output_variance: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, PalimpsaState | None]:
    """Palimpsa recurrence (``kernels/palimpsa/README.md``) on ``[B, T, H, D]`` tensors, as
    ``naive_recurrent_palimpsa``.

    ``ip`` is a scalar or a per-head ``[H]`` tensor (gradients flow to it); states are ``(mu, I)`` pairs of
    ``[B, H, V, K]`` fp32 tensors, ``[N, H, V, K]`` with ``cu_seqlens`` (then ``B == 1``).
    """
    impl = resolve_backend("palimpsa", q.device, backend)
    if impl == "triton":
        from kernels.palimpsa.chunk import chunk_palimpsa

        return chunk_palimpsa(
            q,
            k,
            u,
            beta,
            log_alpha,
            ip,
            scale,
            initial_state,
            output_final_state,
            output_variance,
            cu_seqlens,
        )
    fn = naive_recurrent_palimpsa if impl == "reference" else torch_form(q.device, q.shape[1])
    if cu_seqlens is not None:
        return _per_sequence(
            fn,
            q,
            k,
            u,
            beta,
            log_alpha,
            ip,
            scale,
            initial_state,
            output_final_state,
            output_variance,
            cu_seqlens,
        )
    return fn(q, k, u, beta, log_alpha, ip, scale, initial_state, output_final_state, output_variance)


@torch.no_grad()
@torch.compiler.disable  # compiled models call the op as it is: its kernels are already fused
def fused_recurrent_palimpsa(
    q: Tensor,
    k: Tensor,
    u: Tensor,
    beta: Tensor,
    log_alpha: Tensor,
    ip: Tensor | float,
    scale: float | None = None,
    initial_state: PalimpsaState | None = None,
    output_final_state: bool = True,
    output_variance: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None, PalimpsaState | None]:
    """Inference forward (prefill or one-token decode) with the state in and out; no gradients.

    Short inputs (decode) run the fused recurrent kernel; long prompts run the chunked forward.
    """
    impl = resolve_backend("palimpsa", q.device, backend)
    B, T, H, K = q.shape
    if impl != "triton":
        fn = naive_recurrent_palimpsa if impl == "reference" else torch_form(q.device, T)
        return fn(q, k, u, beta, log_alpha, ip, scale, initial_state, output_final_state, output_variance)
    scale = K**-0.5 if scale is None else float(scale)
    if T >= PREFILL_CHUNKED_MIN:
        from kernels.palimpsa.chunk import chunk_palimpsa

        return chunk_palimpsa(
            q, k, u, beta, log_alpha, ip, scale, initial_state, output_final_state, output_variance
        )
    from kernels.palimpsa.fused_recurrent import recurrent_palimpsa_fwd

    q, k, u, beta = autocast_inputs(q, k, u, beta)  # as the chunked forward takes them
    ip_h = torch.as_tensor(ip, device=q.device, dtype=torch.float32)
    ip_h = (ip_h.expand(H) if ip_h.dim() == 0 else ip_h).contiguous()
    return recurrent_palimpsa_fwd(
        q, k, u, beta, log_alpha, ip_h, scale, initial_state, output_final_state, output_variance
    )
