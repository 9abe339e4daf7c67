"""Tasks: MQAR, the MAD synthetic suite and language modelling (bytes or BPE tokens).

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
from palimpsa.tasks.lm import LMConfig, build_lm, corpus_fingerprint, resolve_tokenizer
from palimpsa.tasks.mad import MAD_VARIANTS, MADConfig, build_mad, generate_mad
from palimpsa.tasks.metrics import mean_accuracy, sequence_accuracy
from palimpsa.tasks.mqar import MQARConfig, build_mqar, generate_mqar

TASK_CONFIGS: dict[str, type] = {"mqar": MQARConfig, "mad": MADConfig, "lm": LMConfig}

# Builders take (config, seed, cache dir): the LM task keeps a trained tokenizer there.
_BUILDERS: dict[type, Callable[[Any, int, Path | None], TaskData]] = {
    MQARConfig: lambda cfg, seed, _: build_mqar(cfg, seed),
    MADConfig: lambda cfg, seed, _: build_mad(cfg, seed),
    LMConfig: lambda cfg, seed, cache_dir: build_lm(cfg, seed, cache_dir),
}
# What cached data depends on beyond (config, seed): for file corpora, the files themselves.
_FINGERPRINTS: dict[type, Callable[[Any], Any]] = {LMConfig: corpus_fingerprint}


def data_path(cfg: Any, cache_dir: str | Path, seed: int = 0) -> Path:
    """The cache file that holds (or will hold) the data of task ``cfg`` for run seed ``seed``."""
    fingerprint = _FINGERPRINTS.get(type(cfg), lambda _: None)(cfg)
    return cache_path(cache_dir, cfg.name, config_digest(cfg, seed, GENERATOR_VERSION, fingerprint))


def build_task(cfg: Any, cache_dir: str | Path | None = None, seed: int = 0) -> TaskData:
    """Generate (or load from ``cache_dir``) the data of task ``cfg`` for run seed ``seed``."""
    builder = _BUILDERS.get(type(cfg))
    if builder is None:
        raise TypeError(f"not a task config: {type(cfg).__name__}; expected one of {sorted(TASK_CONFIGS)}")
    if cache_dir is None:
        return builder(cfg, seed, None)
    path = data_path(cfg, cache_dir, seed)
    data = load_cached(path)
    if data is None:
        data = builder(cfg, seed, Path(cache_dir))
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
    "data_path",
    "generate_mad",
    "generate_mqar",
    "mean_accuracy",
    "resolve_tokenizer",
    "sequence_accuracy",
]
