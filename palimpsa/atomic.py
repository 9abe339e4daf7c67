"""Atomic file writes: a crash, a kill or a full disk leaves the old file or the new one, never half of one.

Every output that something else waits on (checkpoints, cached datasets, metrics.json that Snakemake
watches) goes through here.

Files the project creates are readable by their owner only (mode 600): checkpoints and stores hold what
others should not read unasked. ``$PALIMPSA_FILE_MODE`` says otherwise (octal: ``640`` shares with the
group, ``644`` with everyone); :func:`file_mode` reads it and :func:`private_file` applies it to the
stores that libraries create (SQLite databases, Optuna journals).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from palimpsa.errors import ConfigError

FILE_MODE_ENV = "PALIMPSA_FILE_MODE"
DEFAULT_FILE_MODE = 0o600


def file_mode() -> int:
    """The mode of new files: ``$PALIMPSA_FILE_MODE`` (octal) or owner-only. The owner must keep read and
    write (jobs rewrite their files) and nobody gets execute bits."""
    text = os.environ.get(FILE_MODE_ENV, "").strip()
    if not text:
        return DEFAULT_FILE_MODE
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if mode < 0 or mode & ~0o666 or mode & 0o600 != 0o600:
        raise ConfigError(FILE_MODE_ENV, f"must be an octal mode from 600 to 666 such as 640, got {text!r}")
    return mode


def private_file(path: str | Path) -> Path:
    """Create ``path`` (and its folder) empty with :func:`file_mode` before a library opens it, or bring
    our own existing file to that mode; a file owned by someone else is left alone."""
    path = Path(path)
    mode = file_mode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    info = path.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o777 != mode:
        os.chmod(path, mode)  # also when the umask took bits off at creation
    return path


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Text through :func:`atomic_write`."""
    atomic_write(path, lambda handle: handle.write(text))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)
