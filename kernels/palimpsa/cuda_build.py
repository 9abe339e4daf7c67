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
from pathlib import Path
from typing import Protocol

import torch

HERE = Path(__file__).parent
HEADERS = sorted(HERE.glob("*.cuh"))  # included by every kernel source
MAX_SMEM = 227 * 1024  # dynamic shared memory a block may have (sm_90)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
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


def usable(on_cuda: bool) -> bool:
    """True where ``"auto"`` may pick a CUDA kernel: CUDA tensors, an nvcc, and no failed build before."""
    return not _GAVE_UP and on_cuda and nvcc_path() is not None


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
    return _driver().function(_cubin(kernel, f"sm_{major}{minor}"), kernel.name, kernel.smem_bytes)


def launch_on_gpu(kernel: Kernel, grid: tuple[int, int, int], args: list) -> None:
    """Build (once) and launch the kernel on the current CUDA device and stream."""
    if kernel.smem_bytes > MAX_SMEM:  # (not reached for K <= 128)
        raise CudaUnavailable(f"{kernel.name} needs {kernel.smem_bytes} bytes of shared memory here")
    device = torch.cuda.current_device()
    _driver().launch(_function(kernel, device), grid, kernel.threads, kernel.smem_bytes, args)


def pointer_args(tensors: list[torch.Tensor]) -> list:
    return [ctypes.c_void_p(x.data_ptr()) for x in tensors]
