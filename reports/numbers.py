"""Numbers that carry their own recipe, and the builder that makes them while sentences are assembled.

Each :class:`Number` records how it was obtained (an operation, the raw-table columns and the
equality filter that select its runs, the run ids, or the other numbers it combines), so a test
can recompute every number in every sentence from the exported tables alone. Comparisons are
built here too (:meth:`Builder.compare`): two means, their intervals, and the Welch interval of
their difference with its verdict, so no sentence can print a difference without its uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from reports import analysis, chance, compute, stats
from reports.tables import Prepared


@dataclass
class Number:
    """One number of a sentence and its recipe.

    ``op``:

    - ``mean`` / ``count``: ``column`` over the raw runs matching ``filter`` (mean, distinct values);
    - ``state`` / ``state_per_pair``: mean recurrent state of those runs by the cost model
      (:func:`reports.compute.state_elements`), per stored key-value pair for the latter;
    - ``diff`` (``sign * (a - b)``), ``ratio`` (``a / b``) and ``corr`` (Pearson r of the first half
      of the operands against the second half) of other numbers;
    - ``ci_lo`` / ``ci_hi``: Student t interval at ``level`` of the per-run values behind the one
      operand (a ``mean`` or ``at_budget``), cut at ``bounds`` (the metric's range);
    - ``welch_lo`` / ``welch_hi``: Welch t interval at ``level`` of ``sign * (a - b)`` over the
      per-run values behind the two operands;
    - ``slope`` / ``slope_lo`` / ``slope_hi``: least-squares slope of the second half of the operands
      against log2 of the first half, and its t interval (n - 2 degrees of freedom);
    - ``r_crit``: smallest |Pearson r| that differs from zero at ``level`` with ``n`` points;
    - ``chance``: chance level of ``metric`` computed from ``column`` over the runs matching
      ``filter`` (see :mod:`reports.chance`); ``threshold``: the learned threshold of the one
      (chance) operand with ``margin``; ``count_learned``: how many runs matching ``filter`` have
      ``column`` beyond the threshold operand (``sign`` +1: above it, -1: below it);
    - ``budget``: smallest final ``x`` over ``run_ids``; ``at_budget``: mean over ``run_ids`` of the
      last ``curve_key`` value with ``x <= budget``.
    """

    name: str
    value: float
    text: str
    op: str
    column: str | None = None
    filter: dict[str, Any] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    operands: list[str] = field(default_factory=list)
    sign: float = 1.0
    curve_key: str | None = None
    x: str | None = None  # "wall" or "flops_at" for budget numbers
    budget: str | None = None  # name of the budget number an at_budget value uses
    level: float | None = None  # confidence level of interval numbers
    bounds: list[float | None] | None = None  # [lo, hi] an interval is cut at (None: unbounded)
    margin: float | None = None  # learned margin of a threshold
    metric: str | None = None  # the metric a chance level or threshold belongs to
    n: int | None = None  # points behind an r_crit


@dataclass
class Finding:
    section: str
    text: str
    numbers: list[Number]

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "text": self.text, "numbers": [asdict(n) for n in self.numbers]}


def fmt(value: float, kind: str = "value") -> str:
    """The printed form of a number; tests compare recomputed values through the same function."""
    if kind == "signed":
        a = abs(value)
        if 0 < a < 5e-4:
            return f"{value:+.1e}"
        if a >= 1e5:
            return f"{value:+.3g}"
        if a >= 100:
            return f"{value:+.0f}"
        return f"{value:+.2f}" if a >= 1 else f"{value:+.3f}"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "corr":
        return f"{value:.3f}"
    if kind == "count":
        return str(int(value))
    a = abs(value)
    if a >= 1e5 or (0 < a < 1e-3):
        return f"{value:.3g}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 1:
        return f"{value:.3g}"
    return f"{value:.3f}"


@dataclass
class Comparison:
    """``a`` against ``b`` on one column: both means with intervals and the verdict on their difference."""

    a: dict[str, Any]  # analysis.model_means rows
    b: dict[str, Any]
    mean_a: Number
    mean_b: Number
    ci_a: tuple[Number, Number] | None
    ci_b: tuple[Number, Number] | None
    n_a: Number
    n_b: Number
    diff: Number | None  # None when either side has a single seed: no bare difference is printed
    ci_diff: tuple[Number, Number] | None
    verdict: str  # better / worse / cannot tell (from a's side)

    @property
    def numbers(self) -> list[Number]:
        out = [self.mean_a, *(self.ci_a or ()), self.mean_b, *(self.ci_b or ()), self.n_a, self.n_b]
        return out + [n for n in (self.diff, *(self.ci_diff or ())) if n is not None]


def interval_text(ci: tuple[Number, Number] | None) -> str:
    """`` [lo, hi]`` after a mean; nothing for a single seed (the seed count says so)."""
    return f" [{ci[0].text}, {ci[1].text}]" if ci else ""


def seeds_text(c: Comparison) -> str:
    if c.n_a.value == c.n_b.value == 1:
        return "one seed each"
    return f"{c.n_a.text} and {c.n_b.text} seeds"


def comparison_clause(c: Comparison, a_name: str, b_name: str) -> str:
    """``A 0.85 [0.80, 0.90] against B 0.70 [0.60, 0.80] (3 and 3 seeds): <verdict>``."""
    return (
        f"{a_name} {c.mean_a.text}{interval_text(c.ci_a)} against {b_name} "
        f"{c.mean_b.text}{interval_text(c.ci_b)} ({seeds_text(c)}): {verdict_text(c, a_name, b_name)}"
    )


def verdict_text(
    c: Comparison, a_name: str, b_name: str, better: str = "better", worse: str = "worse", unit: str = ""
) -> str:
    """The verdict clause: a verdict with the 95% interval of the difference, never a bare difference."""
    if c.ci_diff is None:
        return f"cannot tell {a_name} from {b_name}: a single seed gives no interval"
    lo, hi = c.ci_diff
    level = f"{lo.level * 100:g}%"
    if c.verdict == "cannot tell":
        return (
            f"cannot tell {a_name} from {b_name} at {c.n_a.text} and {c.n_b.text} seeds: the difference "
            f"{c.diff.text}{unit} has a {level} interval [{lo.text}, {hi.text}] that includes zero"
        )
    word = better if c.verdict == "better" else worse
    return f"{a_name} {word}: difference {c.diff.text}{unit} ({level} interval [{lo.text}, {hi.text}])"


class Builder:
    """Collects numbers with unique names while sentences are assembled."""

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.key_cols = ["model.mixer.kind", *prep.task_columns, *prep.size_columns, *prep.variant_columns]
        self.key_cols = list(dict.fromkeys(c for c in self.key_cols if c in prep.selected.columns))
        self.means = analysis.model_means(prep)
        self.numbers: dict[str, Number] = {}
        self.samples: dict[str, list[float]] = {}  # per-run values behind mean and at_budget numbers
        self._chance: dict[str, tuple[Number, Number] | None] = {}  # per task: one pair of numbers, reused

    # ----------------------------------------------------------------- recipes over runs

    def _filter(self, config_key: str, lr: float | None = None) -> dict[str, Any]:
        row = self.prep.runs.filter(pl.col("config_key") == config_key).row(0, named=True)
        f = {c: row[c] for c in self.key_cols}
        sel = self.prep.selected.filter(pl.col("config_key") == config_key)
        f["train.lr"] = sel.get_column("train.lr")[0] if lr is None else lr
        if "status" in self.prep.runs.columns:
            f["status"] = "FINISHED"
        return f

    def _rows(self, config_key: str, lr: float | None = None) -> pl.DataFrame:
        if lr is None:
            return self.prep.selected.filter(pl.col("config_key") == config_key)
        return self.prep.runs.filter((pl.col("config_key") == config_key) & (pl.col("train.lr") == lr))

    def add(self, number: Number) -> Number:
        base, i = number.name, 1
        while number.name in self.numbers:
            i += 1
            number.name = f"{base}#{i}"
        self.numbers[number.name] = number
        return number

    def mean(self, config_key: str, column: str, tag: str, lr: float | None = None) -> Number:
        """Mean of ``column`` over the model's seeds (at its chosen lr, or at ``lr``)."""
        sel = self._rows(config_key, lr)
        vals = sel.filter(pl.col(column).is_not_null()).sort("run_id").get_column(column)
        value = float(vals.mean())
        source = self.prep.metric if column == "quality" else column  # the runs table's own column
        number = self.add(
            Number(
                name=f"mean({source})[{tag}]",
                value=value,
                text=fmt(value),
                op="mean",
                column=source,
                filter=self._filter(config_key, lr),
                run_ids=sorted(sel.get_column("run_id").to_list()),
            )
        )
        self.samples[number.name] = [float(v) for v in vals.to_list()]
        return number

    def count(self, config_key: str, tag: str) -> Number:
        sel = self._rows(config_key)
        n = sel.get_column("seed").n_unique()
        return self.add(
            Number(
                name=f"seeds[{tag}]",
                value=float(n),
                text=fmt(n, "count"),
                op="count",
                column="seed",
                filter=self._filter(config_key),
                run_ids=sorted(sel.get_column("run_id").to_list()),
            )
        )

    def state(self, config_key: str, tag: str, per_pair: bool = False) -> Number | None:
        """Recurrent state of the model by the cost model, optionally per stored key-value pair."""
        sel = self._rows(config_key)
        vals = []
        for row in sel.to_dicts():
            s = compute.state_elements(row)
            pairs = row.get("task.num_kv_pairs")
            if s is None or (per_pair and not pairs):
                return None
            vals.append(s / pairs if per_pair else s)
        value = sum(vals) / len(vals)
        op = "state_per_pair" if per_pair else "state"
        return self.add(
            Number(
                name=f"{op}[{tag}]",
                value=value,
                text=fmt(value),
                op=op,
                filter=self._filter(config_key),
                run_ids=sorted(sel.get_column("run_id").to_list()),
            )
        )

    # ----------------------------------------------------------------- arithmetic

    def diff(self, a: Number, b: Number, tag: str, sign: float) -> Number:
        value = sign * (a.value - b.value)
        return self.add(
            Number(
                name=f"diff[{tag}]",
                value=value,
                text=fmt(value, "signed"),
                op="diff",
                operands=[a.name, b.name],
                sign=sign,
            )
        )

    def ratio(self, a: Number, b: Number, tag: str) -> Number:
        value = a.value / b.value
        return self.add(
            Number(
                name=f"ratio[{tag}]",
                value=value,
                text=fmt(value, "ratio"),
                op="ratio",
                operands=[a.name, b.name],
            )
        )

    def corr(self, xs: list[Number], ys: list[Number], tag: str) -> Number | None:
        r = analysis.pearson([x.value for x in xs], [y.value for y in ys])
        if r is None:
            return None
        return self.add(
            Number(
                name=f"corr[{tag}]",
                value=r,
                text=fmt(r, "corr"),
                op="corr",
                operands=[n.name for n in [*xs, *ys]],
            )
        )

    # ----------------------------------------------------------------- intervals and verdicts

    def bounds_of(self, column: str) -> list[float | None] | None:
        """The range an interval of ``column``'s mean is cut at: the metric's, or [0, inf) for rates."""
        if column == "tokens_per_second":
            return [0.0, None]
        source = self.prep.metric if column == "quality" else column
        bounds = chance.metric_bounds(source) if source in (self.prep.metric,) or is_recall(source) else None
        if bounds is None:
            return None
        return [bounds[0], None if math.isinf(bounds[1]) else bounds[1]]

    def interval(
        self, mean: Number, tag: str, bounds: list[float | None] | None
    ) -> tuple[Number, Number] | None:
        """Student t interval of the values behind ``mean``; None with a single value."""
        cut = None if bounds is None else (bounds[0], math.inf if bounds[1] is None else bounds[1])
        ci = stats.mean_interval(self.samples[mean.name], bounds=cut)
        if ci is None:
            return None
        return tuple(  # type: ignore[return-value]
            self.add(
                Number(
                    name=f"{op}[{tag}]",
                    value=value,
                    text=fmt(value),
                    op=op,
                    operands=[mean.name],
                    level=stats.LEVEL,
                    bounds=bounds,
                )
            )
            for op, value in (("ci_lo", ci.lo), ("ci_hi", ci.hi))
        )

    def welch(self, a: Number, b: Number, tag: str, sign: float) -> tuple[stats.Interval | None, tuple]:
        ci = stats.welch_interval(self.samples[a.name], self.samples[b.name], sign=sign)
        if ci is None:
            return None, ()
        nums = tuple(
            self.add(
                Number(
                    name=f"{op}[{tag}]",
                    value=value,
                    text=fmt(value, "signed"),
                    op=op,
                    operands=[a.name, b.name],
                    sign=sign,
                    level=stats.LEVEL,
                )
            )
            for op, value in (("welch_lo", ci.lo), ("welch_hi", ci.hi))
        )
        return ci, nums

    def compare_numbers(
        self,
        a: dict[str, Any],
        b: dict[str, Any],
        mean_a: Number,
        mean_b: Number,
        n_a: Number,
        n_b: Number,
        tag: str,
        sign: float,
        bounds: list[float | None] | None,
    ) -> Comparison:
        """A comparison from two means whose per-run values are known (runs or curves at a budget)."""
        ci_a = self.interval(mean_a, f"{mean_a.name}", bounds)
        ci_b = self.interval(mean_b, f"{mean_b.name}", bounds)
        ci, nums = self.welch(mean_a, mean_b, tag, sign)
        diff = self.diff(mean_a, mean_b, tag, sign) if ci is not None else None
        return Comparison(
            a=a,
            b=b,
            mean_a=mean_a,
            mean_b=mean_b,
            ci_a=ci_a,
            ci_b=ci_b,
            n_a=n_a,
            n_b=n_b,
            diff=diff,
            ci_diff=nums or None,
            verdict=stats.verdict(ci),
        )

    def compare(self, a: dict[str, Any], b: dict[str, Any], tag: str, column: str = "quality") -> Comparison:
        """``a`` against ``b`` (model_means rows) on ``column`` over all their seeds at their chosen lrs."""
        where = f"{a['size']}@{a['task']}"
        mean_a = self.mean(a["config_key"], column, f"{a['model']}@{where}")
        where_b = f"{b['size']}@{b['task']}"
        mean_b = self.mean(b["config_key"], column, f"{b['model']}@{where_b}")
        n_a = self.count(a["config_key"], f"{a['model']}@{where}")
        n_b = self.count(b["config_key"], f"{b['model']}@{where_b}")
        sign = self.prep.sign() if column == "quality" else 1.0
        return self.compare_numbers(a, b, mean_a, mean_b, n_a, n_b, tag, sign, self.bounds_of(column))

    def slope(self, xs: list[Number], ys: list[Number], tag: str) -> tuple[Number, Number, Number] | None:
        """Least-squares slope of ``ys`` per doubling of ``xs``, with its t interval."""
        fit = stats.ols_slope([math.log2(x.value) for x in xs], [y.value for y in ys])
        if fit is None:
            return None
        operands = [n.name for n in [*xs, *ys]]
        return tuple(  # type: ignore[return-value]
            self.add(
                Number(
                    name=f"{op}[{tag}]",
                    value=value,
                    text=fmt(value, "signed"),
                    op=op,
                    operands=operands,
                    level=stats.LEVEL,
                )
            )
            for op, value in (("slope", fit.estimate), ("slope_lo", fit.lo), ("slope_hi", fit.hi))
        )

    def r_crit(self, n: int, tag: str) -> Number | None:
        value = stats.r_critical(n)
        if value is None:
            return None
        return self.add(
            Number(
                name=f"r_crit[{tag}]",
                value=value,
                text=fmt(value, "corr"),
                op="r_crit",
                level=stats.LEVEL,
                n=n,
            )
        )

    # ----------------------------------------------------------------- chance screen

    def chance(self, task: str) -> tuple[Number, Number] | None:
        """(chance level, learned threshold) of ``task``, or None when unknown or not unique; the same two
        numbers however many findings cite them."""
        if task not in self._chance:
            self._chance[task] = self._chance_numbers(task)
        return self._chance[task]

    def _chance_numbers(self, task: str) -> tuple[Number, Number] | None:
        runs = self.prep.runs.filter(pl.col("task") == task)
        row = runs.row(0, named=True)
        source = chance.chance_source(row, self.prep.metric)
        if (
            source is None
            or runs.get_column("chance").n_unique() != 1
            or runs.get_column("chance")[0] is None
        ):
            return None
        f = {c: row[c] for c in self.prep.task_columns}
        if "status" in runs.columns:
            f["status"] = "FINISHED"
        level = float(runs.get_column("chance")[0])
        metric = self.prep.metric
        ch = self.add(
            Number(
                name=f"chance({metric})[{task}]",
                value=level,
                text=fmt(level),
                op="chance",
                column=source,
                filter=f,
                metric=metric,
            )
        )
        limit = chance.threshold(level, metric, self.prep.margin)
        th = self.add(
            Number(
                name=f"threshold({metric})[{task}]",
                value=limit,
                text=fmt(limit),
                op="threshold",
                operands=[ch.name],
                margin=self.prep.margin,
                metric=metric,
            )
        )
        return ch, th

    def count_learned(self, config_key: str, threshold: Number, tag: str) -> Number:
        sel = self._rows(config_key)
        value = int(sel.get_column("learned").sum())
        return self.add(
            Number(
                name=f"learned[{tag}]",
                value=float(value),
                text=fmt(value, "count"),
                op="count_learned",
                column=self.prep.metric,
                filter=self._filter(config_key),
                run_ids=sorted(sel.get_column("run_id").to_list()),
                operands=[threshold.name],
                sign=self.prep.sign(),
            )
        )

    # ----------------------------------------------------------------- curves at a budget

    def budget(self, x: str, key: str, run_ids: list[str], value: float, tag: str) -> Number:
        return self.add(
            Number(
                name=f"budget[{tag}]",
                value=value,
                text=fmt(value),
                op="budget",
                x=x,
                curve_key=key,
                run_ids=sorted(run_ids),
            )
        )

    def at_budget(self, x: str, key: str, budget: Number, values: dict[str, float], tag: str) -> Number:
        """Mean over runs of the curve value reached at ``budget``; its per-run values kept for intervals."""
        ids = sorted(values)
        value = sum(values[r] for r in ids) / len(ids)
        number = self.add(
            Number(
                name=f"at_budget[{tag}]",
                value=value,
                text=fmt(value),
                op="at_budget",
                x=x,
                curve_key=key,
                budget=budget.name,
                run_ids=ids,
            )
        )
        self.samples[number.name] = [values[r] for r in ids]
        return number


def is_recall(column: str) -> bool:
    return column.startswith("recall_gap.")


def model_row(b: Builder, task: str, size: str, model: str) -> dict[str, Any] | None:
    rows = b.means.filter((pl.col("task") == task) & (pl.col("size") == size) & (pl.col("model") == model))
    return rows.row(0, named=True) if rows.height else None


def comparable(row: dict[str, Any] | None) -> bool:
    """A group may enter a comparison only when every one of its seeds learned (or chance is unknown)."""
    return row is not None and row["status"] in analysis.COMPARABLE


def where(task: str, size: str, n_tasks: int) -> str:
    return f"At {size}" + (f" on {task}" if n_tasks > 1 else "")
