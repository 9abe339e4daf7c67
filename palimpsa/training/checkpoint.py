"""Run state and checkpoints: what a killed job needs to finish with the metrics of an uninterrupted run.

A checkpoint is the model's own checkpoint (:func:`palimpsa.model.save_model`: config, weights, vocab)
plus the optimizer state, the RNG states and :class:`TrainState`. Resuming refuses a checkpoint written by
a different config, except for keys that do not change the math (:data:`RESUME_IGNORED`).
"""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from palimpsa.config import RunConfig, config_from_dict, config_to_dict
from palimpsa.errors import CheckpointError, TrainingError
from palimpsa.io import flatten
from palimpsa.model import read_checkpoint, save_model

CHECKPOINT_FORMAT = 2
# Config keys that may differ between a checkpoint and the resuming job: they do not change the math.
RESUME_IGNORED = (
    "tracking.",
    "train.num_threads",
    "train.device",
    "train.checkpoint_every",
    "train.log_every",
    "train.compile",
)


@dataclass
class TrainState:
    """Everything besides model and optimizer tensors that a resumed job needs."""

    step: int = 0
    best_val_loss: float | None = None
    best_val_accuracy: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0  # summed over sessions, up to the last checkpoint of each
    train_seconds: float = 0.0  # forward/backward/update only: the throughput denominator
    tokens: int = 0
    mlflow_run_id: str | None = None
    # running sums of the training loss since the last eval and the last log line, so a resumed run
    # logs the same means as an uninterrupted one
    loss_sum_since_eval: float = 0.0
    steps_since_eval: int = 0
    loss_sum_since_log: float = 0.0
    steps_since_log: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np = sys.modules.get("numpy")  # only matters if something loaded it
    if np is not None:
        np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_diff(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """``key: old -> new`` for every key that changes the math. The saved config is read through the
    current schema first, so a key added since (at its default) is not a difference."""
    a = flatten(config_to_dict(config_from_dict(saved)))
    b = flatten(config_to_dict(current))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not any(k == p or k.startswith(p) for p in RESUME_IGNORED)
    ]


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, state: TrainState
) -> None:
    extra = {"format": CHECKPOINT_FORMAT, "optimizer": optimizer.state_dict(), "rng": rng_state()}
    save_model(path, model, cfg, trainer=asdict(state), **extra)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig
) -> TrainState:
    """Restore model, optimizer and RNG from ``path``; the run state to continue from."""
    blob = read_checkpoint(path)
    if blob.get("format") != CHECKPOINT_FORMAT or "trainer" not in blob:
        raise CheckpointError(
            path, "holds no trainer state of this version to resume from; use another --out"
        )
    diff = config_diff(blob["config"], cfg)
    if diff:
        raise TrainingError(
            f"{path}: written by a different config ({'; '.join(diff[:3])}); "
            "use another --out or delete the folder"
        )
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["trainer"])
