"""Scale-out stores for real, set up as the README's team recipe: a throwaway PostgreSQL server whose role
logs in with a password backs an MLflow tracking server (basic-auth app, backend URI from the environment)
and the Optuna storage (its URL in an environment variable that the workflow config names); a tiny grid
plus a study run through Snakemake against both, every job logging in through MLFLOW_TRACKING_USERNAME /
_PASSWORD. A one-point grid then tracks straight into PostgreSQL through a password-bearing
$MLFLOW_TRACKING_URI. After each, every file of the run's folder (Snakemake's logs included), its terminal
output, the command lines sampled while it ran, the MLflow store and the Optuna study are searched for the
passwords.

Without PostgreSQL binaries the tests skip with the reason, unless ``PALIMPSA_REQUIRE_POSTGRES=1`` (CI):
then a missing server is a failure, so a green CI run means these stores were exercised.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from leak_search import file_hits, mlflow_store_text, optuna_text, text_hits, watch_processes
from mlflow_sandbox import ADMIN, create_user, mlflow_server, status
from postgres_sandbox import available, password_database, postgres_server
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("PALIMPSA_REQUIRE_POSTGRES") == "1"

BASE = tiny_config("pg")
KINDS = ["palimpsa", "mamba2"]
TRIALS = 3
MEMBER = "palimpsa-ci"  # the team member the jobs log in as
OPTUNA_ENV = "PALIMPSA_TEST_OPTUNA_STORAGE"  # the variable that holds the Optuna URL (tuning.storage_env)


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


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    """The database role's, the MLflow admin's and the team member's: what no output may contain."""
    return {who: secrets.token_urlsafe(18) for who in ("database", "admin", "member")}


@pytest.fixture(scope="module")
def tracking_server(
    postgres: str, passwords: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """`mlflow server --app-name basic-auth` on a password-protected PostgreSQL database; a member's login."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    backend = password_database(postgres, "mlflow", passwords["database"])
    with mlflow_server(folder, backend, admin_password=passwords["admin"]) as url:
        create_user(url, (ADMIN, passwords["admin"]), MEMBER, passwords["member"])
        yield {"url": url, "folder": folder}


@pytest.fixture(scope="module")
def member_login(tracking_server: dict, passwords: dict) -> Iterator[None]:
    """This process and the jobs it starts log in as the member, through MLflow's environment variables."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", MEMBER)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", passwords["member"])
        yield


def _write_inputs(work: Path, kinds: list[str], studies: bool) -> None:
    (work / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"description": "pg grid", "base": "base.yaml", "product": {"model.mixer.kind": kinds}}
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
        "mlflow": {"tracking_uri": "sqlite:///results/never-used.db"},  # the environment's store wins
        "tuning": {"studies": [str(work / "tune-pg.yaml")] if studies else [], "workers": 2},
        "report": {"enabled": False},
    }
    if studies:
        config["tuning"]["storage_env"] = OPTUNA_ENV
    (work / "config.yaml").write_text(yaml.safe_dump(config))


