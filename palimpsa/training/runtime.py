"""Where and how a run executes: device, numeric precision, memory readings and stop signals."""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from palimpsa.errors import TrainingError

Autocast = Callable[[], contextlib.AbstractContextManager]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> Autocast:
    """bf16 autocast on GPU by default; fp32 on CPU unless bf16 is asked for. A ``pure_bf16`` model holds
    bf16 weights itself, so it needs no autocast."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_name(requested: str, amp: Autocast) -> str:
    """What ran: ``pure_bf16``, ``bf16`` (autocast) or ``fp32``."""
    if requested == "pure_bf16":
        return "pure_bf16"
    return "bf16" if amp is not contextlib.nullcontext else "fp32"


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileOrEager:
    """Calls ``torch.compile(module)``; if compiling fails on the first call, warns once and calls the module
    eagerly from then on (a machine without a working compiler still trains). ``status`` says which ran."""

    def __init__(self, module: torch.nn.Module):
        self.eager, self.compiled = module, torch.compile(module)
        self.status = "pending"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.status == "eager":
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:
            if self.status == "compiled":
                raise
            self.status = "eager"
            warnings.warn(
                f"torch.compile failed, training eagerly: {type(err).__name__}: {err}"[:400], stacklevel=2
            )
            return self.eager(*args, **kwargs)
        self.status = "compiled"
        return out


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop at the next step boundary (checkpoint, then KILLED).

    A second signal interrupts at once. Only installable from the main thread; elsewhere a no-op.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(self.requested)
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
