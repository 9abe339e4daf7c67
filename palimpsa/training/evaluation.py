"""Validation: loss over scored positions, recall accuracy, recall by key-to-query distance, and for
language modelling the loss by position in the context and the unigram (chance) loss."""

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
from palimpsa.tasks.metrics import gap_bin, query_distances, recall_by_gap
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


def position_bin(position: int) -> str:
    """Power-of-two bin of a 0-based position in the context: 0 -> ``0-0``, 1 -> ``1-1``, 2..3 -> ``2-3``,
    4..7 -> ``4-7``, ... (bins keep their names whatever the context length, so runs line up)."""
    return "0-0" if position <= 0 else gap_bin(position)


def loss_by_position(nll: Tensor, count: Tensor) -> dict[str, float]:
    """``{"val_loss_pos.<lo>-<hi>": mean NLL}`` from per-position sums ``nll [T]`` and counts ``count [T]``:
    how well the model predicts the next token after seeing ``lo + 1 .. hi + 1`` tokens of its window."""
    nll, count = nll.double().cpu(), count.cpu()
    bins: dict[str, list[int]] = {}
    for t in range(nll.shape[0]):
        bins.setdefault(position_bin(t), []).append(t)
    out = {}
    for name, index in bins.items():
        n = int(count[index].sum())
        if n:
            out[f"val_loss_pos.{name}"] = float(nll[index].sum()) / n
    return out


def unigram_loss(targets: Tensor) -> float:
    """Entropy (nats) of the unigram distribution of the scored tokens: the loss of a model that ignores its
    context and predicts token frequencies, the chance level of a language model's loss."""
    tokens = targets[targets != IGNORE_INDEX]
    if tokens.numel() == 0:
        return float("nan")
    p = torch.bincount(tokens.reshape(-1)).double()
    p = p[p > 0] / tokens.numel()
    return float(-(p * p.log()).sum())


def summary_metrics(data: TaskData, last_eval: dict[str, Any]) -> dict[str, float]:
    """The binned keys of the last eval (``recall_gap.*``, ``val_loss_pos.*``) and, for a loss-scored task,
    ``unigram_loss`` of its training tokens: the per-run extras of ``metrics.json``."""
    out = {k: v for k, v in last_eval.items() if k.startswith(("recall_gap.", "val_loss_pos."))}
    if data.metric == "loss":
        out["unigram_loss"] = unigram_loss(data.train_targets)
    return out


class ValidationSet:
    """The validation examples on the device, with their scored positions and query distances when every
    example scores the same number of positions (computed once, reused at every eval). A loss-scored task
    that scores every position (language modelling) also gets its loss by position."""

    def __init__(self, data: TaskData, device: torch.device):
        positions = scored_positions(data.val_targets)
        self.inputs = data.val_inputs.to(device)
        self.metric = data.metric
        self.by_position = data.metric == "loss" and positions is None
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
    example, then over examples) and ``recall_gap.<lo>-<hi>`` (accuracy by key-to-query distance); for
    language modelling ``val_loss_pos.<lo>-<hi>`` (loss by position in the context, :func:`position_bin`)."""
    was_training = model.training
    model.eval()
    device = val.inputs.device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    pos_nll = torch.zeros(val.inputs.shape[1], dtype=torch.float64, device=device)
    pos_count = torch.zeros(val.inputs.shape[1], dtype=torch.long, device=device)
    accs, correct = [], []
    for start in range(0, val.inputs.shape[0], batch_size):
        x, y = val.inputs[start : start + batch_size].long(), val.targets[start : start + batch_size].long()
        pos = None if val.positions is None else val.positions[start : start + batch_size]
        with amp():
            logits = model(x, positions=pos)
        if val.by_position:
            token_nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                y.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(y.shape)
            scored = y != IGNORE_INDEX
            pos_nll, pos_count = pos_nll + token_nll.sum(0, dtype=torch.float64), pos_count + scored.sum(0)
            loss, n = token_nll.sum(), scored.sum()
        else:
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
    if val.by_position:
        out.update(loss_by_position(pos_nll, pos_count))
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
    extra = {"unigram_loss": unigram_loss(data.train_targets)} if data.metric == "loss" else {}
    diag = collect_diagnostics(model, data.val_inputs, dev)
    return {"checkpoint": str(path), "name": cfg.name, "metric": data.metric, **metrics, **extra, **diag}
