"""Tidy results tables from run folders (polars, parquet).

Each run folder written by the workflow holds ``point.json`` (grid, point id, axis values),
``config.yaml`` (the resolved run config the trainer wrote),
``metrics.json`` (the trainer's final metrics) and
``history.jsonl`` (one line per eval). :func:`collect_runs` makes one row per run: identifiers, the
point's axis values (``axis.<key>``), every config value (``cfg.<dotted key>``) and every final metric
(``metric.<name>``); :func:`collect_curves` makes one row per (run, eval). Reading folders, not the
MLflow store, keeps the table exact for the points of the current grids (stale runs of edited grids
stay out) and works without a tracking server; ``mlflow_run_id`` links each row to its MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from palimpsa.config import flatten

ID_COLUMNS = ("grid", "point", "label", "experiment", "run_dir", "status", "mlflow_run_id")


def _run_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() or path.suffix == ".json" else path


def _scalar(value: Any) -> Any:
    """Parquet columns need one type: lists and mappings become JSON text."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def read_run(path: str | Path) -> dict[str, Any]:
    """One row: identifiers, axes, config and final metrics of a run folder (or its metrics.json)."""
    run_dir = _run_dir(path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    point_file, config_file = run_dir / "point.json", run_dir / "config.yaml"
    if not config_file.is_file():
        config_file = run_dir / "run.yaml"
    point = json.loads(point_file.read_text()) if point_file.is_file() else {}
    cfg = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    row: dict[str, Any] = {
        "grid": point.get("grid", run_dir.parent.name),
        "point": point.get("point", run_dir.name),
        "label": point.get("label", run_dir.name),
        "experiment": point.get("experiment"),
        "run_dir": str(run_dir),
        "status": metrics.get("status"),
        "mlflow_run_id": metrics.get("mlflow_run_id"),
    }
    row["variant"] = point.get("axes", {}).get("variant")
    for key, value in point.get("axes", {}).items():
        if key != "variant":
            row[f"axis.{key}"] = _scalar(value)
    for key, value in flatten({k: v for k, v in (cfg or {}).items() if k != "tracking"}).items():
        row[f"cfg.{key}"] = _scalar(value)
    for key, value in flatten(metrics).items():
        if key not in ("status", "mlflow_run_id"):
            row[f"metric.{key}"] = _scalar(value)
    return row


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    """One row per eval of a run's history.jsonl, with the run's grid and point."""
    run_dir = _run_dir(path)
    point_file = run_dir / "point.json"
    point = json.loads(point_file.read_text()) if point_file.is_file() else {}
    history = run_dir / "history.jsonl"
    rows = []
    if history.is_file():
        for line in history.read_text().splitlines():
            if line.strip():
                entry = {k: _scalar(v) for k, v in json.loads(line).items()}
                rows.append(
                    {
                        "grid": point.get("grid", run_dir.parent.name),
                        "point": point.get("point", run_dir.name),
                        **entry,
                    }
                )
    return rows


def _frame(rows: list[dict[str, Any]], first: tuple[str, ...]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame({c: [] for c in first}, schema={c: pl.String for c in first})
    columns = list(dict.fromkeys(c for row in rows for c in row))
    ordered = [c for c in first if c in columns] + sorted(c for c in columns if c not in first)
    # Mixed int/float columns (an axis of 1 and 0.5) must not fail the frame: widen to float.
    data = {c: [row.get(c) for row in rows] for c in ordered}
    for c, values in data.items():
        kinds = {type(v) for v in values if v is not None}
        if kinds <= {int, float} and float in kinds:
            data[c] = [None if v is None else float(v) for v in values]
        elif len(kinds) > 1:
            data[c] = [None if v is None else str(v) for v in values]
    return pl.DataFrame(data, strict=False)


def collect_runs(paths: list[str | Path]) -> pl.DataFrame:
    return _frame([read_run(p) for p in paths], (*ID_COLUMNS, "variant"))


def collect_curves(paths: list[str | Path]) -> pl.DataFrame:
    return _frame([row for p in paths for row in read_curve(p)], ("grid", "point", "step"))


def main(argv: list[str] | None = None) -> int:
    """``python -m palimpsa.results RUN_DIR_OR_METRICS... --runs-out T.parquet --curves-out C.parquet``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders or their metrics.json")
    parser.add_argument("--runs-out", required=True)
    parser.add_argument("--curves-out")
    args = parser.parse_args(argv)
    runs = collect_runs(args.runs)
    Path(args.runs_out).parent.mkdir(parents=True, exist_ok=True)
    runs.write_parquet(args.runs_out)
    print(f"{args.runs_out}: {runs.height} runs x {runs.width} columns")
    if args.curves_out:
        curves = collect_curves(args.runs)
        curves.write_parquet(args.curves_out)
        print(f"{args.curves_out}: {curves.height} evals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
