"""Data-parallel training under ``torchrun``: process group from its environment, batch slicing, rank 0.

``torchrun --nproc_per_node N -m palimpsa train CONFIG --out DIR`` starts N copies of the trainer; each
finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and joins one process group (gloo on CPU,
nccl on CUDA). Every rank trains on its contiguous slice of the same global batch (``train.batch_size``
stays the global batch, so a config means the same run at any world size) and DDP averages the
gradients. Only rank 0 writes files and talks to MLflow; all ranks evaluate the same weights on the same
validation set, so early-stopping decisions agree without extra messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from palimpsa.errors import TrainingError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        """This rank's contiguous part of a global batch (the sizes must divide: see :func:`setup`)."""
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, *values: float | torch.Tensor) -> list[float]:
        """Sums over ranks of a few scalars, in one message."""
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop signal seen by one rank stops all)."""
        return self.sum(1.0 if flag else 0.0)[0] > 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model: gradients are averaged over ranks during backward."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device, global_batch: int) -> DistContext | None:
    """Join the job's process group when launched by torchrun with more than one process; else None.

    The device is the rank's own GPU (``cuda:LOCAL_RANK``) on CUDA. A global batch that the world size
    does not divide is refused: uneven slices would weight examples differently from one process.
    """
    world = world_size_from_env()
    if world <= 1:
        return None
    if global_batch % world:
        raise TrainingError(
            f"train.batch_size: {global_batch} is not divisible by the {world} data-parallel processes"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = os.environ.get("PALIMPSA_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown(ctx: DistContext | None) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()
