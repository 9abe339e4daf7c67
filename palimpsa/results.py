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

from palimpsa.credentials import mask_url, reject_password
from palimpsa.errors import ConfigError
from palimpsa.io import flatten, read_yaml, yaml_load
from palimpsa.tracking import RESULT_TAG, SUPERSEDED_TAG, flat_metric, mlflow_metric

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
    cfg = read_yaml(config_file) if config_file.is_file() else {}
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


# --------------------------------------------------------------------------- from the MLflow store

CONFIG_ROOTS = ("model.", "task.", "train.", "seed", "name")
CURVE_KEYS = ("val_loss", "val_accuracy", "train_loss")
PARENT_ROLES = ("sweep", "study")


def _param_value(text: str) -> Any:
    """MLflow params are strings; YAML gives back numbers, booleans and None."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def _mlflow_run_id(tags: dict[str, str], mlflow_id: str) -> str:
    grid, point = tags.get("grid"), tags.get("grid.point")
    return f"{grid}/{point}" if grid and point else mlflow_id


def build_tables(
    tracking_uri: str, experiments: list[str] | None = None, curve_keys: tuple[str, ...] = CURVE_KEYS
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(runs, curves) from an MLflow store: the same columns as :func:`collect_runs`, and long curves
    (``run_id, step, key, value``). Sweep and study parent runs and runs retrained since (superseded) are
    left out; ``run_id`` is ``grid/point`` for workflow runs (as the folder tables derive it), else the
    MLflow run id. Metrics are logged under grouped names (``val/accuracy``); columns and curve keys keep
    the flat names of ``metrics.json`` (``metric.val_accuracy``, ``val_accuracy``).
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if experiments:
        found = {name: client.get_experiment_by_name(name) for name in experiments}
        missing = [name for name, exp in found.items() if exp is None]
        if missing:
            raise ValueError(f"{mask_url(tracking_uri)}: no MLflow experiment named {missing}")
        exps = list(found.values())
    else:
        exps = client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    token = None
    while names:
        page = client.search_runs(list(names), max_results=1000, page_token=token)
        for run in page:
            tags, info = run.data.tags, run.info
            if tags.get("palimpsa.role") in PARENT_ROLES or SUPERSEDED_TAG in tags:
                continue
            run_id = _mlflow_run_id(tags, info.run_id)
            row: dict[str, Any] = {
                "run_id": run_id,
                "grid": tags.get("grid", names[info.experiment_id]),
                "point": tags.get("grid.point", info.run_name),
                "label": tags.get("grid.point", info.run_name),
                "experiment": names[info.experiment_id],
                "run_dir": tags.get("palimpsa.out_dir"),
                "status": info.status,
                "mlflow_run_id": info.run_id,
                "variant": tags.get("axis.variant"),
                "start_time": info.start_time,
                "end_time": info.end_time,
            }
            for key, value in tags.items():
                if key.startswith("axis.") and key != "axis.variant":
                    row[key] = _scalar(_param_value(value))
                elif key.startswith(RESULT_TAG) and key.removeprefix(RESULT_TAG) not in ID_COLUMNS:
                    row[f"metric.{key.removeprefix(RESULT_TAG)}"] = value
            for key, value in run.data.params.items():
                if key.startswith(CONFIG_ROOTS) and not key.startswith("tracking."):
                    row[f"cfg.{key}"] = _scalar(_param_value(value))
                elif key.startswith("backend."):  # the implementation each layer ran, as in metrics.json
                    row[f"metric.backends.{key.removeprefix('backend.')}"] = value
            for key, value in run.data.metrics.items():
                row[f"metric.{flat_metric(key)}"] = value
            rows.append(row)
            for key in curve_keys:
                if mlflow_metric(key) in run.data.metrics:
                    curves += [
                        {"run_id": run_id, "step": m.step, "key": key, "value": m.value}
                        for m in client.get_metric_history(info.run_id, mlflow_metric(key))
                    ]
        token = page.token
        if not token:
            break
    runs = _frame(rows, ("run_id", *ID_COLUMNS, "variant"))
    schema = {"run_id": pl.String, "step": pl.Int64, "key": pl.String, "value": pl.Float64}
    return runs, pl.DataFrame(curves, schema=schema)


# --------------------------------------------------------------------------- views of a runs table

LR, SEED = "cfg.train.lr", "cfg.seed"


def setting_columns(runs: pl.DataFrame) -> list[str]:
    """The columns that name a setting (a model at one task size): the variant, every axis but lr and seed."""
    axes = [c for c in runs.columns if c.startswith("axis.") and c not in ("axis.train.lr", "axis.seed")]
    named = (["variant"] if "variant" in runs.columns else []) + sorted(axes)
    return [c for c in named if runs[c].null_count() < runs.height]  # an all-empty column names nothing


def _score(runs: pl.DataFrame) -> tuple[str, bool]:
    """The final validation metric column and whether higher is better."""
    if "metric.val_accuracy" in runs.columns and runs["metric.val_accuracy"].drop_nulls().len() > 0:
        return "metric.val_accuracy", True
    return "metric.val_loss", False


def best_lr(runs: pl.DataFrame, per: str = "seed", drop_seeds: tuple[int, ...] = ()) -> pl.DataFrame:
    """The learning rate chosen on the final validation metric, one row per (setting, seed).

    ``per="seed"``: each seed keeps its own best lr (the published MQAR figure's view, which also drops
    seeds 5 and 6: ``drop_seeds=(5, 6)``). ``per="setting"``: one lr per setting, the best mean over the
    seeds run at every lr (as the report chooses), and every seed's value at that lr. Columns: the
    setting, ``seed``, ``lr``, ``value`` and ``n_lr`` (how many learning rates the choice was made from).
    """
    if per not in ("seed", "setting"):
        raise ValueError(f"per must be 'seed' or 'setting', got {per!r}")
    score, higher = _score(runs)
    setting = setting_columns(runs) or ["grid"]
    done = runs.filter(pl.col("status") == "FINISHED") if "status" in runs.columns else runs
    done = done.filter(~pl.col(SEED).is_in(list(drop_seeds)) & pl.col(score).is_not_null()).select(
        *setting, pl.col(SEED).alias("seed"), pl.col(LR).alias("lr"), pl.col(score).alias("value")
    )
    # group_by and over() keep null keys as a group of their own (joins would drop them)
    if per == "seed":
        done = done.with_columns(n_lr=pl.col("lr").n_unique().over([*setting, "seed"]))
        best = done.sort("value", descending=higher).group_by([*setting, "seed"], maintain_order=True).first()
    else:  # chosen on the seeds run at every lr: seeds added later at the chosen lr do not sway the choice
        done = done.with_columns(n_lr=pl.col("lr").n_unique().over(setting))
        shared = pl.col("lr").n_unique().over([*setting, "seed"]) == pl.col("n_lr")
        done = done.with_columns(basis=shared | ~shared.any().over(setting))  # no seed ran every lr: all do
        mean = pl.when(pl.col("basis")).then(pl.col("value")).mean().over([*setting, "lr"])
        best_mean = mean.max().over(setting) if higher else mean.min().over(setting)
        best = done.with_columns(mean=mean).filter(pl.col("mean") == best_mean)
        # ties between two lrs at the same mean: keep the smaller lr
        best = best.filter(pl.col("lr") == pl.col("lr").min().over(setting))
    return best.sort([*setting, "seed"], nulls_last=True).select(*setting, "seed", "lr", "value", "n_lr")


def cli_command(parser: Any) -> Any:
    """``palimpsa results RUNS.parquet [--best-lr-per seed|setting] [--drop-seeds 5 6] [--csv OUT]``."""
    parser.add_argument("runs", type=Path, help="a runs table (results/tables/runs.parquet)")
    parser.add_argument("--best-lr-per", choices=["seed", "setting"], default="setting")
    parser.add_argument("--drop-seeds", type=int, nargs="*", default=[], help="leave these seeds out")
    parser.add_argument("--csv", type=Path, help="also write the table here")

    def run(args: Any) -> int:
        if not args.runs.is_file():
            raise FileNotFoundError(2, "no such runs table", str(args.runs))
        table = best_lr(pl.read_parquet(args.runs), args.best_lr_per, tuple(args.drop_seeds))
        if args.csv:
            table.write_csv(args.csv)
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
            print(table)
        return 0

    return run


def main(argv: list[str] | None = None) -> int:
    """``python -m palimpsa.results (RUN_DIR... | --tracking-uri URI) --runs-out T [--curves-out C]``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="*", help="run folders or their metrics.json")
    parser.add_argument("--tracking-uri", help="read the MLflow store instead of run folders")
    parser.add_argument("--experiments", help="comma-separated experiment names (with --tracking-uri)")
    parser.add_argument("--runs-out", required=True)
    parser.add_argument("--curves-out")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.tracking_uri):
        parser.error("give run folders or --tracking-uri (one of them)")
    try:
        reject_password(args.tracking_uri, "--tracking-uri")
    except ConfigError as err:
        parser.error(str(err))
    if args.tracking_uri:
        experiments = [e for e in (args.experiments or "").split(",") if e] or None
        runs, curves = build_tables(args.tracking_uri, experiments)
        Path(args.runs_out).parent.mkdir(parents=True, exist_ok=True)
        runs.write_parquet(args.runs_out)
        if args.curves_out:
            curves.write_parquet(args.curves_out)
        print(f"{args.runs_out}: {runs.height} runs from {mask_url(args.tracking_uri)}")
        return 0
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
