"""Building and launching the op's CUDA C++ kernels (``walk_bwd.cu``, ``output_fwd.cu``).

Each kernel is compiled by the ``nvcc`` on ``PATH`` (or under ``CUDA_HOME``) on first use, one cubin per
configuration (head sizes, dtype, options as ``-D`` defines) for the device's own architecture, and cached
in ``$PALIMPSA_CUDA_CACHE`` (default ``~/.cache/palimpsa/cuda``). Launching goes through the CUDA driver
(``libcuda``) with ctypes, on PyTorch's current stream: no compiled Python extension, nothing to install
beyond the CUDA toolkit. Where a kernel cannot be built, ``"auto"`` settings give up on the CUDA kernels for
the rest of the process with one warning, and the Triton kernels run instead.
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
from typing import Protocol

import torch

from kernels.palimpsa.utils import next_pow2

HERE = Path(__file__).parent
HEADERS = sorted(HERE.glob("*.cuh"))  # included by every kernel source
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS_PER_THREAD = 4  # each thread holds ROWS_PER_THREAD x 4 elements of the [V, K] state
STATE_PER_BLOCK = 4096  # [BV, K] elements a thread block holds: 16 a thread at 256 threads
_SMEM_ATTRIBUTE = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class CudaUnavailable(RuntimeError):
    """A CUDA kernel was asked for but cannot run here (no GPU, no nvcc, or an unsupported shape)."""


class Kernel(Protocol):
    """One compiled configuration of a kernel and its launch geometry (hashable: builds are cached by it)."""

    @property
    def source(self) -> Path: ...
    @property
    def name(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def smem_bytes(self) -> int: ...
    def defines(self) -> list[str]: ...


# runs a kernel: (configuration, grid, ctypes arguments in the kernel's parameter order)
Launcher = Callable[[Kernel, tuple[int, int, int], list], None]


@dataclass(frozen=True)
class StateTiled:
    """A configuration whose thread block holds a ``[BV, KP]`` tile of the state, ``ROWS_PER_THREAD x 4``
    elements a thread (the two kernels' shared launch geometry)."""

    KP: int  # K padded to a power of two, at least 16
    BV: int  # value rows a block

    @property
    def threads(self) -> int:
        return (self.BV // ROWS_PER_THREAD) * (self.KP // 4)


def block_shape(K: int, V: int) -> tuple[int, int]:
    """``(KP, BV)``: K padded to a power of two (at least 16) and the value rows of a thread block."""
    KP = max(16, next_pow2(K))
    return KP, max(32, min(next_pow2(V), STATE_PER_BLOCK // KP))


@functools.cache
def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate and candidate.exists() else None


_GAVE_UP: list[str] = []  # why "auto" stopped trying the CUDA kernels in this process (a failed build)


def give_up(reason: str) -> None:
    """Stop ``"auto"`` from trying the CUDA kernels again in this process, with one warning that says why."""
    if not _GAVE_UP:
        warnings.warn(f"the CUDA kernels cannot run ({reason}); using the Triton kernels", stacklevel=3)
    _GAVE_UP.append(reason)


def usable(x: torch.Tensor, kernel: Kernel) -> bool:
    """True where ``"auto"`` may pick this kernel for tensors like ``x``: on a CUDA device whose blocks may
    have the shared memory it needs, with an nvcc, and no failed build before."""
    return not _GAVE_UP and x.is_cuda and nvcc_path() is not None and fits(kernel, x.device)


def fits(kernel: Kernel, device: torch.device) -> bool:
    """Whether a block of ``kernel`` gets the shared memory it asks for on ``device`` (227 KiB on sm_90,
    163 KiB on sm_80, 99 KiB on sm_86 and sm_89)."""
    return kernel.smem_bytes <= torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def run_or_fall_back(setting: str, cuda: Callable[[], object], triton: Callable[[], object]) -> object:
    """``cuda()``; where it cannot run, an error if the setting asked for "cuda", else (under "auto") one
    warning, no further tries in this process, and ``triton()``."""
    try:
        return cuda()
    except CudaUnavailable as exc:
        if setting == "cuda":
            raise
        give_up(str(exc))
    return triton()


def _cache_dir() -> Path:
    root = os.environ.get("PALIMPSA_CUDA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "palimpsa" / "cuda"


@functools.cache
def _cubin(kernel: Kernel, arch: str) -> bytes:
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaUnavailable("the CUDA kernels need nvcc (on PATH or under CUDA_HOME)")
    source = b"".join(p.read_bytes() for p in (kernel.source, *HEADERS))
    flags = ["-cubin", f"-arch={arch}", "-O3", "-std=c++17", *kernel.defines()]
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:24]
    out = _cache_dir() / f"{kernel.source.stem}_{key}.cubin"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        command = [nvcc, *flags, str(kernel.source), "-o", str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CudaUnavailable(f"nvcc failed on {kernel.source.name} ({' '.join(flags)}):\n{done.stderr}")
        tmp.replace(out)  # atomic: a concurrent build never leaves half a file
    return out.read_bytes()


class _Driver:
    """The few CUDA driver calls a launch needs."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else status}")

    def function(self, cubin: bytes, name: str, smem: int) -> ctypes.c_void_p:
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        found = self.lib.cuModuleGetFunction(ctypes.byref(func), module, name.encode())
        self.check(found, "cuModuleGetFunction")
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
def _function(kernel: Kernel, device: int):
    major, minor = torch.cuda.get_device_capability(device)
    cubin = _cubin(kernel, f"sm_{major}{minor}")
    try:
        return _driver().function(cubin, kernel.name, kernel.smem_bytes)
    except RuntimeError as exc:  # a module this device or driver cannot load
        raise CudaUnavailable(f"loading {kernel.source.name}: {exc}") from exc


def launch_on_gpu(kernel: Kernel, grid: tuple[int, int, int], args: list) -> None:
    """Build (once) and launch the kernel on the current CUDA device and stream."""
    device = torch.cuda.current_device()
    if not fits(kernel, torch.device("cuda", device)):
        raise CudaUnavailable(f"{kernel.name} needs {kernel.smem_bytes} bytes of shared memory a block here")
    _driver().launch(_function(kernel, device), grid, kernel.threads, kernel.smem_bytes, args)


def pointer_args(tensors: list[torch.Tensor]) -> list:
    return [ctypes.c_void_p(x.data_ptr()) for x in tensors]
