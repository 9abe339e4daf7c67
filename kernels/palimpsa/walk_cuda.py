"""The one-pass backward's reverse walk in CUDA C++ (``walk_bwd.cu``), built with ``nvcc`` on first use.

Selected by ``chunk.CONFIG["onepass_walk"] = "cuda"`` (or ``"auto"``: CUDA where it can run, else Triton).
It takes and returns exactly what ``chunk_onepass._walk_bwd`` does, so the scan and the correction kernels
are shared; the Triton walk stays the portable path (and the one Triton's interpreter tests on the CPU).

Building: one cubin per configuration (head sizes, dtype, sub-chunk length), compiled by the ``nvcc`` on
``PATH`` (or under ``CUDA_HOME``) for the device's own architecture and cached in
``$PALIMPSA_CUDA_CACHE`` (default ``~/.cache/palimpsa/cuda``). Launching goes through the CUDA driver
(``libcuda``) with ctypes, on PyTorch's current stream: no compiled Python extension, nothing to install
beyond the CUDA toolkit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kernels.palimpsa.utils import SequenceLayout, next_pow2

SOURCE = Path(__file__).with_name("walk_bwd.cu")
CHUNK = 64  # the kernel's chunk length (checkpoints every 16 tokens)
MAX_K = 128
MAX_SMEM = 227 * 1024  # dynamic shared memory a block may have (sm_90)
ROWS_PER_THREAD = 4
STATE_PER_BLOCK = 4096  # [BV, K] elements a thread block holds: 16 a thread at 256 threads
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SMEM_ATTRIBUTE = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class CudaWalkUnavailable(RuntimeError):
    """The CUDA walk was asked for but cannot run here (no GPU, no nvcc, or an unsupported shape)."""


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate and candidate.exists() else None


def unsupported_reason(K: int, V: int, C: int, dtype: torch.dtype, sub: int) -> str | None:
    """Why the CUDA walk cannot take this shape, or ``None`` when it can."""
    if C != CHUNK:
        return f"chunk_size {C} (the CUDA walk is built for {CHUNK})"
    if K > MAX_K:
        return f"K = {K} (at most {MAX_K})"
    if dtype not in _DTYPES:
        return f"dtype {dtype}"
    if sub not in (1, 2, 4):
        return f"sub-chunk length {sub} (1, 2 or 4: the partial sums of S tokens share the shared memory)"
    return None


_GAVE_UP: list[str] = []  # why "auto" stopped trying the CUDA walk in this process (a failed build)


def give_up(reason: str) -> None:
    """Stop ``"auto"`` from trying the CUDA walk again in this process, with one warning that says why."""
    if not _GAVE_UP:
        warnings.warn(f"the CUDA walk cannot run ({reason}); using the Triton walk", stacklevel=3)
    _GAVE_UP.append(reason)


def can_run(q: Tensor, V: int, C: int, sub: int) -> bool:
    """True where ``"auto"`` picks the CUDA walk: a CUDA tensor, an nvcc, a supported shape, and no failed
    build earlier in this process."""
    shape_ok = unsupported_reason(q.shape[-1], V, C, q.dtype, sub) is None
    return not _GAVE_UP and q.is_cuda and nvcc_path() is not None and shape_ok


@dataclass(frozen=True)
class WalkShape:
    """One compiled configuration and its launch geometry."""

    KP: int  # K padded to a power of two, at least 16
    BV: int  # value rows a block
    S: int
    in_t: int
    has_dvar: bool
    atomic: bool

    @property
    def threads(self) -> int:
        return (self.BV // ROWS_PER_THREAD) * (self.KP // 4)

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
    KP = max(16, next_pow2(K))
    BV = max(32, min(next_pow2(V), STATE_PER_BLOCK // KP))
    atomic = V > BV
    return WalkShape(KP, BV, sub, _DTYPES[dtype], has_dvar, atomic)


def _cache_dir() -> Path:
    root = os.environ.get("PALIMPSA_CUDA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "palimpsa" / "cuda"


@functools.cache
def _cubin(shape: WalkShape, arch: str) -> bytes:
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaWalkUnavailable("the CUDA walk needs nvcc (on PATH or under CUDA_HOME)")
    source = SOURCE.read_bytes()
    flags = ["-cubin", f"-arch={arch}", "-O3", "-std=c++17", *shape.defines()]
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:24]
    out = _cache_dir() / f"walk_bwd_{key}.cubin"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([nvcc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise CudaWalkUnavailable(f"nvcc failed on {SOURCE.name} ({' '.join(flags)}):\n{done.stderr}")
        tmp.replace(out)  # atomic: a concurrent build never leaves half a file
    return out.read_bytes()


class _Driver:
    """The few CUDA driver calls the launch needs."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else status}")

    def function(self, cubin: bytes, smem: int) -> ctypes.c_void_p:
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        name = b"palimpsa_walk_bwd"
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(func), module, name), "cuModuleGetFunction")
        self.check(self.lib.cuFuncSetAttribute(func, _SMEM_ATTRIBUTE, smem), "cuFuncSetAttribute")
        return func

    def launch(self, func, grid: tuple[int, int, int], threads: int, smem: int, args: list) -> None:
        pointers = [ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args]
        params = (ctypes.c_void_p * len(args))(*pointers)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(
            self.lib.cuLaunchKernel(func, *grid, threads, 1, 1, smem, stream, params, None), "cuLaunchKernel"
        )


