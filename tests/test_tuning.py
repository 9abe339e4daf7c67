"""Optuna tuning: spec validation, pruning through the trainer's on_eval hook, parallel workers on one
journal, nested MLflow runs, and best.yaml feeding a grid's overrides_from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from tiny import tiny_config

from palimpsa.grid import GridError, load_grid
from palimpsa.tuning import (
    init_study,
    load_tune_spec,
    make_objective,
    make_storage,
    run_study,
    run_worker,
    write_best,
)

ROOT = Path(__file__).resolve().parents[1]

BASE = tiny_config(train={"eval_every": 2, "warmup_steps": 1}, tracking={"enabled": False})
SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
    "model.mixer.beta_rank": {"type": "categorical", "choices": [1, 2]},
    "model.mixer.ip": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
}


def spec_file(tmp_path: Path, **changes) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {"description": "t", "base": "base.yaml", "n_trials": 2, "space": SPACE, **changes}
    path = tmp_path / "tune-t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def reject(tmp_path: Path, **changes) -> str:
    path = spec_file(tmp_path, **changes)
    with pytest.raises(GridError) as info:
        load_tune_spec(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_spec_defaults(tmp_path: Path) -> None:
    spec = load_tune_spec(spec_file(tmp_path))
    assert spec.name == "tune-t" and spec.experiment == "tune-t"
    assert spec.metric == "val_accuracy" and spec.direction == "maximize"
    assert load_tune_spec(spec_file(tmp_path, metric="val_loss")).direction == "minimize"


def test_spec_rejects_unknown_key(tmp_path: Path) -> None:
    msg = reject(tmp_path, space={"model.mixer.ipp": {"type": "float", "low": 1, "high": 2}})
    assert "space.model.mixer.ipp" in msg and "ip" in msg


def test_spec_rejects_out_of_range_bound(tmp_path: Path) -> None:
    msg = reject(tmp_path, space={"model.mixer.ip": {"type": "float", "low": 0.0, "high": 2.0}})
    assert "space.model.mixer.ip" in msg and "> 0" in msg


def test_spec_rejects_inverted_range(tmp_path: Path) -> None:
    msg = reject(tmp_path, space={"train.lr": {"type": "float", "low": 0.1, "high": 0.01}})
    assert "space.train.lr.low" in msg


def test_spec_rejects_bad_distribution(tmp_path: Path) -> None:
    msg = reject(tmp_path, space={"train.lr": {"type": "floaty", "low": 0.1, "high": 0.2}})
    assert "space.train.lr" in msg


def test_spec_rejects_wrong_choice_type(tmp_path: Path) -> None:
    msg = reject(tmp_path, space={"model.mixer.beta_rank": {"type": "categorical", "choices": [2, "x"]}})
    assert "space.model.mixer.beta_rank" in msg and "integer" in msg


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_pruned_trial_stops_training_and_its_run_is_killed(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_tune_spec(spec_file(tmp_path))
    storage = make_storage(None, tmp_path / "out")
    info = init_study(spec, storage, tmp_path / "out", track=True, tracking_uri=uri)
    study = optuna.load_study(study_name=spec.name, storage=storage, pruner=AlwaysPrune())
    objective = make_objective(
        spec, tmp_path / "out", info["mlflow_parent_run_id"], True, uri, tmp_path / "data"
    )
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [2], "pruned at the first eval, not after training"
    run_dir = Path(trial.user_attrs["run_dir"])
    assert not (run_dir / "metrics.json").exists()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = {r.data.tags.get("palimpsa.role"): r for r in client.search_runs([exp.experiment_id])}
    assert runs["trial"].info.status == "KILLED"
    assert runs["trial"].data.tags["optuna.state"] == "PRUNED"  # the UI filters pruned trials by this tag
    assert runs["trial"].data.tags["mlflow.parentRunId"] == info["mlflow_parent_run_id"]
    assert runs["study"].info.run_id == info["mlflow_parent_run_id"]


def test_study_parent_run_carries_the_result(tmp_path: Path) -> None:
    """best.yaml, the trials table and the importance figure land on the study's MLflow run."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_tune_spec(spec_file(tmp_path, n_trials=3, pruner={"kind": "none"}))
    out = tmp_path / "out"
    storage = make_storage(None, out)
    info = init_study(spec, storage, out, track=True, tracking_uri=uri)
    run_worker(spec, storage, out, track=True, tracking_uri=uri, data_dir=tmp_path / "data")
    best = write_best(spec, storage, out, tracking_uri=uri)
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(info["mlflow_parent_run_id"])
    assert parent.data.metrics[f"best_{spec.metric}"] == pytest.approx(best["value"])
    assert parent.data.metrics["trials_complete"] == 3
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "best.yaml", "trials.parquet", "importance.png"
    }  # fmt: skip
    trials = client.search_runs([parent.info.experiment_id], "tags.`palimpsa.role` = 'trial'")
    assert {r.data.tags["optuna.state"] for r in trials} == {"COMPLETE"}


def test_run_study_writes_best_that_a_grid_can_use(tmp_path: Path) -> None:
    out = tmp_path / "tuning"
    best = run_study(BASE, SPACE, "s", None, 3, out, track=False, pruner={"kind": "none"})
    assert set(best["overrides"]) == set(SPACE) and best["trials"] == {"complete": 3}
    doc = yaml.safe_load((out / "best.yaml").read_text())
    assert doc["overrides"] == best["overrides"]
    import polars as pl

    trials = pl.read_parquet(out / "trials.parquet")
    assert trials.height == 3 and set(trials["state"]) == {"COMPLETE"}
    assert pl.read_parquet(out / "trial_curves.parquet").height == 3 * 4  # evals at steps 2, 4, 6, 8
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = tmp_path / "g.yaml"
    grid.write_text(
        yaml.safe_dump(
            {"base": "base.yaml", "overrides_from": "tuning/best.yaml", "product": {"seed": [1, 2]}}
        )
    )
    for point in load_grid(grid).points:
        cfg = point.resolve()
        assert cfg["train"]["lr"] == pytest.approx(best["overrides"]["train.lr"])
        assert cfg["model"]["mixer"]["beta_rank"] == best["overrides"]["model.mixer.beta_rank"]


@pytest.mark.slow
def test_parallel_workers_share_one_journal(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, n_trials=4)
    out = tmp_path / "out"
    common = [sys.executable, "-m", "palimpsa", "tune", str(spec), "--out", str(out), "--no-track"]
    common += ["--data-dir", str(tmp_path / "data"), "--set", "train.num_threads=1"]
    assert subprocess.run([*common, "--stage", "init"], cwd=ROOT, check=False).returncode == 0
    workers = [
        subprocess.Popen([*common, "--stage", "work", "--done-file", str(out / f"w{i}.json")], cwd=ROOT)
        for i in range(2)
    ]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    tallies = [json.loads((out / f"w{i}.json").read_text()) for i in range(2)]
    study = optuna.load_study(study_name="tune-t", storage=make_storage(None, out))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # Workers check the count before each trial: at most one extra trial per extra worker.
    assert 4 <= len(study.trials) <= 5
    assert sum(sum(t.values()) for t in tallies) == len(study.trials)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    best = write_best(load_tune_spec(spec), make_storage(None, out), out)
    assert best["value"] == max(t.value for t in study.trials if t.value is not None)
