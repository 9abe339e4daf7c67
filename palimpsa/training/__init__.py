"""The trainer: one run from a :class:`~palimpsa.config.RunConfig` to ``OUT/metrics.json``.

Resumable by construction: the data order is a function of ``(seed, epoch)`` and the learning rate a
function of the step, so a checkpoint (model, optimizer, RNG, run state) is all a killed job needs to
continue and end with the metrics of an uninterrupted run (bit-exact on CPU). Under ``torchrun`` with
several processes the same loop runs data-parallel (:mod:`palimpsa.distributed`); only rank 0 writes files
and tracks the run.

One job per module: ``run`` (the run's life: files, tracking, how it ends), ``loop`` (the steps),
``batches`` (data order, scored positions), ``optim`` (parameter groups, lr schedules), ``checkpoint``
(run state, resume), ``evaluation``, ``runtime`` (device, precision, signals), ``progress``.
"""

from palimpsa.errors import NonFiniteError, StopTraining, TrainingError
from palimpsa.training.batches import Plan, epoch_order, scored_positions
from palimpsa.training.evaluation import evaluate, evaluate_checkpoint, masked_cross_entropy
from palimpsa.training.files import CHECKPOINT, FAILED, HISTORY, METRICS, RUN_ID, write_json
from palimpsa.training.loop import Trainer
from palimpsa.training.optim import decays, epoch_lr_factor, lr_factor, param_groups
from palimpsa.training.run import train

__all__ = [
    "CHECKPOINT",
    "FAILED",
    "HISTORY",
    "METRICS",
    "RUN_ID",
    "NonFiniteError",
    "Plan",
    "StopTraining",
    "Trainer",
    "TrainingError",
    "decays",
    "epoch_lr_factor",
    "epoch_order",
    "evaluate",
    "evaluate_checkpoint",
    "lr_factor",
    "masked_cross_entropy",
    "param_groups",
    "scored_positions",
    "train",
    "write_json",
]
