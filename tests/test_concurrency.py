"""Parallel load on the default stores, for real: 8 training processes on one fresh SQLite tracking
store, and 4 Optuna worker processes on one study (the journal storage the workflow uses by default)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
JOBS = 8
WORKERS = 4
TRIALS = 6

TINY = tiny_config(
    "conc",
    train={
        "max_steps": 24,
        "eval_every": 8,
        "checkpoint_every": 8,
        "log_every": 2,
        "num_threads": 1,
        "device": "cpu",
    },
    tracking={"experiment": "conc"},
)


def env_for(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}


def runs_of(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_parallel_training_jobs_share_one_fresh_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # does not exist yet: the jobs create it
    jobs = []
    for i in range(JOBS):
        cfg = {**TINY, "name": f"conc-{i}", "seed": i}
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "palimpsa", "train", str(path), "--out", str(tmp_path / f"run{i}")]
        cmd += ["--quiet", "--data-dir", str(tmp_path / "data")]
        jobs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env_for(uri), stderr=subprocess.PIPE, text=True))
    start = time.perf_counter()
    errors = [job.communicate(timeout=600)[1] for job in jobs]
    print(f"{JOBS} parallel training jobs: {time.perf_counter() - start:.1f}s")
    assert [job.returncode for job in jobs] == [0] * JOBS, "\n".join(e[-2000:] for e in errors)
    for text in errors:
        assert "database is locked" not in text.lower(), text[-2000:]
    runs = runs_of(uri, "conc")
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(f"conc-{i}" for i in range(JOBS)), "lost or extra run"
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for i in range(JOBS):  # each run holds its own final metrics, not a neighbour's
        metrics = yaml.safe_load((tmp_path / f"run{i}" / "metrics.json").read_text())
        (run,) = [r for r in runs if r.info.run_id == metrics["mlflow_run_id"]]
        assert run.info.run_name == f"conc-{i}" and run.data.metrics["run/steps"] == 24


@pytest.mark.slow
def test_parallel_optuna_workers_run_exactly_the_requested_trials(tmp_path: Path) -> None:
    import optuna

    from palimpsa.tuning import SURPLUS, counted, make_storage

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    base = {**TINY, "train": {**TINY["train"], "max_steps": 8, "eval_every": 4}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "description": "parallel workers",
        "base": "base.yaml",
        "n_trials": TRIALS,
        "pruner": {"kind": "none"},
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
    }
    (tmp_path / "tune-conc.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    common = [sys.executable, "-m", "palimpsa", "tune", str(tmp_path / "tune-conc.yaml"), "--out", str(out)]
    common += ["--data-dir", str(tmp_path / "data")]
    init = subprocess.run([*common, "--stage", "init"], cwd=tmp_path, env=env_for(uri), capture_output=True)
    assert init.returncode == 0, init.stderr[-2000:]
    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [*common, "--stage", "work", "--done-file", str(out / f"w{i}.json")],
            cwd=tmp_path,
            env=env_for(uri),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    print(f"{WORKERS} parallel Optuna workers, {TRIALS} trials: {time.perf_counter() - start:.1f}s")
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n".join(e[-2000:] for e in errors)

    study = optuna.load_study(study_name="tune-conc", storage=make_storage(None, out))
    own = counted(study.trials)  # a surplus trial (taken as the queue emptied) is pruned untrained
    numbers = sorted(t.number for t in own)
    assert numbers == list(range(TRIALS)), "lost, extra or duplicated trials"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in own)
    assert all(t.user_attrs.get(SURPLUS) and t.state.name == "PRUNED" for t in study.trials if t not in own)
    tallies = [yaml.safe_load((out / f"w{i}.json").read_text()) for i in range(WORKERS)]
    assert sum(t["COMPLETE"] for t in tallies) == TRIALS
    assert sum(1 for t in tallies if t["COMPLETE"]) >= 2, "the work was shared"

    runs = runs_of(uri, "tune-conc")
    parent = [r for r in runs if r.data.tags.get("palimpsa.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("palimpsa.role") == "trial"]
    assert len(parent) == 1 and len(trials) == TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == numbers
    assert all(r.info.status == "FINISHED" for r in trials)
    by_run = {t.user_attrs["mlflow_run_id"]: t.number for t in own}
    assert {r.info.run_id: int(r.data.tags["optuna.trial"]) for r in trials} == by_run


def test_a_dead_workers_trial_is_replaced_exactly_once(tmp_path: Path) -> None:
    import socket

    import optuna

    from palimpsa.tuning import (
        REPLACES,
        _retire_stale_trials,
        init_study,
        load_tune_spec,
        make_storage,
        run_worker,
    )

    base = {
        **TINY,
        "train": {**TINY["train"], "max_steps": 4, "eval_every": 4},
        "tracking": {"enabled": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec_doc = {
        "description": "dead worker",
        "base": "base.yaml",
        "n_trials": 2,
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
    }
    (tmp_path / "tune-dead.yaml").write_text(yaml.safe_dump(spec_doc))
    spec, out = load_tune_spec(tmp_path / "tune-dead.yaml"), tmp_path / "out"
    init_study(spec, make_storage(None, out), out, track=False)
    init_study(spec, make_storage(None, out), out, track=False)  # idempotent: nothing queued twice
    study = optuna.load_study(study_name=spec.name, storage=make_storage(None, out))
    assert len(study.trials) == 2

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    trial = study.ask()  # a worker took a queued trial, then died without a word
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", int(dead.stdout))
    for _ in range(2):  # two workers find the orphan: one retires it and queues one replacement
        _retire_stale_trials(optuna.load_study(study_name=spec.name, storage=make_storage(None, out)))
    tally = run_worker(spec, make_storage(None, out), out, track=False, data_dir=tmp_path / "data")
    assert tally == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0}
    trials = optuna.load_study(study_name=spec.name, storage=make_storage(None, out)).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"] and trials[trial.number].state.name == "FAIL"
    assert [t.user_attrs.get(REPLACES) for t in trials] == [None, None, trial.number]  # one replacement
