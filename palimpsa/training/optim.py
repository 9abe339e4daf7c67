"""AdamW parameter groups and the learning-rate schedules, as pure functions of the config and the step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from palimpsa.config import TrainConfig

NO_DECAY_PARTS = ("norm", "embed")  # any module on a parameter's path whose name contains these


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only for projection matrices (``weight_decay_on: matrices``).

    Never for 1-D parameters (biases, norm weights, per-head gates), parameters a layer marks with
    ``_no_weight_decay`` (gates whatever their shape), or anything inside a norm or an embedding.
    """
    if param.ndim < 2 or getattr(param, "_no_weight_decay", False):
        return False
    return not any(s in part.lower() for part in name.split(".")[:-1] for s in NO_DECAY_PARTS)


def param_groups(model: nn.Module, weight_decay: float, decay_on: str = "matrices") -> list[dict[str, Any]]:
    """Two AdamW groups; tied parameters appear once (``named_parameters`` de-duplicates).

    ``decay_on="all"`` puts every parameter in the decayed group, as a plain ``AdamW(model.parameters())``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decay_on == "all" or decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, train.weight_decay, train.weight_decay_on)
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for update ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_lr_factor(step: int, warmup: int, steps_per_epoch: int, epochs: int, min_ratio: float) -> float:
    """Cosine over epochs, constant within one: epoch ``e`` trains at ``min + (1-min)(1 + cos(pi e/E)) / 2``
    (PyTorch's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch); an optional linear warmup first."""
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def learning_rate(train: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The lr of update ``step`` under the config's schedule."""
    if train.schedule == "epoch_cosine":
        factor = epoch_lr_factor(step, train.warmup_steps, steps_per_epoch, train.epochs, train.min_lr_ratio)
    else:
        factor = lr_factor(step, train.warmup_steps, total_steps, train.min_lr_ratio)
    return train.lr * factor
