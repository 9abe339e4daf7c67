"""The runs table the reports read: loading, derived columns, and best-learning-rate selection.

Every figure and finding works from one :class:`Prepared` table, so that "which runs, which
learning rate, which seeds" is decided once. Models are identified by their config, not their
names: two runs are the same model when every config column other than ``train.lr`` and ``seed``
(and bookkeeping such as the device) agrees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from reports import chance, compute

KIND_NAMES = {
    "palimpsa": "Palimpsa",
    "metamamba2": "MetaMamba2",
    "mamba2": "Mamba2",
    "gated_deltanet": "Gated DeltaNet",
    "deltanet": "DeltaNet",
    "longhorn": "Longhorn",
    "mesa": "Mesa",
    "linear_attention": "Linear attention",
    "attention": "Transformer++",
}
# What makes a model bigger or smaller (its scale and its state), as opposed to what makes it different.
SIZE_COLUMNS = (
    "model.d_model",
    "model.n_layers",
    "model.mixer.num_heads",
    "model.mixer.head_k_dim",
    "model.mixer.head_v_dim",
)
# Size labels are compact (``d64 H1``): they sit in sentences, table cells and tick labels.
SIZE_SHORT = {
    "model.d_model": "d",
    "model.n_layers": "L",
    "model.mixer.num_heads": "H",
    "model.mixer.head_k_dim": "K",
    "model.mixer.head_v_dim": "V",
}
CONFIG_PREFIXES = ("model.", "task.", "train.")
# Config columns that do not change what is learned (where and how a run executes).
NUISANCE_COLUMNS = {
    "train.lr",
    "train.device",
    "train.precision",
    "train.num_threads",
    "train.checkpoint_every",
    "train.eval_every",
    "model.mixer.backend",
}
LOWER_IS_BETTER = ("val_loss", "val_nll", "val_ppl", "val_perplexity")


class ReportInputError(ValueError):
    """The given tables cannot make a report (missing file, missing columns, no finished runs)."""


@dataclass
class Prepared:
    """Finished runs with derived columns, and the learning rate chosen per model."""

    runs: pl.DataFrame  # every finished run with a metric value, derived columns added (chance, learned)
    selected: pl.DataFrame  # the runs at the best learning rate of their model: ALL their seeds
    lr_choice: pl.DataFrame  # a row per model config: chosen lr, its mean, seeds, seeds chosen on, lrs tried
    curves: pl.DataFrame  # run_id, step, key, value (may be empty)
    metric: str
    higher_is_better: bool
    variant_columns: list[str]
    size_columns: list[str]
    task_columns: list[str]
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> number of runs left out
    margin: float = chance.LEARNED_MARGIN

    def sign(self) -> float:
        """+1 when larger metric values are better; orients differences so that positive is better."""
        return 1.0 if self.higher_is_better else -1.0

    @property
    def chance_known(self) -> bool:
        """True when at least one run has a chance level (the learned screen applies)."""
        return self.runs.get_column("chance").drop_nulls().len() > 0

    @property
    def bounds(self) -> tuple[float, float] | None:
        return chance.metric_bounds(self.metric)


# --------------------------------------------------------------------------- loading


def read_parquet_tables(
    runs_path: str | Path, curves_path: str | Path | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Tables exported by another machine (``results/tables/*.parquet``)."""
    runs_path = Path(runs_path)
    if not runs_path.is_file():
        raise ReportInputError(f"{runs_path}: runs table not found")
    runs = pl.read_parquet(runs_path)
    curves = empty_curves()
    if curves_path is not None:
        curves_path = Path(curves_path)
        if not curves_path.is_file():
            raise ReportInputError(f"{curves_path}: curves table not found")
        curves = pl.read_parquet(curves_path)
    return runs, curves


def empty_curves() -> pl.DataFrame:
    return pl.DataFrame(schema={"run_id": pl.String, "step": pl.Int64, "key": pl.String, "value": pl.Float64})


RUN_PREFIXES = ("cfg.", "metric.")  # palimpsa.results' column prefixes; config wins over metrics


