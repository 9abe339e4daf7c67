"""The trainer: one run from a :class:`RunConfig` to ``OUT/metrics.json``.

Resumable by construction: the data order is a function of ``(seed, epoch)`` and the learning rate a
function of the step, so a checkpoint (model, optimizer, RNG, counters, eval history) is all a killed
job needs to continue and end with the metrics of an uninterrupted run (bit-exact on CPU).
Every file a workflow consumes is written to a temporary name and renamed, so a reader never sees half
of one; ``metrics.json`` lands last and marks the run complete.

Files in ``OUT``: checkpoint.pt, config.yaml (resolved), history.jsonl (one line per eval),
mlflow_run_id, metrics.json on success, failed.json on a non-finite loss.

Under ``torchrun`` with several processes the same loop runs data-parallel (:mod:`palimpsa.distributed`):
each rank takes its slice of the global batch, and only rank 0 writes these files and tracks the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from palimpsa.atomic import atomic_write
from palimpsa.config import RunConfig, TrainConfig, config_to_dict, flatten
from palimpsa.diagnostics import collect_diagnostics, summary
from palimpsa.distributed import world_size_from_env
from palimpsa.tracking import RESULT_TAG

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
HISTORY = "history.jsonl"
FAILED = "failed.json"
RUN_ID = "mlflow_run_id"
CHECKPOINT_FORMAT = 1
IGNORE_INDEX = -100

# Per-head gate parameters (any shape) that must not be pulled to zero by weight decay.
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "Ip_log", "logN", "b_scale", "D", "bias"})
NO_DECAY_PARTS = ("norm", "embed")  # any module on the parameter's path whose name contains these
# Config keys that may differ between a checkpoint and the resuming job: they do not change the math.
RESUME_IGNORED = (
    "tracking.",
    "train.num_threads",
    "train.device",
    "train.checkpoint_every",
    "train.log_every",
)


class TrainingError(ValueError):
    """A run that cannot go on: non-finite loss, a checkpoint of another config, no CUDA device."""


class StopTraining(Exception):
    """Raised by an ``on_eval`` hook to end a run early (a pruned tuning trial): the tracked run ends
    KILLED with the message as reason, no metrics.json is written, and the exception propagates."""


# --------------------------------------------------------------------------- optimization


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only for matrices of projections: never 1-D params, gates, norms, embeddings.

    Rule: ``ndim < 2``, or the leaf name is a gate/bias (:data:`NO_DECAY_NAMES`), or a module on the
    path contains "norm" or "embed" -> no decay.
    """
    if param.ndim < 2:
        return False
    parts = name.split(".")
    if parts[-1] in NO_DECAY_NAMES:
        return False
    return not any(s in part.lower() for part in parts[:-1] for s in NO_DECAY_PARTS)


