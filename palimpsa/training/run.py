"""The life of one run: its files, its tracked MLflow run and how each way of ending is recorded.

FINISHED: ``finished.json`` then ``metrics.json`` land last (the workflow's completion marker) after the
tracked run is closed. A non-finite loss: ``failed.json`` and FAILED. A pruning hook's :class:`StopTraining`
or a stop signal: KILLED (a signal leaves a checkpoint to resume from). Anything else: FAILED with the
exception as reason.

A folder holding ``finished.json`` but no ``metrics.json`` is a finished run whose result was deleted to
have it recomputed (what ``snakemake --force`` does to a point): it is retrained from scratch in a new MLflow
run, and the old run is tagged ``palimpsa.superseded_by`` the new one. Without ``finished.json`` a missing
``metrics.json`` means an interrupted run, which resumes from its checkpoint in the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from palimpsa.atomic import atomic_write
from palimpsa.config import RunConfig, config_to_dict
from palimpsa.distributed import teardown
from palimpsa.errors import NonFiniteError, StopTraining
from palimpsa.io import dump_yaml, flatten
from palimpsa.model import save_model
from palimpsa.tracking import RESULT_TAG, DatasetInfo, NullTracker, git_commit, grouped, open_tracker
from palimpsa.training.files import (
    CHECKPOINT,
    FAILED,
    HISTORY,
    METRICS,
    RESOLVED_CONFIG,
    RUN_ID,
    read_run_id,
    write_json,
)
from palimpsa.training.loop import Trainer
from palimpsa.training.progress import Progress
from palimpsa.training.runtime import StopSignals, precision_name

FINISHED = "finished.json"  # lands just before metrics.json: this folder's run completed once
BEST = "best.pt"  # the model (config and weights) at its best evaluation so far
CHECKPOINT_ARTIFACTS = "checkpoints"  # where the final and best checkpoints go in the tracked run
EvalHook = Callable[[int, dict[str, Any]], None]


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
    trainer.on_eval = keep_best(trainer, on_eval)
    try:
        previous = recompute_request(trainer.out)
        if previous is None:
            trainer.resume()
        elif trainer.is_main:
            clear_run_files(trainer.out)
        if trainer.is_main:
            atomic_write(trainer.out / RESOLVED_CONFIG, lambda h: h.write(dump_yaml(config_to_dict(cfg))))
        with tracked(trainer, supersedes=previous) as tracker:
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
            tracker.log_metrics(grouped(_summary_metrics(result, evaluated_at_end)), step=trainer.state.step)
            # the text results (device, precision, stop reason) as tags: the store alone rebuilds the table
            tracker.set_tags({f"{RESULT_TAG}{k}": v for k, v in result.items() if isinstance(v, str)})
            if trainer.is_main:
                _finish(trainer.out, result, tracker)
            return result
    finally:
        if trainer.dist is not None:
            teardown(trainer.dist)


def recompute_request(out: Path) -> dict[str, Any] | None:
    """``finished.json``'s content when a finished run's ``metrics.json`` is gone (retrain from scratch)."""
    marker = out / FINISHED
    if (out / METRICS).exists() or not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):  # a torn marker still says the run had finished
        return {}


def clear_run_files(out: Path) -> None:
    """Remove what a resume would pick up; ``finished.json`` goes last, once the new run is recorded."""
    for name in (CHECKPOINT, BEST, HISTORY, FAILED, RUN_ID):
        (out / name).unlink(missing_ok=True)


def keep_best(trainer: Trainer, on_eval: EvalHook | None) -> EvalHook:
    """The eval hook: save the model whenever the eval was the best so far, then call ``on_eval``."""

    def hook(step: int, entry: dict[str, Any]) -> None:
        if trainer.is_main and trainer.state.best_step == step:
            save_model(trainer.out / BEST, trainer.model, trainer.cfg, step=step)
        if on_eval is not None:
            on_eval(step, entry)

    return hook


@contextmanager
def tracked(trainer: Trainer, supersedes: dict[str, Any] | None = None) -> Iterator[Any]:
    """The run's tracker (rank 0 only), ended with the status that matches how the block exits.

    ``supersedes``: the ``finished.json`` of the run this one retrains; its MLflow run is tagged as replaced.
    """
    out, st = trainer.out, trainer.state
    if not trainer.is_main:
        yield NullTracker()
        return
    tracker = open_tracker(
        trainer.cfg.tracking, trainer.cfg.name, run_id=read_run_id(out) or st.mlflow_run_id
    )
    st.mlflow_run_id = tracker.run_id
    if supersedes is not None:
        _supersede(tracker, supersedes, out)
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


def _supersede(tracker: Any, previous: dict[str, Any], out: Path) -> None:
    """Tag the replaced run (when there was one), then drop the marker that asked for the retraining."""
    old_run_id = previous.get("mlflow_run_id")
    if old_run_id and tracker.run_id and old_run_id != tracker.run_id:
        tracker.supersede(old_run_id)
    (out / FINISHED).unlink(missing_ok=True)


def _start(trainer: Trainer, tracker: Any, config_path: str | Path | None) -> None:
    """Tags, params, the dataset and the config files of a run, logged once per session (idempotent)."""
    commit, dirty = git_commit()
    tracker.set_tags(
        {
            "palimpsa.out_dir": str(trainer.out.resolve()),
            **({"mlflow.source.git.commit": commit, "palimpsa.git_dirty": str(dirty)} if commit else {}),
        }
    )
    tracker.log_params(_tracking_params(trainer))
    tracker.log_dataset(dataset_info(trainer))
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
        _log_checkpoints(out, tracker)
        tracker.end("FINISHED")
        (out / FAILED).unlink(missing_ok=True)
        write_json(out / FINISHED, {k: result.get(k) for k in ("mlflow_run_id", "steps")})
        os.replace(staging / METRICS, out / METRICS)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def _log_checkpoints(out: Path, tracker: Any) -> None:
    """The final and best checkpoints as artifacts, so they are reachable wherever the store is."""
    tags = {}
    for name, tag in ((CHECKPOINT, "palimpsa.checkpoint"), (BEST, "palimpsa.best_checkpoint")):
        if (out / name).is_file():
            tracker.log_artifact(out / name, CHECKPOINT_ARTIFACTS)
            tags[tag] = tracker.artifact_uri(f"{CHECKPOINT_ARTIFACTS}/{name}")
    tracker.set_tags({k: v for k, v in tags.items() if v})


def dataset_info(trainer: Trainer) -> DatasetInfo:
    """The run's data as an MLflow input: task config and seed, a digest of the tensors, their sizes."""
    data, cfg = trainer.data, trainer.cfg
    task = {f"task.{k}": v for k, v in flatten(config_to_dict(cfg)["task"]).items()}
    tensors = {name: getattr(data, name) for name in data.TENSORS}
    return DatasetInfo(
        name=cfg.task.name,
        digest=_tensor_digest(tensors)[:16],
        source={"generator": "palimpsa.tasks", "seed": cfg.seed, **task},
        profile={
            "num_train": int(data.train_inputs.shape[0]),
            "num_val": int(data.val_inputs.shape[0]),
            "seq_len": data.seq_len,
            "vocab_size": data.vocab_size,
            "metric": data.metric,
        },
        schema={
            name: (str(t.dtype).removeprefix("torch."), [-1, *t.shape[1:]]) for name, t in tensors.items()
        },
    )


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes: equal digests mean the same data."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _summary_metrics(result: dict[str, Any], evaluated_at_end: bool) -> dict[str, float]:
    """The end-of-run numbers for MLflow; eval metrics only if the loop's last eval did not log them."""
    skip = {"seed", "val_loss", "val_accuracy"}
    out = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in skip:
            continue
        if key.startswith(("diag.", "recall_gap.", "val_loss_pos.")) and not evaluated_at_end:
            continue
        out[key] = value
    if evaluated_at_end:
        out.update({k: result[k] for k in ("val_loss", "val_accuracy") if k in result})
    return out


