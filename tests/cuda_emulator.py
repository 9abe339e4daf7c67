"""Run the op's CUDA kernels (``kernels/palimpsa/*.cu``) on the CPU, for tests.

A kernel's own source is compiled by the host C++ compiler against ``cuda_emulation/`` (a few CUDA
built-ins: one thread per CUDA thread, barriers for ``__syncthreads`` and warp shuffles) and launched through
the same argument list its Python wrapper (``walk_cuda.walk_bwd``, ``output_cuda.output_fwd``) gives the GPU.
Slow, but the indexing, masking and arithmetic it runs are the kernel's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from kernels.palimpsa import cuda_build

HERE = Path(__file__).with_name("cuda_emulation")


def compiler() -> str:
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        raise RuntimeError("the CPU emulation of the CUDA kernels needs a C++20 compiler (g++) on PATH")
    return found


@functools.cache
def _library(kernel: cuda_build.Kernel) -> ctypes.CDLL:
    flags = ["-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas"]
    flags += ["-I", str(HERE), "-I", str(kernel.source.parent), "-include", "cuda_emulation.h"]
    flags += [f'-DKERNEL_SOURCE="{kernel.source.name}"', f"-DKERNEL={kernel.name}", *kernel.defines()]
    sources = [HERE / "launch.cpp", kernel.source, *cuda_build.HEADERS, *HERE.glob("*.h")]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + " ".join(flags).encode()).hexdigest()
    out = Path(tempfile.gettempdir()) / "palimpsa-cuda-emulation" / f"{kernel.source.stem}_{key[:24]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.so")
        done = subprocess.run(
            [compiler(), *flags, str(HERE / "launch.cpp"), "-o", str(tmp)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"compiling {kernel.source.name} for the CPU failed:\n{done.stderr}")
        tmp.replace(out)
    lib = ctypes.CDLL(str(out))
    lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    if lib.emu_threads() != kernel.threads:
        raise RuntimeError(
            f"the kernel runs {lib.emu_threads()} threads, its wrapper launches {kernel.threads}"
        )
    return lib


def launch(kernel: cuda_build.Kernel, grid: tuple[int, int, int], args: list) -> None:
    """A ``cuda_build.Launcher`` that runs the kernel on the CPU."""
    pointers = [ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args]
    params = (ctypes.c_void_p * len(args))(*pointers)
    _library(kernel).emu_launch(params, *grid)
