"""Data-parallel training through torchrun on CPU (2 gloo processes) against one process at the same
global batch: the same per-step losses, one tracked run written by rank 0 only, a clear error for a batch
that the processes cannot share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12

CONFIG = tiny_config(
    "ddp-tiny",
    # eval_every 1: one history line per step, whose train_loss is that step's loss
    train={"max_steps": STEPS, "eval_every": 1, "log_every": 1, "num_threads": 1, "device": "cpu"},
    tracking={"enabled": False, "experiment": "ddp"},
)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def train_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "palimpsa", "train", str(config), "--out", str(out), "--quiet", *extra]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    single = run([sys.executable, *train_cmd(config, tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ddp_args = ["--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri={uri}"]
    ddp = run([*torchrun(2), *train_cmd(config, tmp_path / "two", *ddp_args)], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [h["step"] for h in one] == [h["step"] for h in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5), (a["step"], a, b)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5), (a["step"], a, b)
    assert one[-1]["train_loss"] < one[0]["train_loss"] - 0.05, "the run learned something to compare"

    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert m2["tokens"] == m1["tokens"] == STEPS * 16 * 16, "tokens count the global batch"
    assert m2["val_accuracy"] == pytest.approx(m1["val_accuracy"], abs=1e-6)

    # Rank 0 alone tracks: one run, finished, whose per-step train_loss is the global batch's.
    client = MlflowClient(uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run_.info.status == "FINISHED" and run_.info.run_id == m2["mlflow_run_id"]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run_.info.run_id, "train/loss"))
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    assert [v for _, v in logged] == pytest.approx([h["train_loss"] for h in one], abs=1e-5)
    assert not list((tmp_path / "two").glob(".*")), "temporary files left behind"


def test_a_batch_the_processes_cannot_share_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    proc = run([*torchrun(2), *train_cmd(config, tmp_path / "odd", "--set", "train.batch_size=15")], tmp_path)
    assert proc.returncode != 0
    assert "error: train.batch_size: 15 is not divisible by the 2 data-parallel processes" in proc.stderr
    # torchrun reports its failed children with its own traceback; the trainer prints none
    assert str(ROOT / "palimpsa") not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "odd" / "metrics.json").exists()
