"""Validation: loss over scored positions, recall accuracy, and recall by key-to-query distance."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palimpsa.diagnostics import collect_diagnostics
from palimpsa.model import load_model
from palimpsa.tasks import IGNORE_INDEX, TaskData, build_task, sequence_accuracy
from palimpsa.tasks.metrics import query_distances, recall_by_gap
from palimpsa.training.batches import scored_positions
from palimpsa.training.runtime import Autocast, autocast_for, resolve_device


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL over scored positions and their count, both on the device (a batch without any gives 0)."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


class ValidationSet:
    """The validation examples on the device, with their scored positions and query distances when every
    example scores the same number of positions (computed once, reused at every eval)."""

    def __init__(self, data: TaskData, device: torch.device):
        positions = scored_positions(data.val_targets)
        self.inputs = data.val_inputs.to(device)
        self.metric = data.metric
        if positions is None:
            self.targets, self.positions, self.distances = data.val_targets.to(device), None, None
        else:
            self.targets = data.val_targets.gather(1, positions).to(device)
            self.distances = query_distances(data.val_inputs, positions)
            self.positions = positions.to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, val: ValidationSet, batch_size: int, amp: Autocast = contextlib.nullcontext
) -> dict[str, float]:
    """``val_loss`` (token-weighted NLL over scored positions); for recall tasks ``val_accuracy`` (per
    example, then over examples) and ``recall_gap.<lo>-<hi>`` (accuracy by key-to-query distance)."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=val.inputs.device)
    count = torch.zeros((), dtype=torch.long, device=val.inputs.device)
    accs, correct = [], []
    for start in range(0, val.inputs.shape[0], batch_size):
        x, y = val.inputs[start : start + batch_size], val.targets[start : start + batch_size]
        pos = None if val.positions is None else val.positions[start : start + batch_size]
        with amp():
            logits = model(x, positions=pos)
        loss, n = masked_cross_entropy(logits, y)
        nll, count = nll + loss, count + n
        if val.metric == "accuracy":
            accs.append(sequence_accuracy(logits.float(), y).cpu())
            if pos is not None:
                correct.append((logits.argmax(-1) == y).cpu())
    model.train(was_training)
    out = {"val_loss": float(nll) / max(int(count), 1)}
    if val.metric == "accuracy":
        out["val_accuracy"] = float(torch.nanmean(torch.cat(accs)))
        if correct and val.distances is not None:
            out.update(recall_by_gap(torch.cat(correct), val.distances))
    return out


def evaluate_checkpoint(
    path: str | Path, data_dir: str | Path | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Validation metrics and diagnostics of a saved model, on the task and seed its config names."""
    model, cfg = load_model(path)
    dev = resolve_device(device)
    model.to(dev)
    data = build_task(cfg.task, data_dir, cfg.seed)
    amp = autocast_for(dev, cfg.train.precision)
    metrics = evaluate(model, ValidationSet(data, dev), cfg.train.batch_size * 2, amp)
    diag = collect_diagnostics(model, data.val_inputs, dev)
    return {"checkpoint": str(path), "name": cfg.name, "metric": data.metric, **metrics, **diag}
