"""Figures of training curves, compute, importance-state diagnostics, throughput and Optuna studies."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import polars as pl

from reports import analysis
from reports.plotting import (
    MAX_WIDTH_IN,
    SEEDS_CAPTION,
    FigureResult,
    Studies,
    bounded_ylim,
    chance_band,
    chance_caption,
    data_ticks,
    finish,
    legend_below,
    means_with_seeds,
    palette,
    panels,
    skip,
    task_chance,
)
from reports.tables import Prepared, size_order

# Diagnostics are fractions or positive quantities: their intervals are cut there.
DIAG_BOUNDS = {"consolidated": (0.0, 1.0), "lr_eff": (0.0, float("inf")), "horizon": (0.0, float("inf"))}
DIAG_SEEDS = (
    "Markers: mean over all seeds at the best lr with its 95% Student t interval (no bar with one seed; cut "
    "at the quantity's range); "
    "dots: every seed."
)


def _curve_band(prep: Prepared, task: str) -> tuple[float, float] | None:
    """The chance band of a curve, when the curve is the report metric itself."""
    return task_chance(prep, task) if analysis.curve_key(prep) == prep.metric else None


def learning_curves(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "learning_curves", "Overlaid learning curves"
    pts = analysis.curve_points(prep)
    if pts.height == 0:
        why = (
            "no curves table" if prep.curves.height == 0 else f"no {prep.metric} curve for the selected runs"
        )
        return skip(name, title, why)
    key = analysis.curve_key(prep)
    groups = analysis.sorted_by_size(prep, pts.select("task", "size").unique()).rows()
    n_tasks = len({t for t, _ in groups})
    colors = palette(prep)
    fig, axes = panels(len(groups), height=3.0)
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = pts.filter((pl.col("task") == task) & (pl.col("size") == size))
        chance_band(ax, _curve_band(prep, task), prep.higher_is_better)
        for (model,), m in d.group_by("model", maintain_order=True):
            for (_,), run in m.group_by("run_id", maintain_order=True):
                r = run.sort("step")
                ax.plot(r["step"], r["value"], color=colors.get(model), lw=0.8, alpha=0.35)
            mean = m.group_by("step").agg(pl.col("value").mean()).sort("step")
            ax.plot(mean["step"], mean["value"], color=colors.get(model), lw=2.0, label=model)
        ax.set(xlabel="step", ylabel=key, title=size + (f", {task}" if n_tasks > 1 else ""))
        bounded_ylim(ax, prep.bounds if key == prep.metric else None)
    legend_below(fig, axes)
    caption = (
        f"Validation {key} during training, one panel per size: thin lines are the seeds at each model's "
        f"best lr, the thick line their mean. {pts.get_column('run_id').n_unique()} runs, {pts.height} "
        "evaluations. " + (chance_caption(prep) if key == prep.metric else "")
    )
    return finish(name, title, fig, caption, pts.height)


def compute_curves(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "compute_curves", "Learning curves against wall clock and FLOPs"
    pts = analysis.curve_points(prep)
    axes_x = [x for x in ("wall", "flops_at") if x in pts.columns and pts.get_column(x).drop_nulls().len()]
    if pts.height == 0 or not axes_x:
        return skip(name, title, "no curves with wall time or FLOPs for the selected runs")
    sizes = [s for s in size_order(prep) if s in set(pts.get_column("size").to_list())]
    colors = palette(prep)
    width = min(MAX_WIDTH_IN, 2.7 * len(sizes) + 0.6)
    fig, axes = plt.subplots(len(axes_x), len(sizes), figsize=(width, 2.7 * len(axes_x)), squeeze=False)
    labels = {"wall": "training time (s)", "flops_at": "training FLOPs (estimate)"}
    key = analysis.curve_key(prep)
    for r, x in enumerate(axes_x):
        for c, size in enumerate(sizes):
            ax = axes[r][c]
            d = pts.filter(pl.col("size") == size)
            tasks = d.get_column("task").unique().to_list()
            chance_band(ax, _curve_band(prep, tasks[0]) if len(tasks) == 1 else None, prep.higher_is_better)
            for _, run in d.sort("run_id", "step").group_by("run_id", maintain_order=True):
                model = run.get_column("model")[0]
                ax.plot(run[x], run["value"], color=colors.get(model), lw=1.0, alpha=0.8, label=model)
            budget = analysis.values_at_budget(d, x)
            if budget.height:
                ax.axvline(budget.get_column("budget")[0], color="0.3", ls=":", lw=1.1, label="equal budget")
            ax.set(xlabel=labels[x], ylabel=key if c == 0 else None, title=size)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    legend_below(fig, list(axes.flat))
    caption = (
        "The validation curves of every seed at the best lr against measured training time (top: "
        "optimizer-step seconds, without start-up and evaluation) and estimated training FLOPs (bottom: 6 * "
        "params * tokens plus 3x the mixer's per-token state work). The dotted vertical line is the equal "
        "budget of the figure below: the smallest final spend among the runs of that size. "
        + (chance_caption(prep) if key == prep.metric else "")
    )
    return finish(name, title, fig, caption, pts.height)


def compute_matched(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "compute_matched", "Quality at equal training time and equal FLOPs"
    pts = analysis.curve_points(prep)
    parts = []
    for x, label in (("wall", "equal training time"), ("flops_at", "equal FLOPs")):
        v = analysis.values_at_budget(pts, x)
        if v.height:
            parts.append(
                v.select("task", "size", "model", "seed", "value").with_columns(pl.lit(label).alias("budget"))
            )
    if not parts:
        return skip(name, title, "no curves with wall time or FLOPs for the selected runs")
    data = pl.concat(parts)
    sizes = [s for s in size_order(prep) if s in set(data.get_column("size").to_list())]
    xpos = {s: i for i, s in enumerate(sizes)}
    colors = palette(prep)
    budgets = data.get_column("budget").unique().sort(descending=True).to_list()
    tasks = data.get_column("task").unique().sort().to_list()
    groups = [(t, b) for t in tasks for b in budgets]
    fig, axes = panels(
        len(groups),
        ncols=len(budgets),
        width=min(MAX_WIDTH_IN, (1.4 * len(sizes) + 1.6) * len(budgets)),
        height=3.2,
    )
    n_models = data.get_column("model").n_unique()
    key = analysis.curve_key(prep)
    for ax, (task, b) in zip(axes, groups, strict=True):
        d = data.filter((pl.col("budget") == b) & (pl.col("task") == task))
        band = _curve_band(prep, task)
        chance_band(ax, band, prep.higher_is_better)
        hollow = set()
        if band is not None:  # open markers: not every seed had learned by the budget
            ok = pl.col("value") > band[1] if prep.higher_is_better else pl.col("value") < band[1]
            per = d.group_by("model", "size").agg(ok.all().alias("ok")).filter(~pl.col("ok"))
            hollow = {(m, s) for m, s in per.select("model", "size").iter_rows()}
        means_with_seeds(
            ax, d, "size", "value", "model", colors, prep.bounds if key == prep.metric else None,
            hollow=hollow, dodge=0.7 / max(n_models, 1), connect=False, xpos=xpos,
        )  # fmt: skip
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set(xlabel="size", ylabel=f"{key} at budget", title=b + (f", {task}" if len(tasks) > 1 else ""))
        ax.set_xlim(-0.6, len(sizes) - 0.4)
        bounded_ylim(ax, prep.bounds if key == prep.metric else None)
    legend_below(fig, axes)
    seeds = SEEDS_CAPTION.replace("not every seed learned.", "not every seed had learned by the budget.")
    caption = (
        f"{key} each model had reached when all runs of a size had spent the same wall-clock training time "
        "(measured optimizer-step seconds) or the same estimated training FLOPs: the last evaluation at or "
        "before the budget, which is the smallest final spend of that size's runs. A slower mixer is judged "
        "at fewer steps; a model without a marker had not reached its first evaluation within the budget. "
        f"{seeds} " + (chance_caption(prep) if key == prep.metric else "")
    )
    return finish(name, title, fig, caption, data.height)


def diagnostics_vs_scale(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "diagnostics_vs_scale", "Importance-state diagnostics against scale"
    cols = [
        c
        for c in analysis.DIAG_SUMMARY
        if c in prep.selected.columns and prep.selected.get_column(c).drop_nulls().len() > 0
    ]
    if not cols:
        return skip(
            name, title, "no run logged importance-state diagnostics (diag.consolidated/lr_eff/horizon)"
        )
    if "num_params" not in prep.selected.columns:
        return skip(name, title, "no run has num_params")
    colors = palette(prep)
    fig, axes = panels(len(cols), height=3.0)
    n = 0
    per_config = prep.selected.group_by("config_key").agg(pl.col("num_params").mean().alias("x"))
    for ax, col in zip(axes, cols, strict=True):
        d = prep.selected.filter(pl.col(col).is_not_null()).join(per_config, on="config_key")
        n += means_with_seeds(ax, d, "x", col, "model", colors, DIAG_BOUNDS.get(col.rsplit(".", 1)[-1]))
        ax.set_xscale("log")
        data_ticks(ax, d.get_column("x").to_list())
        ax.set(xlabel="parameters", ylabel=analysis.DIAG_SUMMARY[col])
        if col != "diag.consolidated":
            ax.set_yscale("log")
    legend_below(fig, axes)
    caption = (
        "Model-wide importance-state diagnostics at the end of training, against parameter count, measured "
        "on a fixed probe of validation sequences: the fraction of synapses consolidated (I/Ip above the "
        "consolidation threshold), the effective learning rate 1/I, and the memory horizon 1/(1 - alpha) in "
        f"tokens (also defined for gated mixers without an importance state). {DIAG_SEEDS}"
    )
    return finish(name, title, fig, caption, n)


def diagnostics_vs_depth(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "diagnostics_vs_depth", "Importance-state diagnostics against depth"
    long = analysis.layer_diagnostics(prep)
    if long.height == 0:
        return skip(name, title, "no per-layer diagnostics (diag.l<layer>.<quantity>) in the runs table")
    quantities = [
        q for q in ("consolidated", "lr_eff", "horizon") if q in set(long.get_column("quantity").to_list())
    ]
    if not quantities:
        return skip(name, title, "per-layer diagnostics lack consolidated, lr_eff and horizon")
    long = long.filter(pl.col("quantity").is_in(quantities))
    if long.get_column("layer").n_unique() < 2:
        return skip(name, title, "every run has a single layer; depth needs two or more")
    long = analysis.sorted_by_size(prep, long).with_columns(
        pl.concat_str(pl.col("model"), pl.lit(", "), pl.col("size")).alias("group")
    )
    order = list(dict.fromkeys(long.get_column("group").to_list()))
    colors = dict(zip(order, plt.get_cmap("tab20").colors, strict=False))
    fig, axes = panels(len(quantities), height=3.0)
    labels = {
        "consolidated": "fraction consolidated",
        "lr_eff": "effective learning rate 1/I",
        "horizon": "memory horizon (tokens)",
    }
    for ax, q in zip(axes, quantities, strict=True):
        d = long.filter(pl.col("quantity") == q)
        xpos = {v: v for v in d["layer"].unique()}
        means_with_seeds(ax, d, "layer", "value", "group", colors, DIAG_BOUNDS[q], dodge=0.04, xpos=xpos)
        ax.set(xlabel="layer", ylabel=labels[q])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if q != "consolidated":
            ax.set_yscale("log")
    legend_below(fig, axes)
    caption = (
        "Per-layer importance-state diagnostics (averaged over heads), one line per model and size: where "
        "in depth synapses consolidate, how the effective learning rate 1/I and the memory horizon change "
        f"from the first to the last layer. {DIAG_SEEDS}"
    )
    return finish(name, title, fig, caption, long.height)


def kernels_by_model(sel: pl.DataFrame) -> str:
    """``model: backend, ...`` over every layer of every run (``backends.<layer>`` columns), or ``""``."""
    cols = [c for c in sel.columns if c.startswith("backends.")]
    if not cols or "model" not in sel.columns:
        return ""
    parts = []
    for model in sorted(sel.get_column("model").unique().to_list()):
        rows = sel.filter(pl.col("model") == model)
        used = sorted({str(v) for c in cols for v in rows.get_column(c).drop_nulls().to_list()})
        if used:
            parts.append(f"{model}: {', '.join(used)}")
    return "; ".join(parts)


def throughput_ratio(prep: Prepared) -> pl.DataFrame:
    """Mean tokens/s of each model over Gated DeltaNet's at the same task and size."""
    if "tokens_per_second" not in prep.selected.columns:
        return pl.DataFrame()
    tps = analysis.model_means(prep, "tokens_per_second")
    ref_label = analysis.main_label(prep, "gated_deltanet")
    if ref_label is None or tps.height == 0:
        return pl.DataFrame()
    ref = tps.filter(pl.col("model") == ref_label).select("task", "size", pl.col("mean").alias("ref"))
    return (
        tps.filter(pl.col("model") != ref_label)
        .join(ref, on=["task", "size"])
        .with_columns((pl.col("mean") / pl.col("ref")).alias("ratio"))
    )


