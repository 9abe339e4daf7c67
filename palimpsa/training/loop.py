"""The training loop of one run: :class:`Trainer` holds the data, model, optimizer and run state.

A step never waits for the device: the loss and the gradient norm stay on it (:class:`StepMeter`) and are
read back once per log interval, eval and checkpoint. A non-finite loss or gradient norm is noticed there,
with the exact step it first occurred, before anything is evaluated or saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from palimpsa.config import RunConfig
from palimpsa.diagnostics import collect_diagnostics
from palimpsa.distributed import setup as setup_distributed
from palimpsa.distributed import world_size_from_env
from palimpsa.errors import NonFiniteError
from palimpsa.model import build_model
from palimpsa.tasks import build_task
from palimpsa.tracking import grouped
from palimpsa.training.batches import Batches, Plan
from palimpsa.training.checkpoint import TrainState, load_checkpoint, save_checkpoint, seed_everything
from palimpsa.training.evaluation import ValidationSet, evaluate, masked_cross_entropy, summary_metrics
from palimpsa.training.files import CHECKPOINT, HISTORY, write_history
from palimpsa.training.optim import learning_rate, make_optimizer
from palimpsa.training.progress import Progress
from palimpsa.training.runtime import (
    CompileOrEager,
    StopSignals,
    autocast_for,
    peak_memory_mib,
    precision_name,
    resolve_device,
    synchronize,
)


class StepMeter:
    """Sums of the training loss since the last eval and log, the last gradient norm and the first step with
    a non-finite loss or norm, all on the device; :meth:`read` is the one place that waits for it."""

    def __init__(self, state: TrainState, device: torch.device):
        as_sum = {"dtype": torch.float64, "device": device}
        self.since_eval = torch.tensor(state.loss_sum_since_eval, **as_sum)
        self.since_log = torch.tensor(state.loss_sum_since_log, **as_sum)
        self.grad_norm = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: Tensor, grad_norm: Tensor, step: int) -> None:
        self.since_eval += loss.double()
        self.since_log += loss.double()
        self.grad_norm = grad_norm
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def read(self, state: TrainState) -> None:
        """Copy the sums into ``state``; raise :class:`NonFiniteError` if a step went non-finite."""
        state.loss_sum_since_eval, state.loss_sum_since_log = float(self.since_eval), float(self.since_log)
        if int(self.first_bad) >= 0:
            raise NonFiniteError(int(self.first_bad))

    def reset_log(self, state: TrainState) -> None:
        self.since_log.zero_()
        state.loss_sum_since_log, state.steps_since_log = 0.0, 0

    def reset_eval(self, state: TrainState) -> None:
        self.since_eval.zero_()
        state.loss_sum_since_eval, state.steps_since_eval = 0.0, 0


class Trainer:
    """One run. :func:`palimpsa.training.train` drives it; profilers and tests may call its parts."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, data_dir: str | Path | None = None):
        self.cfg, self.out = cfg, Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.session_start, self.wall_at_checkpoint = time.perf_counter(), 0.0
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.device = resolve_device(cfg.train.device)
        seed_everything(cfg.seed)
        self.data = build_task(cfg.task, data_dir, cfg.seed)
        self.plan = Plan.make(cfg.train, self.data.train_inputs.shape[0])
        self.dist = None
        if world_size_from_env() > 1:  # launched by torchrun: one rank of a data-parallel job
            self.dist = setup_distributed(self.device, self.plan.batch_size)
            self.device = self.dist.device
        self.amp = autocast_for(self.device, cfg.train.precision)
        self.model = build_model(cfg, self.data.vocab_size).to(self.device)
        if cfg.train.precision == "pure_bf16":  # weights, gradients and AdamW moments all in bf16
            self.model.to(torch.bfloat16)
        self.net = self.model if self.dist is None else self.dist.wrap(self.model)  # what training calls
        if cfg.train.compile:
            self.net = CompileOrEager(self.net)
        self.optimizer = make_optimizer(self.model, cfg.train)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rank_slice = None if self.dist is None else self.dist.local_slice(self.plan.batch_size)
        self.train_batches = Batches(self.data, self.plan, cfg.seed, self.device, rank_slice)
        self.val = ValidationSet(self.data, self.device)
        self.state = TrainState()
        self.resumed = False
        self.on_eval: Callable[[int, dict[str, Any]], None] | None = None

    @property
    def is_main(self) -> bool:
        """The process that writes files and tracks: the only one, or rank 0 of a data-parallel job."""
        return self.dist is None or self.dist.is_main

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        """Continue from ``OUT/checkpoint.pt`` if there is one (refused if another config wrote it)."""
        if not self.checkpoint_path.exists():
            return False
        self.state = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.cfg)
        self.resumed = True
        return True

    def save_checkpoint(self) -> None:
        now = time.perf_counter() - self.session_start
        self.state.wall_seconds += now - self.wall_at_checkpoint
        self.wall_at_checkpoint = now
        if self.is_main:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.cfg, self.state)

    def elapsed(self) -> float:
        """Wall seconds of the whole run: earlier sessions plus this one."""
        return self.state.wall_seconds + time.perf_counter() - self.session_start - self.wall_at_checkpoint

    # ------------------------------------------------------------------ one step

    def set_lr(self, step: int) -> float:
        lr = learning_rate(self.cfg.train, step, self.plan.steps_per_epoch, self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x: Tensor, y: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One update; ``(mean loss, gradient norm)`` as device tensors (no wait for the device)."""
        self.model.train()
        with self.amp():
            logits = self.net(x, positions=positions)
        total, count = masked_cross_entropy(logits, y)
        if self.dist is None:
            loss = total / count.clamp_min(1)
            value = loss.detach()
        else:  # DDP averages gradients over ranks: scale so the result is the global per-token mean
            global_total, global_count = self.dist.sum(total.detach(), count)
            loss = total * self.dist.world_size / max(global_count, 1)
            value = torch.tensor(global_total / max(global_count, 1), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = math.inf if self.cfg.train.grad_clip is None else self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        return value, grad_norm

    # ------------------------------------------------------------------ the loop

    def loop(self, tracker: Any, signals: StopSignals, progress: Progress) -> dict[str, Any] | None:
        """Train until the plan, the target or patience ends it; returns the last eval (or None)."""
        st, plan, train = self.state, self.plan, self.cfg.train
        meter = StepMeter(st, self.device)
        last_eval: dict[str, Any] | None = None
        last_loss: float | None = None
        window_tokens, window_seconds = 0, 0.0
        batches = self.train_batches.from_step(st.step)
        stretch = time.perf_counter()  # start of the steps not yet timed

        def read_back() -> float:
            """Wait for the device, time the steps since the last read, check them; seconds they took."""
            nonlocal stretch
            synchronize(self.device)
            seconds = time.perf_counter() - stretch
            st.train_seconds += seconds
            meter.read(st)
            stretch = time.perf_counter()
            return seconds

        while st.step < plan.total_steps and st.stop_reason is None:
            x, y, positions = next(batches)
            lr = self.set_lr(st.step)
            loss, grad_norm = self.train_step(x, y, positions)
            st.step += 1
            tokens = x.numel() * (1 if self.dist is None else self.dist.world_size)  # the global batch's
            st.tokens, window_tokens = st.tokens + tokens, window_tokens + tokens
            st.steps_since_eval, st.steps_since_log = st.steps_since_eval + 1, st.steps_since_log + 1
            meter.add(loss, grad_norm, st.step)
            if st.step % train.log_every == 0:
                window_seconds += read_back()
                last_loss = st.loss_sum_since_log / st.steps_since_log
                metrics = {
                    "train_loss": last_loss,
                    "lr": lr,
                    "grad_norm": float(meter.grad_norm),
                    "tokens_per_second": window_tokens / max(window_seconds, 1e-9),
                    "epoch": st.step / plan.steps_per_epoch,
                }
                tracker.log_metrics(grouped(metrics), step=st.step)  # train/loss, train/lr, ...
                meter.reset_log(st)
                window_tokens, window_seconds = 0, 0.0
            progress.update(st.step, last_loss)  # after the log interval's read-back: the loss is current
            if st.step % plan.eval_every == 0 or st.step == plan.total_steps:
                window_seconds += read_back()
                last_eval = self.run_eval(tracker, st.loss_sum_since_eval / max(st.steps_since_eval, 1))
                meter.reset_eval(st)
                progress.eval_line(last_eval, self.data.metric)
                if self.on_eval is not None:  # e.g. Optuna: report, maybe raise StopTraining
                    self.on_eval(st.step, last_eval)
                stretch = time.perf_counter()
            requested = signals.requested
            if self.dist is not None and self.dist.any(requested is not None):  # all ranks stop together
                requested = requested or "stop signal on another rank"
            if requested is not None:
                read_back()
                self.save_checkpoint()
                raise KeyboardInterrupt(f"{requested} at step {st.step}; checkpoint saved")
            if st.step % train.checkpoint_every == 0 and st.step < plan.total_steps:
                window_seconds += read_back()
                self.save_checkpoint()
                stretch = time.perf_counter()
        read_back()
        if st.stop_reason is None:
            st.stop_reason = "max_steps" if st.step < plan.steps_per_epoch * train.epochs else "epochs"
        return last_eval

    # ------------------------------------------------------------------ evaluation

    def run_eval(self, tracker: Any, train_loss: float | None) -> dict[str, Any]:
        metrics = evaluate(self.model, self.val, self.plan.batch_size * 2, self.amp)
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
        tracker.log_metrics(grouped({**logged, **diag}), step=st.step)  # val/..., time/..., diag/...
        if self.is_main:
            write_history(self.out / HISTORY, st.history)
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

    def final_metrics(self, last_eval: dict[str, Any] | None) -> dict[str, Any]:
        """metrics.json: the last eval (made now if the loop ended without one), run facts and diagnostics."""
        st = self.state
        if last_eval is None or last_eval["step"] != st.step:  # e.g. resumed from a finished checkpoint
            last_eval = {
                **evaluate(self.model, self.val, self.plan.batch_size * 2, self.amp),
                "diagnostics": collect_diagnostics(self.model, self.data.val_inputs, self.device, self.amp),
            }
        memory, memory_kind = peak_memory_mib(self.device)
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
            "num_params": int(self.model.num_params()),
            "peak_memory_mib": memory,
            "peak_memory_kind": memory_kind,
            "device": str(self.device),
            "precision": precision_name(self.cfg.train.precision, self.amp),
            "compiled": isinstance(self.net, CompileOrEager) and self.net.status == "compiled",
            "num_threads": torch.get_num_threads(),
            "resumed": self.resumed,
            "world_size": 1 if self.dist is None else self.dist.world_size,
            "backends": self.model.backends(),
            "mlflow_run_id": st.mlflow_run_id,
            **summary_metrics(self.data, last_eval),
            **last_eval["diagnostics"],
        }
        if self.data.metric == "accuracy":
            out["val_accuracy"] = last_eval["val_accuracy"]
            out["best_val_accuracy"] = st.best_val_accuracy
        return out
