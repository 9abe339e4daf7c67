"""Experiment tracking: one MLflow run per training job, or a no-op when tracking is off.

MLflow is imported only here, and only when a tracker is opened, so the core library trains on a
bare box with just torch. The MLflow client API is used (not the fluent global run stack), so a
process that runs many trainings (a sweep) never trips over a stale "active run".

A job killed at any moment keeps its run id in ``OUT/mlflow_run_id``; the rerun reopens that same
run (status back to RUNNING, the earlier failure reason moved out of ``failure_reason``) instead of leaving
an orphan and starting a duplicate.

Credentials never reach the store: the URI comes from the config (where a password is refused) or from
``$MLFLOW_TRACKING_URI``, a tracking server's login from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (MLflow reads them), and every param, tag and warning has URL passwords masked.
A SQLite store is created readable by its owner only (:func:`palimpsa.atomic.private_file`).

Metric names are grouped for the UI (``train/loss``, ``val/accuracy``, ``diag/...``): :func:`mlflow_metric`
names a run's flat metric (the ``metrics.json`` and ``history.jsonl`` key) in MLflow and
:func:`flat_metric` maps it back, so tables built from the store keep the flat column names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from palimpsa.atomic import private_file
from palimpsa.config import ConfigError, TrackingConfig
from palimpsa.credentials import has_password, mask_text, mask_url

DEFAULT_URI = "sqlite:///results/mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # next to the SQLite file, never ./mlruns
RESULT_TAG = "result."  # tag prefix of a finished run's text results (device, precision, stop reason, ...)
FAILURE_TAG = "failure_reason"  # why a FAILED or KILLED run stopped; cleared when the run is reopened
SUPERSEDED_TAG = "palimpsa.superseded_by"  # on a run retrained from scratch: the run id that replaced it
# MLflow 3 opens an experiment of unknown kind on its GenAI pages; ours are training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_BATCH = 100  # MLflow's limit of params/tags per log_batch request
_T = TypeVar("_T")

log = logging.getLogger(__name__)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then the project's SQLite file under ``results/``."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to cwd, or absolute with four slashes); None for
    other URIs and an in-memory database."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :].split("?", 1)[0] if uri.startswith(prefix) else ""
    return Path(path) if path and path != ":memory:" else None


def prepare_store(uri: str) -> None:
    """Before MLflow opens a store: a SQLite file is created owner-only, and a URI with a password keeps
    MLflow from printing it (its "View run at" lines go to stdout, that is the job's log)."""
    db = sqlite_path(uri)
    if db is not None:
        private_file(db)
    if has_password(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def open_client(uri: str) -> Any:
    """An ``mlflow.MlflowClient`` on ``uri``, for every module that writes to the store."""
    from mlflow import MlflowClient

    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)


def git_commit(path: str | Path | None = None) -> tuple[str | None, bool]:
    """``(commit, dirty)`` of the code's checkout; ``(None, False)`` outside git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


# --------------------------------------------------------------------------- metric names

# The flat names of metrics.json / history.jsonl and their grouped MLflow names; families by prefix below.
METRIC_GROUPS = {
    "train_loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
    "epoch": "train/epoch",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "best_val_loss": "val/best_loss",
    "best_val_accuracy": "val/best_accuracy",
    "best_step": "val/best_step",
    "unigram_loss": "val/unigram_loss",
    "wall_seconds": "time/wall_seconds",
    "train_seconds": "time/train_seconds",
    "steps": "run/steps",
    "epochs": "run/epochs",
    "tokens": "run/tokens",
    "num_params": "run/num_params",
    "peak_memory_mib": "run/peak_memory_mib",
    "num_threads": "run/num_threads",
    "world_size": "run/world_size",
}
METRIC_FAMILIES = {
    "diag.": "diag/",
    "recall_gap.": "val/recall_gap/",
    "val_loss_pos.": "val/loss_by_position/",
}
_FLAT = {group: flat for flat, group in METRIC_GROUPS.items()}


def mlflow_metric(name: str) -> str:
    """The grouped MLflow name of a flat run metric (``recall_gap.0-8`` -> ``val/recall_gap/0-8``)."""
    if name in METRIC_GROUPS:
        return METRIC_GROUPS[name]
    for flat, group in METRIC_FAMILIES.items():
        if name.startswith(flat):
            return group + name.removeprefix(flat)
    return name


def flat_metric(name: str) -> str:
    """Inverse of :func:`mlflow_metric`; names it never produced (``system/...``) come back unchanged."""
    if name in _FLAT:
        return _FLAT[name]
    for flat, group in METRIC_FAMILIES.items():
        if name.startswith(group):
            return flat + name.removeprefix(group)
    return name


def grouped(metrics: dict[str, Any]) -> dict[str, Any]:
    """A mapping of flat run metrics under their MLflow names."""
    return {mlflow_metric(k): v for k, v in metrics.items()}


# --------------------------------------------------------------------------- store access


def _retry(fn: Callable[[], _T], what: str, attempts: int = 6) -> _T:
    """Retry store calls: parallel jobs sharing one SQLite file can briefly see it locked."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # the store raises assorted SQLAlchemy/MLflow errors
            if attempt == attempts - 1 or not _transient(err):
                raise
            log.warning("mlflow %s failed (%s); retrying in %.1fs", what, mask_text(str(err)), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _transient(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("locked", "busy", "operationalerror", "already exists", "timeout"))


def _text(value: Any, limit: int) -> str:
    """A param or tag value as MLflow stores it: URL passwords masked, cut to ``limit`` characters."""
    text = mask_text(str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class DatasetInfo:
    """What a run trained on, as an MLflow run input: ``digest`` identifies the content, ``source`` says
    how it was made (the task config and seed), ``profile`` its sizes, ``schema`` its tensors."""

    name: str
    digest: str
    source: dict[str, Any]
    profile: dict[str, Any]
    schema: dict[str, tuple[str, list[int]]] | None = None  # tensor name -> (dtype, shape; -1 = any size)


def _tensor_schema(schema: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    """MLflow's tensor-spec layout (what its numpy datasets log), so the UI lists the tensors."""

    def specs(targets: bool) -> str:
        return json.dumps(
            [
                {"name": name, "type": "tensor", "tensor-spec": {"dtype": dtype, "shape": list(shape)}}
                for name, (dtype, shape) in schema.items()
                if name.endswith("targets") == targets
            ]
        )

    return {"mlflow_tensorspec": {"features": specs(False), "targets": specs(True)}}


class NullTracker:
    """Tracking off: same interface, records nothing. Training never depends on a tracker."""

    run_id: str | None = None
    uri: str | None = None
    resumed = False

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end(_status_for(exc_type), reason=_reason(exc))

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, dataset: DatasetInfo, context: str = "training") -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def supersede(self, old_run_id: str) -> None:
        pass

    def artifact_uri(self, artifact_path: str) -> str | None:
        return None

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run. ``run_id`` given and present in the store: continue it, else start a new one."""

    def __init__(
        self,
        cfg: TrackingConfig,
        default_name: str,
        run_id: str | None = None,
        system_metrics: bool = True,
    ):
        try:
            import mlflow  # noqa: F401
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(
                "tracking.enabled", "mlflow is not installed; install it or set tracking.enabled=false"
            ) from None
        for noisy in ("alembic", "mlflow.system_metrics", "mlflow.store.db.utils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)  # keep stderr for progress and errors
        self.uri = resolve_tracking_uri(cfg)
        db = sqlite_path(self.uri)
        prepare_store(self.uri)
        self._ended = False
        self._monitor: Any = None
        self.resumed = False
        self.run_id = None
        with _store_lock(db):  # parallel jobs must not create the schema or the experiment twice
            self.client = _retry(lambda: MlflowClient(tracking_uri=self.uri), "connect")
            self.client.search_experiments(max_results=1)  # forces the schema (migrations) into place
            experiment_id = (
                None if run_id else _get_or_create_experiment(self.client, cfg.experiment or default_name, db)
            )
        if run_id:
            self.run_id = self._reopen(run_id)
        if self.run_id is None:
            if experiment_id is None:
                with _store_lock(db):
                    experiment_id = _get_or_create_experiment(self.client, cfg.experiment or default_name, db)
            tags = {str(k): _text(v, 8000) for k, v in cfg.tags.items()}
            if cfg.parent_run_id:
                tags["mlflow.parentRunId"] = cfg.parent_run_id
            run = _retry(
                lambda: self.client.create_run(
                    experiment_id, run_name=cfg.run_name or default_name, tags=tags
                ),
                "create_run",
            )
            self.run_id = run.info.run_id
        if system_metrics:
            self._start_system_metrics()

    # ------------------------------------------------------------------ setup

    def _reopen(self, run_id: str) -> str | None:
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            warnings.warn(
                f"mlflow run {run_id} not found in {mask_url(self.uri)} ({mask_text(str(err))}); "
                "starting a new run",
                stacklevel=3,
            )
            return None
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"), "update_run")
        self.resumed = True
        self._clear_failure(run_id, run.data.tags.get(FAILURE_TAG))
        _retry(lambda: self.client.set_tag(run_id, "palimpsa.resumed", "true"), "set_tag")
        return run_id

    def _clear_failure(self, run_id: str, reason: str | None) -> None:
        """A reopened run is no longer failed: keep why it stopped as history, not as its failure reason."""
        if not reason:
            return
        after = _text(reason, 8000)
        _retry(lambda: self.client.set_tag(run_id, "palimpsa.resumed_after", after), "set_tag")
        _retry(lambda: self.client.delete_tag(run_id, FAILURE_TAG), "delete_tag")

    def _start_system_metrics(self) -> None:
        """CPU/memory/GPU usage in the background; skipped quietly when psutil is missing."""
        try:
            import psutil  # noqa: F401
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return
        try:
            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception as err:  # monitoring is a nicety; never fail a run for it
            log.warning("system metrics disabled: %s", err)
            self._monitor = None

    # ------------------------------------------------------------------ logging

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are write-once in MLflow: on a resumed run, a changed value becomes a tag instead."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        fresh, changed = [], []
        for key, value in params.items():
            text = _text(value, 6000)
            if key not in existing:
                fresh.append(Param(key, text))
            elif existing[key] != text:
                changed.append(RunTag(f"param_changed.{key}", _text(value, 8000)))
        for i in range(0, len(fresh), _BATCH):
            _retry(lambda i=i: self.client.log_batch(self.run_id, params=fresh[i : i + _BATCH]), "log_params")
        if changed:
            _retry(lambda: self.client.log_batch(self.run_id, tags=changed), "set_tags")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Best effort: a briefly locked store loses a point rather than the run."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if not items:
            return
        try:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=items), "log_metrics")
        except Exception as err:
            log.warning("mlflow: dropped metrics at step %s: %s", step, err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), "log_artifact")

    def artifact_uri(self, artifact_path: str) -> str | None:
        """Where an artifact of this run is, for any client of the same tracking server."""
        return f"runs:/{self.run_id}/{artifact_path}"

    def log_dataset(self, dataset: DatasetInfo, context: str = "training") -> None:
        """The run's input dataset (the UI's Datasets column); logging the same one again is a no-op."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type="code",
            source=json.dumps({"tags": dataset.source}, sort_keys=True, default=str),
            schema=None if dataset.schema is None else json.dumps(_tensor_schema(dataset.schema)),
            profile=json.dumps(dataset.profile, sort_keys=True, default=str),
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        _retry(lambda: self.client.log_inputs(self.run_id, [DatasetInput(entity, tags)]), "log_inputs")

    def supersede(self, old_run_id: str) -> None:
        """Record that this run retrains ``old_run_id`` from scratch; the old run stays, tagged replaced."""
        note = f"Superseded: retrained from scratch in run {self.run_id}."
        for key, value in ((SUPERSEDED_TAG, self.run_id), ("mlflow.note.content", note)):
            _retry(lambda key=key, value=value: self.client.set_tag(old_run_id, key, value), "set_tag")
        self.set_tags({"palimpsa.supersedes": old_run_id})

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _text(v, 8000)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            _retry(lambda i=i: self.client.log_batch(self.run_id, tags=items[i : i + _BATCH]), "set_tags")

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """Idempotent; FAILED/KILLED record the reason as the ``failure_reason`` tag."""
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if reason:
            try:
                self.set_tags({FAILURE_TAG: reason})
            except Exception as err:
                log.warning("mlflow: could not record failure reason: %s", err)
        _retry(lambda: self.client.set_terminated(self.run_id, status=status), "set_terminated")


def _get_or_create_experiment(client: Any, name: str, db: Path | None) -> str:
    """Experiment id by name (restoring a deleted one); new ones keep artifacts next to a SQLite store."""

    def get_or_create() -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            for key, value in EXPERIMENT_KIND.items():
                if key not in found.tags:  # a store made before the tag: open it on its runs too
                    client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = None
        if db is not None:  # artifacts next to the database, not in ./mlruns of whatever cwd
            location = (db.parent / ARTIFACT_DIR / _safe(name)).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)

    return _retry(get_or_create, "create_experiment")


def ensure_experiment(client: Any, name: str) -> str:
    """For every module that creates experiments (sweeps, store tools): same artifact layout, same lock.

    ``client`` is an ``mlflow.MlflowClient``; returns the experiment id.
    """
    db = sqlite_path(client.tracking_uri)
    with _store_lock(db):
        return _get_or_create_experiment(client, name, db)


@contextlib.contextmanager
def _store_lock(db: Path | None) -> Iterator[None]:
    """Exclusive lock beside a SQLite store: MLflow's schema migrations are not safe to run concurrently."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, parallel first use of a fresh store may fail
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "default"


def _status_for(exc_type: Any) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


def _reason(exc: Any) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def open_tracker(
    cfg: TrackingConfig, default_name: str, run_id: str | None = None, system_metrics: bool = True
) -> NullTracker:
    """The tracker a run should use: MLflow when ``cfg.enabled``, else a no-op."""
    if not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, default_name, run_id=run_id, system_metrics=system_metrics)
