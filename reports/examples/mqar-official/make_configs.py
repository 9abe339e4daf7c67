"""Write the run configs of one batch of this campaign: L = 512 points of ``ablations/mqar-official.yaml``.

    python reports/examples/mqar-official/make_configs.py --variants palimpsa mamba2 --lrs 4.64e-3 --seeds 1 \
        --out WORKDIR/configs

Every point keeps the published model and optimizer; the budget is the one change: ``train.epochs`` (default
7, i.e. 5,467 steps of 781 an epoch, the per-epoch cosine running over those 7 epochs instead of 60). Runs go
to the grid's MLflow experiment with the tags the workflow gives a grid point (``grid``, ``grid.point``,
``axis.*``), so ``palimpsa.results`` reads their variant, lr and seed back.

``--tag-store URI`` gives those tags to the runs of a store that lack them: the first batch's configs put the
point id inside one malformed ``grid`` tag (a mapping written as text), which this reads back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from palimpsa.grid import Grid, load_grid, point_tags  # noqa: E402
from palimpsa.io import dump_yaml, yaml_load  # noqa: E402

GRID = ROOT / "ablations/mqar-official.yaml"


def write_configs(
    grid: Grid, variants: list[str], lrs: list[float], seeds: list[int], epochs: int, out: Path
) -> int:
    chosen = [
        p
        for p in grid.points
        if p.axes["task.seq_len"] == 512
        and p.axes["variant"] in variants
        and p.axes["train.lr"] in lrs
        and p.axes["seed"] in seeds
    ]
    want = len(variants) * len(lrs) * len(seeds)
    if len(chosen) != want:
        raise SystemExit(f"{GRID}: {len(chosen)} points match, expected {want}; check variants, lrs, seeds")
    out.mkdir(parents=True, exist_ok=True)
    for point in chosen:
        cfg = point.resolve(
            {
                "train.epochs": epochs,
                "tracking.experiment": grid.experiment,
                "tracking.run_name": point.point_id,
            }
        )
        cfg["tracking"]["tags"] = point_tags(grid, point)  # dotted tag names: not through set_key
        header = f"# grid point {point.point_id} of {GRID.relative_to(ROOT)}, train.epochs {epochs}\n"
        (out / f"{point.point_id}.yaml").write_text(header + dump_yaml(cfg))
    return len(chosen)


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
    ap.add_argument("--variants", nargs="+")
    ap.add_argument("--lrs", nargs="+", type=float)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tag-store", metavar="URI", help="tag the runs of this MLflow store and stop")
    args = ap.parse_args(argv)
    grid = load_grid(GRID)
    if args.tag_store:
        print(f"{tag_store(grid, args.tag_store)} runs tagged in {args.tag_store}")
        return 0
    if not (args.variants and args.lrs and args.seeds and args.out):
        ap.error("--variants, --lrs, --seeds and --out are required (or --tag-store)")
    n = write_configs(grid, args.variants, args.lrs, args.seeds, args.epochs, args.out)
    print(f"{n} configs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
