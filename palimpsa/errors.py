"""The errors a user fixes: each is reported as one line that names the file or key, with a non-zero exit.

They live apart from the modules that raise them so that every module can import them at the top without an
import cycle (configs and tasks, the trainer and data parallelism).
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A user error in a config: names the file and the dotted key."""

    def __init__(self, key: str, message: str, source: str | Path | None = None):
        self.key, self.message, self.source = key, message, str(source) if source else None
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


class FieldError(ValueError):
    """Raised from a config's ``__post_init__``; the parser prefixes the dotted path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


class TaskError(ValueError):
    """A user error while building a task's data (a missing file, an absent optional package)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not hold a model of this project; names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


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


USER_ERRORS = (ConfigError, TaskError, CheckpointError, TrainingError, FileNotFoundError)
