"""One line for the terminal when a grid point finishes; the training job prints it after a success.

    run_line.py results/runs/<grid>/<point>/metrics.json

prints (on one line) ``done smoke/K8_V8_mamba2-897c51b6  val_accuracy 0.0352 (best 0.0391 at step 150)
200 steps, 14s, 24.9k tokens/s  MLflow run 4189003e``: the job's own log holds the progress lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def duration(seconds: float) -> str:
    """``14s``, ``3m07s``, ``2h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def score(metrics: dict[str, Any]) -> str:
    """The final validation metric and, when it differs, the best one and its step."""
    key = "val_accuracy" if metrics.get("metric") == "accuracy" else "val_loss"
    value, best = metrics.get(key), metrics.get(f"best_{key}")
    if value is None:
        return f"{key} -"
    text = f"{key} {value:.4f}"
    if best is not None and best != value:
        text += f" (best {best:.4f} at step {metrics.get('best_step')})"
    return text


def line(metrics: dict[str, Any]) -> str:
    parts = [
        f"done {metrics.get('name', '?')}",
        score(metrics),
        f"{metrics.get('steps', '?')} steps, {duration(metrics.get('wall_seconds') or 0)}, "
        f"{(metrics.get('tokens_per_second') or 0) / 1000:.1f}k tokens/s"
        + (" (resumed)" if metrics.get("resumed") else ""),
    ]
    if metrics.get("mlflow_run_id"):
        parts.append(f"MLflow run {metrics['mlflow_run_id'][:8]}")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: run_line.py METRICS_JSON", file=sys.stderr)
        return 2
    print(line(json.loads(Path(args[0]).read_text())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
