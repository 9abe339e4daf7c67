"""Comparisons shared by figures and findings: per-model means, paired ablation deltas, curves at a budget.

Everything here works on the best-lr selection of :mod:`reports.tables`, so a figure and the
sentence that describes it can never disagree on which runs they mean, which of them learned,
or how wide an interval is.
"""

from __future__ import annotations

import math
import re

import polars as pl

from reports import stats
from reports.compute import METAPLASTIC_KINDS
from reports.tables import Prepared, size_order

TIME_KEYS = ("wall_seconds", "elapsed_seconds", "time_seconds", "wall_time")
DIAG_SUMMARY = {
    "diag.consolidated": "fraction consolidated",
    "diag.lr_eff": "effective learning rate 1/I",
    "diag.horizon": "memory horizon (tokens)",
}
LAYER_DIAG = re.compile(r"^diag\.l(\d+)\.([a-z_]+)$")
HEAD_DIAG = re.compile(r"^diag\.l(\d+)\.h(\d+)\.([a-z_]+)$")


COMPARABLE = ("learned", "unscreened")  # group statuses a comparison may use


def group_status(n_learned: int | None, n: int) -> str:
    """``learned`` (every seed), ``some`` (some seeds), ``none``, or ``unscreened`` (no known chance)."""
    if n_learned is None:
        return "unscreened"
    return "learned" if n_learned == n else ("some" if n_learned else "none")


def model_means(prep: Prepared, column: str = "quality") -> pl.DataFrame:
    """Per (task, size, model) over ALL seeds at the best lr: mean, sd, n, 95% t interval (``lo``,
    ``hi``; null with one seed), the seeds' values, and how many of them learned (``n_learned``,
    ``status``: see :func:`group_status`)."""
    sel = prep.selected.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan())
    if sel.height == 0:
        return pl.DataFrame()
    extra = [pl.col(c).mean() for c in ("num_params", "state_elements") if c in sel.columns]
    groups = (
        sel.sort("run_id")
        .group_by("task", "size", "size_rank", "model", "model.mixer.kind", "config_key", "train.lr")
        .agg(
            pl.col(column).mean().alias("mean"),
            pl.col(column).std().alias("std"),
            pl.col("seed").n_unique().alias("n"),
            pl.col("run_id").alias("run_ids"),
            pl.col(column).alias("values"),
            pl.col("learned").sum().alias("n_learned"),
            pl.col("learned").is_null().any().alias("_unscreened"),
            pl.col("chance").first(),
            pl.col("threshold").first(),
            *extra,
        )
        .sort("task", "size_rank", "model")
    )
    bounds = prep.bounds if column == "quality" else None
    intervals = [stats.mean_interval(v, bounds=bounds) for v in groups.get_column("values").to_list()]
    status = [
        group_status(None if unscreened else k, n)
        for k, n, unscreened in groups.select("n_learned", "n", "_unscreened").iter_rows()
    ]
    return groups.drop("_unscreened").with_columns(
        pl.Series("lo", [i.lo if i else None for i in intervals], dtype=pl.Float64),
        pl.Series("hi", [i.hi if i else None for i in intervals], dtype=pl.Float64),
        pl.Series("status", status, dtype=pl.String),
    )


def main_label(prep: Prepared, kind: str, metaplastic: bool | None = None) -> str | None:
    """The label of ``kind`` with every ablation setting at its default (fewest descriptors, most runs);
    with ``metaplastic``, among the configs with metaplasticity on (True; unset counts as on) or off
    (False) only, and None when the runs do not record it."""
    rows = prep.selected.filter(pl.col("model.mixer.kind") == kind)
    if metaplastic is not None:
        if "model.mixer.metaplastic" not in rows.columns:
            return None
        rows = rows.filter(pl.col("model.mixer.metaplastic").fill_null(True) == metaplastic)
    if rows.height == 0:
        return None
    counts = rows.group_by("model").agg(pl.len().alias("n")).to_dicts()
    counts.sort(key=lambda r: ("(" in r["model"], r["model"].count(","), -r["n"], r["model"]))
    return counts[0]["model"]


