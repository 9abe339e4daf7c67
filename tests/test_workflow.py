"""The Snakemake workflow: lint, plain `snakemake` in a fresh copy finding the default profile by itself,
dry runs of the full DAG under every profile, a config error naming the key, and a real tiny end-to-end run
(outputs, MLflow runs, grouped metrics, dataset inputs and checkpoint artifacts, the sweep's summary, the end
message, Optuna trials, idempotence, one changed point rerunning alone, a failing run failing only its own
job, `--force` retraining a point in a new MLflow run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SNAKEMAKE_PROFILE")}
    return subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[-1]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
        if m.group(1) != "total"
    }


# --------------------------------------------------------------------------- lint, plain `snakemake`


def test_lint_is_clean() -> None:
    proc = snakemake("--lint")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Lints for" not in proc.stdout + proc.stderr


def fresh_copy(dest: Path) -> Path:
    """The checkout as a fresh clone of it would be: tracked and not-ignored files, no results, no .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def activated_env(home: Path) -> dict[str, str]:
    """The environment of a shell that activated the project's virtualenv: its bin first on PATH, no profile
    variable, no tracking URI, and a home without user-level Snakemake profiles."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SNAKEMAKE_PROFILE")}
    venv_bin = Path(sys.executable).parent
    env.update(
        PATH=os.pathsep.join([str(venv_bin), env.get("PATH", "")]),
        VIRTUAL_ENV=str(venv_bin.parent),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
    )
    return env


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_plain_snakemake_in_a_fresh_clone_uses_the_default_profile(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "clone")
    env = activated_env(tmp_path / "home")
    command = shutil.which("snakemake", path=env["PATH"])
    assert command is not None
    dry = subprocess.run([command, "-n"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert f"Using profile {clone / 'workflow' / 'profiles' / 'default'}" in out
    counts = job_counts(out)
    assert counts["train"] == 12 and counts["tune_worker"] == 2 and counts["report"] == 1, counts
    # a real run without --cores: the profile's 2 cores (the cheapest target, the MLflow store)
    real = subprocess.run(
        [command, "results/meta/mlflow-store.json"], cwd=clone, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    out = real.stdout + real.stderr
    assert real.returncode == 0, out[-3000:]
    assert "Provided cores: 2" in out and "cores have to be specified" not in out
    assert "mlflow ui --backend-store-uri sqlite:///results/mlflow.db" in out
    assert (clone / "results" / "mlflow.db").is_file()


# --------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("profile", ["default", "gpu", "slurm"])
def test_dry_run_of_the_full_dag(profile: str, tmp_path: Path) -> None:
    proc = snakemake("-n", "-F", "--nolock", "--profile", f"workflow/profiles/{profile}", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    for rule in ("mlflow_store", "dataset", "sweep", "point_config", "train", "tune_init", "tune_worker"):
        assert counts.get(rule, 0) >= 1, (rule, counts)
    assert counts["train"] == counts["point_config"]
    assert counts["collect"] == 1 and counts["report"] == 1 and counts["tune_best"] >= 1
    if profile == "default":
        assert counts["train"] >= 12 and counts["tune_worker"] == 2
    else:
        assert counts["train"] > 100 and counts["tune_worker"] == 4


def test_gpu_and_slurm_profiles_give_training_jobs_a_gpu() -> None:
    for profile, expected in (("gpu", r"gpu=1"), ("slurm", r"slurm_partition=gpu.*gpu=1")):
        proc = snakemake("-n", "-F", "--nolock", "--profile", f"workflow/profiles/{profile}", "-p")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        train_block = out.split("rule train:", 1)[1].split("\n\n", 1)[0]
        resources = next(line for line in train_block.splitlines() if "resources:" in line)
        assert re.search(expected, resources), resources
        assert 'gpu_slot.py" --gpus 1 --' in out, "training jobs take a GPU slot through the launcher"


def test_gpu_example_command_plans_its_eighteen_runs() -> None:
    """The scale-gpu example's snakemake command: 3 widths x 3 mixers x 2 seeds, nothing else."""
    proc = snakemake(
        "-n", "-F", "--nolock", "--quiet", "rules", "--until", "train",
        "--profile", "workflow/profiles/gpu",
        "--configfile", "workflow/profiles/gpu/workflow.yaml", "reports/examples/scale-gpu/workflow.yaml",
        "--resources", "gpu=18", "--cores", "20", "--set-threads", "train=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == counts["point_config"] == 18, counts
    assert "collect" not in counts and "report" not in counts and "tune_worker" not in counts, counts


def committed_runs_match_points(grid, committed, filled_by_run: bool = False) -> None:
    """Every committed run is a point of ``grid`` (matched by label: the hash part of an id moved when the
    hash became relative to the defaults, and extra overrides such as the budget move it too), and every
    config value the run recorded is the one the point resolves to now. ``filled_by_run``: the runs recorded
    the values they filled in themselves (``auto`` and unset ones), which are left out of the comparison."""
    from palimpsa.grid import EXECUTION_KEYS
    from palimpsa.io import flatten, yaml_load

    label = {p.point_id.rsplit("-", 1)[0]: p for p in grid.points}
    for row in committed.iter_rows(named=True):
        point = label[row["point"].rsplit("-", 1)[0]]
        resolved = flatten(point.resolve())
        recorded = {  # MLflow params come back as text; read them as config files are read
            k[4:]: (None if v == "None" else yaml_load(v)) if isinstance(v, str) else v
            for k, v in row.items()
            if k.startswith("cfg.") and v is not None and not k[4:].startswith(EXECUTION_KEYS)
        }
        at_run_time = {k for k, v in resolved.items() if v is None or v == "auto"} if filled_by_run else set()
        compared = {k: v for k, v in recorded.items() if k not in at_run_time}
        differing = {k: (v, resolved.get(k)) for k, v in compared.items() if resolved.get(k) != v}
        assert not differing, (row["point"], differing)


def test_gpu_example_config_gives_the_committed_runs() -> None:
    """Rerunning the example's config trains exactly the points its committed report was built from."""
    import polars as pl

    from palimpsa.grid import load_grid

    example = ROOT / "reports" / "examples" / "scale-gpu"
    overrides = yaml.safe_load((example / "workflow.yaml").read_text())["run_overrides"]
    grid = load_grid(example / "scale-depth2.yaml", extra=overrides)
    committed = pl.read_parquet(example / "runs.parquet")
    assert set(committed.get_column("grid")) == {grid.name}
    assert sorted(p.rsplit("-", 1)[0] for p in committed.get_column("point")) == sorted(
        p.point_id.rsplit("-", 1)[0] for p in grid.points
    )
    committed_runs_match_points(grid, committed)


def test_mqar_campaign_workflow_config_plans_both_parts_and_holds_the_committed_runs() -> None:
    """reports/examples/mqar-official/workflow.yaml: part A's 40 points and the capacity grid's 240 at the
    campaign's budget; every committed run of seeds 1 and 2 (both parts) is one of those points, with the
    config values (7 epochs included) the workflow would give it."""
    import polars as pl

    from palimpsa.grid import load_grid

    example = ROOT / "reports" / "examples" / "mqar-official"
    proc = snakemake(
        "-n", "-F", "--nolock", "--quiet", "rules", "--until", "train", "--profile", "workflow/profiles/gpu",
        "--configfile", "workflow/profiles/gpu/workflow.yaml", str(example / "workflow.yaml"), "--cores", "4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == counts["point_config"] == 40 + 240, counts
    config = yaml.safe_load((example / "workflow.yaml").read_text())
    assert config["run_overrides"]["train.epochs"] == 7
    for grid_file, table in zip(config["grids"], ("runs.parquet", "capacity/runs.parquet"), strict=True):
        grid = load_grid(ROOT / grid_file, extra=config["run_overrides"])
        committed = pl.read_parquet(example / table).filter(pl.col("axis.seed") <= 2)
        assert committed.height >= 30 and set(committed.get_column("experiment")) == {grid.experiment}
        committed_runs_match_points(grid, committed, filled_by_run=True)


def test_bad_workflow_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tuning": {"studies": [], "workers": 0}}))
    proc = snakemake("-n", "--nolock", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    assert "tuning.workers" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_grid_stops_the_workflow_naming_file_and_key(tmp_path: Path) -> None:
    grid = tmp_path / "bad-grid.yaml"
    grid.write_text(
        yaml.safe_dump({"base": str(ROOT / "ablations/base/mqar-smoke.yaml"), "product": {"seed": [0, 0]}})
    )
    proc = snakemake("-n", "--nolock", "--cores", "1", "--config", f"grids=['{grid}']")
    assert proc.returncode != 0
    assert f"{grid}: product.seed: duplicate value 0" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- a real tiny run

TINY_BASE = tiny_config(task={"num_train": 128, "num_val": 32}, train={"max_steps": 16, "device": "cpu"})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with a 3-point grid, a 2-trial study and a failing grid, run once."""
    work = tmp_path_factory.mktemp("workflow")
    (work / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    tiny = {
        "description": "tiny",
        "base": "base.yaml",
        "product": {"model.mixer.kind": ["palimpsa", "mamba2", "deltanet"]},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    broken = {
        "description": "one diverging point",
        "base": "base.yaml",
        "product": {"train.lr": [1.0e-2, 1.0e6]},
    }
    (work / "broken.yaml").write_text(yaml.safe_dump(broken))
    study = {
        "description": "tiny study",
        "base": "base.yaml",
        "n_trials": 2,
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
    }
    (work / "tune-tiny.yaml").write_text(yaml.safe_dump(study))
    config = {
        "results": "results",
        "grids": [str(work / "tiny.yaml")],
        "run_overrides": {"train.num_threads": 1},
        "data_cache": "results/data",
        "mlflow": {"tracking_uri": "sqlite:///results/mlflow.db"},
        "tuning": {"studies": [str(work / "tune-tiny.yaml")], "workers": 2},
        "report": {"enabled": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_tiny(work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (work / "first-run.out").write_text(proc.stdout + proc.stderr)
    return work


def run_tiny(work: Path, *extra: str) -> subprocess.CompletedProcess:
    return snakemake(
        "-s", str(ROOT / "Snakefile"), "--directory", str(work), "--configfile", str(work / "config.yaml"),
        "--cores", "2", "--keep-going", *extra, cwd=work,
    )  # fmt: skip


def mlflow_runs(work: Path, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_tiny_run_outputs(project: Path) -> None:
    import polars as pl

    runs_dir = project / "results" / "runs" / "tiny"
    points = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert len(points) == 3
    for d in points:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "FINISHED" and metrics["steps"] == 16
        assert (d / "run.yaml").is_file() and (d / "history.jsonl").is_file()
    table = pl.read_parquet(project / "results" / "tables" / "runs.parquet")
    assert table.height == 3 and set(table["cfg.model.mixer.kind"]) == {"palimpsa", "mamba2", "deltanet"}
    assert table["status"].to_list() == ["FINISHED"] * 3
    curves = pl.read_parquet(project / "results" / "tables" / "curves.parquet")
    assert curves.height == 3 * 4 and set(curves["step"]) == {4, 8, 12, 16}
    best = yaml.safe_load((project / "results" / "tuning" / "tune-tiny" / "best.yaml").read_text())
    assert set(best["overrides"]) == {"train.lr"} and 1.0e-3 <= best["overrides"]["train.lr"] <= 3.0e-2


@pytest.mark.slow
def test_tiny_run_is_tracked(project: Path) -> None:
    runs = mlflow_runs(project, "tiny")
    sweep = [r for r in runs if r.data.tags.get("palimpsa.role") == "sweep"]
    points = [r for r in runs if r.data.tags.get("palimpsa.role") == "point"]
    assert len(sweep) == 1 and len(points) == 3
    assert all(r.info.status == "FINISHED" for r in points)
    assert {r.data.tags["mlflow.parentRunId"] for r in points} == {sweep[0].info.run_id}
    assert {r.data.tags["grid.point"] for r in points} == {
        d.name for d in (project / "results" / "runs" / "tiny").iterdir() if d.is_dir()
    }
    trials = [r for r in mlflow_runs(project, "tune-tiny") if r.data.tags.get("palimpsa.role") == "trial"]
    study = [r for r in mlflow_runs(project, "tune-tiny") if r.data.tags.get("palimpsa.role") == "study"]
    assert len(study) == 1 and len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {study[0].info.run_id}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)
    # every experiment keeps its artifacts beside the store, none in ./mlruns of the working directory
    assert not (project / "mlruns").exists()
    results_uri = (project / "results").resolve().as_uri()
    for run in [*points, *sweep, *study, *trials]:
        assert run.info.artifact_uri.startswith(results_uri), run.info.artifact_uri


@pytest.mark.slow
def test_tiny_run_store_has_grouped_metrics_the_dataset_and_checkpoints(project: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'results' / 'mlflow.db'}")
    for run in [r for r in mlflow_runs(project, "tiny") if r.data.tags.get("palimpsa.role") == "point"]:
        metrics = set(run.data.metrics)
        assert {"train/loss", "val/loss", "val/accuracy", "time/wall_seconds", "run/steps"} <= metrics
        assert any(m.startswith("val/recall_gap/") for m in metrics), sorted(metrics)
        assert not {"train_loss", "val_accuracy", "steps"} & metrics, "flat names are gone"
        assert not any(key.startswith("tracking.") for key in run.data.params)
        assert run.data.params["model.vocab_size"] == "16"
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.name == "mqar" and json.loads(dataset.profile)["num_train"] == 128
        checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert checkpoints == {"checkpoints/checkpoint.pt", "checkpoints/best.pt"}
        assert run.data.tags["palimpsa.checkpoint"].startswith(f"runs:/{run.info.run_id}/")


@pytest.mark.slow
def test_sweep_run_carries_the_grid_summary(project: Path) -> None:
    import mlflow

    runs = mlflow_runs(project, "tiny")
    (sweep,) = [r for r in runs if r.data.tags.get("palimpsa.role") == "sweep"]
    points = {r.data.tags["grid.point"]: r for r in runs if r.data.tags.get("palimpsa.role") == "point"}
    assert sweep.data.metrics["points/finished"] == 3
    best = points[sweep.data.tags["best.point"]]
    assert sweep.data.tags["best.mlflow_run_id"] == best.info.run_id
    best_value = max(r.data.metrics["val/accuracy"] for r in points.values())
    assert sweep.data.metrics["best/val_accuracy"] == best_value
    assert "3 points" in sweep.data.tags["mlflow.note.content"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'results' / 'mlflow.db'}")
    table = {a.path for a in client.list_artifacts(sweep.info.run_id, "table")}
    assert table == {"table/runs.csv", "table/runs.parquet"}
    summary = json.loads((project / "results" / "runs" / "tiny" / "summary.json").read_text())
    assert summary["points"] == 3 and summary["best"]["point"] == sweep.data.tags["best.point"]


@pytest.mark.slow
def test_terminal_shows_one_line_per_run_and_where_everything_is(project: Path) -> None:
    out = (project / "first-run.out").read_text()
    points = [d.name for d in (project / "results" / "runs" / "tiny").iterdir() if d.is_dir()]
    for point in points:
        (line,) = [line for line in out.splitlines() if line.startswith(f"done tiny/{point}")]
        assert "val_accuracy" in line and "16 steps" in line and "MLflow run" in line, line
    assert "rule train:" not in out, "no job blocks on the terminal"
    end = out[out.index("Palimpsa pipeline done") :]
    assert "3 of 3 grid points and 1 of 1 tuning study finished" in end
    assert str(project / "results" / "tables" / "runs.parquet") in end
    assert f"mlflow ui --backend-store-uri sqlite:///{project / 'results' / 'mlflow.db'}" in end
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs \(tiny\)", end), end
    log = (project / "results" / "runs" / "tiny" / points[0] / "train.log").read_text()
    assert re.search(r"^step 16/16 \(100%\)  loss \S+  val_accuracy \S+  \S+  eta \S+$", log, re.M), log


@pytest.mark.slow
def test_tiny_study_has_its_trials(project: Path) -> None:
    import optuna

    from palimpsa.tuning import load_tune_spec, make_storage

    spec = load_tune_spec(project / "tune-tiny.yaml")
    storage = make_storage(None, project / "results" / "tuning" / "tune-tiny")
    study = optuna.load_study(study_name=spec.name, storage=storage)
    states = [t.state for t in study.trials]
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert len(states) == 2 and all(s in done for s in states)
    workers = sorted((project / "results" / "tuning" / "tune-tiny").glob("worker-*.json"))
    assert len(workers) == 2


@pytest.mark.slow
def test_second_run_has_nothing_to_do(project: Path) -> None:
    proc = run_tiny(project, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_changing_one_point_reruns_only_it(project: Path) -> None:
    path = project / "tiny.yaml"
    original = path.read_text()
    grid = yaml.safe_load(original)
    grid["product"]["model.mixer.kind"] = ["palimpsa", "mamba2", "gated_deltanet"]
    try:
        path.write_text(yaml.safe_dump(grid))
        proc = run_tiny(project, "-n", "--quiet", "host")  # job blocks back on, to name the new point
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = job_counts(proc.stdout + proc.stderr)
        assert counts.get("train") == 1 and counts.get("point_config") == 1, counts
        assert "gated-deltanet" in proc.stdout + proc.stderr
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_failing_run_fails_alone(project: Path) -> None:
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["grids"].append(str(project / "broken.yaml"))
    (project / "config-broken.yaml").write_text(yaml.safe_dump(config))
    broken = str(project / "config-broken.yaml")
    proc = snakemake(
        "-s", str(ROOT / "Snakefile"), "--directory", str(project), "--configfile", broken,
        "--cores", "2", "--keep-going", "--show-failed-logs", cwd=project,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: non-finite" in out, "the trainer's message reaches the user"
    runs = [r for r in mlflow_runs(project, "broken") if r.data.tags.get("palimpsa.role") == "point"]
    status = {r.data.tags["axis.train.lr"]: r.info.status for r in runs}
    assert status == {"0.01": "FINISHED", "1000000.0": "FAILED"}, status
    ok = [d for d in (project / "results" / "runs" / "broken").iterdir() if (d / "metrics.json").is_file()]
    assert len(ok) == 1, "the good point of the grid still finished"
    counts = job_counts(out)
    assert "train" in counts and counts.get("tune_worker", 0) == 0, "nothing of the finished grid reran"


@pytest.mark.slow
def test_force_retrains_a_point_in_a_new_mlflow_run(project: Path) -> None:
    runs = mlflow_runs(project, "tiny")
    before = {r.data.tags["grid.point"]: r for r in runs if r.data.tags.get("palimpsa.role") == "point"}
    point = sorted(before)[0]
    metrics = project / "results" / "runs" / "tiny" / point / "metrics.json"
    proc = run_tiny(project, "--force", str(metrics.relative_to(project)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert job_counts(proc.stdout + proc.stderr) == {"train": 1}
    result = json.loads(metrics.read_text())
    assert result["resumed"] is False and result["steps"] == 16
    runs = {r.info.run_id: r for r in mlflow_runs(project, "tiny")}
    old, new = runs[before[point].info.run_id], runs[result["mlflow_run_id"]]
    assert new.info.run_id != old.info.run_id and new.info.status == "FINISHED"
    assert old.data.tags["palimpsa.superseded_by"] == new.info.run_id
    assert new.data.tags["grid.point"] == point and "palimpsa.resumed" not in new.data.tags
    history = (metrics.parent / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [4, 8, 12, 16]


# --------------------------------------------------------------------------- GPU slots


def launch(gpus: int, visible: str, lock_dir: Path, hold_s: float, per_gpu: int = 1) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PALIMPSA_GPU_LOCK_DIR": str(lock_dir)}
    env["PALIMPSA_JOBS_PER_GPU"] = str(per_gpu)
    env.pop("SLURM_JOB_ID", None)
    code = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], time.time(), flush=True); "
    code += f"time.sleep({hold_s})"
    cmd = [
        sys.executable,
        str(ROOT / "workflow/scripts/gpu_slot.py"),
        "--gpus",
        str(gpus),
        "--",
        sys.executable,
    ]
    return subprocess.Popen([*cmd, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def test_gpu_slots_give_each_job_its_own_device(tmp_path: Path) -> None:
    jobs = [launch(1, "3,5", tmp_path, 1.5) for _ in range(2)]
    seen = [job.communicate(timeout=60)[0].split()[0] for job in jobs]
    assert sorted(seen) == ["3", "5"] and all(job.returncode == 0 for job in jobs)


def test_gpu_slots_queue_when_all_are_taken(tmp_path: Path) -> None:
    first = launch(1, "0", tmp_path, 2.0)
    started = float(first.stdout.readline().split()[1])
    second = launch(1, "0", tmp_path, 0.0)
    device, begun = second.communicate(timeout=60)[0].split()
    first.communicate(timeout=60)
    assert device == "0" and float(begun) >= started + 1.9, "the second job waited for the GPU"


def test_gpu_slots_share_a_device_when_jobs_per_gpu_allows(tmp_path: Path) -> None:
    jobs = [launch(1, "0", tmp_path, 2.0, per_gpu=2) for _ in range(2)]
    starts = [float(job.stdout.readline().split()[1]) for job in jobs]
    for job in jobs:
        job.communicate(timeout=60)
    assert abs(starts[0] - starts[1]) < 1.5, "both jobs ran on GPU 0 at once"
    third = [launch(1, "0", tmp_path, 1.0, per_gpu=2) for _ in range(3)]
    begun = sorted(float(job.stdout.readline().split()[1]) for job in third)
    for job in third:
        job.communicate(timeout=60)
    assert begun[2] >= begun[0] + 0.9, "a third job waits for one of the two slots"


def test_gpu_slots_hide_gpus_from_cpu_jobs_and_pass_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    code = "import os, sys; sys.exit(0 if os.environ['CUDA_VISIBLE_DEVICES'] == '' else 3)"
    script = str(ROOT / "workflow/scripts/gpu_slot.py")
    proc = subprocess.run(
        [sys.executable, script, "--gpus", "0", "--", sys.executable, "-c", code], env=env, check=False
    )
    assert proc.returncode == 0
    fail = subprocess.run(
        [sys.executable, script, "--", sys.executable, "-c", "raise SystemExit(7)"], check=False
    )
    assert fail.returncode == 7
    short = subprocess.run(
        [sys.executable, script, "--gpus", "3", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert short.returncode == 1 and "needs 3 GPU(s) but 2 are visible" in short.stderr