def _snakemake(work: Path, env: dict[str, str], secrets_: list[str], what: str) -> dict:
    """Run the workflow in ``work`` (commands printed, so the logs show them) while the process list is
    sampled for the secrets; the terminal output and the samples come back."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work)]
    cmd += ["--configfile", str(work / "config.yaml"), "--cores", "2", "--keep-going", "--show-failed-logs"]
    start = time.perf_counter()
    with watch_processes(secrets_) as processes:
        proc = subprocess.run(
            [*cmd, "--printshellcmds"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    print(f"{what} through Snakemake on PostgreSQL: {time.perf_counter() - start:.1f}s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return {"output": proc.stdout + proc.stderr, "processes": processes}


@pytest.fixture(scope="module")
def project(
    postgres: str,
    tracking_server: dict,
    member_login: None,
    passwords: dict,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """A tiny grid and study run through Snakemake, tracked by the server, tuned on PostgreSQL."""
    work = tmp_path_factory.mktemp("pgflow")
    optuna_url = password_database(postgres, "optuna", passwords["database"])
    _write_inputs(work, KINDS, studies=True)
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env.update({"MLFLOW_TRACKING_URI": tracking_server["url"], OPTUNA_ENV: optuna_url})
    ran = _snakemake(work, env, list(passwords.values()), "grid + study")
    return {"work": work, "tracking_uri": tracking_server["url"], "optuna_url": optuna_url, **ran}


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


def _assert_the_password_is_needed(url: str) -> None:
    """The URL's password is what lets it in (on the sandbox's server; a given server may trust anyone)."""
    import psycopg2

    if os.environ.get("PALIMPSA_TEST_POSTGRES_URL"):
        return
    head, _, rest = url.partition("://")
    user, _, host = rest.partition("@")
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(f"{head}://{user.partition(':')[0]}@{host}").close()


def _assert_no_leak(roots: list[Path], ran: dict, store_client: object, secrets_: list[str]) -> int:
    """Zero hits in the files, the terminal output, the command lines and the MLflow store; returns the number
    of runs the store holds (the search covered them)."""
    planted = roots[0].parent / f"{roots[0].name}-control"
    planted.mkdir(exist_ok=True)
    (planted / "log.txt").write_text(f"x{secrets_[0]}x")
    assert file_hits([planted], secrets_), "the file search finds a planted password"
    assert file_hits(roots, secrets_) == []
    assert text_hits(ran["output"], secrets_) == []
    assert ran["processes"]["samples"] >= 10 and ran["processes"]["hits"] == []
    text, runs = mlflow_store_text(store_client)
    assert text_hits(text, secrets_) == []
    return runs


@pytest.mark.slow
def test_no_password_in_results_logs_command_lines_or_stores(
    project: dict, tracking_server: dict, passwords: dict
) -> None:
    import optuna
    from mlflow import MlflowClient

    _assert_the_password_is_needed(project["optuna_url"])
    assert status(f"{project['tracking_uri']}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    work, secrets_ = project["work"], list(passwords.values())
    assert (work / ".snakemake" / "log").is_dir() and (work / "results" / "tuning" / "tune-pg").is_dir()
    roots = [work, tracking_server["folder"] / "mlartifacts", tracking_server["folder"] / "auth.ini"]
    runs = _assert_no_leak(roots, project, MlflowClient(project["tracking_uri"]), secrets_)
    assert runs >= len(KINDS) + 1 + TRIALS + 1  # points, sweep, trials, study
    study = optuna.load_study(study_name="tune-pg", storage=project["optuna_url"])
    assert text_hits(optuna_text(study), secrets_) == []


@pytest.fixture(scope="module")
def direct(postgres: str, passwords: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-point grid whose $MLFLOW_TRACKING_URI is a PostgreSQL URL with the password in it."""
    work = tmp_path_factory.mktemp("pgdirect")
    uri = password_database(postgres, "mlflow_direct", passwords["database"])
    _write_inputs(work, KINDS[:1], studies=False)
    drop = ("SNAKEMAKE_PROFILE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "MLFLOW_TRACKING_URI": uri}
    return {"work": work, "tracking_uri": uri, **_snakemake(work, env, list(passwords.values()), "one point")}


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_stays_in_the_environment(direct: dict, passwords: dict) -> None:
    from mlflow import MlflowClient

    _assert_the_password_is_needed(direct["tracking_uri"])
    work = direct["work"]
    (point,) = [d for d in (work / "results" / "runs" / "pggrid").iterdir() if d.is_dir()]
    assert yaml.safe_load((point / "run.yaml").read_text())["tracking"]["tracking_uri"] is None
    marker = json.loads((work / "results" / "meta" / "mlflow-store.json").read_text())
    assert marker["tracking_uri"].startswith("postgresql://palimpsa_pw:***@")
    assert "--backend-store-uri postgresql://palimpsa_pw:***@" in direct["output"]  # the end message
    client = MlflowClient(direct["tracking_uri"])
    assert _assert_no_leak([work], direct, client, list(passwords.values())) == 2  # the point, the sweep
    run_id = json.loads((point / "metrics.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
