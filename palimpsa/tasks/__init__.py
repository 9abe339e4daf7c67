"""Tasks: MQAR, the MAD synthetic suite and byte-level language modelling.

``build_task(cfg, cache_dir, seed)`` turns a task config (one of :data:`TASK_CONFIGS`) into
:class:`TaskData`; generation is seeded by (seed, config) and cached on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from palimpsa.errors import TaskError
from palimpsa.tasks.base import IGNORE_INDEX, TaskData, config_digest
from palimpsa.tasks.cache import GENERATOR_VERSION, cache_path, load_cached, save_cached
from palimpsa.tasks.lm import LMConfig, build_lm, corpus_fingerprint
from palimpsa.tasks.mad import MAD_VARIANTS, MADConfig, build_mad, generate_mad
from palimpsa.tasks.metrics import mean_accuracy, sequence_accuracy
from palimpsa.tasks.mqar import MQARConfig, build_mqar, generate_mqar

TASK_CONFIGS: dict[str, type] = {"mqar": MQARConfig, "mad": MADConfig, "lm": LMConfig}

_BUILDERS: dict[type, Callable[[Any, int], TaskData]] = {
    MQARConfig: build_mqar,
    MADConfig: build_mad,
    LMConfig: build_lm,
}
# What cached data depends on beyond (config, seed): for file corpora, the files themselves.
_FINGERPRINTS: dict[type, Callable[[Any], Any]] = {LMConfig: corpus_fingerprint}


def build_task(cfg: Any, cache_dir: str | Path | None = None, seed: int = 0) -> TaskData:
    """Generate (or load from ``cache_dir``) the data of task ``cfg`` for run seed ``seed``."""
    builder = _BUILDERS.get(type(cfg))
    if builder is None:
        raise TypeError(f"not a task config: {type(cfg).__name__}; expected one of {sorted(TASK_CONFIGS)}")
    if cache_dir is None:
        return builder(cfg, seed)
    fingerprint = _FINGERPRINTS.get(type(cfg), lambda _: None)(cfg)
    path = cache_path(cache_dir, cfg.name, config_digest(cfg, seed, GENERATOR_VERSION, fingerprint))
    data = load_cached(path)
    if data is None:
        data = builder(cfg, seed)
        save_cached(path, data)
    return data


__all__ = [
    "IGNORE_INDEX",
    "MAD_VARIANTS",
    "TASK_CONFIGS",
    "LMConfig",
    "MADConfig",
    "MQARConfig",
    "TaskData",
    "TaskError",
    "build_task",
    "generate_mad",
    "generate_mqar",
    "mean_accuracy",
    "sequence_accuracy",
]
