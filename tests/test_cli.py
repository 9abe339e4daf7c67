"""The ``palimpsa`` command: one-line user errors, lazy subcommands, SIGKILL + rerun, eval and convert."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from palimpsa.cli import COMMANDS, main
from palimpsa.config import config_from_dict
from palimpsa.model import build_model, save_model
from palimpsa.training import CHECKPOINT, FAILED, METRICS, train

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "cli-tiny",
    "seed": 2,
    "task": {
        "name": "mqar",
        "vocab_size": 32,
        "seq_len": 16,
        "num_kv_pairs": 2,
        "num_train": 512,
        "num_val": 64,
    },
    "model": {
        "d_model": 16,
        "n_layers": 1,
        "mixer": {"kind": "palimpsa", "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8, "beta_rank": 4},
    },
    "train": {
        "lr": 1e-2,
        "batch_size": 16,
        "warmup_steps": 2,
        "epochs": 2,
        "eval_every": 16,
        "checkpoint_every": 2,
        "num_threads": 1,
    },
    "tracking": {"enabled": False},
}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def palimpsa(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "palimpsa", *args],
        cwd=kwargs.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_key_is_one_line_naming_file_and_key(tmp_path):
    bad = {**TINY, "train": {**TINY["train"], "lrr": 0.1}}
    path = write_config(tmp_path / "bad.yaml", bad)
    proc = palimpsa("train", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, str(path), "train.lrr", "did you mean 'lr'")
    assert not (tmp_path / "out").exists()


def test_bad_override_and_missing_file(tmp_path):
    path = write_config(tmp_path / "ok.yaml", TINY)
    assert_one_line_error(
        palimpsa("train", str(path), "--out", str(tmp_path / "o"), "--set", "train.lr=-1"),
        "train.lr",
        "must be > 0",
    )
    assert_one_line_error(
        palimpsa("train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")), "nope.yaml", "not found"
    )
    assert_one_line_error(palimpsa("eval", str(tmp_path / "missing.pt")), "missing.pt")


def test_non_finite_loss_exits_nonzero(tmp_path):
    path = write_config(tmp_path / "nan.yaml", TINY)
    proc = palimpsa(
        "train",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--set",
        "train.lr=1e30",
        "--set",
        "train.warmup_steps=0",
    )
    assert_one_line_error(proc, "non-finite")
    assert (tmp_path / "out" / FAILED).is_file() and not (tmp_path / "out" / METRICS).exists()


def test_subcommands_are_imported_lazily():
    code = (
        "import sys; from palimpsa.cli import build_parser; build_parser('train'); "
        "print(sorted(m for m in ('optuna', 'mlflow', 'polars', 'seaborn', 'snakemake') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_sigkill_then_rerun_continues_the_same_mlflow_run(tmp_path):
    """A job killed at a random point resumes from its checkpoint, ends with the uninterrupted metrics,
    and leaves exactly one FINISHED run in the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path / "run.yaml", TINY)
    out = tmp_path / "out"
    args = [
        "train",
        str(path),
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"tracking.tracking_uri={uri}",
        "--set",
        "tracking.enabled=true",
    ]
    job = subprocess.Popen(
        [sys.executable, "-m", "palimpsa", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (out / CHECKPOINT).exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.01)
        time.sleep(0.3)  # land somewhere mid-run, not right on the first checkpoint
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert not (out / METRICS).exists(), "the run finished before it could be killed"
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "cli-tiny"]
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves behind; the rerun must adopt it

    proc = palimpsa(*args)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((out / METRICS).read_text())
    assert resumed["resumed"] is True
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == killed.info.run_id == resumed["mlflow_run_id"]
    assert run.info.status == "FINISHED"

    full = train(config_from_dict(TINY), tmp_path / "full", progress=False)
    for key in ("val_loss", "val_accuracy", "best_val_accuracy", "steps", "diag.horizon"):
        assert resumed[key] == full[key], key

    evaluated = palimpsa("eval", str(out / CHECKPOINT), "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["val_loss"] == pytest.approx(resumed["val_loss"])


def test_convert_command(tmp_path):
    cfg = config_from_dict(
        {**TINY, "model": {**TINY["model"], "mixer": {**TINY["model"]["mixer"], "kind": "mamba2"}}}
    )
    save_model(tmp_path / "mamba2.pt", build_model(cfg, 32), cfg)
    assert main(["convert", str(tmp_path / "mamba2.pt"), "--out", str(tmp_path / "meta.pt")]) == 0
    assert (tmp_path / "meta.pt").is_file()
    assert main(["convert", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
