"""MLflow bookkeeping the workflow does once: create the store, create a grid's parent sweep run.

    mlflow_store.py init  --tracking-uri URI --out MARKER
    mlflow_store.py sweep --tracking-uri URI --grid NAME --experiment NAME --out SWEEP_JSON [--tags JSON]

Creating a SQLite store from several processes at once races on the schema migration, so the
workflow runs ``init`` alone before any training job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _write(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)


def _client(uri: str):
    import mlflow

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(uri)


def init(args: argparse.Namespace) -> None:
    client = _client(args.tracking_uri)
    experiments = client.search_experiments()  # forces schema creation / migration now
    _write(args.out, {"tracking_uri": args.tracking_uri, "experiments": len(experiments)})


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init")
    p_init.add_argument("--tracking-uri", required=True)
    p_init.add_argument("--out", required=True)
    p_sweep = sub.add_parser("sweep")
    p_sweep.add_argument("--tracking-uri", required=True)
    p_sweep.add_argument("--grid", required=True)
    p_sweep.add_argument("--experiment", required=True)
    p_sweep.add_argument("--description", default="")
    p_sweep.add_argument("--tags", default="{}")
    p_sweep.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        {"init": init, "sweep": sweep}[args.command](args)
    except Exception as err:  # one line for the job log: the store is unreachable or malformed
        print(f"error: MLflow store {args.tracking_uri}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
