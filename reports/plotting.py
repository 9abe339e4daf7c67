"""Drawing conventions every figure shares: page-sized panels, the chance band, means with intervals.

Figures are drawn at the size they are shown in the HTML page (at most :data:`MAX_WIDTH_IN` wide at
:data:`DPI`, so they are never scaled down), legends sit below the panels instead of widening them,
and every mean over seeds is drawn with its 95% Student t interval and the seeds themselves as dots,
over the metric's chance level and the band of values that do not count as learned.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import seaborn as sns  # noqa: E402

from reports import stats  # noqa: E402
from reports.numbers import fmt  # noqa: E402
from reports.tables import Prepared  # noqa: E402
from reports.tuning import TuningData  # noqa: E402

Studies = list[TuningData] | None

DPI = 110
MAX_WIDTH_IN = 10.0  # 1100 px: the width of a figure in the report page
CHANCE_STYLE = {"color": "0.35", "ls": "--", "lw": 1.0}
BAND_COLOR = "0.9"


@dataclass
class FigureResult:
    name: str
    title: str
    caption: str = ""
    png: bytes | None = None
    skipped: str | None = None  # why there is no figure
    n_points: int = 0  # plotted data points (runs, curve points or trials)
    path: Path | None = None
    silent: bool = False  # a skipped figure the report does not list (its data is optional)

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


def skip(name: str, title: str, reason: str, silent: bool = False) -> FigureResult:
    return FigureResult(name=name, title=title, skipped=reason, silent=silent)


def palette(prep: Prepared) -> dict[str, tuple]:
    """One colour per model label, the same in every figure."""
    models = sorted(prep.runs.get_column("model").unique().to_list())
    return dict(zip(models, sns.color_palette("tab10", n_colors=max(len(models), 1)), strict=False))


def span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def not_learned_points(runs: pl.DataFrame, x: str, group: str = "model") -> set:
    """(group, x) points not learned in every seed: drawn with open markers."""
    sel = runs.filter(pl.col("learned").is_not_null())
    if sel.height == 0 or x not in sel.columns:
        return set()
    bad = sel.group_by(group, x).agg(pl.col("learned").all().alias("all")).filter(~pl.col("all"))
    return {(m, v) for m, v in bad.select(group, x).iter_rows()}


SEEDS_CAPTION = (
    "Markers: the mean over all seeds at each model's best learning rate, with its 95% Student t interval "
    "(no bar when there is one seed; cut at the metric's range); dots: every seed; open markers: not every "
    "seed learned."
)


def chance_caption(prep: Prepared) -> str:
    """The sentence that explains the chance line and band, with their values."""
    levels = prep.runs.select("task", "chance", "threshold").unique().drop_nulls().sort("task")
    if levels.height == 0:
        return f"No chance level is known for {prep.metric}, so no chance line is drawn."
    side = "below" if prep.higher_is_better else "above"
    items = [
        f"{fmt(c)} (learned {'above' if prep.higher_is_better else 'below'} {fmt(t)})"
        + (f" on {task}" if levels.height > 1 else "")
        for task, c, t in levels.iter_rows()
    ]
    return (
        f"Dashed line: chance level of {prep.metric}, {'; '.join(items)}; grey band: values {side} the "
        "learned threshold, which do not count as learned (Methods)."
    )


def short_number(value: float, _pos=None) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def data_ticks(ax, values, axis: str = "x") -> None:
    """Major ticks at the data's own values (sizes, parameter counts), merging ones within 15%."""
    ticks: list[float] = []
    for v in sorted(float(v) for v in values if v is not None and v > 0):
        if not ticks or v > ticks[-1] * 1.15:
            ticks.append(v)
    if not ticks or len(ticks) > 8:
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(short_number))
    target.set_minor_locator(matplotlib.ticker.NullLocator())


def tidy_log_axes(fig: plt.Figure) -> None:
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
            axis.set_major_formatter(ticker.FuncFormatter(short_number))
            if hi / lo < 30:
                ratio = (hi / lo) ** (1 / 5)
                ticks = [float(f"{lo * ratio**k:.2g}") for k in range(1, 5)]
                axis.set_major_locator(ticker.FixedLocator(ticks))


