"""Importance-state diagnostics of a trained model, collected at every eval and at the end of a run.

The model computes them (``PalimpsaLM.importance_diagnostics``: quantiles of I/Ip, the fraction of
consolidated synapses, the memory horizon 1/(1 - alpha) per layer and head); this module picks the
probe batch, keeps only finite numbers (they become MLflow metrics) and renders a one-line summary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

PROBE_EXAMPLES = 16  # a small fixed slice of the validation set: cheap, and the same at every eval


@torch.no_grad()
def collect_diagnostics(
    model: nn.Module, inputs: torch.Tensor, device: torch.device | str, amp: Any = None
) -> dict[str, float]:
    """Flat ``{"diag.l0.h1.consolidated": ..., "diag.horizon": ...}`` on the first validation examples.

    Runs in fp32 (``amp`` is accepted for symmetry and ignored): quantiles of a precision ratio in bf16
    would be too coarse to compare runs. Models without an importance state give only what applies.
    """
    probe = getattr(model, "importance_diagnostics", None)
    if probe is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        raw = probe(inputs[:PROBE_EXAMPLES].to(device).long())
    finally:
        model.train(was_training)
    return {str(k): float(v) for k, v in raw.items() if v is not None and math.isfinite(float(v))}


def summary(diag: dict[str, float]) -> str:
    """``horizon 12.3  consolidated 0.41``: the model-wide aggregates, for progress lines."""
    parts = [
        f"{key[len('diag.') :]} {diag[key]:.3g}"
        for key in ("diag.horizon", "diag.consolidated")
        if key in diag
    ]
    return "  ".join(parts)
