"""Accuracy over scored positions (``palimpsa/tasks/README.md``): per example first, then over examples."""

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


def query_distances(inputs: torch.Tensor, positions: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``[N, S]`` distance from each scored position back to the first earlier occurrence of its token
    (MQAR: the query re-asks a key; the key sits in the context), or -1 when the token has not occurred.

    Rows are processed in blocks: the comparison is ``[rows, S, T]``.
    """
    out = torch.full(positions.shape, -1, dtype=torch.long)
    T = inputs.shape[1]
    steps = torch.arange(T)
    for start in range(0, inputs.shape[0], block):
        x, pos = inputs[start : start + block], positions[start : start + block]
        token = x.gather(1, pos)  # [n, S]
        earlier = (x[:, None, :] == token[:, :, None]) & (steps[None, None, :] < pos[:, :, None])
        first = torch.where(earlier, steps, T).min(dim=-1).values  # [n, S]; T where none
        out[start : start + block] = torch.where(first < T, pos - first, -1)
    return out


def gap_bin(distance: int) -> str:
    """Power-of-two bin of a distance: 1 -> ``1-1``, 2..3 -> ``2-3``, 4..7 -> ``4-7``, ..."""
    lo = 1 << (max(distance, 1).bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def recall_by_gap(correct: torch.Tensor, distances: torch.Tensor) -> dict[str, float]:
    """``{"recall_gap.<lo>-<hi>": accuracy}`` over scored positions binned by :func:`gap_bin` of their
    key-to-query distance (positions without an earlier occurrence are left out)."""
    flat_ok, flat_d = correct.reshape(-1).float(), distances.reshape(-1)
    keep = flat_d > 0
    if not bool(keep.any()):
        return {}
    flat_ok, flat_d = flat_ok[keep], flat_d[keep]
    level = torch.floor(torch.log2(flat_d.double())).long()  # bin index: 2**level <= d < 2**(level + 1)
    out = {}
    for lv in sorted(set(level.tolist())):
        sel = level == lv
        out[f"recall_gap.{gap_bin(1 << lv)}"] = float(flat_ok[sel].mean())
    return out
