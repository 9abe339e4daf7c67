"""On-disk cache of generated task data, keyed by task name and a digest of (config, seed)."""

from __future__ import annotations

from pathlib import Path

import torch

from palimpsa.atomic import atomic_torch_save
from palimpsa.tasks.base import TaskData

# Bump when a generator changes what it emits for the same config and seed: old files stop matching.
GENERATOR_VERSION = 1


def cache_path(cache_dir: str | Path, task_name: str, digest: str) -> Path:
    return Path(cache_dir) / f"{task_name}-{digest[:16]}.pt"


def load_cached(path: Path) -> TaskData | None:
    """The cached data, or None when the file is absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return TaskData(
            **{name: blob[name] for name in TaskData.TENSORS},
            vocab_size=int(blob["vocab_size"]),
            metric=blob["metric"],
        )
    except Exception:  # a torn or foreign file is a cache miss, never an error
        return None


def save_cached(path: Path, data: TaskData) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never half of it."""
    blob = {name: getattr(data, name).contiguous() for name in TaskData.TENSORS}
    blob.update(vocab_size=data.vocab_size, metric=data.metric)
    atomic_torch_save(blob, path)
