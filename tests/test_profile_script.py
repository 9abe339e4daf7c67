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
