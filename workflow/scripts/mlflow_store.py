"""MLflow bookkeeping of the workflow: create the store, create a grid's parent sweep run, summarise it.

    mlflow_store.py init    --out MARKER
    mlflow_store.py sweep   --grid NAME --experiment NAME --out SWEEP_JSON [--tags JSON]
    mlflow_store.py summary --sweep SWEEP_JSON --table RUNS_PARQUET --out SUMMARY_JSON

The store is ``$MLFLOW_TRACKING_URI`` (``--tracking-uri`` overrides it with a URI that holds no password:
a command line shows in the process list). Whatever this writes or prints has URL passwords masked.

Creating a SQLite store from several processes at once races on the schema migration, so the
workflow runs ``init`` alone before any training job. ``summary`` runs once every point of the grid has
finished: the sweep run gets the number of points, the best point (run id, value) and the grid's table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _write(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)


def _client(uri: str):
    from palimpsa.tracking import open_client

    return open_client(uri)  # a SQLite store is created owner-only


def tracking_uri(given: str | None) -> str:
    """``--tracking-uri`` when given (no password allowed there), else the environment's, else the default."""
    from palimpsa.credentials import reject_password
    from palimpsa.tracking import DEFAULT_URI

    reject_password(given, "--tracking-uri")
    return given or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def init(args: argparse.Namespace) -> None:
    from palimpsa.credentials import mask_url

    client = _client(args.tracking_uri)
    experiments = client.search_experiments()  # forces schema creation / migration now
    _write(args.out, {"tracking_uri": mask_url(args.tracking_uri), "experiments": len(experiments)})


def sweep(args: argparse.Namespace) -> None:
    from palimpsa.tracking import ensure_experiment

    client = _client(args.tracking_uri)
    exp_id = ensure_experiment(client, args.experiment)  # artifacts beside the store, under its lock
    if args.description:
        client.set_experiment_tag(exp_id, "mlflow.note.content", args.description)
    tags = {str(k): str(v) for k, v in json.loads(args.tags or "{}").items()}
    tags.update({"palimpsa.role": "sweep", "grid": args.grid})
    run = client.create_run(exp_id, run_name=f"{args.grid}-sweep", tags=tags)
    # Children link to it by run id; it holds the grid's provenance, not a live process.
    client.set_terminated(run.info.run_id, "FINISHED")
    _write(
        args.out,
        {
            "grid": args.grid,
            "experiment": args.experiment,
            "experiment_id": exp_id,
            "run_id": run.info.run_id,
        },
    )


def best_point(table: Any) -> dict[str, Any] | None:
    """The point with the best final validation metric: accuracy when the grid has it (higher is better),
    else loss (lower is better). ``table`` is the grid's rows of results/tables/runs.parquet (polars)."""
    has_accuracy = "metric.val_accuracy" in table.columns and table["metric.val_accuracy"].drop_nulls().len()
    key = "val_accuracy" if has_accuracy else "val_loss"
    column = f"metric.{key}"
    if column not in table.columns:
        return None
    rows = table.filter(table[column].is_not_null()).sort(column, descending=bool(has_accuracy))
    if rows.height == 0:
        return None
    row = rows.row(0, named=True)
    return {"point": row["point"], "metric": key, "value": row[column], "mlflow_run_id": row["mlflow_run_id"]}


def _summary_note(grid: str, points: int, best: dict[str, Any] | None) -> str:
    """The sweep run's description in the UI (markdown)."""
    text = f"**{grid}**: {points} points finished."
    if best:
        text += f" Best {best['metric']}: {best['value']:.4g} at `{best['point']}`"
        text += f" (run `{best['mlflow_run_id']}`)."
    return text + " The grid's table is the artifact `table/runs.csv` (and `runs.parquet`)."


def summary(args: argparse.Namespace) -> None:
    import polars as pl

    sweep_info = json.loads(Path(args.sweep).read_text())
    grid, run_id = sweep_info["grid"], sweep_info["run_id"]
    table = pl.read_parquet(args.table).filter(pl.col("grid") == grid)
    best = best_point(table)
    client = _client(args.tracking_uri)
    metrics = {"points/finished": float(table.height)}
    tags = {"mlflow.note.content": _summary_note(grid, table.height, best)}
    if best:
        metrics[f"best/{best['metric']}"] = float(best["value"])
        tags.update({"best.point": best["point"], "best.mlflow_run_id": str(best["mlflow_run_id"])})
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        table.write_parquet(Path(tmp) / "runs.parquet")
        table.write_csv(Path(tmp) / "runs.csv")
        client.log_artifacts(run_id, tmp, "table")
    _write(args.out, {**sweep_info, "points": table.height, "best": best})


def main(argv: list[str] | None = None) -> int:
    from palimpsa.credentials import mask_text, mask_url

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init")
    p_init.add_argument("--out", required=True)
    p_sweep = sub.add_parser("sweep")
    p_sweep.add_argument("--grid", required=True)
    p_sweep.add_argument("--experiment", required=True)
    p_sweep.add_argument("--description", default="")
    p_sweep.add_argument("--tags", default="{}")
    p_sweep.add_argument("--out", required=True)
    p_summary = sub.add_parser("summary")
    p_summary.add_argument("--sweep", required=True, help="the grid's sweep.json")
    p_summary.add_argument("--table", required=True, help="results/tables/runs.parquet")
    p_summary.add_argument("--out", required=True)
    for command in (p_init, p_sweep, p_summary):
        command.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    try:
        args.tracking_uri = tracking_uri(args.tracking_uri)
        {"init": init, "sweep": sweep, "summary": summary}[args.command](args)
    except Exception as err:  # one line for the job log: the store is unreachable or malformed
        where = mask_url(args.tracking_uri)
        print(mask_text(f"error: MLflow store {where}: {type(err).__name__}: {err}"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
