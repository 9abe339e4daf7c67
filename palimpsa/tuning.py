"""Optuna studies over a run config: a YAML search space, pruning on validation curves, MLflow per trial.

A study spec (``ablations/tune-*.yaml``) names a base run config, dotted overrides, the metric and a
search space (``dotted.key: {type: float|int|categorical, low, high, log, step, choices}``). Several
workers (processes, Snakemake jobs, machines sharing a file system) run trials on one storage until the
study's queue is empty; the default storage is a journal file, safe for parallel writers without a
database server, and any database URL works too (with heartbeats: a trial whose worker stops beating is
failed and retried once). The init stage queues exactly ``n_trials`` trials; workers take them with
Optuna's public ``study.optimize(n_trials=1)``, which claims a queued trial first (an atomic state change in
every storage). A worker that finds the queue empty at the very moment another takes the last trial gets a
fresh trial instead: it is marked ``palimpsa.surplus`` and pruned at once, never trained, and not counted.
Each trial trains through
:func:`palimpsa.training.train` with an ``on_eval`` hook that reports the validation metric and raises
:class:`optuna.TrialPruned` when the pruner says so; each trial is an MLflow run nested under one study
run. The best trial's parameters land in ``best.yaml`` as dotted overrides that a grid can reference with
``overrides_from``.

A storage URL with a password never goes on the command line (the process list shows it) or in a config:
``--storage-env NAME`` reads it from an environment variable, ``--storage-file PATH`` from an owner-only
file, and a PostgreSQL URL without a password uses ``~/.pgpass``. Journals and SQLite files are created
readable by their owner only (:func:`palimpsa.atomic.private_file`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from palimpsa.atomic import private_file, write_text
from palimpsa.config import ConfigError, config_from_dict, config_to_dict
from palimpsa.credentials import (
    find_password,
    mask_text,
    mask_url,
    password_message,
    print_masked_traceback,
    read_secret,
    reject_password,
)
from palimpsa.errors import StopTraining
from palimpsa.grid import GridError, read_overrides, resolve_path, schema_errors
from palimpsa.io import YamlFileError, read_yaml, set_key, yaml_load
from palimpsa.tracking import ensure_experiment, open_client, sqlite_path
from palimpsa.training import train
from palimpsa.training.files import read_run_id

log = optuna.logging.get_logger("optuna.palimpsa")  # optuna's handler: lines in the worker log

STUDY_ATTR_PARENT = "mlflow_parent_run_id"
QUEUED = "palimpsa.queued"  # user attr of the trials the init stage (or a retirement) queued
REPLACES = "palimpsa.replaces"  # number of the trial a queued replacement stands in for
SURPLUS = "palimpsa.surplus"  # a fresh trial taken while the queue emptied: pruned untrained
HEARTBEAT_S, GRACE_S = 60, 300  # database storages: beat every minute, fail after five silent minutes


@dataclass
class TuneSpec:
    """A validated study spec; ``config`` is the base run config mapping with overrides applied."""

    name: str
    path: Path | None
    config: dict[str, Any]
    space: dict[str, dict[str, Any]]
    metric: str = "val_accuracy"
    direction: str = "maximize"
    n_trials: int = 8
    sampler: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def experiment(self) -> str:
        return self.name if self.name.startswith("tune") else f"tune-{self.name}"


def _default_direction(metric: str) -> str:
    return "minimize" if any(w in metric for w in ("loss", "perplexity", "nll", "error")) else "maximize"


def load_tune_spec(
    source: str | Path | dict[str, Any], extra: dict[str, Any] | None = None, name: str | None = None
) -> TuneSpec:
    """Read and validate a study spec (a file or a mapping). ``extra``: dotted overrides on top."""
    path = Path(source) if not isinstance(source, dict) else None
    where = path or "tuning spec"
    if path is not None:
        try:
            data = read_yaml(path, "tuning spec")
        except YamlFileError as err:
            raise GridError("", err.message, path) from None
    else:
        data = copy.deepcopy(source)
    if not isinstance(data, dict):
        raise GridError("", "a tuning spec must be a YAML mapping", where)
    errors = schema_errors(data, "tune.schema.yaml")
    if errors:
        raise GridError(errors[0][0], errors[0][1], where)
    secret = find_password(data)  # a spec ends up in job params and MLflow params
    if secret is not None:
        raise GridError(secret[0], password_message(secret[1]), where)
    base = data["base"]
    if isinstance(base, str):
        base_path = resolve_path(base, path) if path else Path(base)
        try:
            base = read_yaml(base_path, "base config")
        except YamlFileError as err:
            raise GridError("base", err.message, where) from None
    cfg = copy.deepcopy(base)
    for key, value in (data.get("overrides") or {}).items():
        set_key(cfg, key, value, f"overrides.{key}")
    for key, value in (extra or {}).items():
        set_key(cfg, key, value, f"run_overrides.{key}")
    try:
        cfg = config_to_dict(config_from_dict(cfg))
    except ConfigError as err:
        raise GridError(err.key, err.message, where) from None
    space = data["space"]
    _check_space(cfg, space, where)
    metric = data.get("metric", "val_accuracy")
    return TuneSpec(
        name=name or data.get("study") or (path.stem if path else "study"),
        path=path,
        config=cfg,
        space=space,
        metric=metric,
        direction=data.get("direction") or _default_direction(metric),
        n_trials=int(data.get("n_trials", 8)),
        sampler=data.get("sampler") or {},
        pruner=data.get("pruner") or {},
        description=data.get("description", ""),
    )


def _check_space(cfg: dict[str, Any], space: dict[str, Any], where: Any) -> None:
    """Every bound and choice must give a valid run config: a bad space fails before any trial runs."""
    for key, dist in space.items():
        if dist["type"] == "categorical":
            probes = dist["choices"]
        else:
            if dist["low"] > dist["high"]:
                raise GridError(f"space.{key}.low", f"low {dist['low']} > high {dist['high']}", where)
            if dist.get("log") and dist["low"] <= 0:
                raise GridError(f"space.{key}.low", "a log-scaled range needs low > 0", where)
            if dist["type"] == "int" and not all(float(dist[b]).is_integer() for b in ("low", "high")):
                raise GridError(f"space.{key}", "an int range needs integer low and high", where)
            probes = [dist["low"], dist["high"]]
        for value in probes:
            probe = copy.deepcopy(cfg)
            try:
                set_key(probe, key, value, key)
                config_from_dict(probe)
            except ConfigError as err:
                raise GridError(f"space.{key}", f"value {value!r}: {err.key}: {err.message}", where) from None
            except Exception as err:  # a dotted key that runs into a non-mapping
                raise GridError(f"space.{key}", str(err), where) from None


# --------------------------------------------------------------------------- storage and study


def storage_url(url: str | None = None, env: str | None = None, file: str | Path | None = None) -> str | None:
    """The storage the user chose: ``url`` (a journal path, or a database URL without a password, since it
    shows in configs, job logs and the process list), or a URL read from the environment variable ``env``
    or the owner-only file ``file``, where a password may live. None: the default journal."""
    if sum(bool(x) for x in (url, env, file)) > 1:
        raise ConfigError("", "give one of --storage, --storage-env and --storage-file", "Optuna storage")
    if env or file:
        return read_secret(env=env or None, file=file or None)
    reject_password(url, "--storage")
    return url or None


def make_storage(storage: str | None, out_dir: str | Path) -> Any:
    """None: a journal file in ``out_dir``; a URL with ``://``: a database; other strings: a journal path."""
    from optuna.storages import JournalStorage

    if storage and "://" in storage:
        return _database_storage(storage)
    path = private_file(Path(storage) if storage else Path(out_dir) / "optuna.journal")
    return JournalStorage(_journal_backend(path))


