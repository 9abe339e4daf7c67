"""``python -m reports.build``: render the analysis report from tracked runs, never retraining.

Sources, one of:
  --results DIR                                     a results folder copied from any machine (tables, tuning)
  --runs RUNS.parquet [--curves CURVES.parquet]     tables exported by any machine
  --tracking-uri URI [--experiments a,b]            the MLflow store itself (via palimpsa.results)
  (neither)                                         results/tables/{runs,curves}.parquet
Optional: --tuning trials.parquet | --tuning STORAGE_URL --study NAME (Optuna history and importances);
--pipeline-check when the runs only check the pipeline (the header then says so whatever the data);
--caveat TEXT (repeatable) for what the runs cannot say themselves (a cut budget, a shared GPU).
A URI with a password is refused on the command line (the process list shows it): PostgreSQL reads the
password from ~/.pgpass, a tracking server's login comes from MLFLOW_TRACKING_USERNAME / _PASSWORD.

Writes ``--out`` (a self-contained HTML file) and, next to it, ``figures/<name>.png`` with
``figures/<name>.rst`` captions, ``findings.json`` (every number with its source) and
``selected.parquet`` (the runs at each model's best learning rate).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from palimpsa.credentials import mask_url, reject_password
from palimpsa.errors import ConfigError

DEFAULT_TABLES = Path("results/tables")
DEFAULT_OUT = Path("results/report/index.html")


@dataclass
class BuildResult:
    out: Path
    figures: list  # reports.figures.FigureResult
    findings: list  # reports.findings.Finding
    prepared: object  # reports.tables.Prepared
    notes: dict  # section -> why it has no finding
    check: list  # why the report only checks the pipeline (empty: it can speak about the science)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reports.build", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("sources")
    src.add_argument(
        "--results",
        type=Path,
        help="a results folder copied from any machine (e.g. a GPU box): reads RESULTS/tables/*.parquet and "
        "RESULTS/tuning, writes RESULTS/report/index.html unless --out is given",
    )
    src.add_argument(
        "--runs", "--table", dest="runs", type=Path, help="runs table (parquet), one row per run"
    )
    src.add_argument("--curves", type=Path, help="curves table (parquet): run_id, step, key, value")
    src.add_argument("--tracking-uri", help="read the MLflow store at this URI instead of parquet tables")
    src.add_argument("--experiments", help="comma-separated MLflow experiment (grid) names; default: all")
    src.add_argument(
        "--tuning",
        help="Optuna trials table (parquet), a folder of <study>/trials.parquet, "
        "or a storage URL (with --study)",
    )
    src.add_argument("--study", help="Optuna study name when --tuning is a storage URL")
    p.add_argument("--metric", help="quality column (default: val_accuracy, else val_loss)")
    p.add_argument("--title", default="Palimpsa: why performance shifts with scale")
    p.add_argument("--out", type=Path, help=f"HTML file to write (default {DEFAULT_OUT})")
    p.add_argument("--min-figures", type=int, default=0, help="fail when fewer figures have data")
    p.add_argument(
        "--pipeline-check",
        action="store_true",
        help="the runs only check the pipeline (e.g. the CPU smoke grid): the header says so even when some "
        "runs happen to leave chance",
    )
    p.add_argument(
        "--caveat",
        action="append",
        default=[],
        metavar="TEXT",
        help="what a reader must know that the runs cannot say (a budget below the published one, runs that "
        "shared a GPU); repeatable, listed at the top of the report",
    )
    args = p.parse_args(argv)
    if any(not c.strip() for c in args.caveat):
        p.error("--caveat needs text: a blank caveat says nothing")
    if args.results is not None:
        if args.runs is not None or args.tracking_uri is not None:
            p.error("--results replaces --runs/--curves and --tracking-uri")
        args.runs = args.results / "tables" / "runs.parquet"
        if args.curves is None and (args.results / "tables" / "curves.parquet").is_file():
            args.curves = args.results / "tables" / "curves.parquet"
        if args.tuning is None and (args.results / "tuning").is_dir():
            args.tuning = str(args.results / "tuning")
        args.out = args.out or args.results / "report" / "index.html"
    args.out = args.out or DEFAULT_OUT
    if args.runs is not None and args.tracking_uri is not None:
        p.error("give either --runs or --tracking-uri, not both")
    if args.curves is not None and args.runs is None:
        p.error("--curves needs --runs")
    if args.study is not None and args.tuning is None:
        p.error("--study needs --tuning")
    try:
        reject_password(args.tracking_uri, "--tracking-uri")
        reject_password(args.tuning, "--tuning")
    except ConfigError as err:
        p.error(str(err))
    return args


def load_sources(args: argparse.Namespace):
    """(runs, curves, source description) from parquet tables or the MLflow store."""
    from reports.tables import ReportInputError, read_parquet_tables

    if args.tracking_uri is not None:
        from palimpsa import results

        experiments = [e for e in (args.experiments or "").split(",") if e] or None
        try:
            runs, curves = results.build_tables(args.tracking_uri, experiments)
        except ValueError as err:  # e.g. an experiment name the store does not hold
            raise ReportInputError(" ".join(str(err).split())) from None
        where = f"MLflow store {mask_url(args.tracking_uri)}" + (
            f", experiments {', '.join(experiments)}" if experiments else ""
        )
        return runs, curves, where
    runs_path = args.runs or DEFAULT_TABLES / "runs.parquet"
    curves_path = args.curves
    if curves_path is None and args.runs is None and (DEFAULT_TABLES / "curves.parquet").is_file():
        curves_path = DEFAULT_TABLES / "curves.parquet"
    if args.runs is None and not runs_path.is_file():
        raise ReportInputError(f"{runs_path}: no runs table; give --runs or --tracking-uri")
    runs, curves = read_parquet_tables(runs_path, curves_path)
    return runs, curves, f"tables {runs_path}" + (f" and {curves_path}" if curves_path else "")


def build(args: argparse.Namespace) -> BuildResult:
    from reports import figures as figs
    from reports import findings as fnd
    from reports import html
    from reports.purpose import pipeline_check_reasons
    from reports.tables import prepare
    from reports.tuning import load_tuning

    runs, curves, source = load_sources(args)
    prep = prepare(runs, curves, metric=args.metric)
    tuning = load_tuning(args.tuning, args.study, prep.higher_is_better) if args.tuning else None
    out: Path = args.out
    fig_dir = out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    results = figs.render_all(prep, tuning)
    findings, notes = fnd.collect(prep)
    check = pipeline_check_reasons(prep, args.pipeline_check)
    for res in results:
        res.save(fig_dir)
    (out.parent / "findings.json").write_text(json.dumps([f.to_dict() for f in findings], indent=1))
    prep.selected.write_parquet(out.parent / "selected.parquet")
    page = html.render(args.title, prep, results, findings, source, tuning, notes, check, args.caveat)
    out.write_text(page)
    return BuildResult(out=out, figures=results, findings=findings, prepared=prep, notes=notes, check=check)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from reports.tables import ReportInputError
    from reports.tuning import TuningInputError

    try:
        result = build(args)
    except (ReportInputError, TuningInputError) as err:
        print(f"reports.build: error: {err}", file=sys.stderr)
        return 2
    with_data = [r for r in result.figures if r.has_data]
    skipped = [r for r in result.figures if r.skipped and not r.silent]
    print(
        f"wrote {result.out}: {len(with_data)} figures, {len(skipped)} skipped, {len(result.findings)} "
        "findings"
    )
    for r in skipped:
        print(f"  skipped {r.name}: {r.skipped}")
    if len(with_data) < args.min_figures:
        print(
            f"reports.build: error: only {len(with_data)} figures have data (--min-figures "
            f"{args.min_figures})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
