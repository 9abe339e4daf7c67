"""MLflow tracking against a real SQLite store in tmp_path: params, grouped metrics, the dataset input, tags,
artifacts (checkpoints included), statuses, resumes and retraining a finished run from scratch."""

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
import torch
from mlflow import MlflowClient
from tiny import tiny_config as tiny_run

from palimpsa.config import RunConfig, TrackingConfig, config_from_dict
from palimpsa.results import build_tables
from palimpsa.tracking import (
    DEFAULT_URI,
    METRIC_GROUPS,
    MlflowTracker,
    NullTracker,
    flat_metric,
    mlflow_metric,
    open_tracker,
    resolve_tracking_uri,
)
from palimpsa.training import CHECKPOINT, METRICS, RUN_ID, TrainingError, train


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
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs

    # params: the resolved config, without the tracking plumbing
    params = run.data.params
    assert params["model.d_model"] == "16" and params["train.lr"] == "0.01" and params["task.name"] == "mqar"
    assert params["model.vocab_size"] == "32" and params["train.device"] == "cpu"  # null / auto resolved
    assert params["model.mixer.qk_norm"] == "l2" and params["train.precision"] == "fp32"
    assert params["backend.layer0"] == params["model.mixer.backend"] != "auto"
    assert not any(key.startswith("tracking.") for key in params), sorted(params)
    assert "None" not in {params["model.vocab_size"], params["model.mixer.scale"], params["train.eval_every"]}

    tags = run.data.tags
    assert tags["grid"] == "smoke"
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from the project's checkout
    assert tags["palimpsa.out_dir"] == str((tmp_path / "run").resolve())

    # metrics: grouped names, one chart section per group
    history = {key: client.get_metric_history(run.info.run_id, key) for key in ("train/loss", "val/accuracy")}
    assert [m.step for m in history["train/loss"]] == list(range(2, 33, 2))
    assert [m.step for m in history["val/accuracy"]][-4:] == [8, 16, 24, 32]
    metrics = run.data.metrics
    for key in (
        "val/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_second",
        "time/wall_seconds",
        "diag/horizon",
        "diag/consolidated",
        "diag/l0.h0.i_over_ip_q50",
        "val/best_accuracy",
        "run/steps",
    ):
        assert key in metrics, key
    assert any(key.startswith("val/recall_gap/") for key in metrics), sorted(metrics)
    assert not {"train_loss", "val_accuracy", "steps", "lr"} & set(metrics), "flat names are gone"
    assert metrics["val/accuracy"] == pytest.approx(result["val_accuracy"])
    assert any(key.startswith("system/") for key in metrics), "no system metrics logged"

    # the dataset as the run's input: task config and seed, a content digest, its sizes
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "mqar" and len(dataset.digest) == 16 and dataset.source_type == "code"
    assert json.loads(dataset.profile) == {
        "metric": "accuracy",
        "num_train": 256,
        "num_val": 64,
        "seq_len": 16,
        "vocab_size": 32,
    }
    source = json.loads(dataset.source)["tags"]
    assert source["task.num_kv_pairs"] == 2 and source["seed"] == 1
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}

    # artifacts: configs, results and both checkpoints, reachable through the store
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "history.jsonl", "source_config", "checkpoints"} <= artifacts
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/checkpoint.pt", "checkpoints/best.pt"}
    assert tags["palimpsa.checkpoint"] == f"runs:/{run.info.run_id}/checkpoints/checkpoint.pt"
    assert tags["palimpsa.best_checkpoint"] == f"runs:/{run.info.run_id}/checkpoints/best.pt"
    local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["mlflow_run_id"] == run.info.run_id
    best = Path(client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path / "dl")))
    assert torch.load(best, weights_only=True)["step"] == result["best_step"]
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").resolve().as_uri())


def test_metric_names_are_grouped_and_map_back():
    for flat, grouped in METRIC_GROUPS.items():
        assert "/" in grouped and flat_metric(mlflow_metric(flat)) == flat
    assert mlflow_metric("train_loss") == "train/loss" and mlflow_metric("val_accuracy") == "val/accuracy"
    assert mlflow_metric("recall_gap.0-7") == "val/recall_gap/0-7"
    assert mlflow_metric("diag.l0.h1.horizon") == "diag/l0.h1.horizon"
    assert mlflow_metric("val_loss_pos.64-127") == "val/loss_by_position/64-127"
    for flat in ("recall_gap.8-15", "diag.l1.h0.i_over_ip_q90", "diag.horizon", "val_loss_pos.0-0"):
        assert flat_metric(mlflow_metric(flat)) == flat
    assert flat_metric("system/cpu_utilization_percentage") == "system/cpu_utilization_percentage"
    assert len(set(METRIC_GROUPS.values())) == len(METRIC_GROUPS), "two flat names share a grouped one"


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
    assert "failure_reason" not in run.data.tags  # a FINISHED run carries no failure
    assert run.data.tags["palimpsa.resumed_after"] == "SIGTERM"  # the earlier kill stays on record

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
    assert run.data.tags["palimpsa.resumed"] == "true" and result["resumed"] is True
    assert "failure_reason" not in run.data.tags, "the finished run keeps no stale failure"
    assert "SIGTERM" in run.data.tags["palimpsa.resumed_after"]


def test_deleted_result_retrains_from_scratch_in_a_new_run(tmp_path):
    """What `snakemake --force` does to a point: metrics.json goes, the run is trained again from step 0."""
    uri = store(tmp_path)
    out = tmp_path / "run"
    cfg = tiny_config(uri, epochs=1, eval_every=4)
    first = train(cfg, out, progress=False)
    (out / METRICS).unlink()
    second = train(cfg, out, progress=False)
    assert second["resumed"] is False and second["steps"] == first["steps"]
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    assert second["val_loss"] == first["val_loss"], "a fresh run reproduces the first one"
    runs = {r.info.run_id: r for r in runs_of(uri)}
    old, new = runs[first["mlflow_run_id"]], runs[second["mlflow_run_id"]]
    assert old.data.tags["palimpsa.superseded_by"] == new.info.run_id
    assert new.data.tags["palimpsa.supersedes"] == old.info.run_id
    assert old.info.status == new.info.status == "FINISHED"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8, 12, 16], "the old run's evals are not carried over"

    # the store's tables keep one row per point (the superseded run is left out) under the flat names
    rows, curves = build_tables(uri, ["tiny-exp"])
    assert rows["mlflow_run_id"].to_list() == [new.info.run_id]
    assert rows["metric.val_accuracy"][0] == pytest.approx(second["val_accuracy"])
    assert {"metric.steps", "metric.best_val_loss", "metric.diag.horizon"} <= set(rows.columns)
    assert set(curves["key"]) == {"val_loss", "val_accuracy", "train_loss"}

    # a finished folder rerun as is (metrics.json present) stays in its run
    third = train(cfg, out, progress=False)
    assert third["mlflow_run_id"] == second["mlflow_run_id"] and third["resumed"] is True


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
