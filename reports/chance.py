"""Chance level of the report metric and the rule that says whether a run learned.

A model that has not left chance has not been measured yet: comparing two such runs compares
noise. Every run is therefore screened against the chance level of its own task before any
comparison, with one explicit rule (:data:`LEARNED_MARGIN`) that the report's Methods state.
"""

from __future__ import annotations

import math
from typing import Any

# A run learned when it closed at least this fraction of the distance from chance to a perfect
# score: accuracy >= chance + margin * (1 - chance); loss <= (1 - margin) * chance loss.
LEARNED_MARGIN = 0.10
UNIGRAM_COLUMNS = ("unigram_loss", "val_unigram_loss", "task.unigram_loss")


def is_accuracy(metric: str) -> bool:
    """Accuracy-like metrics lie in [0, 1] with 1 perfect (``val_accuracy``, ``recall_gap.<lo>-<hi>``)."""
    return "accuracy" in metric or metric.startswith("recall_gap.")


def is_loss(metric: str) -> bool:
    return metric.endswith(("loss", "nll"))


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric can take (intervals of its mean are cut there), or None when unknown."""
    if is_accuracy(metric):
        return (0.0, 1.0)
    if is_loss(metric):
        return (0.0, math.inf)
    return None


def mqar_values(vocab_size: int) -> int:
    """Number of distinct values an MQAR answer can take: tokens ``[vocab/2, vocab)``."""
    return vocab_size - vocab_size // 2


def chance_source(row: dict[str, Any], metric: str) -> str | None:
    """The column the chance level is computed from, or None when this metric has no known chance."""
    mqar = row.get("task.name") == "mqar" and row.get("task.vocab_size") is not None
    if mqar and (is_accuracy(metric) or is_loss(metric)):
        return "task.vocab_size"
    if is_loss(metric):
        return next((c for c in UNIGRAM_COLUMNS if row.get(c) is not None), None)
    return None


def chance_from(source: str, value: float, metric: str) -> float:
    """Chance level from its source column's value.

    MQAR: guessing uniformly among its ``vocab - vocab // 2`` values gives accuracy ``1 / values``
    and loss ``ln(values)``. A language model's chance loss is its unigram loss, read as logged.
    """
    if source == "task.vocab_size":
        values = mqar_values(int(value))
        return 1.0 / values if is_accuracy(metric) else math.log(values)
    return float(value)


def chance_level(row: dict[str, Any], metric: str) -> float | None:
    source = chance_source(row, metric)
    return None if source is None else chance_from(source, row[source], metric)


def threshold(chance: float, metric: str, margin: float = LEARNED_MARGIN) -> float:
    """The value a run must pass to count as learned (see :data:`LEARNED_MARGIN`)."""
    if is_accuracy(metric):
        return chance + margin * (1.0 - chance)
    return (1.0 - margin) * chance


def learned(value: float, limit: float, higher_is_better: bool) -> bool:
    """True when ``value`` is beyond the learned threshold ``limit`` (strictly)."""
    return value > limit if higher_is_better else value < limit
