"""Shared pieces of every task: the data container, the user-error type and seeded generators."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch

IGNORE_INDEX = -100  # target value of positions that are not scored (torch's cross-entropy default)


TOKEN_DTYPES = (torch.int16, torch.int32, torch.int64)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed dtype that holds every token id and ``IGNORE_INDEX``."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


@dataclass
class TaskData:
    """Token tensors of one task, aligned for next-token prediction.

    The model predicts ``targets[:, t]`` from ``inputs[:, : t + 1]``; targets hold ``IGNORE_INDEX``
    where a position is not scored. Tensors are signed integers: int64, or the compact
    :func:`token_dtype` that language-model data keeps (a billion tokens take 2 GB as int16, not 8 as
    int64, on the host, in the cache and on the device); batches become int64 when they are drawn.
    """

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    vocab_size: int
    metric: Literal["accuracy", "loss"]

    TENSORS = ("train_inputs", "train_targets", "val_inputs", "val_targets")

    def __post_init__(self) -> None:
        for name in self.TENSORS:
            value = getattr(self, name)
            if value.dtype not in TOKEN_DTYPES or value.dim() != 2:
                raise ValueError(
                    f"{name} must be a 2-D int16/int32/int64 tensor; got {value.dtype} {tuple(value.shape)}"
                )
        if self.train_inputs.shape != self.train_targets.shape:
            raise ValueError("train inputs and targets differ in shape")
        if self.val_inputs.shape != self.val_targets.shape:
            raise ValueError("val inputs and targets differ in shape")

    @property
    def seq_len(self) -> int:
        return int(self.train_inputs.shape[1])


def config_digest(cfg: Any, seed: int, *extra: Any) -> str:
    """Stable hex digest of a task config, the run seed and anything else the data depends on."""
    payload = {"config": dataclasses.asdict(cfg), "seed": seed, "extra": [str(e) for e in extra]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def split_generator(cfg: Any, seed: int, split: str, exclude: tuple[str, ...] = ()) -> torch.Generator:
    """One independent CPU generator per (config, seed, split): the val set does not move with num_train.

    ``exclude``: fields left out as well, e.g. new fields a config's data does not depend on (its windows
    then stay those it had before the field existed).
    """
    skip = ("num_train", "num_val", *exclude)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    payload = json.dumps({"fields": fields, "seed": seed, "split": split}, sort_keys=True, default=str)
    value = int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def sample_without_replacement(
    num_rows: int, num_choices: int, k: int, gen: torch.Generator, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``k`` distinct indices in ``[0, num_choices)`` per row, in draw order.

    Top-k of Gumbel-perturbed log-weights has the law of drawing one at a time without replacement
    with probability proportional to the weights (uniform when ``log_weights`` is None).
    Rows are processed in blocks so a large vocabulary does not need a [rows, vocab] buffer at once.
    """
    block = max(1, (1 << 24) // max(num_choices, 1))
    out = torch.empty(num_rows, k, dtype=torch.long)
    for start in range(0, num_rows, block):
        rows = min(block, num_rows - start)
        scores = torch.rand(rows, num_choices, generator=gen)
        if log_weights is not None:
            scores = log_weights - torch.log(-torch.log(scores.clamp_min(1e-12)))
        out[start : start + rows] = scores.topk(k, dim=1).indices
    return out
