"""The life of one run: its files, its tracked MLflow run and how each way of ending is recorded.

FINISHED: ``metrics.json`` lands last (the workflow's completion marker) after the tracked run is closed.
A non-finite loss: ``failed.json`` and FAILED. A pruning hook's :class:`StopTraining` or a stop signal:
KILLED (a signal leaves a checkpoint to resume from). Anything else: FAILED with the exception as reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from palimpsa.atomic import atomic_write
from palimpsa.config import RunConfig, config_to_dict
from palimpsa.distributed import teardown
from palimpsa.errors import NonFiniteError, StopTraining
from palimpsa.io import dump_yaml, flatten
from palimpsa.tracking import RESULT_TAG, NullTracker, git_commit, open_tracker
from palimpsa.training.files import FAILED, HISTORY, METRICS, RESOLVED_CONFIG, RUN_ID, read_run_id, write_json
from palimpsa.training.loop import Trainer
from palimpsa.training.progress import Progress
from palimpsa.training.runtime import StopSignals


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
    run early (tracked run KILLED): the hook Optuna pruning uses.
    """
    trainer = Trainer(cfg, out_dir, data_dir)
    trainer.on_eval = on_eval
    try:
        trainer.resume()
        if trainer.is_main:
            atomic_write(trainer.out / RESOLVED_CONFIG, lambda h: h.write(dump_yaml(config_to_dict(cfg))))
        with tracked(trainer) as tracker:
            bar = Progress(trainer.plan.total_steps, trainer.state.step, enabled=progress and trainer.is_main)
            try:
                _start(trainer, tracker, config_path)
                with StopSignals() as signals:
                    last_eval = trainer.loop(tracker, signals, bar)
            finally:
                bar.close()
            trainer.save_checkpoint()
            result = trainer.final_metrics(last_eval)
            evaluated_at_end = last_eval is None or last_eval["step"] != trainer.state.step
            tracker.log_metrics(_summary_metrics(result, evaluated_at_end), step=trainer.state.step)
            # the text results (device, precision, stop reason) as tags: the store alone rebuilds the table
            tracker.set_tags({f"{RESULT_TAG}{k}": v for k, v in result.items() if isinstance(v, str)})
            if trainer.is_main:
                _finish(trainer.out, result, tracker)
            return result
    finally:
        if trainer.dist is not None:
            teardown(trainer.dist)


@contextmanager
def tracked(trainer: Trainer) -> Iterator[Any]:
    """The run's tracker (rank 0 only), ended with the status that matches how the block exits."""
    out, st = trainer.out, trainer.state
    if not trainer.is_main:
        yield NullTracker()
        return
    tracker = open_tracker(
        trainer.cfg.tracking, trainer.cfg.name, run_id=read_run_id(out) or st.mlflow_run_id
    )
    st.mlflow_run_id = tracker.run_id
    if tracker.run_id:
        atomic_write(out / RUN_ID, lambda h: h.write(tracker.run_id + "\n"))
    try:
        yield tracker
    except NonFiniteError as err:
        write_json(out / FAILED, {"status": "FAILED", "reason": str(err), "step": err.step})
        tracker.end("FAILED", reason=str(err))
        raise
    except StopTraining as err:
        tracker.end("KILLED", reason=str(err) or "stopped by on_eval")
        raise
    except KeyboardInterrupt as err:
        tracker.end("KILLED", reason=str(err) or "interrupted")
        raise
    except BaseException as err:
        tracker.end("FAILED", reason=f"{type(err).__name__}: {err}")
        raise


def _start(trainer: Trainer, tracker: Any, config_path: str | Path | None) -> None:
    """Tags, params and the config files of a run, logged once per session (idempotent on resume)."""
    commit, dirty = git_commit()
    tracker.set_tags(
        {
            "palimpsa.out_dir": str(trainer.out.resolve()),
            "palimpsa.checkpoint": str(trainer.checkpoint_path.resolve()),
            **({"mlflow.source.git.commit": commit, "palimpsa.git_dirty": str(dirty)} if commit else {}),
        }
    )
    tracker.log_params(_tracking_params(trainer))
    tracker.log_artifact(trainer.out / RESOLVED_CONFIG)
    if config_path is not None and Path(config_path).exists():
        tracker.log_artifact(config_path, "source_config")


def _finish(out: Path, result: dict[str, Any], tracker: Any) -> None:
    """Close the tracked run FINISHED, then let metrics.json land: its presence means all is recorded."""
    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        write_json(staging / METRICS, result)
        tracker.log_artifact(staging / METRICS)
        if (out / HISTORY).exists():
            tracker.log_artifact(out / HISTORY)
        tracker.end("FINISHED")
        (out / FAILED).unlink(missing_ok=True)
        os.replace(staging / METRICS, out / METRICS)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def _summary_metrics(result: dict[str, Any], evaluated_at_end: bool) -> dict[str, float]:
    """The end-of-run numbers for MLflow; eval metrics only if the loop's last eval did not log them."""
    skip = {"seed", "val_loss", "val_accuracy"}
    out = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in skip:
            continue
        if key.startswith(("diag.", "recall_gap.")) and not evaluated_at_end:
            continue
        out[key] = value
    if evaluated_at_end:
        out.update({k: result[k] for k in ("val_loss", "val_accuracy") if k in result})
    return out


def _tracking_params(trainer: Trainer) -> dict[str, Any]:
    params = flatten(config_to_dict(trainer.cfg))
    params.update({f"backend.{k}": v for k, v in trainer.model.backends().items()})
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