def param_groups(model: nn.Module, weight_decay: float, decay_on: str = "matrices") -> list[dict[str, Any]]:
    """Two AdamW groups; tied parameters appear once (``named_parameters`` de-duplicates).

    ``decay_on="all"`` puts every parameter in the decayed group, as a plain ``AdamW(model.parameters())``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decay_on == "all" or decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for update ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_lr_factor(step: int, warmup: int, steps_per_epoch: int, epochs: int, min_ratio: float) -> float:
    """Cosine over epochs, constant within one: epoch ``e`` trains at ``min + (1-min)(1 + cos(pi e/E)) / 2``
    (PyTorch's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch); an optional linear warmup first."""
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


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


def epoch_order(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The shuffle of one epoch, a pure function of (seed, epoch): what makes resume exact."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63))
    return torch.randperm(num_examples, generator=gen)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over scored positions and their count (a batch without any gives 0, not NaN)."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    metric: str,
    batch_size: int,
    device: torch.device,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """``val_loss`` (token-weighted NLL over scored positions) and, for recall, ``val_accuracy``."""
    from palimpsa.tasks import sequence_accuracy

    was_training = model.training
    model.eval()
    nll, count, accs = 0.0, 0, []
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        with amp():
            logits = model(x)
        loss, n = masked_cross_entropy(logits, y)
        nll, count = nll + float(loss), count + n
        if metric == "accuracy":
            accs.append(sequence_accuracy(logits.float(), y).cpu())
    model.train(was_training)
    out = {"val_loss": nll / max(count, 1)}
    if metric == "accuracy":
        out["val_accuracy"] = float(torch.nanmean(torch.cat(accs)))
    return out


# --------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda h: h.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


# --------------------------------------------------------------------------- run state


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed job needs."""

    step: int = 0
    best_val_loss: float | None = None
    best_val_accuracy: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stop_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0  # summed over sessions, up to the last checkpoint of each
    train_seconds: float = 0.0  # forward/backward/update only: the throughput denominator
    tokens: int = 0
    mlflow_run_id: str | None = None
    losses_since_eval: list[float] = field(default_factory=list)  # kept so a resumed run logs the same
    losses_since_log: list[float] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np = sys.modules.get("numpy")  # only matters if something loaded it
    if np is not None:
        np.random.seed(seed % 2**32)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not any(k == p or k.startswith(p) for p in RESUME_IGNORED)
    ]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPU by default; fp32 on CPU unless bf16 is asked for. A ``pure_bf16`` model holds
    bf16 weights itself, so it needs no autocast."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_name(requested: str, amp: Callable[[], contextlib.AbstractContextManager]) -> str:
    """What ran: ``pure_bf16``, ``bf16`` (autocast) or ``fp32``."""
    if requested == "pure_bf16":
        return "pure_bf16"
    return "bf16" if amp is not contextlib.nullcontext else "fp32"


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to stop at the next step boundary (checkpoint, then KILLED).

    A second signal interrupts at once. Only installable from the main thread; elsewhere a no-op.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(self.requested)
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class NonFiniteError(TrainingError):
    pass


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One run. Use :func:`train`; the class only keeps the loop's pieces together."""

    @property
    def is_main(self) -> bool:
        """The process that writes files and tracks: the only one, or rank 0 of a data-parallel job."""
        return self.dist is None or self.dist.is_main

    def __init__(self, cfg: RunConfig, out_dir: str | Path, data_dir: str | Path | None = None):
        from palimpsa.model import build_model
        from palimpsa.tasks import build_task

        self.cfg, self.out = cfg, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.session_start = time.perf_counter()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = resolve_device(cfg.train.device)
        seed_everything(cfg.seed)
        self.data = build_task(cfg.task, data_dir, cfg.seed)
        self.plan = Plan.make(cfg.train, self.data.train_inputs.shape[0])
        self.dist = None
        if world_size_from_env() > 1:  # launched by torchrun: one rank of a data-parallel job
            from palimpsa.distributed import setup

            self.dist = setup(self.device, self.plan.batch_size)
            self.device = self.dist.device
        self.amp = autocast_for(self.device, cfg.train.precision)
        self.model = build_model(cfg, self.data.vocab_size).to(self.device)
        if cfg.train.precision == "pure_bf16":  # weights, gradients and AdamW moments all in bf16
            self.model.to(torch.bfloat16)
        self.net = self.model if self.dist is None else self.dist.wrap(self.model)  # what training calls
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.train.weight_decay, cfg.train.weight_decay_on),
            lr=cfg.train.lr,
            betas=(cfg.train.beta1, cfg.train.beta2),
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.state = TrainState()
        self.wall_at_checkpoint = 0.0
        self.resumed = self._maybe_resume()
        self.log_every = max(1, cfg.train.log_every)
        self.on_eval: Callable[[int, dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _maybe_resume(self) -> bool:
        path = self.checkpoint_path
        if not path.exists():
            return False
        from palimpsa.model import CheckpointError, read_checkpoint

        blob = read_checkpoint(path)
        if blob.get("format") != CHECKPOINT_FORMAT or "trainer" not in blob:
            raise CheckpointError(path, "holds no trainer state to resume from; use another --out")
        diff = _config_diff(blob["config"], config_to_dict(self.cfg))
        if diff:
            raise TrainingError(
                f"{path}: written by a different config ({'; '.join(diff[:3])}); "
                "use another --out or delete the folder"
            )
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = TrainState(**blob["trainer"])
        _set_rng_state(blob["rng"])
        return True

    def save_checkpoint(self) -> None:
        now = time.perf_counter()
        self.state.wall_seconds += now - self.session_start - self.wall_at_checkpoint
        self.wall_at_checkpoint = now - self.session_start
        if not self.is_main:
            return
        blob = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "vocab_size": self.model.vocab_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "kind": "warmup_cosine",
                "warmup_steps": self.cfg.train.warmup_steps,
                "total_steps": self.plan.total_steps,
                "min_lr_ratio": self.cfg.train.min_lr_ratio,
            },
            "step": self.state.step,
            "epoch": self.state.step / self.plan.steps_per_epoch,
            "rng": _rng_state(),
            "best": {
                "val_loss": self.state.best_val_loss,
                "val_accuracy": self.state.best_val_accuracy,
                "step": self.state.best_step,
            },
            "history": self.state.history,
            "mlflow_run_id": self.state.mlflow_run_id,
            "trainer": asdict(self.state),
        }
        atomic_write(self.checkpoint_path, lambda h: torch.save(blob, h), binary=True)

    def elapsed(self) -> float:
        """Wall seconds of the whole run: earlier sessions plus this one."""
        return self.state.wall_seconds + time.perf_counter() - self.session_start - self.wall_at_checkpoint

    # ------------------------------------------------------------------ loop

    def set_lr(self, step: int) -> float:
        t = self.cfg.train
        if t.schedule == "epoch_cosine":
            per_epoch = self.plan.steps_per_epoch
            factor = epoch_lr_factor(step, t.warmup_steps, per_epoch, t.epochs, t.min_lr_ratio)
        else:
            factor = lr_factor(step, t.warmup_steps, self.plan.total_steps, t.min_lr_ratio)
        lr = t.lr * factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        self.model.train()
        with self.amp():
            logits = self.net(x)
        total, count = masked_cross_entropy(logits, y)
        if self.dist is None:
            loss = total / max(count, 1)
            value = float(loss.detach())
        else:  # DDP averages gradients over ranks: scale so the result is the global per-token mean
            global_total, global_count = self.dist.sum(total.detach(), count)
            loss = total * self.dist.world_size / max(global_count, 1)
            value = global_total / max(global_count, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = math.inf if self.cfg.train.grad_clip is None else self.cfg.train.grad_clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(value) or not math.isfinite(grad_norm):  # checked before the update
            what = f"loss {value}" if not math.isfinite(value) else f"gradient norm {grad_norm}"
            raise NonFiniteError(f"non-finite {what} at step {self.state.step + 1}")
        self.optimizer.step()
        return value, grad_norm

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from the current step on; the epoch's order is recomputed, never stored."""
        per_epoch, batch = self.plan.steps_per_epoch, self.plan.batch_size
        order, order_epoch = None, -1
        while True:
            epoch, pos = divmod(self.state.step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.cfg.seed, epoch, self.data.train_inputs.shape[0]), epoch
            idx = order[pos * batch : (pos + 1) * batch]
            if self.dist is not None:
                idx = idx[self.dist.local_slice(batch)]
            yield (
                self.data.train_inputs[idx].to(self.device, non_blocking=True),
                self.data.train_targets[idx].to(self.device, non_blocking=True),
            )

    def run_eval(self, tracker: Any, train_loss: float | None) -> dict[str, Any]:
        metrics = evaluate(
            self.model,
            self.data.val_inputs,
            self.data.val_targets,
            self.data.metric,
            self.plan.batch_size * 2,
            self.device,
            self.amp,
        )
        st = self.state
        st.best_val_loss = min(metrics["val_loss"], st.best_val_loss or math.inf)
        if self.data.metric == "accuracy":
            improved = st.best_val_accuracy is None or metrics["val_accuracy"] > st.best_val_accuracy
            if improved:
                st.best_val_accuracy = metrics["val_accuracy"]
        else:
            improved = st.best_step is None or metrics["val_loss"] <= st.best_val_loss
        if improved:
            st.best_step, st.bad_evals = st.step, 0
        else:
            st.bad_evals += 1
        diag = collect_diagnostics(self.model, self.data.val_inputs, self.device, self.amp)
        entry = {
            "step": st.step,
            "epoch": st.step / self.plan.steps_per_epoch,
            **metrics,
            "train_loss": train_loss,
            "wall_seconds": self.elapsed(),
            "train_seconds": st.train_seconds,  # inside training steps only: no eval, no checkpoints
        }
        st.history.append(entry)
        logged = {k: v for k, v in entry.items() if k not in ("step", "epoch", "train_loss")}  # per-step keys
        tracker.log_metrics({**logged, **diag}, step=st.step)
        if self.is_main:
            atomic_write(self.out / HISTORY, lambda h: h.writelines(json.dumps(e) + "\n" for e in st.history))
        self._check_stop(metrics)
        return {**entry, "diagnostics": diag}

    def _check_stop(self, metrics: dict[str, float]) -> None:
        t, st = self.cfg.train, self.state
        if t.target is not None:
            if self.data.metric == "accuracy":
                reached = metrics["val_accuracy"] >= t.target
            else:
                reached = metrics["val_loss"] <= t.target
            if reached:
                st.stop_reason = "target"
                return
        if t.patience is not None and st.bad_evals >= t.patience:
            st.stop_reason = "patience"

    def loop(self, tracker: Any, signals: _StopSignals, progress: Progress) -> dict[str, Any] | None:
        """Train until the plan, the target or patience ends it; returns the last eval (or None)."""
        st, plan = self.state, self.plan
        last_eval: dict[str, Any] | None = None
        window_tokens, window_start = 0, time.perf_counter()
        batches = self.batches()
        while st.step < plan.total_steps and st.stop_reason is None:
            x, y = next(batches)
            lr = self.set_lr(st.step)
            start = time.perf_counter()
            loss, grad_norm = self.train_step(x, y)
            st.train_seconds += time.perf_counter() - start
            st.step += 1
            tokens = x.numel() * (1 if self.dist is None else self.dist.world_size)  # the global batch's
            st.tokens += tokens
            st.losses_since_eval.append(loss)
            st.losses_since_log.append(loss)
            window_tokens += tokens
            progress.update(st.step, loss)
            if st.step % self.log_every == 0:
                now = time.perf_counter()
                tracker.log_metrics(
                    {
                        "train_loss": _mean(st.losses_since_log),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_second": window_tokens / max(now - window_start, 1e-9),
                        "epoch": st.step / plan.steps_per_epoch,
                    },
                    step=st.step,
                )
                window_tokens, window_start, st.losses_since_log = 0, now, []
            if st.step % plan.eval_every == 0 or st.step == plan.total_steps:
                last_eval = self.run_eval(tracker, _mean(st.losses_since_eval))
                st.losses_since_eval = []
                progress.eval_line(last_eval, self.data.metric)
                if self.on_eval is not None:  # e.g. Optuna: report, maybe raise StopTraining
                    self.on_eval(st.step, last_eval)
            requested = signals.requested
            if self.dist is not None and self.dist.any(requested is not None):  # all ranks stop together
                requested = requested or "stop signal on another rank"
            if requested is not None:
                self.save_checkpoint()
                raise KeyboardInterrupt(f"{requested} at step {st.step}; checkpoint saved")
            if st.step % self.cfg.train.checkpoint_every == 0 and st.step < plan.total_steps:
                self.save_checkpoint()
        if st.stop_reason is None:
            st.stop_reason = (
                "max_steps" if st.step < plan.steps_per_epoch * self.cfg.train.epochs else "epochs"
            )
        return last_eval

    def final_metrics(self, last_eval: dict[str, Any] | None) -> dict[str, Any]:
        st = self.state
        if last_eval is None or last_eval["step"] != st.step:  # e.g. resumed from a finished checkpoint
            last_eval = {
                **evaluate(
                    self.model,
                    self.data.val_inputs,
                    self.data.val_targets,
                    self.data.metric,
                    self.plan.batch_size * 2,
                    self.device,
                    self.amp,
                ),
                "diagnostics": collect_diagnostics(self.model, self.data.val_inputs, self.device, self.amp),
            }
        memory, memory_kind = peak_memory_mib(self.device)
        backends = self.model.backends() if hasattr(self.model, "backends") else {}
        out: dict[str, Any] = {
            "name": self.cfg.name,
            "seed": self.cfg.seed,
            "status": "FINISHED",
            "stop_reason": st.stop_reason,
            "metric": self.data.metric,
            "val_loss": last_eval["val_loss"],
            "best_val_loss": st.best_val_loss,
            "best_step": st.best_step,
            "steps": st.step,
            "epochs": st.step / self.plan.steps_per_epoch,
            "wall_seconds": self.elapsed(),
            "train_seconds": st.train_seconds,
            "tokens": st.tokens,
            "tokens_per_second": st.tokens / max(st.train_seconds, 1e-9),
            "num_params": int(self.model.num_params()) if hasattr(self.model, "num_params") else None,
            "peak_memory_mib": memory,
            "peak_memory_kind": memory_kind,
            "device": str(self.device),
            "precision": precision_name(self.cfg.train.precision, self.amp),
            "num_threads": torch.get_num_threads(),
            "resumed": self.resumed,
            "world_size": 1 if self.dist is None else self.dist.world_size,
            "backends": backends,
            "mlflow_run_id": st.mlflow_run_id,
            **last_eval["diagnostics"],
        }
        if self.data.metric == "accuracy":
            out["val_accuracy"] = last_eval["val_accuracy"]
            out["best_val_accuracy"] = st.best_val_accuracy
        return out


class Progress:
    """tqdm bar on a terminal; otherwise a plain line every ~5% of the run and at each eval."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        from tqdm import tqdm

        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive, dynamic_ncols=True)
        self.enabled, self.total = enabled, total
        self.every = max(1, total // 20)
        self.start = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if self.interactive:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and step % self.every == 0:
            self.write(f"step {step}/{self.total}  loss {loss:.4f}  {time.perf_counter() - self.start:.1f}s")

    def eval_line(self, entry: dict[str, Any], metric: str) -> None:
        if not self.enabled:
            return
        text = f"eval step {entry['step']}  val_loss {entry['val_loss']:.4f}"
        if metric == "accuracy":
            text += f"  val_accuracy {entry['val_accuracy']:.4f}"
            if self.interactive:
                self.bar.set_postfix(acc=f"{entry['val_accuracy']:.3f}", refresh=False)
        extra = summary(entry.get("diagnostics", {}))
        self.write(f"{text}  {extra}" if extra else text)

    def write(self, text: str) -> None:
        if self.interactive:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _summary_metrics(result: dict[str, Any], evaluated_at_end: bool) -> dict[str, float]:
    """The end-of-run numbers for MLflow; eval metrics only if the loop's last eval did not log them."""
    skip = {"seed", "val_loss", "val_accuracy"}
    out = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in skip:
            continue
        if key.startswith("diag.") and not evaluated_at_end:
            continue
        out[key] = value
    if evaluated_at_end:
        out.update({k: result[k] for k in ("val_loss", "val_accuracy") if k in result})
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _read_run_id(out: Path) -> str | None:
    path = out / RUN_ID
    if not path.exists():
        return None
    return path.read_text().strip() or None


def _tracking_params(trainer: Trainer) -> dict[str, Any]:
    params = flatten(config_to_dict(trainer.cfg))
    params.update({f"backend.{k}": v for k, v in (trainer.model.backends() or {}).items()})
    params.update(
        {
            "num_params": trainer.model.num_params(),
            "steps_per_epoch": trainer.plan.steps_per_epoch,
            "total_steps": trainer.plan.total_steps,
            "num_train": trainer.data.train_inputs.shape[0],
            "seq_len": trainer.data.seq_len,
            "device": str(trainer.device),
        }
    )
    return params


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    config_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one run (resuming from ``out_dir/checkpoint.pt`` if present); returns metrics.json's content.

    Raises :class:`TrainingError` on a non-finite loss (after writing ``failed.json`` and marking the
    tracked run FAILED) and ``KeyboardInterrupt`` on SIGINT/SIGTERM (checkpoint saved, run KILLED).
    ``on_eval(step, eval_entry)`` runs after every eval; raising :class:`StopTraining` from it ends the
    run early (tracked run KILLED) -- the hook Optuna pruning uses.
    """
    trainer = Trainer(cfg, out_dir, data_dir)
    trainer.on_eval = on_eval
    try:
        return _train(trainer, cfg, config_path, progress)
    finally:
        if trainer.dist is not None:
            from palimpsa.distributed import teardown

            teardown(trainer.dist)


def _train(
    trainer: Trainer, cfg: RunConfig, config_path: str | Path | None, progress: bool
) -> dict[str, Any]:
    from palimpsa.tracking import NullTracker, git_commit, open_tracker

    out, st, main = trainer.out, trainer.state, trainer.is_main
    resolved_config = out / "config.yaml"
    if main:
        atomic_write(resolved_config, lambda h: h.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
        tracker = open_tracker(cfg.tracking, cfg.name, run_id=_read_run_id(out) or st.mlflow_run_id)
        st.mlflow_run_id = tracker.run_id
    else:
        tracker = NullTracker()
    if tracker.run_id:
        atomic_write(out / RUN_ID, lambda h: h.write(tracker.run_id + "\n"))
    bar = Progress(trainer.plan.total_steps, st.step, enabled=progress and main)
    try:
        commit, dirty = git_commit()
        tracker.set_tags(
            {
                "palimpsa.out_dir": str(out.resolve()),
                "palimpsa.checkpoint": str(trainer.checkpoint_path.resolve()),
                **({"mlflow.source.git.commit": commit, "palimpsa.git_dirty": str(dirty)} if commit else {}),
            }
        )
        tracker.log_params(_tracking_params(trainer))
        tracker.log_artifact(resolved_config)
        if config_path is not None and Path(config_path).exists():
            tracker.log_artifact(config_path, "source_config")
        with _StopSignals() as signals:
            last_eval = trainer.loop(tracker, signals, bar)
        bar.close()
        trainer.save_checkpoint()
        result = trainer.final_metrics(last_eval)
        tracker.log_metrics(
            _summary_metrics(result, evaluated_at_end=last_eval is None or last_eval["step"] != st.step),
            step=st.step,
        )
        # the text results (device, precision, memory kind, stop reason) as tags: the store alone rebuilds
        # the same results table as the run folders (palimpsa.results)
        tracker.set_tags({f"{RESULT_TAG}{k}": v for k, v in result.items() if isinstance(v, str)})
        if not main:
            return result
        staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
        try:
            write_json(staging / METRICS, result)
            tracker.log_artifact(staging / METRICS)
            if (out / HISTORY).exists():
                tracker.log_artifact(out / HISTORY)
            tracker.end("FINISHED")
            (out / FAILED).unlink(missing_ok=True)
            os.replace(staging / METRICS, out / METRICS)  # the workflow's completion marker lands last
        finally:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
        return result
    except NonFiniteError as err:
        bar.close()
        if main:
            write_json(out / FAILED, {"status": "FAILED", "reason": str(err), "step": st.step + 1})
        tracker.end("FAILED", reason=str(err))
        raise
    except StopTraining as err:
        bar.close()
        tracker.end("KILLED", reason=str(err) or "stopped by on_eval")
        raise
    except KeyboardInterrupt as err:
        bar.close()
        tracker.end("KILLED", reason=str(err) or "interrupted")
        raise
    except BaseException as err:
        bar.close()
        tracker.end("FAILED", reason=f"{type(err).__name__}: {err}")
        raise


def evaluate_checkpoint(
    path: str | Path, data_dir: str | Path | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Validation metrics and diagnostics of a saved model, on the task and seed its config names."""
    from palimpsa.model import load_model
    from palimpsa.tasks import build_task

    model, cfg = load_model(path)
    dev = resolve_device(device)
    model.to(dev)
    data = build_task(cfg.task, data_dir, cfg.seed)
    amp = autocast_for(dev, cfg.train.precision)
    metrics = evaluate(
        model, data.val_inputs, data.val_targets, data.metric, cfg.train.batch_size * 2, dev, amp
    )
    diag = collect_diagnostics(model, data.val_inputs, dev)
    return {"checkpoint": str(path), "name": cfg.name, "metric": data.metric, **metrics, **diag}
