"""Regenerate the stored tiny runs behind tests/test_reports.py with real trainings.

``python -m reports.tiny_runs [--work DIR] [--jobs 2]`` expands the fixture grid of
``tests/data/tiny_runs/`` with :mod:`palimpsa.grid`, trains every point with ``palimpsa train``
(tracked into a scratch MLflow store), runs the fixture's Optuna study with ``palimpsa.tuning``,
and exports the tables with :mod:`palimpsa.results` next to the grid: ``runs.parquet``,
``curves.parquet`` and ``tuning/<study>/{trials.parquet,best.yaml}``. About ten minutes on two
CPU cores. (The same grid also runs through the workflow: ``snakemake --config grids=[...]``.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIXTURE = Path("tests/data/tiny_runs")
GRID = FIXTURE / "report-fixture.yaml"
STUDY = FIXTURE / "report-fixture-tune.yaml"


def _train(run_yaml: Path, out: Path, data_dir: Path) -> tuple[Path, int]:
    cmd = [
        sys.executable,
        "-m",
        "palimpsa",
        "train",
        str(run_yaml),
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--quiet",
        "--set",
        "train.num_threads=1",
    ]
    with open(out / "train.log", "w") as log:
        return out, subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    from palimpsa.grid import load_grid, write_point
    from palimpsa.results import collect_curves, collect_runs

    p = argparse.ArgumentParser(prog="python -m reports.tiny_runs", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, help="scratch folder for runs and the MLflow store (default: a temp dir)"
    )
    p.add_argument("--jobs", type=int, default=3, help="trainings at once (one CPU thread each)")
    args = p.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="palimpsa-fixture-"))).resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    data_dir = work / "data"
    grid = load_grid(GRID)
    run_dirs = []
    for point in grid.points:
        out = work / "runs" / grid.name / point.point_id
        write_point(point, grid, None, out / "run.yaml", out / "point.json", tracking_uri=uri)
        run_dirs.append(out)
    todo = [d for d in run_dirs if not (d / "metrics.json").is_file()]
    print(f"{len(run_dirs)} points, {len(todo)} to train, tracking into {uri}", flush=True)
    # The first run creates the MLflow store's schema; the others then share it.
    failed = [d for d, rc in [_train(todo[0] / "run.yaml", todo[0], data_dir)] if rc] if todo else []
    with ThreadPoolExecutor(args.jobs) as pool:
        for out, rc in pool.map(lambda d: _train(d / "run.yaml", d, data_dir), todo[1:]):
            print(f"{'FAILED' if rc else 'done'} {out.name}", flush=True)
            if rc:
                failed.append(out)
    if failed:
        print(f"{len(failed)} runs failed; see their train.log: {[str(d) for d in failed]}", file=sys.stderr)
        return 1
    tune_out = work / "tuning" / STUDY.stem
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "palimpsa.tuning",
            str(STUDY),
            "--out",
            str(tune_out),
            "--tracking-uri",
            uri,
            "--set",
            "train.num_threads=1",
        ]
    )
    if rc:
        print(f"tuning failed ({rc}); outputs stay in {tune_out}", file=sys.stderr)
        return rc
    metrics = [d / "metrics.json" for d in run_dirs]
    collect_runs(metrics).write_parquet(FIXTURE / "runs.parquet")
    collect_curves(metrics).write_parquet(FIXTURE / "curves.parquet")
    dest = FIXTURE / "tuning" / STUDY.stem
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("trials.parquet", "best.yaml"):
        shutil.copy2(tune_out / name, dest / name)
    print(f"fixture tables written under {FIXTURE} (scratch: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
