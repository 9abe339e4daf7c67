"""One function per figure: each returns a :class:`FigureResult` with a PNG and a caption, or the
reason it was skipped (a figure whose axis the data lacks is never drawn empty).

All figures read the best-lr selection of :mod:`reports.tables` (every seed at the chosen lr),
except the learning-rate sweep, which shows every run so the choice can be checked by eye. This
module holds the quality figures and the registry; cost and curve figures are in
:mod:`reports.figures_cost`, the scale analysis in :mod:`reports.figures_scale`.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import polars as pl
import seaborn as sns

from reports import analysis, figures_cost, figures_scale
from reports.plotting import (
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
    not_learned_points,
    palette,
    panels,
    skip,
    span,
    task_chance,
)
from reports.tables import KIND_NAMES, Prepared, size_order

__all__ = ["FIGURES", "FigureResult", "render_all"]


def _config_x(prep: Prepared, column: str) -> pl.DataFrame:
    """Selected runs with ``x``: their config's mean ``column`` (all seeds of a config share one x)."""
    sel = prep.selected.filter(pl.col(column).is_not_null())
    per_config = sel.group_by("config_key").agg(pl.col(column).mean().alias("x"))
    return sel.join(per_config, on="config_key")


def quality_vs_scale(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "quality_vs_scale", "Quality against scale per mixer"
    if "num_params" not in prep.selected.columns:
        return skip(name, title, "no run has num_params")
    sel = _config_x(prep, "num_params")
    if sel.height == 0:
        return skip(name, title, "no run has num_params")
    if sel.get_column("size").n_unique() < 2:
        return skip(
            name, title, f"one model size only ({sel.get_column('size')[0]}); scale needs two or more"
        )
    tasks = sorted(sel.get_column("task").unique().to_list())
    colors = palette(prep)
    fig, axes = panels(len(tasks), width=6.4 if len(tasks) == 1 else None, height=3.6)
    n_points = 0
    for ax, task in zip(axes, tasks, strict=True):
        d = sel.filter(pl.col("task") == task)
        chance_band(ax, task_chance(prep, task), prep.higher_is_better)
        n_points += means_with_seeds(
            ax, d, "x", "quality", "model", colors, prep.bounds, hollow=not_learned_points(d, "x")
        )
        ax.set_xscale("log")
        data_ticks(ax, d.get_column("x").to_list())
        ax.set(xlabel="parameters", ylabel=prep.metric, title=task if len(tasks) > 1 else None)
        bounded_ylim(ax, prep.bounds)
    legend_below(fig, axes)
    n = sel.group_by("config_key").agg(pl.col("seed").n_unique()).get_column("seed").to_list()
    sizes = size_order(prep)
    caption = (
        f"{prep.metric} against parameter count for each mixer, {sel.get_column('model').n_unique()} models "
        f"at {len(sizes)} sizes ({', '.join(sizes)}), {span(n)} seed{'s' if max(n) > 1 else ''} per point. "
        f"{SEEDS_CAPTION} {chance_caption(prep)}"
    )
    return finish(name, title, fig, caption, n_points)


def quality_vs_state(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "quality_vs_state", "Quality against state size and parameters"
    cols = [c for c in ("state_elements", "num_params") if c in prep.selected.columns]
    sel = _config_x(prep, "state_elements") if "state_elements" in cols else pl.DataFrame()
    if sel.height == 0 or sel.get_column("model").n_unique() < 2:
        return skip(name, title, "fewer than two models with a known state size")
    has_params = "num_params" in cols and prep.selected.get_column("num_params").drop_nulls().len() > 0
    tasks = sorted(sel.get_column("task").unique().to_list())
    colors = palette(prep)
    xs = [("state_elements", "recurrent state (floats per sequence)", "state-matched")]
    if has_params:
        xs.append(("num_params", "parameters", "parameter-matched"))
    fig, axes = panels(len(xs) * len(tasks), ncols=len(xs), width=4.6 * len(xs), height=3.4)
    n_points = 0
    for t, task in enumerate(tasks):
        for i, (col, xlabel, what) in enumerate(xs):
            ax = axes[t * len(xs) + i]
            d = _config_x(prep, col).filter(pl.col("task") == task)
            chance_band(ax, task_chance(prep, task), prep.higher_is_better)
            n_points += means_with_seeds(
                ax, d, "x", "quality", "model", colors, prep.bounds, hollow=not_learned_points(d, "x")
            )
            ax.set_xscale("log")
            data_ticks(ax, d.get_column("x").to_list())
            ax.set(
                xlabel=xlabel,
                ylabel=prep.metric,
                title=what + (f", {task}" if len(tasks) > 1 else ""),
            )
            bounded_ylim(ax, prep.bounds)
    legend_below(fig, axes)
    caption = (
        f"{prep.metric} against the recurrent state a model carries (left: H*K*V per layer, summed over "
        "layers; doubled by the importance state of metaplastic models; plus K*K for Mesa; the full-length "
        "KV cache for softmax attention)"
        + (" and against its parameter count (right)" if has_params else "")
        + ". Models at the same x are state-matched"
        + (" (left) or parameter-matched (right)" if has_params else "")
        + f"; lines join the sizes of one model. {SEEDS_CAPTION} {chance_caption(prep)}"
        + ("" if has_params else " The parameter panel is omitted: no run has num_params.")
    )
    return finish(name, title, fig, caption, n_points)


def ablation_deltas(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "ablation_deltas", "Metaplasticity on/off and paper/official gate deltas"
    parts, any_pair = [], False
    for column, a, b, label in (
        ("model.mixer.metaplastic", True, False, "meta on - off"),
        ("model.mixer.gates", "paper", "official", "paper - official gates"),
    ):
        d = analysis.paired_delta(prep, column, a, b)
        if d.height == 0:
            continue
        any_pair = True
        d = d.filter(
            pl.col("status").is_in(list(analysis.COMPARABLE))
            & pl.col("status_b").is_in(list(analysis.COMPARABLE))
        )
        if d.height:
            kind = pl.col("model.mixer.kind").replace_strict(KIND_NAMES, default=pl.col("model.mixer.kind"))
            parts.append(
                d.with_columns(pl.concat_str(kind, pl.lit(f": {label}")).alias("comparison")).select(
                    "task", "size", "size_rank", "comparison", "delta", "lo_delta", "hi_delta", "n", "n_b"
                )
            )
    if not any_pair:
        return skip(name, title, "no config has a twin that differs only in metaplasticity or in the gates")
    if not parts:
        return skip(name, title, "no twin pair in which both configs learned in every seed (Methods)")
    deltas = pl.concat(parts).sort("task", "size_rank")
    tasks = deltas.get_column("task").unique().sort().to_list()
    fig, axes = panels(len(tasks), width=min(10.0, 1.3 * deltas.get_column("size").n_unique() + 3))
    for ax, task in zip(axes, tasks, strict=True):
        d = deltas.filter(pl.col("task") == task)
        sizes = [s for s in size_order(prep) if s in set(d.get_column("size").to_list())]
        comps = d.get_column("comparison").unique().sort().to_list()
        width = 0.8 / len(comps)
        colors = sns.color_palette("Set2", len(comps))
        for i, comp in enumerate(comps):
            c = d.filter(pl.col("comparison") == comp)
            xs = [sizes.index(s) + (i - (len(comps) - 1) / 2) * width for s in c.get_column("size").to_list()]
            deltas_ = c.get_column("delta").to_list()
            lo = [
                dl - (v if v is not None else dl)
                for dl, v in zip(deltas_, c.get_column("lo_delta"), strict=True)
            ]
            hi = [
                (v if v is not None else dl) - dl
                for dl, v in zip(deltas_, c.get_column("hi_delta"), strict=True)
            ]
            ax.bar(xs, deltas_, width=width, yerr=[lo, hi], capsize=3, label=comp, color=colors[i])
        ax.axhline(0, color="0.2", lw=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set(
            ylabel=f"difference in {prep.metric}\n(>0: first better)", title=task if len(tasks) > 1 else None
        )
    legend_below(fig, axes)
    caption = (
        f"Difference of mean {prep.metric} between twin configs that differ in one setting only, per size: "
        "metaplasticity on minus off (off is beta = 0, the Mamba2 limit of the same gates) and paper minus "
        "official gate parameterization. Each side uses its own best lr and all its seeds; whiskers: Welch "
        "95% interval of the difference (none with a single seed). Only pairs in which both configs learned "
        f"in every seed are drawn: {deltas.height} pairs."
    )
    return finish(name, title, fig, caption, deltas.height)


def prior_continuum(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "prior_continuum", "The prior continuum: from Palimpsa to the Mamba2 limit"
    col = "model.mixer.ip"
    if col not in prep.selected.columns:
        return skip(name, title, "the runs table has no model.mixer.ip column")
    data = analysis.ip_families(prep)
    if data.height == 0:
        return skip(
            name, title, "no size has metaplastic runs at two or more prior precisions Ip (no Ip sweep)"
        )
    groups = analysis.sorted_by_size(prep, data.select("task", "size").unique()).rows()
    fig, axes = panels(len(groups), height=3.2)
    limits = analysis.model_means(prep)
    drawn: set[str] = set()
    families = sorted(data.get_column("family").unique().to_list())
    colors = dict(zip(families, sns.color_palette("tab10", len(families)), strict=False))
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = data.filter((pl.col("task") == task) & (pl.col("size") == size))
        chance_band(ax, task_chance(prep, task), prep.higher_is_better)
        means_with_seeds(
            ax, d, col, "quality", "family", colors, prep.bounds, hollow=not_learned_points(d, col, "family")
        )
        ref = limits.filter((pl.col("task") == task) & (pl.col("size") == size))
        for kind_filter, style, label in (
            (pl.col("model.mixer.kind") == "mamba2", "-.", "Mamba2 (Ip -> inf)"),
            (pl.col("model").str.contains("meta off"), ":", "metaplasticity off"),
        ):
            for row in ref.filter(kind_filter).iter_rows(named=True):
                ax.axhline(row["mean"], ls=style, color="0.25", lw=1.1, label=label)
                drawn.add(label)
        ax.set(
            xscale="log",
            xlabel="prior precision Ip",
            ylabel=prep.metric,
            title=f"{size}" + (f", {task}" if len({t for t, _ in groups}) > 1 else ""),
        )
        ips = sorted(set(d.get_column(col).to_list()))
        ax.set_xticks(ips, [f"{v:g}" for v in ips])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        bounded_ylim(ax, prep.bounds)
    legend_below(fig, axes)
    refs = []
    if "Mamba2 (Ip -> inf)" in drawn:
        refs.append("the dash-dotted line is Mamba2's mean, the limit the layer approaches as Ip grows")
    if "metaplasticity off" in drawn:
        refs.append("the dotted line is the same mixer's mean with metaplasticity off")
    caption = (
        f"{prep.metric} against the prior precision Ip of metaplastic mixers, each Ip at its own best lr. As "
        "Ip grows, the importance state I = Ip + Ibar is dominated by the prior and the layer approaches "
        "the Mamba2 limit"
        + (
            f"; {'; '.join(refs)}"
            if refs
            else " (no Mamba2 or metaplasticity-off run at these sizes to draw it)"
        )
        + f". {SEEDS_CAPTION} {chance_caption(prep)}"
    )
    return finish(name, title, fig, caption, data.height)


def lr_sweep(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "lr_sweep", "Learning-rate sweep and the chosen learning rate"
    swept = prep.lr_choice.filter(pl.col("lrs_tried").list.len() >= 2)
    if swept.height == 0:
        return skip(name, title, "every model was run at a single learning rate")
    runs = prep.runs.join(swept.select("config_key"), on="config_key")
    groups = analysis.sorted_by_size(prep, runs.select("task", "size").unique()).rows()
    colors = palette(prep)
    fig, axes = panels(len(groups), height=3.2)
    n_tasks = len({t for t, _ in groups})
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = runs.filter((pl.col("task") == task) & (pl.col("size") == size))
        chance_band(ax, task_chance(prep, task), prep.higher_is_better)
        means_with_seeds(
            ax,
            d,
            "train.lr",
            "quality",
            "model",
            colors,
            prep.bounds,
            hollow=not_learned_points(d, "train.lr"),
        )
        chosen = swept.filter((pl.col("task") == task) & (pl.col("size") == size))
        for row in chosen.iter_rows(named=True):
            ax.scatter(
                [row["train.lr"]], [row["lr_mean"]], marker="*", s=170, color=colors.get(row["model"]),
                edgecolor="black", zorder=6,
            )  # fmt: skip
        ax.set_xscale("log")
        data_ticks(ax, d.get_column("train.lr").to_list())
        ax.set(
            xlabel="learning rate",
            ylabel=prep.metric,
            title=size + (f", {task}" if n_tasks > 1 else ""),
        )
        bounded_ylim(ax, prep.bounds)
    legend_below(fig, axes)
    caption = (
        f"{prep.metric} of every run against its learning rate. The star marks each model's chosen learning "
        "rate: the one with the best mean over its seeds; all seeds at that lr enter the other figures. "
        f"{swept.height} models swept over {span(swept.get_column('lrs_tried').list.len().to_list())} "
        f"learning rates. {SEEDS_CAPTION} {chance_caption(prep)}"
    )
    return finish(name, title, fig, caption, runs.height)


FIGURES: list[Callable[[Prepared, Studies], FigureResult]] = [
    quality_vs_scale,
    quality_vs_state,
    figures_scale.matched_comparison,
    figures_scale.gap_factors,
    figures_scale.recall_by_distance,
    figures_scale.capacity,
    ablation_deltas,
    prior_continuum,
    figures_cost.learning_curves,
    figures_cost.compute_curves,
    figures_cost.compute_matched,
    figures_cost.diagnostics_vs_scale,
    figures_cost.diagnostics_vs_depth,
    figures_cost.throughput_memory,
    lr_sweep,
    figures_cost.optuna_history,
    figures_cost.optuna_importance,
]


def render_all(prep: Prepared, tuning: Studies = None) -> list[FigureResult]:
    """Every figure, in report order; a figure whose data is missing comes back skipped with the reason."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    out = []
    for fn in FIGURES:
        res = fn(prep, tuning)
        if res.png is not None and res.n_points == 0:
            res = skip(res.name, res.title, "the selection left no data points")
        out.append(res)
    matplotlib.pyplot.close("all")
    return out
