"""The training-step profiler script runs the real Trainer (here on the CPU) and reports every mixer asked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_profile_reports_step_time_and_host_ops_per_mixer(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "profile.md"
    cmd = [sys.executable, str(ROOT / "workflow/scripts/profile_train_step.py"), "--config", str(config)]
    cmd += ["--set", "train.device=cpu", "--mixers", "palimpsa", "mamba2", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for mixer in ("palimpsa", "mamba2"):
        head = re.search(rf"### {mixer}: ([0-9.]+) ms a step, ([0-9,]+) tokens/s", text)
        assert head and float(head[1]) > 0 and int(head[2].replace(",", "")) > 0, text
    assert text.count("| host op (self time) |") == 2 and "`aten::" in text


def test_train_step_benchmark_times_mixers_alone_and_packed(tmp_path: Path) -> None:
    """bench_train_step on the published grid's point, shrunk to a CPU-sized task: one row per mixer alone,
    one per packed count, and both files written."""
    import json

    out = tmp_path / "train_step"
    tiny = ["task.num_train=64", "task.seq_len=32", "task.num_kv_pairs=4", "train.batch_size=8"]
    cmd = [sys.executable, str(ROOT / "workflow/scripts/bench_train_step.py"), "--variants", "mamba2"]
    cmd += [
        *(a for s in [*tiny, "train.precision=fp32"] for a in ("--set", s)),
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    cmd += ["--packed", "2", "--packed-variants", "mamba2", "--seconds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["alone"]["mamba2"]["ms_per_step"] > 0 and record["alone"]["mamba2"]["num_params"] > 0
    (packed,) = record["packed"]
    assert (
        packed["runs"] == 2 and len(packed["steps_per_s_each"]) == 2 and packed["aggregate_steps_per_s"] > 0
    )
    assert "| mamba2 | 2 |" in out.with_suffix(".md").read_text()
