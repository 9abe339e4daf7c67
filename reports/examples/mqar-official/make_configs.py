"""Write the run configs of one batch of this campaign, from the grid points it names.

    # part A: the published comparison at L = 512 (ablations/mqar-official.yaml)
    python reports/examples/mqar-official/make_configs.py --where task.seq_len=512 \
        --variants palimpsa mamba2 --lrs 4.64e-3 --seeds 1 --out WORKDIR/configs
    # a further seed of part A at each mixer's best lr so far (tables or MLflow stores, pooled)
    python reports/examples/mqar-official/make_configs.py --where task.seq_len=512 \
        --variants palimpsa mamba2 --best-lr-from reports/examples/mqar-official/runs.parquet \
        sqlite:///WORKDIR/mlflow.db --seeds 2 --out WORKDIR/configs
    # every rate of seed 2 but those already run (tables or stores)
    python reports/examples/mqar-official/make_configs.py --where task.seq_len=512 \
        --variants palimpsa mamba2 --lrs 1e-3 2.15e-3 4.64e-3 1e-2 --seeds 2 \
        --skip-done reports/examples/mqar-official/runs.parquet --out WORKDIR/configs
    # part B: memory capacity (ablations/mqar-capacity.yaml), each mixer at its best lr of part A
    python reports/examples/mqar-official/make_configs.py --grid ablations/mqar-capacity.yaml \
        --variants palimpsa mamba2 --best-lr-from reports/examples/mqar-official/runs.parquet --seeds 1 \
        --out WORKDIR/configs

Every point keeps the published model and optimizer; the budget is the one change: ``train.epochs`` (default
7, i.e. 5,467 steps of 781 an epoch at L = 512, the per-epoch cosine running over those 7 epochs instead of
60). Runs go to the grid's MLflow experiment with the tags the workflow gives a grid point (``grid``,
``grid.point``, ``axis.*``), so ``palimpsa.results`` reads their variant, lr and seed back.

``--tag-store URI`` gives those tags to the runs of a store that lack them: the first batch's configs put the
point id inside one malformed ``grid`` tag (a mapping written as text), which this reads back.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from palimpsa.grid import Grid, GridPoint, load_grid, point_tags  # noqa: E402
from palimpsa.io import dump_yaml, yaml_load  # noqa: E402

PART_A = ROOT / "ablations/mqar-official.yaml"


def final_accuracies(source: str) -> list[tuple[str, float, int, float]]:
    """(variant, lr, seed, final val accuracy) of every finished run in ``source``: a runs table
    (``.parquet``, read with polars) or an MLflow store URI (read with mlflow alone: a GPU box without
    polars can choose)."""
    local = source.removeprefix("sqlite:///") if source.startswith("sqlite:///") else source
    if "://" not in local and not Path(local).is_file():  # a missing SQLite file would be created empty
        raise SystemExit(f"{source}: no such runs table or MLflow store")
    if source.endswith(".parquet"):
        import polars as pl

        runs = pl.read_parquet(source).filter(pl.col("status") == "FINISHED")
        rows = list(runs.select("variant", "axis.train.lr", "axis.seed", "metric.val_accuracy").iter_rows())
    else:
        from mlflow.tracking import MlflowClient

        from palimpsa.tracking import mlflow_metric

        client = MlflowClient(source)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, "attributes.status = 'FINISHED'", max_results=5000)
        metric = mlflow_metric("val_accuracy")
        rows = [
            (tags["axis.variant"], float(tags["axis.train.lr"]), int(tags["axis.seed"]), metrics[metric])
            for r in runs
            if "axis.variant" in (tags := r.data.tags) and metric in (metrics := r.data.metrics)
        ]
    if not rows:
        raise SystemExit(f"{source}: no finished run of a grid point with a final val accuracy")
    return rows


def best_lrs(rows: list[tuple[str, float, int, float]]) -> dict[str, float]:
    """Each variant's lr with the highest mean final val accuracy over the seeds run at every lr of that
    variant (all its seeds when none was), ties to the smaller lr: the report's choice, without polars. A run
    found in two sources (a table and the store it was exported from) counts once."""
    rows = list({(variant, lr, seed): (variant, lr, seed, acc) for variant, lr, seed, acc in rows}.values())
    lrs: dict[str, set[float]] = defaultdict(set)
    lrs_of_seed: dict[tuple[str, int], set[float]] = defaultdict(set)
    for variant, lr, seed, _ in rows:
        lrs[variant].add(lr)
        lrs_of_seed[variant, seed].add(lr)
    shared = {key for key, tried in lrs_of_seed.items() if tried == lrs[key[0]]}
    has_shared = {variant for variant, _ in shared}
    scores: dict[tuple[str, float], list[float]] = defaultdict(list)
    for variant, lr, seed, acc in rows:
        if (variant, seed) in shared or variant not in has_shared:
            scores[variant, lr].append(acc)
    best: dict[str, tuple[float, float]] = {}
    for (variant, lr), accs in sorted(scores.items()):
        mean = sum(accs) / len(accs)
        if variant not in best or mean > best[variant][1]:
            best[variant] = (lr, mean)
    return {variant: lr for variant, (lr, _) in best.items()}


def select(grid: Grid, want: dict[str, list[Any]], lr_of: dict[str, float] | None) -> list[GridPoint]:
    """The points whose axes take one of the wanted values (and, with ``lr_of``, their variant's lr)."""
    chosen = [
        p
        for p in grid.points
        if all(p.axes.get(key) in values for key, values in want.items())
        and (lr_of is None or p.axes["train.lr"] == lr_of.get(p.axes["variant"]))
    ]
    for key, values in want.items():
        have = {p.axes.get(key) for p in grid.points}
        missing = [v for v in values if v not in have]
        if missing:
            raise SystemExit(
                f"{grid.path}: no point has {key} = {missing[0]!r}; its values: {sorted(have, key=str)}"
            )
    if not chosen:
        raise SystemExit(f"{grid.path}: no point has all of {want}")
    return chosen


def write_configs(grid: Grid, points: list[GridPoint], epochs: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for point in points:
        cfg = point.resolve(
            {
                "train.epochs": epochs,
                "tracking.experiment": grid.experiment,
                "tracking.run_name": point.point_id,
            }
        )
        cfg["tracking"]["tags"] = point_tags(grid, point)  # dotted tag names: not through set_key
        source = grid.path.resolve().relative_to(ROOT)
        header = f"# grid point {point.point_id} of {source}, train.epochs {epochs}\n"
        (out / f"{point.point_id}.yaml").write_text(header + dump_yaml(cfg))


def tag_store(grid: Grid, tracking_uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.experiment)
    if experiment is None:
        raise SystemExit(f"{tracking_uri}: no experiment {grid.experiment!r}")
    tagged = 0
    for run in client.search_runs([experiment.experiment_id]):
        if "axis.variant" in run.data.tags:
            continue
        legacy = yaml_load(run.data.tags.get("grid", ""))
        point_id = run.data.tags.get("grid.point") or (
            legacy.get("point") if isinstance(legacy, dict) else None
        )
        if point_id is None:
            continue
        for key, value in point_tags(grid, grid.point(point_id)).items():
            client.set_tag(run.info.run_id, key, value)
        tagged += 1
    return tagged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=PART_A)
    ap.add_argument("--where", action="append", default=[], metavar="AXIS=VALUE", help="keep points with it")
    ap.add_argument("--variants", nargs="+")
    ap.add_argument("--lrs", nargs="+", type=float)
    ap.add_argument(
        "--best-lr-from",
        nargs="+",
        metavar="RUNS",
        help="each variant at its best lr over these runs tables (.parquet) or MLflow store URIs, together",
    )
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument(
        "--skip-done", nargs="+", metavar="RUNS", help="leave out points finished in these tables or stores"
    )
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tag-store", metavar="URI", help="tag the runs of this MLflow store and stop")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid)
    if args.tag_store:
        print(f"{tag_store(grid, args.tag_store)} runs tagged in {args.tag_store}")
        return 0
    if not (args.variants and args.seeds and args.out) or (args.lrs is None) == (args.best_lr_from is None):
        ap.error("give --variants, --seeds, --out and one of --lrs or --best-lr-from (or --tag-store)")
    want: dict[str, list[Any]] = {"variant": args.variants, "seed": args.seeds}
    for item in args.where:
        key, _, value = item.partition("=")
        want[key] = [yaml_load(value)]
    lr_of = None
    if args.lrs:
        want["train.lr"] = args.lrs
    else:
        lr_of = best_lrs([row for source in args.best_lr_from for row in final_accuracies(source)])
        print("lr per variant:", ", ".join(f"{v} {lr_of.get(v)}" for v in args.variants))
    points = select(grid, want, lr_of)
    if args.skip_done:
        done = {(v, lr, seed) for source in args.skip_done for v, lr, seed, _ in final_accuracies(source)}
        kept = [p for p in points if (p.axes["variant"], p.axes["train.lr"], p.axes["seed"]) not in done]
        print(f"{len(points) - len(kept)} of {len(points)} points finished already: left out")
        points = kept
    write_configs(grid, points, args.epochs, args.out)
    print(f"{len(points)} configs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