def paired_delta(prep: Prepared, column: str, a_value, b_value, kinds=METAPLASTIC_KINDS) -> pl.DataFrame:
    """Configs with ``column == a_value`` against their twins with ``b_value``, all else equal.

    One row per pair: both sides' group statistics (:func:`model_means`; the twin's with suffix
    ``_b``) and the Welch 95% interval of the difference (``delta``, ``lo_delta``, ``hi_delta``,
    ``verdict``), oriented so that positive means "a is better" (loss differences are negated).
    """
    if column not in prep.selected.columns:
        return pl.DataFrame()
    other = [c for c in prep.variant_columns if c != column]
    twin_cols = list(dict.fromkeys(["task", "size", "model.mixer.kind", *other]))
    means = model_means(prep)
    if means.height == 0:
        return pl.DataFrame()
    keys = (
        prep.selected.filter(pl.col("model.mixer.kind").is_in(list(kinds)))
        .select("config_key", *[c for c in dict.fromkeys([column, *other]) if c not in means.columns])
        .unique(subset="config_key")
    )
    groups = means.join(keys, on="config_key")
    a = groups.filter(pl.col(column) == a_value)
    b = groups.filter(pl.col(column) == b_value)
    if a.height == 0 or b.height == 0:
        return pl.DataFrame()
    side = ["model", "config_key", "mean", "n", "values", "run_ids", "status", "lo", "hi"]
    pairs = a.join(b.select(*twin_cols, *side), on=twin_cols, suffix="_b", nulls_equal=True)
    if pairs.height == 0:
        return pl.DataFrame()
    intervals = [
        stats.welch_interval(va, vb, sign=prep.sign())
        for va, vb in pairs.select("values", "values_b").iter_rows()
    ]
    pairs = pairs.with_columns(
        ((pl.col("mean") - pl.col("mean_b")) * prep.sign()).alias("delta"),
        pl.Series("lo_delta", [i.lo if i else None for i in intervals], dtype=pl.Float64),
        pl.Series("hi_delta", [i.hi if i else None for i in intervals], dtype=pl.Float64),
        pl.Series("verdict", [stats.verdict(i) for i in intervals], dtype=pl.String),
    )
    return pairs.sort("task", "size_rank")


def ip_families(prep: Prepared) -> pl.DataFrame:
    """Selected metaplastic runs in families that differ only in the prior precision Ip.

    Adds ``family`` (the model label without its Ip) and keeps families run at two or more Ip values
    within one task and size; a config that also changes, say, the gates forms its own family.
    """
    col = "model.mixer.ip"
    if col not in prep.selected.columns or "model.mixer.metaplastic" not in prep.selected.columns:
        return pl.DataFrame()
    meta = prep.selected.filter(
        pl.col("model.mixer.kind").is_in(list(METAPLASTIC_KINDS)) & pl.col("model.mixer.metaplastic")
    ).with_columns(
        pl.col("model")
        .str.replace_all(r"Ip=[^,)]+(, )?", "")
        .str.replace(r", \)$", ")")
        .str.replace(r" \(\)$", "")
        .alias("family")
    )
    counts = meta.group_by("task", "size", "family").agg(pl.col(col).n_unique().alias("n_ip"))
    keep = counts.filter(pl.col("n_ip") >= 2).select("task", "size", "family")
    return meta.join(keep, on=["task", "size", "family"]).sort("task", "size", "family", col)


def sorted_by_size(prep: Prepared, df: pl.DataFrame) -> pl.DataFrame:
    """``df`` ordered by task, then by size from smallest to largest (numerically, not as text)."""
    order = {s: i for i, s in enumerate(size_order(prep))}
    return (
        df.with_columns(pl.col("size").replace_strict(order, default=-1).alias("_order"))
        .sort("task", "_order", maintain_order=True)
        .drop("_order")
    )


