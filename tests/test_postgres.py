"""Scale-out stores for real: a throwaway PostgreSQL server backs an MLflow tracking server (a subprocess
of `mlflow server`) and the Optuna storage, and a tiny grid plus a study run through Snakemake against both.

Without PostgreSQL binaries the tests skip with the reason, unless ``PALIMPSA_REQUIRE_POSTGRES=1`` (CI):
then a missing server is a failure, so a green CI run means these stores were exercised.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from postgres_sandbox import available, create_database, postgres_server
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("PALIMPSA_REQUIRE_POSTGRES") == "1"

BASE = tiny_config("pg")
KINDS = ["palimpsa", "mamba2"]
TRIALS = 3


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"PALIMPSA_REQUIRE_POSTGRES=1 but no PostgreSQL server: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    reason = available()
    if reason:
        _unavailable(reason)
    try:
        server = postgres_server()
        url = server.__enter__()
    except Exception as err:  # e.g. initdb present but refusing to start here
        _unavailable(f"PostgreSQL did not start: {type(err).__name__}: {err}")
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a PostgreSQL backend store and a local artifact folder; yields its URL."""
    backend = create_database(postgres, "mlflow")
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    port = _free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115 (outlives this statement)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    cmd += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                text = Path(log.name).read_text()[-3000:]
                pytest.fail(f"mlflow server did not come up (exit {proc.poll()}): {text}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def project(postgres: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny grid and study run through Snakemake, tracked by the server, tuned on PostgreSQL."""
    work = tmp_path_factory.mktemp("pgflow")
    optuna_url = create_database(postgres, "optuna")
    (work / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"description": "pg grid", "base": "base.yaml", "product": {"model.mixer.kind": KINDS}}
    (work / "pggrid.yaml").write_text(yaml.safe_dump(grid))
    study = {
        "description": "pg study",
        "base": "base.yaml",
        "n_trials": TRIALS,
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
    }
    (work / "tune-pg.yaml").write_text(yaml.safe_dump(study))
    config = {
        "results": "results",
        "grids": [str(work / "pggrid.yaml")],
        "run_overrides": {"train.num_threads": 1},
        "data_cache": "results/data",
        "mlflow": {"tracking_uri": "sqlite:///results/never-used.db"},  # the environment's server wins
        "tuning": {"studies": [str(work / "tune-pg.yaml")], "workers": 2, "storage": optuna_url},
        "report": {"enabled": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
         "--configfile", str(work / "config.yaml"), "--cores", "2", "--keep-going", "--show-failed-logs"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    print(f"grid + study through Snakemake on PostgreSQL: {time.perf_counter() - start:.1f}s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return {"work": work, "tracking_uri": mlflow_server, "optuna_url": optuna_url}


@pytest.mark.slow
def test_grid_runs_are_finished_in_the_tracking_server(project: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(project["tracking_uri"])
    exp = client.get_experiment_by_name("pggrid")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    points = [r for r in runs if r.data.tags.get("palimpsa.role") == "point"]
    sweep = [r for r in runs if r.data.tags.get("palimpsa.role") == "sweep"]
    assert len(sweep) == 1 and len(points) == len(KINDS)
    assert all(r.info.status == "FINISHED" for r in points)
    assert {r.data.tags["mlflow.parentRunId"] for r in points} == {sweep[0].info.run_id}
    assert sorted(r.data.params["model.mixer.kind"] for r in points) == sorted(KINDS)
    for r in points:
        assert r.data.metrics["run/steps"] == 8
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "metrics.json" in names, names  # artifacts went through the server's proxy
    runs_dir = project["work"] / "results" / "runs" / "pggrid"
    for d in (d for d in runs_dir.iterdir() if d.is_dir()):
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["mlflow_run_id"] in {r.info.run_id for r in points}
    assert not (project["work"] / "results" / "never-used.db").exists(), "nothing fell back to SQLite"


@pytest.mark.slow
def test_study_trials_live_in_postgres(project: dict) -> None:
    import optuna
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="tune-pg", storage=project["optuna_url"])
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(TRIALS))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in done for t in study.trials)
    assert not list((project["work"] / "results" / "tuning" / "tune-pg").glob("*.journal"))
    best = yaml.safe_load((project["work"] / "results" / "tuning" / "tune-pg" / "best.yaml").read_text())
    assert best["value"] == pytest.approx(study.best_value)

    client = MlflowClient(project["tracking_uri"])
    exp = client.get_experiment_by_name("tune-pg")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("palimpsa.role") == "trial"]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == numbers
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)