def _run_id_expr(columns: list[str]) -> pl.Expr | None:
    if "grid" in columns and "point" in columns:
        return pl.concat_str(pl.col("grid"), pl.lit("/"), pl.col("point"))
    if "mlflow_run_id" in columns:
        return pl.col("mlflow_run_id")
    return None


def normalise_runs(runs: pl.DataFrame) -> pl.DataFrame:
    """One schema whatever the exporter: ``model.d_model``, ``val_accuracy``, ``run_id``, ``experiment``.

    Accepts the bare layout (dotted config keys and metric names as columns) and the prefixed one of
    ``palimpsa.results`` (``cfg.<key>``, ``metric.<name>``, runs keyed by ``grid``/``point``).
    """
    taken = set(runs.columns)
    renames: dict[str, str] = {}
    for prefix in RUN_PREFIXES:
        for col in runs.columns:
            if col.startswith(prefix):
                bare = col[len(prefix) :]
                if bare not in taken:
                    renames[col] = bare
                    taken.add(bare)
    out = runs.rename(renames)
    if "run_id" not in out.columns:
        expr = _run_id_expr(out.columns)
        if expr is None:
            raise ReportInputError("the runs table has neither run_id nor grid/point nor mlflow_run_id")
        out = out.with_columns(expr.alias("run_id"))
    if "experiment" not in out.columns and "grid" in out.columns:
        out = out.with_columns(pl.col("grid").alias("experiment"))
    return out


CURVE_ID_COLUMNS = ("run_id", "grid", "point", "step", "study", "trial", "state", "mlflow_run_id")


def normalise_curves(curves: pl.DataFrame) -> pl.DataFrame:
    """Long ``run_id, step, key, value`` from either the long layout or a wide one row per eval."""
    if curves.height == 0:
        return empty_curves()
    if {"run_id", "step", "key", "value"} <= set(curves.columns):
        return curves.select(
            "run_id",
            pl.col("step").cast(pl.Int64),
            pl.col("key").cast(pl.String),
            pl.col("value").cast(pl.Float64),
        )
    if "step" not in curves.columns:
        raise ReportInputError("the curves table has no step column")
    if "run_id" not in curves.columns:
        expr = _run_id_expr(curves.columns)
        if expr is None:
            raise ReportInputError("the curves table has neither run_id nor grid/point")
        curves = curves.with_columns(expr.alias("run_id"))
    numeric = [c for c, t in curves.schema.items() if c not in CURVE_ID_COLUMNS and t.is_numeric()]
    long = curves.select("run_id", "step", *numeric).unpivot(
        index=["run_id", "step"], variable_name="key", value_name="value"
    )
    return long.filter(pl.col("value").is_not_null()).select(
        "run_id", pl.col("step").cast(pl.Int64), "key", pl.col("value").cast(pl.Float64)
    )


# --------------------------------------------------------------------------- derived columns


def _short(column: str) -> str:
    return column.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_variant(column: str, value: Any) -> str:
    """Readable name of one non-default setting, e.g. ``meta off``, ``paper gates``, ``Ip=10``."""
    short = _short(column)
    if short == "metaplastic":
        return "meta on" if value else "meta off"
    if short == "gates":
        return f"{value} gates"
    if short == "ip":
        return f"Ip={_fmt(value)}"
    return f"{short}={_fmt(value)}"


def model_label(kind: str, descriptors: list[str]) -> str:
    name = KIND_NAMES.get(kind, kind)
    return f"{name} ({', '.join(descriptors)})" if descriptors else name


def config_defaults() -> dict[str, Any]:
    """Flattened defaults of the run config: settings at their default are left out of labels."""
    from palimpsa.config import RunConfig, config_to_dict
    from palimpsa.io import flatten

    return flatten(config_to_dict(RunConfig()))


def _varying(df: pl.DataFrame, columns: list[str]) -> list[str]:
    out = []
    for col in columns:
        values = df.get_column(col)
        if values.dtype == pl.Null:
            continue
        if values.cast(pl.String, strict=False).n_unique() > 1:
            out.append(col)
    return out


