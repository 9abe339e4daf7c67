"""Why a run stops early: errors the user must see as one line, and the pruning signal."""

from __future__ import annotations


class TrainingError(ValueError):
    """A run that cannot go on: non-finite loss, a checkpoint of another config, no CUDA device."""


class NonFiniteError(TrainingError):
    """The loss or the gradient norm became NaN or infinite at ``step``; the run is marked FAILED."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite loss or gradient norm at step {step}")


class StopTraining(Exception):
    """Raised by an ``on_eval`` hook to end a run early (a pruned tuning trial): the tracked run ends
    KILLED with the message as reason, no metrics.json is written, and the exception propagates."""
