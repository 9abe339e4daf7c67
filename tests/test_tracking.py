"""MLflow tracking against a real SQLite store in tmp_path: params, metrics, tags, artifacts, statuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tiny import tiny_config as tiny_run

from palimpsa.config import RunConfig, TrackingConfig, config_from_dict
from palimpsa.tracking import DEFAULT_URI, MlflowTracker, NullTracker, open_tracker, resolve_tracking_uri
from palimpsa.training import CHECKPOINT, RUN_ID, TrainingError, train


def tiny_config(uri: str | None, **train_overrides) -> RunConfig:
    train = {"epochs": 2, "max_steps": None, "eval_every": 8, "checkpoint_every": 4, "log_every": 2}
    return config_from_dict(
        tiny_run(
            seed=1,
            task={"vocab_size": 32, "num_train": 256, "num_val": 64},
            mixer={"num_heads": 2, "beta_rank": 4},
            train={**train, "num_threads": 1, **train_overrides},
            tracking={
                "enabled": uri is not None,
                "tracking_uri": uri,
                "experiment": "tiny-exp",
                "tags": {"grid": "smoke"},
            },
        )
    )


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def runs_of(uri: str, experiment: str = "tiny-exp") -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == DEFAULT_URI == "sqlite:///results/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(TrackingConfig()) == "sqlite:///env.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///cfg.db")) == "sqlite:///cfg.db"


def test_tracking_off_is_a_null_tracker_and_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert isinstance(open_tracker(TrackingConfig(enabled=False), "x"), NullTracker)
    result = train(tiny_config(None, max_steps=4), tmp_path / "run", progress=False)
    assert result["mlflow_run_id"] is None
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "run" / RUN_ID).exists()


def test_default_store_lives_under_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with MlflowTracker(TrackingConfig(), "defaults", system_metrics=False) as tracker:
        tracker.log_metrics({"x": 1.0}, step=0)
    assert (tmp_path / "results" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=DEFAULT_URI)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith((tmp_path / "results" / "mlartifacts").resolve().as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_tracked_run_logs_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = store(tmp_path)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("# the source config\n")
    result = train(tiny_config(uri), tmp_path / "run", config_path=config_file, progress=False)

    (run,) = runs_of(uri)
    assert run.info.status == "FINISHED" and run.info.run_id == result["mlflow_run_id"]
    assert run.info.run_name == "tiny"
    assert (tmp_path / "run" / RUN_ID).read_text().strip() == run.info.run_id
    params = run.data.params
    assert params["model.d_model"] == "16" and params["train.lr"] == "0.01" and params["task.name"] == "mqar"
    assert (
        params["backend.layer0"].startswith("palimpsa") and int(params["num_params"]) == result["num_params"]
    )
    tags = run.data.tags
    assert tags["grid"] == "smoke"
    assert tags["palimpsa.checkpoint"] == str((tmp_path / "run" / CHECKPOINT).resolve())
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from the project's checkout

    client = MlflowClient(tracking_uri=uri)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in ("train_loss", "val_accuracy")}
    assert [m.step for m in history["train_loss"]] == list(range(2, 33, 2))
    assert [m.step for m in history["val_accuracy"]][-4:] == [8, 16, 24, 32]
    metrics = run.data.metrics
    for key in (
        "val_loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "wall_seconds",
        "diag.horizon",
        "diag.consolidated",
        "diag.l0.h0.i_over_ip_q50",
        "best_val_accuracy",
    ):
        assert key in metrics, key
    assert metrics["val_accuracy"] == pytest.approx(result["val_accuracy"])
    assert any(key.startswith("system/") for key in metrics), "no system metrics logged"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.jsonl", "source_config"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["mlflow_run_id"] == run.info.run_id
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").resolve().as_uri())


def test_reopened_run_keeps_its_id_and_params(tmp_path):
    uri = store(tmp_path)
    cfg = TrackingConfig(tracking_uri=uri, experiment="reopen")
    first = MlflowTracker(cfg, "r", system_metrics=False)
    first.log_params({"a": 1})
    first.end("KILLED", reason="SIGTERM")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    again = MlflowTracker(cfg, "r", run_id=first.run_id, system_metrics=False)
    assert again.run_id == first.run_id and again.resumed
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_params({"a": 2, "b": 3})  # params are write-once: a change is recorded as a tag
    again.end("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "b": "3"} and run.data.tags["param_changed.a"] == "2"
    assert run.data.tags["failure_reason"] == "SIGTERM"  # the earlier kill stays on record

    with pytest.warns(UserWarning, match="not found"):
        fresh = MlflowTracker(cfg, "r", run_id="0" * 32, system_metrics=False)
    assert fresh.run_id != first.run_id
    fresh.end()


def test_parent_run_nests(tmp_path):
    uri = store(tmp_path)
    parent = MlflowTracker(
        TrackingConfig(tracking_uri=uri, experiment="sweep"), "sweep", system_metrics=False
    )
    child = MlflowTracker(
        TrackingConfig(tracking_uri=uri, experiment="sweep", parent_run_id=parent.run_id),
        "trial",
        system_metrics=False,
    )
    child.end()
    parent.end()
    tags = MlflowClient(tracking_uri=uri).get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id


def test_non_finite_loss_marks_run_failed(tmp_path):
    uri = store(tmp_path)
    with pytest.raises(TrainingError):
        train(tiny_config(uri, lr=1e30, warmup_steps=0), tmp_path / "run", progress=False)
    (run,) = runs_of(uri)
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["failure_reason"]


def test_interrupted_run_is_killed_then_continued(tmp_path):
    uri = store(tmp_path)
    out = tmp_path / "run"
    cfg = tiny_config(uri)

    def stop_after_first_checkpoint() -> None:
        deadline = time.time() + 60
        while not (out / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    watcher.join()
    (run,) = runs_of(uri)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["failure_reason"]

    result = train(cfg, out, progress=False)
    (run,) = runs_of(uri)  # the same run, continued: no duplicate, no orphan
    assert run.info.status == "FINISHED" and run.info.run_id == result["mlflow_run_id"]
    assert run.data.tags["palimpsa.resumed"] == "true"


def test_parallel_jobs_share_a_fresh_store(tmp_path):
    """Workflow jobs start together on a store that does not exist yet: the schema is created once."""
    uri = store(tmp_path)
    code = (
        "import sys; from palimpsa.config import TrackingConfig; "
        "from palimpsa.tracking import MlflowTracker; "
        f"t = MlflowTracker(TrackingConfig(tracking_uri={uri!r}, experiment='par'), 'j' + sys.argv[1], "
        "system_metrics=False); t.log_metrics({'x': 1.0}, step=0); t.end()"
    )
    root = Path(__file__).resolve().parents[1]
    jobs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=root, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [job.communicate(timeout=240)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], errors
    runs = runs_of(uri, "par")
    assert sorted(r.info.run_name for r in runs) == ["j0", "j1", "j2"]
    assert all(r.info.status == "FINISHED" for r in runs)
