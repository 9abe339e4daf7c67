"""One function per figure: each returns a :class:`FigureResult` with a PNG and a caption, or the
reason it was skipped (a figure whose axis the data lacks is never drawn empty).

All figures read the best-lr selection of :mod:`reports.tables` (every seed at the chosen lr),
except the learning-rate sweep, which shows every run so the choice can be checked by eye.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import seaborn as sns  # noqa: E402

from reports import analysis  # noqa: E402
from reports.tables import KIND_NAMES, Prepared, size_order  # noqa: E402
from reports.tuning import TuningData  # noqa: E402

DPI = 110
Studies = list[TuningData] | None


@dataclass
class FigureResult:
    name: str
    title: str
    caption: str = ""
    png: bytes | None = None
    skipped: str | None = None  # why there is no figure
    n_points: int = 0  # plotted data points (runs, curve points or trials)
    path: Path | None = None

    @property
    def has_data(self) -> bool:
        return self.png is not None and self.n_points > 0

    def save(self, directory: Path) -> None:
        """``<name>.png`` and ``<name>.rst`` (the caption, as ``snakemake --report`` reads it)."""
        if self.png is None:
            return
        self.path = directory / f"{self.name}.png"
        self.path.write_bytes(self.png)
        (directory / f"{self.name}.rst").write_text(f"**{self.title}.** {self.caption}\n")


def _skip(name: str, title: str, reason: str) -> FigureResult:
    return FigureResult(name=name, title=title, skipped=reason)


def _short_number(value: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _tidy_log_axes(fig: plt.Figure) -> None:
    """Log axes over a narrow range get a few readable ticks instead of overlapping minor labels."""
    ticker = matplotlib.ticker
    for ax in fig.axes:
        for axis, scale, (lo, hi) in (
            (ax.xaxis, ax.get_xscale(), ax.get_xlim()),
            (ax.yaxis, ax.get_yscale(), ax.get_ylim()),
        ):
            if scale != "log" or isinstance(axis.get_major_locator(), ticker.FixedLocator) or lo <= 0:
                continue
            axis.set_minor_formatter(ticker.NullFormatter())
            axis.set_major_formatter(ticker.FuncFormatter(_short_number))
            if hi / lo < 30:
                ratio = (hi / lo) ** (1 / 5)
                ticks = [float(f"{lo * ratio**k:.2g}") for k in range(1, 5)]
                axis.set_major_locator(ticker.FixedLocator(ticks))


def _done(name: str, title: str, fig: plt.Figure, caption: str, n_points: int) -> FigureResult:
    _tidy_log_axes(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return FigureResult(name=name, title=title, caption=caption, png=buf.getvalue(), n_points=n_points)


def _palette(prep: Prepared) -> dict[str, tuple]:
    models = sorted(prep.runs.get_column("model").unique().to_list())
    return dict(zip(models, sns.color_palette("tab10", n_colors=max(len(models), 1)), strict=False))


def _panels(n: int, width: float = 4.6, height: float = 3.6, ncols: int | None = None):
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _legend_outside(fig: plt.Figure, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and not lab.startswith("_"):
                handles[lab] = h
                labels.append(lab)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _means_plot(ax, prep: Prepared, means: pl.DataFrame, x: str, palette, ylabel: str) -> None:
    """Mean over seeds with a +-1 sd bar, one connected line per model."""
    for model, group in means.sort(x).group_by("model", maintain_order=True):
        g = group.sort(x)
        name = model[0]
        ax.errorbar(
            g.get_column(x).to_list(),
            g.get_column("mean").to_list(),
            yerr=g.get_column("std").fill_null(0).to_list(),
            marker="o",
            capsize=3,
            label=name,
            color=palette.get(name),
        )
    ax.set_ylabel(ylabel)


# --------------------------------------------------------------------------- quality


def quality_vs_scale(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "quality_vs_scale", "Quality against scale per mixer"
    sel = (
        prep.selected.filter(pl.col("num_params").is_not_null())
        if "num_params" in prep.selected.columns
        else None
    )
    if sel is None or sel.height == 0:
        return _skip(name, title, "no run has num_params")
    if sel.get_column("size").n_unique() < 2:
        return _skip(
            name, title, f"one model size only ({sel.get_column('size')[0]}); scale needs two or more"
        )
    tasks = sorted(sel.get_column("task").unique().to_list())
    palette = _palette(prep)
    fig, axes = _panels(len(tasks), width=5.2)
    for ax, task in zip(axes, tasks, strict=True):
        data = sel.filter(pl.col("task") == task).to_pandas()
        sns.lineplot(
            data, x="num_params", y="quality", hue="model", palette=palette, errorbar="sd", marker="o", ax=ax
        )
        sns.scatterplot(
            data,
            x="num_params",
            y="quality",
            hue="model",
            palette=palette,
            alpha=0.45,
            s=22,
            legend=False,
            ax=ax,
        )
        ax.set_xscale("log")
        ax.set(xlabel="parameters", ylabel=prep.metric, title=task if len(tasks) > 1 else None)
    _legend_outside(fig, axes)
    n = sel.group_by("config_key").agg(pl.col("seed").n_unique()).get_column("seed").to_list()
    sizes = size_order(prep)
    caption = (
        f"{prep.metric} against parameter count for each mixer. Line: mean over all seeds at the model's "
        "best "
        "learning rate (chosen by that mean); band: +-1 standard deviation; points: every seed, none "
        "dropped. "
        f"{sel.get_column('model').n_unique()} models at {len(sizes)} sizes ({'; '.join(sizes)}), "
        f"{_span(n)} seeds per point."
    )
    return _done(name, title, fig, caption, sel.height)


def quality_vs_state(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "quality_vs_state", "Quality against state size and parameters"
    means = analysis.model_means(prep)
    states = analysis.model_means(prep, "state_elements").select(
        "config_key", pl.col("mean").alias("state_elements")
    )
    means = means.join(states, on="config_key", how="left").filter(pl.col("state_elements").is_not_null())
    if means.get_column("model").n_unique() < 2:
        return _skip(name, title, "fewer than two models with a known state size")
    palette = _palette(prep)
    fig, axes = _panels(2, width=5.0)
    _means_plot(axes[0], prep, means, "state_elements", palette, prep.metric)
    axes[0].set(
        xscale="log", xlabel="recurrent state (floats per sequence, all layers)", title="state-matched"
    )
    has_params = means.get_column("num_params").drop_nulls().len() > 0
    if has_params:
        _means_plot(
            axes[1],
            prep,
            means.filter(pl.col("num_params").is_not_null()),
            "num_params",
            palette,
            prep.metric,
        )
        axes[1].set(xscale="log", xlabel="parameters", title="parameter-matched")
    else:
        axes[1].set_visible(False)
    _legend_outside(fig, axes)
    caption = (
        f"Mean {prep.metric} (+-1 sd over all seeds, best lr per model) against the recurrent state a model "
        "carries (left: H*K*V per layer; doubled by the importance state of metaplastic models; plus K*K "
        "for Mesa; the full-length KV cache for softmax attention) and against its parameter count (right). "
        "Models at the same x are state-matched (left) or parameter-matched (right); lines join the sizes of "
        f"one model. {means.get_column('model').n_unique()} models, {means.height} model-size points."
        + ("" if has_params else " The right panel is omitted: no run has num_params.")
    )
    return _done(name, title, fig, caption, means.height)


def prior_continuum(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "prior_continuum", "The prior continuum: from Palimpsa to the Mamba2 limit"
    col = "model.mixer.ip"
    if col not in prep.selected.columns:
        return _skip(name, title, "the runs table has no model.mixer.ip column")
    data = analysis.ip_families(prep)
    if data.height == 0:
        return _skip(
            name, title, "no size has metaplastic runs at two or more prior precisions Ip (no Ip sweep)"
        )
    groups = data.select("task", "size").unique().sort("task", "size").rows()
    fig, axes = _panels(len(groups), width=4.8)
    limits = analysis.model_means(prep)
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = data.filter((pl.col("task") == task) & (pl.col("size") == size)).to_pandas()
        sns.lineplot(d, x=col, y="quality", hue="family", errorbar="sd", marker="o", ax=ax)
        sns.scatterplot(d, x=col, y="quality", hue="family", alpha=0.4, s=20, legend=False, ax=ax)
        ref = limits.filter((pl.col("task") == task) & (pl.col("size") == size))
        for kind_filter, style, label in (
            (pl.col("model.mixer.kind") == "mamba2", "--", "Mamba2 (Ip -> inf)"),
            (pl.col("model").str.contains("meta off"), ":", "metaplasticity off (beta = 0)"),
        ):
            r = ref.filter(kind_filter)
            for row in r.iter_rows(named=True):
                ax.axhline(row["mean"], ls=style, color="0.3", label=f"{label}: {row['model']}")
        ax.set(xscale="log", xlabel="prior precision Ip", ylabel=prep.metric, title=f"{task}, {size}")
        ips = sorted(set(d[col].tolist()))
        ax.set_xticks(ips, [f"{v:g}" for v in ips])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _legend_outside(fig, axes)
    caption = (
        f"{prep.metric} against the prior precision Ip of metaplastic mixers (mean +-1 sd over all seeds at "
        "each "
        "Ip's best lr; points are seeds). As Ip grows, the importance state I = Ip + Ibar is dominated by "
        "the "
        "prior and the layer approaches the Mamba2 limit (dashed line, where run); the dotted line is the "
        "same "
        "mixer with metaplasticity off."
    )
    return _done(name, title, fig, caption, data.height)


def ablation_deltas(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "ablation_deltas", "Metaplasticity on/off and paper/official gate deltas"
    parts = []
    for column, a, b, label in (
        ("model.mixer.metaplastic", True, False, "meta on - off"),
        ("model.mixer.gates", "paper", "official", "paper - official gates"),
    ):
        d = analysis.paired_delta(prep, column, a, b)
        if d.height:
            parts.append(
                d.with_columns(
                    pl.concat_str(
                        pl.col("model.mixer.kind").replace_strict(
                            KIND_NAMES, default=pl.col("model.mixer.kind")
                        ),
                        pl.lit(f": {label}"),
                    ).alias("comparison"),
                    (
                        (
                            pl.col("std").fill_null(0) ** 2 / pl.col("n")
                            + pl.col("std_b").fill_null(0) ** 2 / pl.col("n_b")
                        ).sqrt()
                    ).alias("se"),
                ).select("task", "size", "comparison", "delta", "se", "n", "n_b")
            )
    if not parts:
        return _skip(name, title, "no config has a twin that differs only in metaplasticity or in the gates")
    deltas = analysis.sorted_by_size(prep, pl.concat(parts))
    tasks = deltas.get_column("task").unique().sort().to_list()
    fig, axes = _panels(len(tasks), width=max(4.8, 1.4 * deltas.get_column("size").n_unique() + 2))
    for ax, task in zip(axes, tasks, strict=True):
        d = deltas.filter(pl.col("task") == task)
        sizes = [s for s in size_order(prep) if s in set(d.get_column("size").to_list())]
        comps = d.get_column("comparison").unique().sort().to_list()
        width = 0.8 / len(comps)
        colors = sns.color_palette("Set2", len(comps))
        for i, comp in enumerate(comps):
            c = d.filter(pl.col("comparison") == comp)
            xs = [sizes.index(s) + (i - (len(comps) - 1) / 2) * width for s in c.get_column("size").to_list()]
            ax.bar(
                xs,
                c.get_column("delta").to_list(),
                width=width,
                yerr=c.get_column("se").to_list(),
                capsize=3,
                label=comp,
                color=colors[i],
            )
        ax.axhline(0, color="0.2", lw=0.8)
        ax.set_xticks(range(len(sizes)), sizes, rotation=20)
        ax.set(
            ylabel=f"delta {prep.metric}\n(>0: first better)",
            title=task if len(tasks) > 1 else None,
        )
    _legend_outside(fig, axes)
    caption = (
        f"Difference of mean {prep.metric} between twin configs that differ in one setting only, per size: "
        "metaplasticity on minus off (off is beta = 0, the Mamba2 limit of the same gates) and paper minus "
        "official gate parameterization. Each side uses its own best lr and all its seeds; whiskers: "
        "standard "
        f"error of the difference. {deltas.height} paired comparisons."
    )
    return _done(name, title, fig, caption, deltas.height)


def lr_sweep(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "lr_sweep", "Learning-rate sweep and the chosen learning rate"
    swept = prep.lr_choice.filter(pl.col("lrs_tried").list.len() >= 2)
    if swept.height == 0:
        return _skip(name, title, "every model was run at a single learning rate")
    runs = prep.runs.join(swept.select("config_key"), on="config_key")
    sizes = [s for s in size_order(prep) if s in set(runs.get_column("size").to_list())]
    tasks = runs.get_column("task").unique().sort().to_list()
    groups = [
        (t, s)
        for t in tasks
        for s in sizes
        if runs.filter((pl.col("task") == t) & (pl.col("size") == s)).height
    ]
    palette = _palette(prep)
    fig, axes = _panels(len(groups), width=4.6)
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = runs.filter((pl.col("task") == task) & (pl.col("size") == size))
        pdf = d.to_pandas()
        sns.lineplot(pdf, x="train.lr", y="quality", hue="model", palette=palette, errorbar=None, ax=ax)
        sns.scatterplot(
            pdf, x="train.lr", y="quality", hue="model", palette=palette, alpha=0.5, s=18, legend=False, ax=ax
        )
        chosen = swept.filter((pl.col("task") == task) & (pl.col("size") == size))
        for row in chosen.iter_rows(named=True):
            ax.scatter(
                [row["train.lr"]],
                [row["lr_mean"]],
                marker="*",
                s=160,
                color=palette.get(row["model"]),
                edgecolor="black",
                zorder=5,
            )
        ax.set(
            xscale="log",
            xlabel="learning rate",
            ylabel=prep.metric,
            title=f"{size}" + (f" ({task})" if len(tasks) > 1 else ""),
        )
    _legend_outside(fig, axes)
    caption = (
        f"{prep.metric} of every run against its learning rate (points: seeds; line: mean over seeds). The "
        "star "
        "marks each model's chosen learning rate: the one with the best mean over its seeds; all seeds at "
        "that lr "
        f"enter the other figures. {swept.height} models swept over "
        f"{_span(swept.get_column('lrs_tried').list.len().to_list())} "
        "learning rates."
    )
    return _done(name, title, fig, caption, runs.height)


# --------------------------------------------------------------------------- curves and compute


def learning_curves(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "learning_curves", "Overlaid learning curves"
    pts = analysis.curve_points(prep)
    if pts.height == 0:
        why = (
            "no curves table" if prep.curves.height == 0 else f"no {prep.metric} curve for the selected runs"
        )
        return _skip(name, title, why)
    key = analysis.curve_key(prep)
    sizes = [s for s in size_order(prep) if s in set(pts.get_column("size").to_list())]
    tasks = pts.get_column("task").unique().sort().to_list()
    groups = [
        (t, s)
        for t in tasks
        for s in sizes
        if pts.filter((pl.col("task") == t) & (pl.col("size") == s)).height
    ]
    palette = _palette(prep)
    fig, axes = _panels(len(groups), width=4.6)
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = pts.filter((pl.col("task") == task) & (pl.col("size") == size)).to_pandas()
        sns.lineplot(d, x="step", y="value", hue="model", palette=palette, errorbar="sd", ax=ax)
        ax.set(xlabel="step", ylabel=key, title=f"{size}" + (f" ({task})" if len(tasks) > 1 else ""))
    _legend_outside(fig, axes)
    caption = (
        f"Validation {key} during training, one panel per size: mean over all seeds at each model's best lr, "
        f"band +-1 sd. {pts.get_column('run_id').n_unique()} runs, {pts.height} evaluations."
    )
    return _done(name, title, fig, caption, pts.height)


def compute_curves(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "compute_curves", "Learning curves against wall clock and FLOPs"
    pts = analysis.curve_points(prep)
    axes_x = [x for x in ("wall", "flops_at") if x in pts.columns and pts.get_column(x).drop_nulls().len()]
    if pts.height == 0 or not axes_x:
        return _skip(name, title, "no curves with wall time or FLOPs for the selected runs")
    sizes = [s for s in size_order(prep) if s in set(pts.get_column("size").to_list())]
    palette = _palette(prep)
    fig, axes = plt.subplots(
        len(axes_x), len(sizes), figsize=(4.4 * len(sizes), 3.4 * len(axes_x)), squeeze=False
    )
    labels = {"wall": "training time (s)", "flops_at": "training FLOPs (estimate)"}
    for r, x in enumerate(axes_x):
        for c, size in enumerate(sizes):
            ax = axes[r][c]
            d = pts.filter(pl.col("size") == size)
            sns.lineplot(
                d.to_pandas(),
                x=x,
                y="value",
                hue="model",
                units="run_id",
                estimator=None,
                palette=palette,
                lw=1,
                alpha=0.8,
                ax=ax,
            )
            budget = analysis.values_at_budget(d, x)
            if budget.height:
                ax.axvline(budget.get_column("budget")[0], color="0.3", ls="--", lw=0.9, label="equal budget")
            ax.set(xlabel=labels[x], ylabel=analysis.curve_key(prep), title=size)
    _legend_outside(fig, list(axes.flat))
    caption = (
        "The same validation curves as the learning-curve figure, one line per run (every seed at the best "
        "lr), "
        "against measured training time (top: optimizer-step seconds, without start-up and evaluation) and "
        "estimated training FLOPs (bottom: 6 * params * tokens "
        "plus "
        "3x the mixer's per-token state work). The dashed line is the equal budget used in the "
        "compute-matched "
        "comparison: the smallest final spend among the runs of that size."
    )
    return _done(name, title, fig, caption, pts.height)


def compute_matched(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "compute_matched", "Compute-matched comparison: quality at equal wall clock and equal FLOPs"
    pts = analysis.curve_points(prep)
    parts = []
    for x, label in (("wall", "equal training time"), ("flops_at", "equal FLOPs")):
        v = analysis.values_at_budget(pts, x)
        if v.height:
            parts.append(
                v.select("task", "size", "model", "seed", "value").with_columns(pl.lit(label).alias("budget"))
            )
    if not parts:
        return _skip(name, title, "no curves with wall time or FLOPs for the selected runs")
    data = analysis.sorted_by_size(prep, pl.concat(parts))
    palette = _palette(prep)
    budgets = data.get_column("budget").unique().sort(descending=True).to_list()
    fig, axes = _panels(len(budgets), width=max(5.0, 1.6 * data.get_column("size").n_unique() + 2.5))
    for ax, b in zip(axes, budgets, strict=True):
        d = data.filter(pl.col("budget") == b).to_pandas()
        sns.barplot(
            d,
            x="size",
            y="value",
            hue="model",
            hue_order=sorted(palette),
            palette=palette,
            errorbar="sd",
            capsize=0.1,
            ax=ax,
        )
        sns.stripplot(
            d,
            x="size",
            y="value",
            hue="model",
            hue_order=sorted(palette),
            palette=palette,
            dodge=True,
            legend=False,
            size=3,
            color="black",
            ax=ax,
        )
        ax.set(xlabel="size", ylabel=f"{analysis.curve_key(prep)} at budget", title=b)
        ax.tick_params(axis="x", labelrotation=20)
    _legend_outside(fig, axes)
    caption = (
        f"{analysis.curve_key(prep)} each model had reached when all runs of a size had spent the same "
        "wall-clock training time (left: measured optimizer-step seconds) or the same estimated training "
        "FLOPs (right): the last evaluation at or before the budget, which is the smallest final spend of "
        "that size's runs. Bars: mean over all seeds at the "
        "best lr; whiskers: sd; dots: seeds. A slower mixer is judged at fewer steps; a model without a bar "
        "had not reached its first evaluation within the budget."
    )
    return _done(name, title, fig, caption, data.height)


# --------------------------------------------------------------------------- diagnostics and cost


def diagnostics_vs_scale(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "diagnostics_vs_scale", "Importance-state diagnostics against scale"
    cols = [
        c
        for c in analysis.DIAG_SUMMARY
        if c in prep.selected.columns and prep.selected.get_column(c).drop_nulls().len() > 0
    ]
    if not cols:
        return _skip(
            name, title, "no run logged importance-state diagnostics (diag.consolidated/lr_eff/horizon)"
        )
    if "num_params" not in prep.selected.columns:
        return _skip(name, title, "no run has num_params")
    palette = _palette(prep)
    fig, axes = _panels(len(cols), width=4.6)
    n = 0
    for ax, col in zip(axes, cols, strict=True):
        d = prep.selected.filter(pl.col(col).is_not_null())
        n += d.height
        sns.lineplot(
            d.to_pandas(),
            x="num_params",
            y=col,
            hue="model",
            palette=palette,
            errorbar="sd",
            marker="o",
            ax=ax,
        )
        ax.set(xscale="log", xlabel="parameters", ylabel=analysis.DIAG_SUMMARY[col])
        if col != "diag.consolidated":
            ax.set_yscale("log")
    _legend_outside(fig, axes)
    caption = (
        "Model-wide importance-state diagnostics at the end of training, against parameter count (mean +-1 "
        "sd "
        "over all seeds at the best lr), measured on a fixed probe of validation sequences: the fraction of "
        "synapses consolidated (I/Ip above the consolidation threshold), the effective learning rate 1/I, "
        "and "
        "the memory horizon 1/(1 - alpha) in tokens (also defined for gated mixers without an importance "
        "state)."
    )
    return _done(name, title, fig, caption, n)


def diagnostics_vs_depth(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "diagnostics_vs_depth", "Importance-state diagnostics against depth"
    long = analysis.layer_diagnostics(prep)
    if long.height == 0:
        return _skip(name, title, "no per-layer diagnostics (diag.l<layer>.<quantity>) in the runs table")
    quantities = [
        q for q in ("consolidated", "lr_eff", "horizon") if q in set(long.get_column("quantity").to_list())
    ]
    if not quantities:
        return _skip(name, title, "per-layer diagnostics lack consolidated, lr_eff and horizon")
    long = long.filter(pl.col("quantity").is_in(quantities))
    if long.get_column("layer").n_unique() < 2:
        return _skip(name, title, "every run has a single layer; depth needs two or more")
    fig, axes = _panels(len(quantities), width=4.6)
    labels = {
        "consolidated": "fraction consolidated",
        "lr_eff": "effective learning rate 1/I",
        "horizon": "memory horizon (tokens)",
    }
    for ax, q in zip(axes, quantities, strict=True):
        d = long.filter(pl.col("quantity") == q).to_pandas()
        sns.lineplot(d, x="layer", y="value", hue="size", style="model", errorbar="sd", marker="o", ax=ax)
        ax.set(xlabel="layer", ylabel=labels[q])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if q != "consolidated":
            ax.set_yscale("log")
    _legend_outside(fig, axes)
    caption = (
        "Per-layer importance-state diagnostics (mean +-1 sd over seeds at the best lr; averaged over "
        "heads), "
        "colour = model size, line style = model: where in depth synapses consolidate, how the effective "
        "learning rate 1/I and the memory horizon change from the first to the last layer."
    )
    return _done(name, title, fig, caption, long.height)


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
        return _skip(name, title, "no run has tokens_per_second or peak_memory_mib with num_params")
    ratio = throughput_ratio(prep)
    n_panels = len(cols) + (1 if ratio.height else 0)
    palette = _palette(prep)
    fig, axes = _panels(n_panels, width=4.6)
    labels = {"tokens_per_second": "training tokens / s", "peak_memory_mib": "peak memory (MiB)"}
    for ax, col in zip(axes, cols, strict=False):
        d = sel.filter(pl.col(col).is_not_null() & (pl.col(col) > 0)).to_pandas()
        sns.lineplot(d, x="num_params", y=col, hue="model", palette=palette, errorbar="sd", marker="o", ax=ax)
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=labels[col])
    if ratio.height:
        ax = axes[-1]
        d = analysis.sorted_by_size(prep, ratio).to_pandas()
        sns.barplot(d, x="size", y="ratio", hue="model", palette=palette, ax=ax)
        ax.axhline(1.0, color="0.2", lw=0.8)
        ax.set(ylabel="throughput / Gated DeltaNet's", xlabel="size")
        ax.tick_params(axis="x", labelrotation=20)
    _legend_outside(fig, axes)
    kinds = sel.get_column("peak_memory_kind").unique().to_list() if "peak_memory_kind" in sel.columns else []
    devices = sel.get_column("device").unique().to_list() if "device" in sel.columns else []
    caption = (
        "Measured training throughput (tokens per second of optimizer steps) and peak memory against "
        "parameter "
        "count (mean +-1 sd over seeds at the best lr)"
        + (
            ", and each model's throughput relative to Gated DeltaNet at the same size"
            if ratio.height
            else ""
        )
        + ". Measured on "
        + (", ".join(str(d) for d in devices if d) or "the training device")
        + (f"; memory is {', '.join(str(k) for k in kinds if k)}" if kinds else "")
        + "."
    )
    kernels = kernels_by_model(sel)
    if kernels:  # a Triton kernel against a torch fallback is a comparison of implementations too
        caption += f" Recurrence implementations: {kernels}."
    return _done(name, title, fig, caption, sel.height)


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
    if ref_label is None:
        return pl.DataFrame()
    ref = tps.filter(pl.col("model") == ref_label).select("task", "size", pl.col("mean").alias("ref"))
    return (
        tps.filter(pl.col("model") != ref_label)
        .join(ref, on=["task", "size"])
        .with_columns((pl.col("mean") / pl.col("ref")).alias("ratio"))
    )


# --------------------------------------------------------------------------- tuning


def optuna_history(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "optuna_history", "Optuna optimization history"
    if not tuning:
        return _skip(name, title, "no tuning study given (--tuning)")
    studies = [t for t in tuning if t.complete.height]
    if not studies:
        return _skip(name, title, f"no completed trials in {', '.join(t.study_name for t in tuning)}")
    fig, axes = _panels(len(studies), width=5.2)
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
    _legend_outside(fig, axes)
    caption = (
        "Objective of every completed trial and the best value so far, per study. " + "; ".join(lines) + "."
    )
    return _done(name, title, fig, caption, n)


def optuna_importance(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "optuna_importance", "Optuna parameter importances"
    if not tuning:
        return _skip(name, title, "no tuning study given (--tuning)")
    studies = [t for t in tuning if t.importances]
    if not studies:
        return _skip(name, title, "; ".join(f"{t.study_name}: {t.importance_note}" for t in tuning))
    rows = max(len(t.importances) for t in studies)
    fig, axes = _panels(len(studies), width=5.2, height=0.45 * rows + 1.6)
    for ax, t in zip(axes, studies, strict=True):
        items = sorted(t.importances.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="C0")
        ax.set(xlabel="importance (share of objective variance)", title=t.study_name)
    fig.tight_layout()
    notes = "; ".join(f"{t.study_name}: {t.importance_note}" for t in studies)
    caption = f"Hyperparameter importances (fANOVA, summing to 1 per study) of the tuned parameters. {notes}."
    return _done(name, title, fig, caption, sum(len(t.importances) for t in studies))


FIGURES: list[Callable[[Prepared, Studies], FigureResult]] = [
    quality_vs_scale,
    quality_vs_state,
    ablation_deltas,
    prior_continuum,
    learning_curves,
    diagnostics_vs_scale,
    diagnostics_vs_depth,
    throughput_memory,
    compute_curves,
    compute_matched,
    lr_sweep,
    optuna_history,
    optuna_importance,
]


def render_all(prep: Prepared, tuning: Studies = None) -> list[FigureResult]:
    """Every figure, in report order; a figure whose data is missing comes back skipped with the reason."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    out = []
    for fn in FIGURES:
        res = fn(prep, tuning)
        if res.png is not None and res.n_points == 0:
            res = _skip(res.name, res.title, "the selection left no data points")
        out.append(res)
    plt.close("all")
    return out
