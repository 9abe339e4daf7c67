"""The one-pass backward's reverse walk in CUDA C++ (``walk_bwd.cu``), built with ``nvcc`` on first use.

Selected by ``chunk.CONFIG["onepass_walk"] = "cuda"`` (or ``"auto"``: CUDA where it can run, else Triton).
It takes and returns exactly what ``chunk_onepass._walk_bwd`` does, so the scan and the correction kernels
are shared; the Triton walk stays the portable path (and the one Triton's interpreter tests on the CPU).
Building and launching: ``cuda_build.py``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kernels.palimpsa.cuda_build import (
    DTYPES,
    ROWS_PER_THREAD,
    CudaUnavailable,
    Launcher,
    StateTiled,
    block_shape,
    launch_on_gpu,
    pointer_args,
    usable,
)
from kernels.palimpsa.utils import SequenceLayout

SOURCE = Path(__file__).with_name("walk_bwd.cu")
CHUNK = 64  # the kernel's chunk length (checkpoints every 16 tokens)
MAX_K = 128


def unsupported_reason(K: int, V: int, C: int, dtype: torch.dtype, sub: int) -> str | None:
    """Why the CUDA walk cannot take this shape, or ``None`` when it can."""
    if C != CHUNK:
        return f"chunk_size {C} (the CUDA walk is built for {CHUNK})"
    if K > MAX_K:
        return f"K = {K} (at most {MAX_K})"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    if sub not in (1, 2, 4):
        return f"sub-chunk length {sub} (1, 2 or 4: the partial sums of S tokens share the shared memory)"
    return None


def can_run(q: Tensor, V: int, C: int, sub: int) -> bool:
    """True where ``"auto"`` picks the CUDA walk: a supported shape, a CUDA tensor on a device with the shared
    memory it needs, an nvcc, and no failed build earlier in this process."""
    if unsupported_reason(q.shape[-1], V, C, q.dtype, sub) is not None:
        return False
    return usable(q, walk_shape(q.shape[-1], V, q.dtype, sub, has_dvar=True))  # (the larger of the two)


@dataclass(frozen=True)
class WalkShape(StateTiled):
    """One compiled configuration and its launch geometry."""

    S: int
    in_t: int
    has_dvar: bool
    atomic: bool
    source = SOURCE
    name = "palimpsa_walk_bwd"

    @property
    def smem_bytes(self) -> int:
        E = ROWS_PER_THREAD * 4
        lr, rg = self.KP // 4, self.BV // ROWS_PER_THREAD
        floats = 64 + (CHUNK // 16 - 1) * 2 * E * self.threads + self.S * lr * (self.BV + 1) * 4
        floats += self.S * rg * self.KP * 2 + 3 * CHUNK
        floats += 16 * (2 * self.KP + (4 if self.has_dvar else 3) * self.BV)  # one block's inputs, as fp32
        return 4 * floats

    def defines(self) -> list[str]:
        values = {
            "KP": self.KP, "BV": self.BV, "R": ROWS_PER_THREAD, "S": self.S, "C": CHUNK, "IN_T": self.in_t,
            "HAS_DVAR": int(self.has_dvar), "ATOMIC": int(self.atomic),
        }  # fmt: skip
        return [f"-D{key}={value}" for key, value in values.items()]


def walk_shape(K: int, V: int, dtype: torch.dtype, sub: int, has_dvar: bool) -> WalkShape:
    KP, BV = block_shape(K, V)
    atomic = V > BV
    return WalkShape(KP, BV, sub, DTYPES[dtype], has_dvar, atomic)


def walk_bwd(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor,
    hm: Tensor, hi: Tensor, dy: Tensor, dvar: Tensor, has_dvar: bool, scale: float, layout: SequenceLayout,
    C: int, sub: int, in_place: bool = False, launcher: Launcher | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``dq, dk, du, db, dc, dip, ps, lm, li`` as ``chunk_onepass._walk_bwd`` leaves them, and the V blocks;
    ``in_place``: the pulls ``lm, li`` over ``hm, hi`` (a thread reads its elements of the boundary state
    before it writes its pull there).

    ``launcher`` runs the kernel (default: on the GPU); the tests pass one that runs the same source on the
    CPU. Its ``args`` are ctypes values in the kernel's parameter order.
    """
    _, TT, H, K = q.shape
    V = u.shape[-1]
    reason = unsupported_reason(K, V, C, q.dtype, sub)
    if reason is not None:
        raise CudaUnavailable(f"the CUDA walk does not take {reason}")
    if launcher is None and not q.is_cuda:
        raise CudaUnavailable("the CUDA walk needs CUDA tensors")
    ins = [x.contiguous().to(q.dtype) for x in (q, k, u, beta, dy, dvar)]
    shape = walk_shape(K, V, q.dtype, sub, has_dvar)
    NV, NT = -(-V // shape.BV), layout.num_chunks
    kq = torch.float32 if shape.atomic else q.dtype
    fill = torch.zeros if shape.atomic else torch.empty  # atomic: blocks add into it
    dq = fill(q.shape, device=q.device, dtype=kq)
    dk = fill(k.shape, device=q.device, dtype=kq)
    du = torch.empty(u.shape, device=q.device, dtype=q.dtype)
    db = torch.empty(beta.shape, device=q.device, dtype=q.dtype)
    dc = q.new_zeros(NV, TT, H, dtype=torch.float32)  # blocks add their rows' share
    dip = q.new_empty(NV, NT, H, dtype=torch.float64)
    ps = torch.empty_like(dip)
    lm, li = (hm, hi) if in_place else (torch.empty_like(hm), torch.empty_like(hi))
    la = log_alpha.contiguous().float()
    tensors = [*ins[:4], la, om.contiguous().float(), ip.contiguous().float(), hm, hi, *ins[4:]]
    tensors += [dq, dk, du, db, dc, dip, ps, lm, li, layout.cu_seqlens, layout.chunk_index]
    args = pointer_args(tensors)
    args += [ctypes.c_float(scale), *(ctypes.c_int(n) for n in (TT, H, K, V, NT))]
    if launcher is None:
        with torch.cuda.device(q.device):
            launch_on_gpu(shape, (NV, NT, H), args)
    else:
        launcher(shape, (NV, NT, H), args)
    return dq, dk, du.to(u.dtype), db.to(beta.dtype), dc, dip, ps, lm, li, NV