@functools.cache
def _driver() -> _Driver:
    return _Driver()


@functools.cache
def _function(shape: WalkShape, device: int):
    major, minor = torch.cuda.get_device_capability(device)
    return _driver().function(_cubin(shape, f"sm_{major}{minor}"), shape.smem_bytes)


Launcher = Callable[[WalkShape, tuple[int, int, int], list], None]


def launch_on_gpu(shape: WalkShape, grid: tuple[int, int, int], args: list) -> None:
    """Build (once) and launch the kernel on the current CUDA device and stream."""
    device = torch.cuda.current_device()
    _driver().launch(_function(shape, device), grid, shape.threads, shape.smem_bytes, args)


def walk_bwd(
    q: Tensor, k: Tensor, u: Tensor, beta: Tensor, log_alpha: Tensor, om: Tensor, ip: Tensor,
    hm: Tensor, hi: Tensor, dy: Tensor, dvar: Tensor, has_dvar: bool, scale: float, layout: SequenceLayout,
    C: int, sub: int, launcher: Launcher | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``dq, dk, du, db, dc, dip, lm, li`` as ``chunk_onepass._walk_bwd`` leaves them, and the V blocks.

    ``launcher`` runs the kernel (default: on the GPU); the tests pass one that runs the same source on the
    CPU. Its ``args`` are ctypes values in the kernel's parameter order.
    """
    _, TT, H, K = q.shape
    V = u.shape[-1]
    reason = unsupported_reason(K, V, C, q.dtype, sub)
    if reason is not None:
        raise CudaWalkUnavailable(f"the CUDA walk does not take {reason}")
    if launcher is None and not q.is_cuda:
        raise CudaWalkUnavailable("the CUDA walk needs CUDA tensors")
    ins = [x.contiguous().to(q.dtype) for x in (q, k, u, beta, dy, dvar)]
    shape = walk_shape(K, V, q.dtype, sub, has_dvar)
    if shape.smem_bytes > MAX_SMEM:  # (not reached for K <= 128 and S <= 4)
        raise CudaWalkUnavailable(f"the CUDA walk needs {shape.smem_bytes} bytes of shared memory here")
    NV, NT = -(-V // shape.BV), layout.num_chunks
    kq = torch.float32 if shape.atomic else q.dtype
    fill = torch.zeros if shape.atomic else torch.empty  # atomic: blocks add into it
    dq = fill(q.shape, device=q.device, dtype=kq)
    dk = fill(k.shape, device=q.device, dtype=kq)
    du = torch.empty(u.shape, device=q.device, dtype=q.dtype)
    db = torch.empty(beta.shape, device=q.device, dtype=q.dtype)
    dc = q.new_zeros(NV, TT, H, dtype=torch.float32)  # blocks add their rows' share
    dip = q.new_empty(NV, NT, H, dtype=torch.float64)
    lm = torch.empty_like(hm)
    li = torch.empty_like(hi)
    la = log_alpha.contiguous().float()
    tensors = [*ins[:4], la, om.contiguous().float(), ip.contiguous().float(), hm, hi, *ins[4:]]
    tensors += [dq, dk, du, db, dc, dip, lm, li, layout.cu_seqlens, layout.chunk_index]
    args = [ctypes.c_void_p(x.data_ptr()) for x in tensors]
    args += [ctypes.c_float(scale), *(ctypes.c_int(n) for n in (TT, H, K, V, NT))]
    if launcher is None:
        with torch.cuda.device(q.device):
            launch_on_gpu(shape, (NV, NT, H), args)
    else:
        launcher(shape, (NV, NT, H), args)
    return dq, dk, du.to(u.dtype), db.to(beta.dtype), dc, dip, lm, li, NV
