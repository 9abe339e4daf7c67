"""The files of a run folder; anything another process waits on is written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palimpsa.atomic import atomic_write

CHECKPOINT = "checkpoint.pt"  # model, optimizer, RNG and run state: what a killed job resumes from
METRICS = "metrics.json"  # the final metrics; lands last and marks the run complete
HISTORY = "history.jsonl"  # one line per evaluation
FAILED = "failed.json"  # why a run failed (non-finite loss)
RUN_ID = "mlflow_run_id"  # the tracked run, reopened by a rerun
RESOLVED_CONFIG = "config.yaml"  # the run config with every default filled in


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda h: h.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda h: h.writelines(json.dumps(e) + "\n" for e in history))


def read_run_id(out: Path) -> str | None:
    path = out / RUN_ID
    if not path.exists():
        return None
    return path.read_text().strip() or None