def panels(n: int, ncols: int | None = None, height: float = 3.0, width: float | None = None):
    """``n`` axes in rows of at most three, the whole figure no wider than the page."""
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    total = min(width or 3.4 * ncols, MAX_WIDTH_IN)
    fig, axes = plt.subplots(nrows, ncols, figsize=(total, height * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def legend_below(fig: plt.Figure, axes, title: str | None = None) -> None:
    """One legend for all panels, centred under them in as many columns as fit the width."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles and not lab.startswith("_"):
                handles[lab] = h
                labels.append(lab)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.tight_layout()
    if labels:
        width_in = fig.get_size_inches()[0]
        longest = max(len(lab) for lab in labels)
        ncol = max(1, min(len(labels), int(width_in * 11 / (longest + 4))))
        fig.legend(
            [handles[lab] for lab in labels],
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=ncol,
            frameon=False,
            title=title,
        )


def finish(name: str, title: str, fig: plt.Figure, caption: str, n_points: int) -> FigureResult:
    tidy_log_axes(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return FigureResult(name=name, title=title, caption=caption, png=buf.getvalue(), n_points=n_points)


def task_chance(prep: Prepared, task: str) -> tuple[float, float] | None:
    """(chance, learned threshold) of a task's runs, when known and the same for all of them."""
    runs = prep.runs.filter(pl.col("task") == task)
    levels = runs.select("chance", "threshold").unique()
    if levels.height != 1 or levels.get_column("chance")[0] is None:
        return None
    return float(levels.get_column("chance")[0]), float(levels.get_column("threshold")[0])


def chance_band(ax, level: tuple[float, float] | None, higher_is_better: bool = True) -> bool:
    """Chance as a dashed line and the not-learned band between it and the threshold, shaded."""
    if level is None:
        return False
    chance, limit = level
    lo, hi = (min(chance, limit), max(chance, limit))
    if higher_is_better:
        lo = min(lo, 0.0)
    ax.axhspan(lo, hi, color=BAND_COLOR, zorder=0, lw=0, label="not learned")
    ax.axhline(chance, **CHANCE_STYLE, zorder=1, label="chance")
    return True


def bounded_ylim(ax, bounds: tuple[float, float] | None) -> None:
    """Keep the y axis inside the metric's range (an interval can reach past it only on paper)."""
    if bounds is None:
        return
    lo, hi = ax.get_ylim()
    pad = 0.03 * (min(hi, bounds[1]) - max(lo, bounds[0]))
    ax.set_ylim(max(lo, bounds[0] - pad), min(hi, bounds[1] + pad))


def means_with_seeds(
    ax,
    df: pl.DataFrame,
    x: str,
    y: str,
    group: str,
    colors: dict,
    bounds: tuple[float, float] | None = None,
    hollow: set | None = None,  # (group, x) points whose model did not learn in every seed
    dodge: float = 0.0,
    connect: bool = True,
    xpos: dict | None = None,
) -> int:
    """Per ``group``: the seeds of each ``x`` as dots and their mean with a 95% t interval (no bar with
    one seed), means joined by a line. Means in ``hollow`` get open markers; ``xpos`` maps categorical
    x values to positions; ``dodge`` offsets groups on categorical axes. Returns the points drawn."""
    hollow = hollow or set()
    groups = sorted(df.get_column(group).unique().to_list())
    n = 0
    for gi, g in enumerate(groups):
        d = df.filter((pl.col(group) == g) & pl.col(y).is_not_null())
        if d.height == 0:
            continue
        color = colors.get(g)
        shift = (gi - (len(groups) - 1) / 2) * dodge
        xs, means, los, his, opens = [], [], [], [], []
        for (xv,), part in d.group_by(x, maintain_order=True):
            vals = [float(v) for v in part.get_column(y).to_list()]
            pos = (xpos[xv] if xpos else xv) + shift if xpos or dodge else xv
            ax.scatter([pos] * len(vals), vals, s=14, color=color, alpha=0.45, lw=0, zorder=3)
            ci = stats.mean_interval(vals, bounds=bounds)
            m = sum(vals) / len(vals)
            xs.append(pos)
            means.append(m)
            los.append(m - ci.lo if ci else 0.0)
            his.append(ci.hi - m if ci else 0.0)
            opens.append((g, xv) in hollow)
            n += len(vals)
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        xs, means = [xs[i] for i in order], [means[i] for i in order]
        los, his, opens = [los[i] for i in order], [his[i] for i in order], [opens[i] for i in order]
        ax.errorbar(
            xs,
            means,
            yerr=[los, his],
            marker="none",
            capsize=3,
            lw=1.4 if connect else 0,
            elinewidth=1.1,
            color=color,
            label=str(g),
            zorder=4,
        )
        ax.scatter(
            xs,
            means,
            s=34,
            color=[("white" if o else color) for o in opens],
            edgecolors=[color] * len(xs),
            linewidths=1.3,
            zorder=5,
        )
    return n