def curve_points(prep: Prepared, key: str | None = None) -> pl.DataFrame:
    """Curve values of the selected runs with the training time and FLOPs spent by each step.

    Time is optimizer-step time (``train_seconds``, spread evenly over the run's steps): the measured
    cost of training, without process start-up, data generation and evaluation, which are the same
    for every mixer and would swamp short runs. Runs without it fall back to a logged time curve,
    then to ``wall_seconds``. FLOPs grow linearly with steps.
    """
    key = key or curve_key(prep)
    if key is None:
        return pl.DataFrame()
    curves = prep.curves
    pts = curves.filter(pl.col("key") == key).select("run_id", "step", "value")
    info_cols = [
        "run_id",
        "task",
        "size",
        "model",
        "seed",
        "config_key",
        "steps",
        "train_seconds",
        "wall_seconds",
        "flops",
    ]
    info = prep.selected.select([c for c in info_cols if c in prep.selected.columns])
    pts = pts.join(info, on="run_id", how="inner").sort("run_id", "step")
    if pts.height == 0:
        return pts
    time_key = next((k for k in TIME_KEYS if curves.filter(pl.col("key") == k).height), None)
    if {"steps", "train_seconds"} <= set(pts.columns) and pts.get_column("train_seconds").null_count() == 0:
        pts = pts.with_columns((pl.col("step") * pl.col("train_seconds") / pl.col("steps")).alias("wall"))
    elif time_key is not None:
        times = curves.filter(pl.col("key") == time_key).select(
            "run_id", "step", pl.col("value").alias("wall")
        )
        pts = pts.join_asof(times.sort("step"), on="step", by="run_id", strategy="backward")
    elif {"steps", "wall_seconds"} <= set(pts.columns):
        pts = pts.with_columns((pl.col("step") * pl.col("wall_seconds") / pl.col("steps")).alias("wall"))
    if {"steps", "flops"} <= set(pts.columns):
        pts = pts.with_columns((pl.col("step") * pl.col("flops") / pl.col("steps")).alias("flops_at"))
    return pts


def curve_key(prep: Prepared) -> str | None:
    """The curve holding the report metric (``val_accuracy``), or a close variant of its name."""
    keys = prep.curves.get_column("key").unique().to_list() if prep.curves.height else []
    if prep.metric in keys:
        return prep.metric
    tail = prep.metric.removeprefix("val_")
    for k in sorted(keys):
        if k.startswith("val") and k.endswith(tail):
            return k
    return None


def values_at_budget(points: pl.DataFrame, x: str) -> pl.DataFrame:
    """Per run: the last evaluated value at or before the budget of its (task, size) group.

    The budget is the smallest final ``x`` (wall seconds or FLOPs) over the group's runs, so every
    run is compared at a spend that all of them reached.
    """
    if points.height == 0 or x not in points.columns:
        return pl.DataFrame()
    pts = points.filter(pl.col(x).is_not_null())
    final = pts.group_by("task", "size", "run_id").agg(pl.col(x).max().alias("final"))
    budget = final.group_by("task", "size").agg(pl.col("final").min().alias("budget"))
    pts = pts.join(budget, on=["task", "size"]).filter(pl.col(x) <= pl.col("budget") * (1 + 1e-9))
    last = pts.sort("run_id", x).group_by("run_id", maintain_order=True).last()
    return last.select("task", "size", "model", "seed", "run_id", "step", x, "value", "budget")


def layer_diagnostics(prep: Prepared) -> pl.DataFrame:
    """Long table of per-layer diagnostics of the selected runs: layer, quantity, value.

    A quantity logged only per head (``diag.l0.h1.lr_eff``) is averaged over the layer's heads.
    """
    sel = prep.selected
    cols = [c for c in sel.columns if LAYER_DIAG.match(c) or HEAD_DIAG.match(c)]
    cols = [c for c in cols if sel.get_column(c).drop_nulls().len() > 0]
    if not cols:
        return pl.DataFrame()
    index = ["run_id", "task", "size", "model", "seed"]
    long = sel.select(*index, *cols).unpivot(index=index, variable_name="column", value_name="value")
    long = long.filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan()).with_columns(
        pl.col("column").str.extract(r"^diag\.l(\d+)\.", 1).cast(pl.Int64).alias("layer"),
        pl.col("column").str.extract(r"\.([a-z_0-9]+)$", 1).alias("quantity"),
        pl.col("column").str.contains(r"^diag\.l\d+\.h\d+\.").alias("per_head"),
    )
    per_layer = long.filter(~pl.col("per_head"))
    have = per_layer.select("quantity").unique()
    heads = (
        long.filter(pl.col("per_head"))
        .join(have, on="quantity", how="anti")
        .group_by(*index, "layer", "quantity")
        .agg(pl.col("value").mean())
    )
    return pl.concat(
        [
            per_layer.select(*index, "layer", "quantity", "value"),
            heads.select(*index, "layer", "quantity", "value"),
        ]
    )


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None when fewer than three points or a constant series."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)
