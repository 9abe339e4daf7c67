"""The forward read-out in CUDA C++ (``output_fwd.cu``), built with ``nvcc`` on first use.

Selected by ``chunk.CONFIG["out_kernel"] = "cuda"`` (or ``"auto"``: CUDA where it can run, else Triton). It
writes exactly what ``chunk._output_fwd`` writes (``y`` and, when asked, the variance) from the same inputs
and chunk-boundary states; the Triton kernel stays the portable path. Building and launching:
``cuda_build.py``.
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

SOURCE = Path(__file__).with_name("output_fwd.cu")
MAX_K = 128  # a row of the state within one warp: K / 4 lanes
BLOCKS_PER_SM = 3  # the kernel's register cap (80 a thread at 256 threads, no spills at K <= 128)


def unsupported_reason(K: int, C: int, dtypes: list[torch.dtype]) -> str | None:
    """Why the CUDA read-out cannot take this shape, or ``None`` when it can."""
    if C % 16:
        return f"chunk_size {C} (a multiple of 16)"
    if K > MAX_K:
        return f"K = {K} (at most {MAX_K})"
    if dtypes[0] not in DTYPES or any(d != dtypes[0] for d in dtypes):
        return f"inputs of dtypes {sorted({str(d) for d in dtypes})} (one of fp32, bf16, fp16 for all)"
    return None


def can_run(q: Tensor, k: Tensor, u: Tensor, beta: Tensor, C: int) -> bool:
    """True where ``"auto"`` picks the CUDA read-out: a supported shape and dtypes, CUDA tensors on a device
    with the shared memory it needs, an nvcc, and no failed build earlier in this process."""
    if unsupported_reason(q.shape[-1], C, [x.dtype for x in (q, k, u, beta)]) is not None:
        return False
    return usable(q, output_shape(q.shape[-1], u.shape[-1], C, q.dtype, store_var=True))


@dataclass(frozen=True)
class OutputShape(StateTiled):
    """One compiled configuration and its launch geometry."""

    C: int
    in_t: int
    store_var: bool
    source = SOURCE
    name = "palimpsa_output_fwd"

    @property
    def smem_bytes(self) -> int:
        staged = 16 * (2 * self.KP + 2 * self.BV)  # one 16-token block's inputs, as fp32
        outputs = 16 * self.BV * (2 if self.store_var else 1)
        return 4 * (2 * self.C + staged + outputs)

    def defines(self) -> list[str]:
        values = {
            "KP": self.KP, "BV": self.BV, "R": ROWS_PER_THREAD, "C": self.C, "IN_T": self.in_t,
            "STORE_VAR": int(self.store_var), "MINB": BLOCKS_PER_SM,
        }  # fmt: skip
        return [f"-D{key}={value}" for key, value in values.items()]


def output_shape(K: int, V: int, C: int, dtype: torch.dtype, store_var: bool) -> OutputShape:
    KP, BV = block_shape(K, V)
    return OutputShape(KP, BV, C, DTYPES[dtype], store_var)


def output_fwd(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor, hm: Tensor,
    hi: Tensor, y: Tensor, var: Tensor | None, scale: float, layout: SequenceLayout, C: int,
    launcher: Launcher | None = None,
) -> None:  # fmt: skip
    """Write ``y`` (and ``var`` when given) as ``chunk._output_fwd`` does.

    ``launcher`` runs the kernel (default: on the GPU); the tests pass one that runs the same source on the
    CPU. Its ``args`` are ctypes values in the kernel's parameter order.
    """
    _, _, H, K = q.shape
    V = u.shape[-1]
    reason = unsupported_reason(K, C, [x.dtype for x in (q, k, u, beta)])
    if reason is not None:
        raise CudaUnavailable(f"the CUDA read-out does not take {reason}")
    if launcher is None and not q.is_cuda:
        raise CudaUnavailable("the CUDA read-out needs CUDA tensors")
    shape = output_shape(K, V, C, q.dtype, var is not None)
    ins = [x.contiguous() for x in (q, k, u, beta)]
    tensors = [*ins, log_alpha.contiguous().float(), om.contiguous().float(), ip.contiguous().float(), hm, hi]
    tensors += [y, y if var is None else var, layout.cu_seqlens, layout.chunk_index]
    args = pointer_args(tensors) + [ctypes.c_float(scale), *(ctypes.c_int(n) for n in (H, K, V))]
    grid = (-(-V // shape.BV), layout.num_chunks, H)
    if launcher is None:
        with torch.cuda.device(q.device):
            launch_on_gpu(shape, grid, args)
    else:
        launcher(shape, grid, args)