def _tracking_params(trainer: Trainer) -> dict[str, Any]:
    """The run config as the run resolved it (no tracking plumbing) and the implementation each layer ran."""
    cfg = config_to_dict(trainer.cfg)
    cfg.pop("tracking", None)
    params = flatten(cfg)
    params.update(_resolved_values(trainer))
    backends = trainer.model.backends()
    params["model.mixer.backend"] = ",".join(sorted(set(backends.values())))  # what ran, per layer below
    params.update({f"backend.{k}": v for k, v in backends.items()})
    return params


def _resolved_values(trainer: Trainer) -> dict[str, Any]:
    """Config keys whose value the run decides (``null`` / ``auto`` in the config): what it used."""
    mixer, plan = trainer.cfg.model.mixer, trainer.plan
    return {
        "model.vocab_size": trainer.model.vocab_size,
        "model.mixer.numerator": mixer.resolved_numerator,
        "model.mixer.qk_norm": mixer.resolved_qk_norm,
        "model.mixer.scale": _readout_scale(trainer.model, mixer.scale),
        "train.batch_size": plan.batch_size,
        "train.max_steps": plan.total_steps,
        "train.eval_every": plan.eval_every,
        "train.device": str(trainer.device),
        "train.precision": precision_name(trainer.cfg.train.precision, trainer.amp),
        "train.num_threads": torch.get_num_threads(),
    }


def _readout_scale(model: Any, configured: float | None) -> float | None:
    """The first mixer's read-out scale (the config's ``null`` means a per-kind default)."""
    blocks = getattr(model, "blocks", None)
    scale = getattr(getattr(blocks[0], "mixer", None), "scale", None) if blocks else None
    return float(scale) if isinstance(scale, (int, float)) else configured
