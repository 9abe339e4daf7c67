"""Credentials stay in the environment and in owner-only files: URLs are masked wherever the project writes
them; a password in a config, a grid or on a command line is refused; the Optuna storage URL comes from a
named variable or an owner-only file; stores, journals and checkpoints are owner-only unless
PALIMPSA_FILE_MODE says otherwise; MLflow's basic-auth server refuses anonymous requests and records a run
whose login came from the environment. (test_postgres.py searches a grid and a study on PostgreSQL.)"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from leak_search import file_hits, mlflow_store_text, text_hits
from mlflow_sandbox import ADMIN, create_user, mlflow_server, status
from tiny import tiny_config

from palimpsa import cli
from palimpsa.atomic import FILE_MODE_ENV, file_mode, private_file, write_text
from palimpsa.config import ConfigError, TrackingConfig, config_from_dict
from palimpsa.credentials import has_password, mask_text, mask_url, print_masked_traceback, read_secret
from palimpsa.grid import GridError, load_grid, write_point
from palimpsa.tracking import MlflowTracker
from palimpsa.training import train
from palimpsa.tuning import load_tune_spec, make_storage, storage_url

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cr3t-Pw.42"
SECRET_URL = f"postgresql://alice:{PASSWORD}@db.example.org:5432/optuna"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (SECRET_URL, "postgresql://alice:***@db.example.org:5432/optuna"),
        ("mysql+pymysql://u:p@ss/w@h/db?charset=utf8", "mysql+pymysql://u:***@h/db?charset=utf8"),
        ("https://bob:tok@mlflow.example.org", "https://bob:***@mlflow.example.org"),
        (
            "postgresql://h/db?user=a&password=b&sslmode=require",
            "postgresql://h/db?user=a&password=***&sslmode=require",
        ),
        (
            "postgresql://alice@h/db",
            "postgresql://alice@h/db",
        ),  # ~/.pgpass holds the password: nothing to hide
        ("sqlite:///results/mlflow.db", "sqlite:///results/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("results/tuning/x/optuna.journal", "results/tuning/x/optuna.journal"),
    ],
)
def test_urls_keep_their_user_and_lose_their_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert has_password(url) == (masked != url)


def test_urls_inside_messages_and_tracebacks_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    text = f'could not connect to "{SECRET_URL}": timeout (retry {SECRET_URL}/x)'
    assert PASSWORD not in mask_text(text) and mask_text(text).count("alice:***@db.example.org") == 2
    try:
        raise RuntimeError(f"engine for {SECRET_URL} failed")
    except RuntimeError:
        print_masked_traceback()
    err = capsys.readouterr().err
    assert "RuntimeError: engine for postgresql://alice:***@db.example.org" in err and PASSWORD not in err


# --------------------------------------------------------------------------- refused where others read


def test_a_password_in_a_run_config_or_a_grid_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_config(tracking={"tracking_uri": SECRET_URL}), source="run.yaml")
    assert "tracking.tracking_uri: holds a password" in str(err.value) and PASSWORD not in str(err.value)
    assert "MLFLOW_TRACKING_URI" in str(err.value) and ".pgpass" in str(err.value)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config()))
    grid = {"base": "base.yaml", "overrides": {"tracking.tracking_uri": SECRET_URL}, "product": {"seed": [0]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(GridError) as err:
        load_grid(tmp_path / "g.yaml")
    assert "overrides.tracking.tracking_uri: holds a password" in str(err.value)
    grid = {"base": "base.yaml", "tags": {"data": f"{SECRET_URL}/x"}, "product": {"seed": [0]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(GridError, match=r"g.yaml: tags.data: holds a password \(postgresql://alice:\*\*\*@"):
        load_grid(tmp_path / "g.yaml")
    spec = {
        "base": "base.yaml",
        "overrides": {"task.path": SECRET_URL},
        "space": {"seed": {"type": "int", "low": 0, "high": 1}},
    }
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(GridError) as err:
        load_tune_spec(tmp_path / "tune.yaml")
    assert "overrides.task.path: holds a password" in str(err.value) and PASSWORD not in str(err.value)


def test_a_password_on_a_command_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config()))
    train_args = ["train", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]
    assert cli.main([*train_args, "--set", f"tracking.tracking_uri={SECRET_URL}"]) == 2
    spec = {
        "base": str(tmp_path / "run.yaml"),
        "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}},
    }
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    for option in ("--storage", "--tracking-uri"):
        assert (
            cli.main(["tune", str(tmp_path / "tune.yaml"), "--out", str(tmp_path / "t"), option, SECRET_URL])
            == 2
        )
    err = capsys.readouterr().err
    assert err.count("holds a password (postgresql://alice:***@db.example.org") == 3 and PASSWORD not in err
    store = [sys.executable, str(ROOT / "workflow" / "scripts" / "mlflow_store.py"), "init"]
    proc = subprocess.run(
        [*store, "--out", str(tmp_path / "m.json"), "--tracking-uri", SECRET_URL],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "--tracking-uri: holds a password" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the Optuna storage


def test_the_optuna_storage_comes_from_a_named_variable_or_an_owner_only_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_OPTUNA_URL", SECRET_URL)
    assert storage_url(env="MY_OPTUNA_URL") == SECRET_URL
    monkeypatch.delenv("MY_OPTUNA_URL")
    with pytest.raises(ConfigError, match="MY_OPTUNA_URL: environment variable is not set"):
        storage_url(env="MY_OPTUNA_URL")
    secret = tmp_path / "optuna-url"
    secret.write_text(f"\n{SECRET_URL}\n")
    secret.chmod(0o600)
    assert storage_url(file=secret) == SECRET_URL
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others .*chmod 600"):
        storage_url(file=secret)
    with pytest.raises(ConfigError, match="one of --storage, --storage-env and --storage-file"):
        storage_url("optuna.journal", env="MY_OPTUNA_URL")
    assert storage_url("postgresql://alice@db/optuna") == "postgresql://alice@db/optuna"  # ~/.pgpass
    assert storage_url() is None and read_secret(file=_owner_only(tmp_path / "s", "x")) == "x"


def _owner_only(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_an_unreachable_storage_is_one_masked_line(tmp_path: Path) -> None:
    url = f"postgresql://alice:{PASSWORD}@127.0.0.1:1/optuna"  # nothing listens on port 1
    with pytest.raises(ConfigError) as err:
        make_storage(url, tmp_path)
    assert str(err.value).startswith(
        "Optuna storage postgresql://alice:***@127.0.0.1:1/optuna: cannot open it"
    )
    assert PASSWORD not in str(err.value)


def test_the_workflow_refuses_a_password_in_its_config_and_passes_only_the_variable_name(
    tmp_path: Path,
) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config()))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "product": {"seed": [0]}}))
    spec = {
        "base": "base.yaml",
        "n_trials": 1,
        "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}},
    }
    (tmp_path / "tune-s.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "results": "results",
        "grids": [str(tmp_path / "g.yaml")],
        "mlflow": {"tracking_uri": "sqlite:///results/mlflow.db"},
        "tuning": {"studies": [str(tmp_path / "tune-s.yaml")], "storage": SECRET_URL},
        "report": {"enabled": False},
    }
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKEMAKE_PROFILE", "MLFLOW_TRACKING_URI")}
    refused = _dry_run(tmp_path, config, env)
    assert refused.returncode != 0 and "tuning.storage: holds a password" in refused.stderr
    config["tuning"] = {"studies": config["tuning"]["studies"], "storage_env": "MY_OPTUNA_URL"}
    missing = _dry_run(tmp_path, config, env)
    assert missing.returncode != 0 and "MY_OPTUNA_URL: environment variable is not set" in missing.stderr
    # a password-bearing tracking URI in the environment: accepted, never printed, never in a job's command
    env.update(MY_OPTUNA_URL=SECRET_URL, MLFLOW_TRACKING_URI=SECRET_URL.replace("optuna", "mlflow"))
    planned = _dry_run(tmp_path, config, env)
    out = planned.stdout + planned.stderr
    assert planned.returncode == 0, out[-3000:]
    assert "--storage-env MY_OPTUNA_URL" in out and 'mlflow_store.py" init --out' in out
    assert text_hits(out + refused.stdout + refused.stderr + missing.stderr, [PASSWORD]) == []
    assert file_hits([tmp_path / ".snakemake"], [PASSWORD]) == []


def _dry_run(work: Path, config: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work)]
    cmd += ["--configfile", str(work / "config.yaml"), "-n", "-p", "--cores", "1", "--profile", "none"]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_write_point_keeps_a_password_bearing_tracking_uri_out_of_run_yaml(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config()))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "product": {"seed": [0]}}))
    grid = load_grid(tmp_path / "g.yaml")
    point = grid.points[0]
    cfg = write_point(
        point, grid, None, tmp_path / "a" / "run.yaml", tmp_path / "a" / "point.json", SECRET_URL
    )
    assert cfg["tracking"]["tracking_uri"] is None and file_hits([tmp_path / "a"], [PASSWORD]) == []
    plain = "postgresql://alice@db.example.org/mlflow"
    cfg = write_point(point, grid, None, tmp_path / "b" / "run.yaml", tmp_path / "b" / "point.json", plain)
    assert cfg["tracking"]["tracking_uri"] == plain  # `palimpsa train run.yaml` finds the same store


# --------------------------------------------------------------------------- file modes


def test_stores_journals_and_checkpoints_are_owner_only(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracking = {"tracking_uri": uri, "experiment": "private"}
    cfg = config_from_dict(tiny_config("private", tracking=tracking, train={"num_threads": 1}))
    result = train(cfg, tmp_path / "run", data_dir=tmp_path / "data", progress=False)
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and not [k for k in run.data.params if k.startswith("tracking.")]
    artifacts = tmp_path / "store" / "mlartifacts"
    private = [
        tmp_path / "store" / "mlflow.db",
        *(tmp_path / "run").glob("*.pt"),
        tmp_path / "run" / "metrics.json",
    ]
    private += [*artifacts.rglob("*.pt"), *(tmp_path / "data").rglob("*.pt")]
    assert len(private) >= 6 and {p.name: mode(p) for p in private} == {p.name: 0o600 for p in private}
    make_storage(None, tmp_path / "tune")
    make_storage(f"sqlite:///{tmp_path / 'tune' / 'optuna.db'}", tmp_path / "tune")
    assert mode(tmp_path / "tune" / "optuna.journal") == mode(tmp_path / "tune" / "optuna.db") == 0o600


def test_params_tags_and_failure_reasons_reach_the_store_masked(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=uri, experiment="masked"), "masked", system_metrics=False
    )
    with pytest.raises(RuntimeError), tracker:
        tracker.log_params({"data.source": SECRET_URL})
        tracker.set_tags({"note": f"copied from {SECRET_URL}"})
        raise RuntimeError(f"lost the connection to {SECRET_URL}")
    run = MlflowClient(uri).get_run(tracker.run_id)
    masked = "postgresql://alice:***@db.example.org:5432/optuna"
    assert run.data.params["data.source"] == masked and run.data.tags["note"] == f"copied from {masked}"
    assert run.info.status == "FAILED" and masked in run.data.tags["failure_reason"]
    assert text_hits(mlflow_store_text(MlflowClient(uri))[0], [PASSWORD]) == []


def test_file_mode_says_otherwise_when_the_user_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FILE_MODE_ENV, "640")
    write_text(tmp_path / "shared.json", "{}")
    assert mode(tmp_path / "shared.json") == 0o640
    (tmp_path / "old.db").write_text("")
    (tmp_path / "old.db").chmod(0o666)
    assert mode(private_file(tmp_path / "old.db")) == 0o640 == mode(private_file(tmp_path / "new.db"))
    for bad in ("755", "400", "rw", "1644"):
        monkeypatch.setenv(FILE_MODE_ENV, bad)
        with pytest.raises(ConfigError, match=f"{FILE_MODE_ENV}: must be an octal mode"):
            file_mode()
    monkeypatch.delenv(FILE_MODE_ENV)
    assert file_mode() == 0o600


# --------------------------------------------------------------------------- the team's tracking server


def test_the_basic_auth_server_refuses_anonymous_requests_and_records_an_env_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    admin, member = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    server = tmp_path / "server"
    with mlflow_server(server, f"sqlite:///{server / 'mlflow.db'}", admin_password=admin, workers=1) as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert status(search) == 401, "a request without credentials is refused"
        assert status(search, ("alice", member)) == 401, "and so is an unknown login"
        create_user(url, (ADMIN, admin), "alice", member)
        assert status(search, ("alice", member)) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", member)
        cfg = config_from_dict(
            tiny_config("authed", tracking={"experiment": "team"}, train={"num_threads": 1})
        )
        result = train(cfg, tmp_path / "run", data_dir=tmp_path / "data", progress=False)
        client = MlflowClient(url)
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["run/steps"] == 8
        assert status(f"{url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}") == 401
        store_text, runs = mlflow_store_text(client)
        assert runs == 1 and text_hits(store_text, [admin, member]) == []
    assert file_hits([tmp_path / "run", tmp_path / "data"], [admin, member]) == []