def _journal_backend(path: Path) -> Any:
    """An open(O_EXCL) lock file: works on local disks and network file systems alike."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))


def _database_storage(url: str) -> Any:
    """An RDB storage with heartbeats; a failure to open it is one line with the URL's password masked."""
    from optuna.storages import RDBStorage

    db = sqlite_path(url)
    if db is not None:
        private_file(db)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)  # copies the trial, attrs included
    try:
        return RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=retry,
        )
    except Exception as err:  # SQLAlchemy's assorted connect and parse errors
        reason = mask_text(" ".join(f"{type(err).__name__}: {err}".split()))
        raise ConfigError("", f"cannot open it: {reason}", f"Optuna storage {mask_url(url)}") from None


def _sampler(spec: TuneSpec) -> optuna.samplers.BaseSampler:
    kind = spec.sampler.get("kind", "tpe")
    seed = spec.sampler.get("seed")
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = spec.sampler.get("n_startup_trials", min(10, max(2, spec.n_trials // 3)))
    # Distinct seeds per worker: identical seeds would make parallel workers propose the same points.
    if seed is not None:
        seed = seed + os.getpid() % 10007
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    kind = spec.pruner.get("kind", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.pruner.get("min_resource", "auto"),
            reduction_factor=spec.pruner.get("reduction_factor", 3),
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruner.get("n_startup_trials", 2),
        n_warmup_steps=spec.pruner.get("n_warmup_steps", 0),
    )


def open_study(spec: TuneSpec, storage: Any, create: bool = True) -> optuna.Study:
    return (optuna.create_study if create else optuna.load_study)(
        study_name=spec.name,
        storage=storage,
        sampler=_sampler(spec),
        pruner=_pruner(spec),
        **({"direction": spec.direction, "load_if_exists": True} if create else {}),
    )


def init_study(
    spec: TuneSpec,
    storage: Any,
    out_dir: str | Path,
    track: bool = True,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
) -> dict[str, Any]:
    """Create the study and its MLflow parent run, queue its trials; write ``out_dir/study.json``.

    Idempotent: a rerun (or a larger ``n_trials``) only queues the trials the study still lacks. Run it
    once, before the workers: queueing is the one step that must not race.
    """
    study = open_study(spec, storage)
    _queue_missing(study, n_trials or spec.n_trials)
    parent = study.user_attrs.get(STUDY_ATTR_PARENT)
    if track and not parent:
        parent = _create_parent_run(spec, tracking_uri)
        study.set_user_attr(STUDY_ATTR_PARENT, parent)
    info = {
        "study": spec.name,
        "direction": spec.direction,
        "metric": spec.metric,
        "n_trials": n_trials or spec.n_trials,
        "mlflow_parent_run_id": parent,
        "experiment": spec.experiment,
    }
    write_text(Path(out_dir) / "study.json", json.dumps(info, indent=1) + "\n")
    return info


def _create_parent_run(spec: TuneSpec, tracking_uri: str | None) -> str:
    client = open_client(tracking_uri or _default_tracking_uri())
    exp_id = ensure_experiment(client, spec.experiment)  # artifacts beside the store, under its lock
    run = client.create_run(
        exp_id,
        run_name=spec.name,
        tags={"palimpsa.role": "study", "optuna.study": spec.name, "optuna.metric": spec.metric},
    )
    client.log_param(run.info.run_id, "n_trials", spec.n_trials)
    for key, dist in spec.space.items():
        client.log_param(run.info.run_id, f"space.{key}", json.dumps(dist, sort_keys=True))
    client.set_terminated(run.info.run_id, "FINISHED")  # children attach by tag; the parent holds summaries
    return run.info.run_id


def _default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///results/mlflow.db"


# --------------------------------------------------------------------------- trials


def _suggest(trial: optuna.Trial, key: str, dist: dict[str, Any]) -> Any:
    kind = dist["type"]
    if kind == "categorical":
        return trial.suggest_categorical(key, dist["choices"])
    if kind == "int":
        return trial.suggest_int(
            key,
            int(dist["low"]),
            int(dist["high"]),
            step=int(dist.get("step", 1)),
            log=dist.get("log", False),
        )
    return trial.suggest_float(
        key, float(dist["low"]), float(dist["high"]), step=dist.get("step"), log=dist.get("log", False)
    )


def trial_config(spec: TuneSpec, params: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(spec.config)
    for key, value in params.items():
        set_key(cfg, key, value, key)
    return cfg


def _alive(host: str | None, pid: int | None) -> bool:
    if host != socket.gethostname() or not pid:
        return True  # another machine's worker: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _queue(study: optuna.Study, count: int, replaces: int | None = None) -> None:
    """Queue ``count`` empty trials (the sampler fills their parameters when a worker takes them)."""
    attrs: dict[str, Any] = {QUEUED: True} if replaces is None else {QUEUED: True, REPLACES: replaces}
    for _ in range(count):
        study.enqueue_trial({}, user_attrs=attrs, skip_if_exists=False)


def _replaced(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials another one stands in for: retired here, or retried after a missed heartbeat."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    out = {t.user_attrs[REPLACES] for t in trials if REPLACES in t.user_attrs}
    with warnings.catch_warnings():  # a public helper Optuna still labels experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return out | {n for t in trials if (n := retry.retried_trial_number(t)) is not None}


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The study's own trials: queued ones that nothing replaced (surplus and replaced trials left out)."""
    replaced = _replaced(trials)
    return [t for t in trials if t.user_attrs.get(QUEUED) and t.number not in replaced]


def _queue_missing(study: optuna.Study, total: int) -> int:
    """Queue trials until ``total`` count towards the study."""
    missing = max(0, total - len(counted(study.get_trials(deepcopy=False))))
    _queue(study, missing)
    return missing


def _retire(study: optuna.Study, number: int) -> bool:
    """Fail a trial whose worker is gone and queue one replacement, once even if several workers try: the
    FAIL is a compare-and-set in every storage, and only the worker that wins it queues."""
    try:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    _queue(study, 1, replaces=number)
    return True


def _retire_stale_trials(study: optuna.Study) -> None:
    """A worker killed mid-trial leaves it RUNNING forever; retire those of dead local processes (database
    storages also fail trials whose heartbeat stopped, on any machine)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _alive(t.user_attrs.get("host"), t.user_attrs.get("pid")):
            _retire(study, t.number)


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def make_objective(
    spec: TuneSpec,
    out_dir: Path,
    parent_run_id: str | None,
    track: bool,
    tracking_uri: str | None,
    data_dir: str | Path | None = None,
) -> Any:
    class Pruned(StopTraining):
        """Optuna's verdict, carried through the trainer (which ends the MLflow run KILLED)."""

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: _suggest(trial, key, dist) for key, dist in spec.space.items()}
        cfg_dict = trial_config(spec, params)
        run_dir = out_dir / "trials" / f"{trial.number:04d}"
        cfg_dict["name"] = f"{spec.name}-trial{trial.number:04d}"
        cfg_dict["tracking"].update(
            enabled=track,
            experiment=spec.experiment,
            run_name=f"{spec.name}-trial{trial.number:04d}",
            parent_run_id=parent_run_id,
            tags={
                **cfg_dict["tracking"].get("tags", {}),
                "palimpsa.role": "trial",
                "optuna.study": spec.name,
                "optuna.trial": str(trial.number),
            },
        )
        if tracking_uri:
            cfg_dict["tracking"]["tracking_uri"] = tracking_uri
        cfg = config_from_dict(cfg_dict, source=f"{spec.path or spec.name} (trial {trial.number})")
        trial.set_user_attr("run_dir", str(run_dir))

        def on_eval(step: int, metrics: dict[str, Any]) -> None:
            value = metrics.get(spec.metric)
            if value is None or not math.isfinite(float(value)):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                raise Pruned(f"pruned by Optuna at step {step}: {spec.metric} = {float(value):.4g}")

        try:
            result = train(cfg, run_dir, data_dir=data_dir, progress=False, on_eval=on_eval)
        except Pruned as err:
            _tag_run(tracking_uri, run_dir, "PRUNED")
            raise optuna.TrialPruned(str(err)) from None
        _tag_run(tracking_uri, run_dir, "COMPLETE")
        if result.get("mlflow_run_id"):
            trial.set_user_attr("mlflow_run_id", result["mlflow_run_id"])
        status = str(result.get("status", "FINISHED")).upper()
        value = result.get(f"best_{spec.metric}", result.get(spec.metric))
        if status not in ("FINISHED", "COMPLETED", "OK") or value is None or not math.isfinite(float(value)):
            raise RuntimeError(f"trial {trial.number} ended {status} with {spec.metric} = {value}")
        return float(value)

    return objective


def _tag_run(tracking_uri: str | None, run_dir: Path, state: str) -> None:
    """Tag the trial's MLflow run with its Optuna state, so the UI can filter pruned trials
    (``tags.optuna.state = 'PRUNED'``); nothing when the trial was not tracked."""
    run_id = read_run_id(run_dir)
    if run_id:
        open_client(tracking_uri or _default_tracking_uri()).set_tag(run_id, "optuna.state", state)


def run_worker(
    spec: TuneSpec,
    storage: Any,
    out_dir: str | Path,
    n_trials: int | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, int]:
    """Take queued trials until none is left (:func:`init_study` queued them); return my tally.

    ``n_trials`` caps how many trials this worker runs (None: as many as it can take). An interrupt fails
    the trial in hand (Optuna does that) and queues its replacement before it propagates.
    """
    out_dir = Path(out_dir)
    study = open_study(spec, storage)
    _retire_stale_trials(study)
    parent = study.user_attrs.get(STUDY_ATTR_PARENT)
    objective = make_objective(spec, out_dir, parent, track, tracking_uri, data_dir)
    mine: dict[str, int] = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    taken: list[int] = []

    def queued_only(trial: optuna.Trial) -> float:
        taken.append(trial.number)
        if not trial.user_attrs.get(QUEUED):
            trial.set_user_attr(SURPLUS, True)
            raise optuna.TrialPruned("surplus: the queue was empty when this trial was taken")
        try:
            return objective(trial)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as err:
            raise _failed(trial, err) from None

    while (n_trials is None or sum(mine.values()) < n_trials) and _waiting(study):
        try:
            study.optimize(queued_only, n_trials=1, catch=(Exception,), gc_after_trial=True)
        except KeyboardInterrupt:
            if taken:
                _queue(study, 1, replaces=taken[-1])
            raise
        trial = study.get_trials(deepcopy=False)[taken[-1]]
        if trial.user_attrs.get(SURPLUS):
            break
        mine[trial.state.name] += 1
    return mine


class TrialFailed(RuntimeError):
    """A trial's error with URL passwords masked: what Optuna logs and stores in place of the original."""


def _failed(trial: optuna.Trial, err: Exception) -> TrialFailed:
    """Record why a trial failed (``fail_reason``), log the masked traceback, return the masked error."""
    reason = mask_text(f"{type(err).__name__}: {err}")
    trial.set_user_attr("fail_reason", reason[:2000])
    log.warning("trial %d failed:\n%s", trial.number, mask_text(traceback.format_exc()).rstrip())
    return TrialFailed(reason)


# --------------------------------------------------------------------------- best parameters and tables


def write_best(spec: TuneSpec, storage: Any, out_dir: str | Path, tracking_uri: str | None = None) -> dict:
    """Write ``best.yaml`` (dotted overrides + provenance) and ``trials.parquet``; log the best to MLflow."""
    out_dir = Path(out_dir)
    study = open_study(spec, storage, create=False)
    trials = study.get_trials(deepcopy=False)
    own = counted(trials)
    counts = {s.name.lower(): sum(t.state == s for t in own) for s in optuna.trial.TrialState}
    complete = [t for t in own if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise GridError(
            "", f"study {spec.name!r} has no complete trial ({counts}); see the trial logs", out_dir
        )
    best = study.best_trial
    overrides = {key: best.params[key] for key in spec.space}
    best_doc = {
        "study": spec.name,
        "metric": spec.metric,
        "direction": spec.direction,
        "value": float(best.value),
        "trial": best.number,
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "trials": {k: v for k, v in counts.items() if v},
        "overrides": overrides,
    }
    header = (
        f"# Best trial of study {spec.name} ({spec.metric} = {best.value:.4g}, {spec.direction}).\n"
        f"# A grid uses these values with: overrides_from: {out_dir / 'best.yaml'}\n"
    )
    write_text(out_dir / "best.yaml", header + yaml.safe_dump(best_doc, sort_keys=False))
    _write_trials_table(study, spec, out_dir)
    parent = study.user_attrs.get(STUDY_ATTR_PARENT)
    if parent:
        _summarise_parent(parent, study, spec, best_doc, out_dir, tracking_uri)
    return best_doc


def _summarise_parent(
    parent: str, study: optuna.Study, spec: TuneSpec, best: dict, out_dir: Path, tracking_uri: str | None
) -> None:
    """The study's MLflow run carries its result: best value and parameters, trial counts, best.yaml, the
    trials table and a parameter-importance figure (fANOVA over the complete trials, when two or more)."""
    client = open_client(tracking_uri or _default_tracking_uri())
    client.log_metric(parent, f"best_{spec.metric}", best["value"])
    for key, value in best["overrides"].items():
        client.set_tag(parent, f"best.{key}", str(value))
    for state, count in best["trials"].items():
        client.log_metric(parent, f"trials_{state}", count)
    for name in ("best.yaml", "trials.parquet"):
        client.log_artifact(parent, str(out_dir / name))
    figure = _importance_figure(study, spec, out_dir)
    if figure is not None:
        client.log_artifact(parent, str(figure))


def _importance_figure(study: optuna.Study, spec: TuneSpec, out_dir: Path) -> Path | None:
    complete = [t for t in counted(study.trials) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        importance = optuna.importance.get_param_importances(study, params=list(spec.space))
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importance)), layout="constrained")
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="#4c72b0")
    ax.set_xlabel(f"fANOVA importance for {spec.metric} ({len(complete)} complete trials)")
    path = out_dir / "importance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_trials_table(study: optuna.Study, spec: TuneSpec, out_dir: Path) -> None:
    import polars as pl

    rows, curves = [], []
    for t in study.get_trials(deepcopy=False):
        row = {
            "study": spec.name,
            "trial": t.number,
            "state": t.state.name,
            "value": t.value,
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "last_step": max(t.intermediate_values) if t.intermediate_values else None,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        }
        row.update({f"param.{k}": t.params.get(k) for k in spec.space})
        rows.append(row)
        curves += [
            {"study": spec.name, "trial": t.number, "state": t.state.name, "step": s, spec.metric: v}
            for s, v in sorted(t.intermediate_values.items())
        ]
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(out_dir / "trials.parquet")
    schema = {
        "study": pl.String,
        "trial": pl.Int64,
        "state": pl.String,
        "step": pl.Int64,
        spec.metric: pl.Float64,
    }
    pl.DataFrame(curves, schema=schema).write_parquet(out_dir / "trial_curves.parquet")


def run_study(
    base_cfg: dict[str, Any] | str | Path,
    space: dict[str, Any] | str | Path,
    study_name: str,
    storage: str | None,
    n_trials: int,
    out_dir: str | Path,
    *,
    metric: str = "val_accuracy",
    direction: str | None = None,
    pruner: dict[str, Any] | None = None,
    sampler: dict[str, Any] | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """One-call study: create, run ``n_trials`` in this process, write best.yaml; return the best doc.

    ``space`` is a mapping (or YAML file) of dotted key -> distribution, or a whole study spec.
    """
    if isinstance(space, (str, Path)):
        space = read_yaml(space, "search space")
    spec_dict = dict(space) if "space" in space else {"space": space}
    spec_dict.update(base=base_cfg if isinstance(base_cfg, dict) else str(base_cfg), metric=metric)
    spec_dict.update(n_trials=n_trials, study=study_name)
    if direction:
        spec_dict["direction"] = direction
    if pruner is not None:
        spec_dict["pruner"] = pruner
    if sampler is not None:
        spec_dict["sampler"] = sampler
    spec = load_tune_spec(spec_dict)
    store = make_storage(storage, out_dir)
    init_study(spec, store, out_dir, track=track, tracking_uri=tracking_uri, n_trials=n_trials)
    run_worker(spec, store, out_dir, track=track, tracking_uri=tracking_uri, data_dir=data_dir)
    return write_best(spec, store, out_dir, tracking_uri=tracking_uri)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: Any) -> None:
    parser.add_argument("spec", help="study spec YAML (ablations/tune-*.yaml)")
    parser.add_argument("--out", help="output folder (default results/tuning/<study>)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--storage",
        help="journal file path or database URL without a password (default: <out>/optuna.journal)",
    )
    where.add_argument(
        "--storage-env", metavar="NAME", help="read the storage URL from this environment variable"
    )
    where.add_argument(
        "--storage-file", metavar="PATH", help="read the storage URL from this owner-only file"
    )
    parser.add_argument(
        "--n-trials", type=int, help="trials in the study, queued by the init stage (default: the spec's)"
    )
    parser.add_argument("--stage", choices=["all", "init", "work", "best"], default="all")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override every trial"
    )
    parser.add_argument("--no-track", action="store_true", help="no MLflow runs")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI without a password (default $MLFLOW_TRACKING_URI or sqlite)",
    )
    parser.add_argument("--data-dir", help="cache folder for generated task data")
    parser.add_argument("--done-file", help="write this worker's tally as JSON here (workflow marker)")


