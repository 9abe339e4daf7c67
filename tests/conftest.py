"""Session-wide test setup.

Without a GPU, Triton kernels run in Triton's interpreter, which must be switched on before triton is first
imported; importing the project's ops can import it (torch's compiler, which the ops opt out of, loads it),
so the switch is set here, before any test module is collected.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def config():
    """The Triton kernels' ``chunk.CONFIG``, restored after the test (tests change launch and backward
    settings through it)."""
    from kernels.palimpsa import chunk  # imported late: the interpreter switch above comes first

    saved = dict(chunk.CONFIG)
    yield chunk.CONFIG
    chunk.CONFIG.clear()
    chunk.CONFIG.update(saved)
