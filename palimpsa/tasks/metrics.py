"""Accuracy over scored positions (DESIGN §3): per example first, then over examples."""

from __future__ import annotations

import torch

from palimpsa.tasks.base import IGNORE_INDEX


def sequence_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example ``[N]``: mean over its scored positions of ``argmax(logits) == target``.

    Examples without a scored position give NaN, so :func:`mean_accuracy` (a NaN-mean) skips them
    instead of counting them as right or wrong.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & scored
    count = scored.sum(dim=-1).to(torch.float32)
    acc = correct.sum(dim=-1).to(torch.float32) / count.clamp_min(1)
    return torch.where(count > 0, acc, torch.full_like(acc, float("nan")))


def mean_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The task accuracy: mean of :func:`sequence_accuracy` over examples that have a scored position."""
    return float(torch.nanmean(sequence_accuracy(logits, targets)))