def throughput_memory(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "throughput_memory", "Measured training throughput and memory against scale"
    sel = prep.selected
    cols = [
        c
        for c in ("tokens_per_second", "peak_memory_mib")
        if c in sel.columns
        and sel.get_column(c).drop_nulls().filter(sel.get_column(c).drop_nulls() > 0).len() > 0
    ]
    if not cols or "num_params" not in sel.columns:
        return skip(name, title, "no run has tokens_per_second or peak_memory_mib with num_params")
    ratio = throughput_ratio(prep)
    colors = palette(prep)
    fig, axes = panels(len(cols) + (1 if ratio.height else 0), height=3.0)
    labels = {"tokens_per_second": "training tokens / s", "peak_memory_mib": "peak memory (MiB)"}
    per_config = sel.group_by("config_key").agg(pl.col("num_params").mean().alias("x"))
    for ax, col in zip(axes, cols, strict=False):
        d = sel.filter(pl.col(col).is_not_null() & (pl.col(col) > 0)).join(per_config, on="config_key")
        means_with_seeds(ax, d, "x", col, "model", colors, bounds=(0.0, float("inf")))
        ax.set(xscale="log", yscale="log")
        data_ticks(ax, d.get_column("x").to_list())
        ax.set(xlabel="parameters", ylabel=labels[col])
    if ratio.height:
        ax = axes[-1]
        d = analysis.sorted_by_size(prep, ratio)
        sizes = list(dict.fromkeys(d.get_column("size").to_list()))
        models = sorted(d.get_column("model").unique().to_list())
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            m = d.filter(pl.col("model") == model)
            xs = [
                sizes.index(s) + (i - (len(models) - 1) / 2) * width for s in m.get_column("size").to_list()
            ]
            ax.bar(xs, m.get_column("ratio").to_list(), width=width, color=colors.get(model), label=model)
        ax.axhline(1.0, color="0.2", lw=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set(ylabel="throughput / Gated DeltaNet's", xlabel="size")
    legend_below(fig, axes)
    kinds = sel.get_column("peak_memory_kind").unique().to_list() if "peak_memory_kind" in sel.columns else []
    devices = sel.get_column("device").unique().to_list() if "device" in sel.columns else []
    caption = (
        "Measured training throughput (tokens per second of optimizer steps) and peak memory against "
        "parameter count"
        + (
            ", and each model's mean throughput relative to Gated DeltaNet's at the same size"
            if ratio.height
            else ""
        )
        + ". Measured on "
        + (", ".join(str(d) for d in devices if d) or "the training device")
        + (f"; memory is {', '.join(str(k) for k in kinds if k)}" if kinds else "")
        + f". {DIAG_SEEDS}"
    )
    kernels = kernels_by_model(sel)
    if kernels:  # a Triton kernel against a torch fallback is a comparison of implementations too
        caption += f" Recurrence implementations: {kernels}."
    return finish(name, title, fig, caption, sel.height)


def optuna_history(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "optuna_history", "Optuna optimization history"
    if not tuning:
        return skip(name, title, "no tuning study given (--tuning)")
    studies = [t for t in tuning if t.complete.height]
    if not studies:
        return skip(name, title, f"no completed trials in {', '.join(t.study_name for t in tuning)}")
    fig, axes = panels(len(studies), width=min(MAX_WIDTH_IN, 4.4 * len(studies)), height=3.0)
    lines, n = [], 0
    for ax, t in zip(axes, studies, strict=True):
        done = t.complete
        best = done.get_column("value").cum_max() if t.maximize else done.get_column("value").cum_min()
        ax.scatter(
            done.get_column("number").to_list(), done.get_column("value").to_list(), s=20, label="trial"
        )
        ax.step(
            done.get_column("number").to_list(), best.to_list(), where="post", color="C3", label="best so far"
        )
        ax.set(xlabel="trial", ylabel="objective", title=t.study_name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        pruned = t.trials.filter(pl.col("state") == "PRUNED").height
        other = t.trials.height - done.height - pruned
        lines.append(
            f"{t.study_name} ({'maximized' if t.maximize else 'minimized'}): {done.height} completed, "
            f"{pruned} pruned, {other} failed or unfinished trials"
        )
        n += done.height
    legend_below(fig, axes)
    caption = (
        "Objective of every completed trial and the best value so far, per study. " + "; ".join(lines) + "."
    )
    return finish(name, title, fig, caption, n)


def optuna_importance(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "optuna_importance", "Optuna parameter importances"
    if not tuning:
        return skip(name, title, "no tuning study given (--tuning)")
    studies = [t for t in tuning if t.importances]
    if not studies:
        return skip(name, title, "; ".join(f"{t.study_name}: {t.importance_note}" for t in tuning))
    rows = max(len(t.importances) for t in studies)
    fig, axes = panels(len(studies), width=min(MAX_WIDTH_IN, 4.6 * len(studies)), height=0.45 * rows + 1.6)
    for ax, t in zip(axes, studies, strict=True):
        items = sorted(t.importances.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="C0")
        ax.set(xlabel="importance (share of objective variance)", title=t.study_name)
    fig.tight_layout()
    notes = "; ".join(f"{t.study_name}: {t.importance_note}" for t in studies)
    caption = f"Hyperparameter importances (fANOVA, summing to 1 per study) of the tuned parameters. {notes}."
    return finish(name, title, fig, caption, sum(len(t.importances) for t in studies))
