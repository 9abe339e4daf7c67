"""The data order of a run and its batches, kept on the training device.

The order is a pure function of ``(seed, epoch)``, so a resumed run sees the batches an uninterrupted one
would. When every example scores the same number of positions (MQAR: one per key), their indices are
computed once (``positions``) and the model reads out logits only there: at L = 512 with 128 pairs a
quarter of the positions, so the output head and the loss cost a quarter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from palimpsa.config import TrainConfig
from palimpsa.tasks import IGNORE_INDEX, TaskData

Batch = tuple[Tensor, Tensor, Tensor | None]  # inputs [B, T], targets [B, T] or [B, S], positions [B, S]


@dataclass
class Plan:
    """Step arithmetic of a run, fixed by the config and the data size."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    batch_size: int

    @classmethod
    def make(cls, train: TrainConfig, num_train: int) -> Plan:
        batch = min(train.batch_size, num_train)
        per_epoch = num_train // batch  # drop the ragged tail: every step sees a full batch
        total = per_epoch * train.epochs
        if train.max_steps is not None:
            total = min(total, train.max_steps)
        return cls(per_epoch, total, train.eval_every or per_epoch, batch)


def epoch_order(seed: int, epoch: int, num_examples: int) -> Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): what makes resume exact."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63))
    return torch.randperm(num_examples, generator=gen)


def scored_positions(targets: Tensor) -> Tensor | None:
    """``[N, S]`` indices of the scored positions when every row has the same ``S < T`` of them, else None."""
    scored = targets != IGNORE_INDEX
    counts = scored.sum(dim=1)
    if (
        targets.shape[0] == 0
        or not bool((counts == counts[0]).all())
        or int(counts[0]) in (0, targets.shape[1])
    ):
        return None
    return scored.nonzero()[:, 1].view(targets.shape[0], int(counts[0]))  # row-major: sorted per row


class Batches:
    """Training batches from a given step on; data, scored targets and the order live on ``device``."""

    def __init__(self, data: TaskData, plan: Plan, seed: int, device: torch.device, rank_slice: slice | None):
        self.plan, self.seed, self.rank_slice = plan, seed, rank_slice
        positions = scored_positions(data.train_targets)
        self.inputs = data.train_inputs.to(device)
        if positions is None:
            self.targets, self.positions = data.train_targets.to(device), None
        else:
            self.targets = data.train_targets.gather(1, positions).to(device)
            self.positions = positions.to(device)
        self.num_examples, self.device = data.train_inputs.shape[0], device

    def from_step(self, step: int) -> Iterator[Batch]:
        per_epoch, batch = self.plan.steps_per_epoch, self.plan.batch_size
        order, order_epoch = None, -1
        while True:
            epoch, pos = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.seed, epoch, self.num_examples).to(self.device), epoch
            idx = order[pos * batch : (pos + 1) * batch]
            if self.rank_slice is not None:
                idx = idx[self.rank_slice]
            positions = None if self.positions is None else self.positions[idx]
            yield (
                self.inputs[idx].long(),
                self.targets[idx].long(),
                positions,
            )  # compact token dtypes -> int64
            step += 1
