"""Figures of the scale analysis: matched comparisons, the gap against measured factors, recall by distance,
and memory capacity (quality against state per stored pair).

The first two draw the very numbers the findings print (they run the same builders), so a figure
and its sentence cannot disagree; both draw only comparisons in which both sides learned.
"""

from __future__ import annotations

import textwrap

import polars as pl
import seaborn as sns

from reports import chance, comparisons, matching, recall, scaling
from reports.numbers import Builder
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
    not_learned_points,
    palette,
    panels,
    skip,
)
from reports.stats import LEVEL
from reports.tables import KIND_NAMES, Prepared


def matched_comparison(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "matched_comparison", "Palimpsa against each baseline under four matchings"
    cells = matching.matches(Builder(prep))
    done = [m for m in cells if m.comparison is not None]
    if not cells:
        return skip(name, title, "no Palimpsa run with a baseline to match it against")
    if not done:
        return skip(name, title, "no matched pair in which both sides learned in every seed (Methods)")
    bases = list(dict.fromkeys(m.baseline for m in done))
    kinds = list(matching.MATCHINGS)
    colors = dict(zip(kinds, sns.color_palette("Dark2", len(kinds)), strict=False))
    markers = {"params": "o", "state": "s", "wall": "^", "flops_at": "D"}
    sizes = sorted({(m.size_rank, m.size) for m in cells})
    ypos = {s: i for i, (_, s) in enumerate(sizes)}
    fig, axes = panels(len(bases), ncols=min(len(bases), 2), width=min(MAX_WIDTH_IN, 4.8 * len(bases)),
                       height=0.55 * len(sizes) + 1.6)  # fmt: skip
    for ax, base in zip(axes, bases, strict=True):
        ax.axvline(0, color="0.2", lw=0.9)
        for kind in kinds:  # legend entries: filled markers, whatever the first point's verdict
            ax.scatter([], [], marker=markers[kind], s=40, color=colors[kind], label=matching.MATCHINGS[kind])
        ax.scatter([], [], marker="o", s=40, color="white", edgecolors=["0.3"], label="open: cannot tell")
        for j, kind in enumerate(kinds):
            for m in (m for m in done if m.baseline == base and m.matching == kind):
                c = m.comparison
                y = ypos[m.size] + (j - 1.5) * 0.18
                d = c.diff.value if c.diff is not None else c.mean_a.value - c.mean_b.value
                if c.ci_diff:
                    ax.errorbar(d, y, xerr=[[d - c.ci_diff[0].value], [c.ci_diff[1].value - d]], capsize=2.5,
                                color=colors[kind], lw=1.2)  # fmt: skip
                filled = c.verdict != "cannot tell"
                ax.scatter([d], [y], marker=markers[kind], s=40, color=colors[kind] if filled else "white",
                           edgecolors=[colors[kind]], linewidths=1.3, zorder=4)  # fmt: skip
        ax.set_yticks(range(len(sizes)), [s for _, s in sizes])
        ax.set_ylim(len(sizes) - 0.5, -0.5)
        ax.set(
            xlabel=f"Palimpsa minus {base}\n(>0: Palimpsa better)",
            ylabel="Palimpsa size",
            title=f"against {base}",
        )
    legend_below(fig, axes)
    caption = (
        f"Difference in {prep.metric} between Palimpsa at each size and a matched baseline: the baseline "
        "config nearest in parameters, or nearest in recurrent state elements (each within "
        f"x{matching.TOLERANCE:g}, possibly at another size), or the same size read off both learning curves "
        f"at an equal training-time or FLOPs budget. Whiskers: Welch {LEVEL * 100:g}% interval of the "
        "difference (none with a single seed); filled markers: a verdict (interval excludes zero); open: "
        "cannot tell. Only pairs in which both sides learned in every seed are drawn; the table under the "
        "findings gives each missing cell's reason."
    )
    return finish(name, title, fig, caption, len(done))


def _series(prep: Prepared) -> list[scaling.GapSeries]:
    b = Builder(prep)
    _, ref_gaps, ref = comparisons.versus(b)
    _, meta_gaps, meta = comparisons.metaplasticity(b)
    gaps = {ref: ref_gaps} if ref else {}
    if meta is not None:
        gaps.setdefault(meta, meta_gaps)
    return [s for label, gs in gaps.items() for s in scaling.gap_series(b, gs, label)]


def gap_factors(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "gap_factors", "The Palimpsa-minus-baseline gap against measured factors"
    series = [s for s in _series(prep) if any(f.r is not None for f in s.factors)]
    if not series:
        return skip(
            name, title,
            f"fewer than {scaling.MIN_SIZES} sizes where Palimpsa and a baseline both learned in every seed "
            "(with two or more seeds each)",
        )  # fmt: skip
    cells = [(s, f) for s in series for f in s.factors if f.r is not None]
    fig, axes = panels(len(cells), height=2.9)
    colors = dict(zip([s.b_label for s in series], sns.color_palette("Dark2", len(series)), strict=False))
    for ax, (s, f) in zip(axes, cells, strict=True):
        xs = [v.value for v in f.values]
        ys = [g.value for g in s.gaps]
        for x, y, c, size in zip(xs, ys, s.comparisons, s.sizes, strict=True):
            if c.ci_diff:
                ax.errorbar(x, y, yerr=[[y - c.ci_diff[0].value], [c.ci_diff[1].value - y]], capsize=2.5,
                            color=colors[s.b_label], lw=1.1)  # fmt: skip
            ax.annotate(size, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="0.3")
        ax.plot(xs, ys, marker="o", lw=0.8, color=colors[s.b_label], label=f"gap to {s.b_label}")
        ax.axhline(0, color="0.2", lw=0.8)
        label = f.label.removeprefix(f"{s.a_label}'s ")
        ax.set(xlabel="\n".join(textwrap.wrap(label, 34)), ylabel=f"{s.a_label} minus {s.b_label}")
        ax.set_title(f"r = {f.r.text} (needs |r| > {f.r_crit.text})", fontsize=9)
        if f.values[0].value > 0 and max(xs) / min(xs) > 8:
            ax.set_xscale("log")
    legend_below(fig, axes)
    caption = (
        f"The {prep.metric} gap between Palimpsa and a baseline (positive: Palimpsa better) at each size "
        "where both learned in every seed, against factors measured on Palimpsa's runs; whiskers: Welch "
        f"{LEVEL * 100:g}% interval of each gap. Each panel gives the Pearson r across sizes and the |r| "
        "that this number of sizes needs to differ from no relation. With so few sizes, factors that all "
        "grow with size move together: a factor that tracks the gap is an association, not a cause."
    )
    return finish(name, title, fig, caption, sum(len(f.values) for _, f in cells))


def recall_by_distance(prep: Prepared, tuning: Studies = None) -> FigureResult:
    name, title = "recall_by_distance", "Recall accuracy against key-to-query distance"
    long = recall.recall_long(prep)
    if long.height == 0:
        return skip(name, title, "no run logged recall_gap.<lo>-<hi> metrics", silent=True)
    groups = (
        long.select("task", "size", "size_rank")
        .unique()
        .sort("task", "size_rank")
        .select("task", "size")
        .rows()
    )
    bins = long.select("lo", "hi").unique().sort("lo")
    labels = [recall.bin_label(lo, hi) for lo, hi in bins.rows()]
    xpos = {lo: i for i, (lo, _) in enumerate(bins.rows())}
    colors = palette(prep)
    fig, axes = panels(len(groups), height=3.0)
    n_tasks = len({t for t, _ in groups})
    n = 0
    for ax, (task, size) in zip(axes, groups, strict=True):
        d = long.filter((pl.col("task") == task) & (pl.col("size") == size))
        row = prep.runs.filter(pl.col("task") == task).row(0, named=True)
        col = d.get_column("column")[0]
        level = chance.chance_level(row, col)
        chance_band(ax, (level, chance.threshold(level, col)) if level is not None else None)
        hollow = {
            (m, lo)
            for m, _ in not_learned_points(prep.selected.filter(pl.col("size") == size), "size")
            for lo in xpos
        }
        n += means_with_seeds(ax, d, "lo", "value", "model", colors, (0.0, 1.0), hollow=hollow, xpos=xpos)
        ax.set_xticks(range(len(labels)), labels, rotation=0)
        ax.set(
            xlabel="key-to-query distance (tokens)",
            ylabel="recall accuracy",
            title=size + (f", {task}" if n_tasks > 1 else ""),
        )
        bounded_ylim(ax, (0.0, 1.0))
    legend_below(fig, axes)
    caption = (
        "Recall accuracy against key-to-query distance: accuracy on the queries whose key stood the given "
        f"number of tokens before them (power-of-two bins), per mixer and size. {SEEDS_CAPTION} Dashed line: "
        "chance (one over the number of values); grey band: below the learned threshold (Methods)."
    )
    return finish(name, title, fig, caption, n)


VARIANT_NAMES = {**KIND_NAMES, "notpalimpsa": "Palimpsa (meta off)"}


def _mixer_names(sel: pl.DataFrame) -> pl.Expr:
    """The grid's variant where runs name one (a mixer whatever its state size), else the report's model
    label (which names a state size that varies within a mixer kind, so its points stay apart)."""
    if "variant" not in sel.columns:
        return pl.col("model")
    named = pl.col("variant").replace_strict(VARIANT_NAMES, default=pl.col("variant"))
    return pl.when(pl.col("variant").is_not_null()).then(named).otherwise(pl.col("model"))


def capacity(prep: Prepared, tuning: Studies = None) -> FigureResult:
    """Memory capacity: quality against recurrent state per stored key-value pair, one line per mixer and
    load. If a mixer's lines for two loads fall on one curve, what it recalls is set by its state per pair."""
    name, title = "capacity", "Memory capacity: quality against state per stored pair"
    need = ("state_elements", "task.num_kv_pairs", "model.mixer.kind")
    if not all(c in prep.selected.columns for c in need):
        return skip(name, title, "no run with a recurrent state and a key-value load (MQAR)")
    sel = prep.selected.filter(
        pl.col("state_elements").is_not_null() & pl.col("task.num_kv_pairs").is_not_null()
    )
    sel = sel.with_columns(
        _mixer_names(sel).alias("mixer"),
        (pl.col("state_elements") / pl.col("task.num_kv_pairs")).alias("per_pair"),
    )
    per_config = sel.group_by("config_key").agg(pl.col("per_pair").mean().alias("x"))
    sel = sel.join(per_config, on="config_key")
    spread = sel.group_by("mixer").agg(pl.col("x").n_unique().alias("n"))
    if spread.height < 2 or spread.get_column("n").max() < 2:
        return skip(name, title, "fewer than two mixers, or no mixer at two or more states per pair")
    loads = sorted(sel.get_column("task.num_kv_pairs").unique().to_list())
    mixers = sorted(sel.get_column("mixer").unique().to_list())
    base = dict(zip(mixers, sns.color_palette("tab10", n_colors=len(mixers)), strict=True))
    shade = {load: i / max(len(loads), 2) for i, load in enumerate(loads)}  # more pairs: lighter
    sel = sel.with_columns(
        (
            pl.col("mixer") + pl.lit(", ") + pl.col("task.num_kv_pairs").cast(pl.String) + pl.lit(" pairs")
        ).alias("line")
        if len(loads) > 1
        else pl.col("mixer").alias("line")
    )
    colors = {}
    for line, mixer, load in sel.select("line", "mixer", "task.num_kv_pairs").unique().iter_rows():
        colors[line] = tuple(c + (1 - c) * shade[load] for c in base[mixer])
    levels = sel.select("chance", "threshold").unique()
    fig, axes = panels(1, width=7.0, height=4.0)
    ax = axes[0]
    if levels.height == 1 and levels.get_column("chance")[0] is not None:
        chance_band(ax, (float(levels.get_column("chance")[0]), float(levels.get_column("threshold")[0])))
    n_points = means_with_seeds(
        ax, sel, "x", "quality", "line", colors, prep.bounds, hollow=not_learned_points(sel, "x", "line")
    )
    ax.set_xscale("log", base=2)
    data_ticks(ax, sel.get_column("x").unique().to_list())  # the states per pair that were run
    ax.set(xlabel="recurrent state per stored key-value pair (floats, all layers)", ylabel=prep.metric)
    bounded_ylim(ax, prep.bounds)
    legend_below(fig, axes)
    caption = (
        f"{prep.metric} against the recurrent state a model carries per key-value pair it must store: state "
        "elements (H*K*V per layer summed over layers, doubled by the importance state of metaplastic "
        "models) divided by task.num_kv_pairs. One line per mixer"
        + (
            f" and load ({', '.join(str(v) for v in loads)} pairs; more pairs drawn lighter)"
            if len(loads) > 1
            else ""
        )
        + f". {SEEDS_CAPTION} {chance_caption(prep)}"
    )
    return finish(name, title, fig, caption, n_points)