def pick_metric(runs: pl.DataFrame, metric: str | None) -> str:
    if metric is not None:
        if metric not in runs.columns:
            raise ReportInputError(f"--metric: column {metric!r} is not in the runs table")
        return metric
    for candidate in ("val_accuracy", "val_loss"):
        if candidate in runs.columns and runs.get_column(candidate).drop_nulls().len() > 0:
            return candidate
    raise ReportInputError("the runs table has neither val_accuracy nor val_loss values")


def size_label(row: dict[str, Any], size_cols: list[str]) -> str:
    """``d64 H1``: the short name of each size column and its value (no comma: sizes sit in lists)."""
    return " ".join(f"{SIZE_SHORT.get(c, _short(c) + '=')}{_fmt(row.get(c))}" for c in size_cols)


def _screen(row: dict[str, Any], metric: str, higher: bool) -> tuple[float | None, float | None, bool | None]:
    """(chance, learned threshold, learned) of one run; all None when the metric has no known chance."""
    level = chance.chance_level(row, metric)
    if level is None:
        return None, None, None
    limit = chance.threshold(level, metric)
    return level, limit, chance.learned(float(row[metric]), limit, higher)


def prepare(runs: pl.DataFrame, curves: pl.DataFrame | None = None, metric: str | None = None) -> Prepared:
    """Add model/task/size labels, state, FLOPs and the chance screen, then pick the best lr per model."""
    runs = normalise_runs(runs)
    curves = empty_curves() if curves is None else normalise_curves(curves)
    for col in ("run_id", "model.mixer.kind", "seed", "train.lr"):
        if col not in runs.columns:
            raise ReportInputError(f"the runs table lacks the column {col!r}")
    excluded: dict[str, int] = {}
    if "status" in runs.columns:
        done = runs.filter(pl.col("status") == "FINISHED")
        if runs.height - done.height:
            excluded["not finished (failed, killed or running)"] = runs.height - done.height
        runs = done
    metric = pick_metric(runs, metric)
    with_metric = runs.filter(pl.col(metric).is_not_null() & pl.col(metric).is_not_nan())
    if runs.height - with_metric.height:
        excluded[f"no {metric} value"] = runs.height - with_metric.height
    runs = with_metric
    if runs.height == 0:
        raise ReportInputError(f"no finished runs with a {metric} value")
    runs = runs.with_columns(pl.col(metric).cast(pl.Float64).alias("quality"))

    config_cols = [c for c in runs.columns if c.startswith(CONFIG_PREFIXES) and c not in NUISANCE_COLUMNS]
    task_cols = _varying(runs, [c for c in config_cols if c.startswith("task.")])
    size_cols = _varying(runs, [c for c in SIZE_COLUMNS if c in runs.columns]) or [
        c for c in SIZE_COLUMNS[:1] if c in runs.columns
    ]
    variant_cols = [
        c for c in _varying(runs, [c for c in config_cols if not c.startswith("task.")]) if c not in size_cols
    ]
    defaults = config_defaults()

    higher = metric not in LOWER_IS_BETTER and not metric.endswith("loss")
    rows = runs.to_dicts()
    labels, tasks, sizes, keys, states, flops, tokens = [], [], [], [], [], [], []
    screens: list[tuple[float | None, float | None, bool | None]] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["model.mixer.kind"], []).append(row)
    varies_in_kind = {
        kind: [c for c in variant_cols if len({json.dumps(r.get(c), default=str) for r in kind_rows}) > 1]
        for kind, kind_rows in by_kind.items()
    }
    for row in rows:
        kind = row["model.mixer.kind"]
        descriptors = [
            describe_variant(c, row.get(c))
            for c in varies_in_kind[kind]
            if row.get(c) != defaults.get(c, object())
        ]
        labels.append(model_label(kind, descriptors))
        tasks.append(
            ", ".join(f"{_short(c)}={_fmt(row.get(c))}" for c in task_cols)
            or str(row.get("task.name", "task"))
        )
        sizes.append(size_label(row, size_cols))
        key = {c: row.get(c) for c in config_cols}
        keys.append(hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12])
        states.append(compute.state_elements(row))
        flops.append(compute.training_flops(row))
        tokens.append(compute.tokens_seen(row))
        screens.append(_screen(row, metric, higher))
    runs = runs.with_columns(
        pl.Series("model", labels, dtype=pl.String),
        pl.Series("task", tasks, dtype=pl.String),
        pl.Series("size", sizes, dtype=pl.String),
        pl.Series("config_key", keys, dtype=pl.String),
        pl.Series("state_elements", states, dtype=pl.Float64),
        pl.Series("flops", flops, dtype=pl.Float64),
        pl.Series("tokens", tokens, dtype=pl.Float64),
        pl.Series("chance", [c for c, _, _ in screens], dtype=pl.Float64),
        pl.Series("threshold", [t for _, t, _ in screens], dtype=pl.Float64),
        pl.Series("learned", [ok for _, _, ok in screens], dtype=pl.Boolean),
    )
    ranks = runs.select("size", *size_cols).unique(subset="size").sort(size_cols, nulls_last=True)
    rank = {s: i for i, s in enumerate(ranks.get_column("size").to_list())}
    runs = runs.with_columns(pl.col("size").replace_strict(rank, return_dtype=pl.Int64).alias("size_rank"))
    runs = deduplicate(runs)
    selected, lr_choice = select_best_lr(runs, higher)
    return Prepared(
        runs=runs,
        selected=selected,
        lr_choice=lr_choice,
        curves=curves,
        metric=metric,
        higher_is_better=higher,
        variant_columns=variant_cols,
        size_columns=size_cols,
        task_columns=task_cols,
        excluded=excluded,
    )


