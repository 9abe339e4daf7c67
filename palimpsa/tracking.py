"""Experiment tracking: one MLflow run per training job, or a no-op when tracking is off.

MLflow is imported only here, and only when a tracker is opened, so the core library trains on a
bare box with just torch. The MLflow client API is used (not the fluent global run stack), so a
process that runs many trainings (a sweep) never trips over a stale "active run".

A job killed at any moment keeps its run id in ``OUT/mlflow_run_id``; the rerun reopens that same
run (status back to RUNNING) instead of leaving an orphan and starting a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from palimpsa.config import ConfigError, TrackingConfig

DEFAULT_URI = "sqlite:///results/mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # next to the SQLite file, never ./mlruns
RESULT_TAG = "result."  # tag prefix of a finished run's text results (device, precision, stop reason, ...)
_BATCH = 100  # MLflow's limit of params/tags per log_batch request
_T = TypeVar("_T")

log = logging.getLogger(__name__)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then the project's SQLite file under ``results/``."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to cwd, or absolute with four slashes)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


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


def _retry(fn: Callable[[], _T], what: str, attempts: int = 6) -> _T:
    """Retry store calls: parallel jobs sharing one SQLite file can briefly see it locked."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # the store raises assorted SQLAlchemy/MLflow errors
            if attempt == attempts - 1 or not _transient(err):
                raise
            log.warning("mlflow %s failed (%s); retrying in %.1fs", what, err, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _transient(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("locked", "busy", "operationalerror", "already exists", "timeout"))


def _text(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

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
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
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
            tags = {str(k): str(v) for k, v in cfg.tags.items()}
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
            self.client.get_run(run_id)
        except Exception as err:
            warnings.warn(
                f"mlflow run {run_id} not found in {self.uri} ({err}); starting a new run", stacklevel=3
            )
            return None
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"), "update_run")
        _retry(lambda: self.client.set_tag(run_id, "palimpsa.resumed", "true"), "set_tag")
        self.resumed = True
        return run_id

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
                self.set_tags({"failure_reason": reason})
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
            return found.experiment_id
        location = None
        if db is not None:  # artifacts next to the database, not in ./mlruns of whatever cwd
            location = (db.parent / ARTIFACT_DIR / _safe(name)).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)

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