def run_cli(args: Any) -> int:
    """Run the stages ``args.stage`` asks for; user errors print one line and return 2."""
    try:
        extra = {}
        for item in args.set:
            key, sep, text = item.partition("=")
            if not sep:
                raise GridError("", f"override {item!r} is not of the form key=value", "--set")
            extra[key] = yaml_load(text)
        spec = load_tune_spec(args.spec, extra=extra)
        out_dir = Path(args.out or f"results/tuning/{spec.name}")
        reject_password(args.tracking_uri, "--tracking-uri")
        storage = make_storage(storage_url(args.storage, args.storage_env, args.storage_file), out_dir)
        track = not args.no_track
        if args.stage in ("all", "init"):
            init_study(
                spec, storage, out_dir, track=track, tracking_uri=args.tracking_uri, n_trials=args.n_trials
            )
        if args.stage in ("all", "work"):
            tally = run_worker(spec, storage, out_dir, None, track, args.tracking_uri, data_dir=args.data_dir)
            print(f"{spec.name}: this worker ran {tally}", file=sys.stderr)
            if tally["FAIL"] and not (tally["COMPLETE"] or tally["PRUNED"]):
                print(f"error: every trial of this worker failed; see {out_dir}/trials/*/", file=sys.stderr)
                return 1
            if args.done_file:
                write_text(Path(args.done_file), json.dumps(tally) + "\n")
        if args.stage in ("all", "best"):
            best = write_best(spec, storage, out_dir, tracking_uri=args.tracking_uri)
            print(f"{spec.name}: best {spec.metric} = {best['value']:.4g} with {best['overrides']}")
    except ConfigError as err:
        print(f"error: {mask_text(str(err))}", file=sys.stderr)
        return 2
    return 0


def cli_command(parser: Any) -> Any:
    """``palimpsa tune``: the CLI's subcommand hook (adds the arguments, returns the runner)."""
    add_arguments(parser)
    return run_cli


def main(argv: list[str] | None = None) -> int:
    """``palimpsa tune SPEC``: run an Optuna study (or one stage of it, for parallel workflow jobs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="palimpsa tune", description=main.__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except Exception:  # the workflow's entry point: its traceback lands in a job log
        print_masked_traceback()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "TuneSpec",
    "init_study",
    "load_tune_spec",
    "make_storage",
    "storage_url",
    "read_overrides",
    "run_study",
    "run_worker",
    "write_best",
]