def deduplicate(runs: pl.DataFrame) -> pl.DataFrame:
    """One run per (model config, lr, seed): a re-run of the same seed replaces, never adds, a seed."""
    order = "end_time" if "end_time" in runs.columns else "run_id"
    return runs.sort(order).unique(
        subset=["config_key", "train.lr", "seed"], keep="last", maintain_order=True
    )


def select_best_lr(runs: pl.DataFrame, higher_is_better: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Best lr per model by the mean over the seeds that every tried lr has; then keep ALL seeds at that lr.

    Choosing on the shared seeds keeps an lr run on one seed from beating an lr whose extra seeds were run
    after the choice (and failed): on a full grid they are all the seeds. A model whose seeds share no lr
    set is chosen on all its runs. ``chosen_on`` counts the seeds the choice was made on.
    """
    lrs_of_seed = pl.col("train.lr").n_unique().over(["config_key", "seed"])
    shared = runs.filter(lrs_of_seed == pl.col("train.lr").n_unique().over("config_key"))
    unshared = runs.filter(~pl.col("config_key").is_in(shared.get_column("config_key").to_list()))
    basis = pl.concat([shared, unshared])
    per_lr = basis.group_by(["config_key", "train.lr"]).agg(
        pl.col("quality").mean().alias("choice_mean"), pl.col("seed").n_unique().alias("chosen_on")
    )
    per_lr = per_lr.sort(
        ["config_key", "choice_mean", "train.lr"], descending=[False, higher_is_better, False]
    )
    best = per_lr.group_by("config_key", maintain_order=True).first()
    tried = runs.group_by("config_key").agg(pl.col("train.lr").unique().sort().alias("lrs_tried"))
    selected = runs.join(best.select("config_key", "train.lr"), on=["config_key", "train.lr"], how="inner")
    at_best = selected.group_by("config_key").agg(
        pl.col("quality").mean().alias("lr_mean"), pl.col("seed").n_unique().alias("n_seeds")
    )
    labels = runs.select("config_key", "model", "task", "size", "size_rank").unique(subset="config_key")
    lr_choice = (
        best.join(at_best, on="config_key")
        .join(tried, on="config_key")
        .join(labels, on="config_key")
        .sort(["task", "size_rank", "model"])
        .select(
            "task", "size", "model", "config_key", "train.lr", "lr_mean", "n_seeds", "chosen_on", "lrs_tried"
        )
    )
    return selected.sort(["task", "size_rank", "model", "seed"]), lr_choice


def size_order(prep: Prepared) -> list[str]:
    """Size labels from smallest to largest (by the size columns, numerically: 8 before 16)."""
    sizes = prep.runs.select("size", "size_rank").unique(subset="size").sort("size_rank")
    return sizes.get_column("size").to_list()
