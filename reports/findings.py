"""Findings computed from the runs table: sentences whose every number carries its own recipe.

Each :class:`Number` records how it was obtained (an operation, the raw-table columns and the
equality filter that select its runs, the run ids, or the other numbers it combines), so a test
can recompute every number in every sentence from the exported tables alone. Nothing here is
hand-written prose about results: a sentence exists only when the data for it exists.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from reports import analysis
from reports.tables import Prepared, size_order


@dataclass
class Number:
    """One number of a sentence and its recipe.

    ``op``: ``mean`` / ``count`` (column over the raw runs matching ``filter``), ``diff``
    (``sign * (a - b)`` of two operands), ``ratio`` (``a / b``), ``corr`` (Pearson r of the first
    half of the operands against the second half), ``budget`` (smallest final ``x`` over ``run_ids``)
    and ``at_budget`` (mean over ``run_ids`` of the last ``curve_key`` value with ``x <= budget``).
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


@dataclass
class Finding:
    section: str
    text: str
    numbers: list[Number]

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "text": self.text, "numbers": [asdict(n) for n in self.numbers]}


SECTIONS = {
    "ranking": "Best model per size",
    "versus": "Palimpsa against its strongest baseline",
    "metaplasticity": "Where metaplasticity helps",
    "trend": "Scale trend and the factors that move with it",
    "gates": "Paper against official gate parameterization",
    "prior": "The prior continuum",
    "throughput": "Measured throughput",
    "compute": "Compute-matched comparison",
}


def fmt(value: float, kind: str = "value") -> str:
    """The printed form of a number; tests compare recomputed values through the same function."""
    if kind == "signed":
        return f"{value:+.1e}" if 0 < abs(value) < 5e-4 else f"{value:+.3f}"
    if kind == "ratio" or kind == "corr":
        return f"{value:.2f}"
    if kind == "count":
        return str(int(value))
    a = abs(value)
    if a >= 1e5 or (0 < a < 1e-3):
        return f"{value:.3g}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


class _Builder:
    """Collects numbers with unique names while sentences are assembled."""

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.key_cols = ["model.mixer.kind", *prep.task_columns, *prep.size_columns, *prep.variant_columns]
        self.key_cols = list(dict.fromkeys(c for c in self.key_cols if c in prep.selected.columns))
        self.means = analysis.model_means(prep)
        self.numbers: dict[str, Number] = {}

    def _filter(self, config_key: str, with_lr: bool = True) -> dict[str, Any]:
        row = self.prep.selected.filter(pl.col("config_key") == config_key).row(0, named=True)
        f = {c: row[c] for c in self.key_cols}
        if with_lr:
            f["train.lr"] = row["train.lr"]
        if "status" in self.prep.selected.columns:
            f["status"] = "FINISHED"
        return f

    def add(self, number: Number) -> Number:
        base, i = number.name, 1
        while number.name in self.numbers:
            i += 1
            number.name = f"{base}#{i}"
        self.numbers[number.name] = number
        return number

    def mean(self, config_key: str, column: str, tag: str) -> Number:
        sel = self.prep.selected.filter(pl.col("config_key") == config_key)
        vals = sel.filter(pl.col(column).is_not_null()).get_column(column)
        value = float(vals.mean())
        source = self.prep.metric if column == "quality" else column  # the runs table's own column
        return self.add(
            Number(
                name=f"mean({source})[{tag}]",
                value=value,
                text=fmt(value),
                op="mean",
                column=source,
                filter=self._filter(config_key),
                run_ids=sorted(sel.get_column("run_id").to_list()),
            )
        )

    def count(self, config_key: str, tag: str) -> Number:
        sel = self.prep.selected.filter(pl.col("config_key") == config_key)
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


def _model_row(b: _Builder, task: str, size: str, model: str) -> dict[str, Any] | None:
    rows = b.means.filter((pl.col("task") == task) & (pl.col("size") == size) & (pl.col("model") == model))
    return rows.row(0, named=True) if rows.height else None


def _where(task: str, size: str, n_tasks: int) -> str:
    return f"At {size}" + (f" on {task}" if n_tasks > 1 else "")


def _better_word(delta: float) -> str:
    return "exceeds" if delta > 0 else ("trails" if delta < 0 else "equals")


def ranking(b: _Builder) -> list[Finding]:
    out, prep = [], b.prep
    tasks = b.means.get_column("task").unique().sort().to_list()
    for task in tasks:
        for size in size_order(prep):
            m = b.means.filter((pl.col("task") == task) & (pl.col("size") == size))
            if m.height < 2:
                continue
            best = m.sort("mean", descending=prep.higher_is_better).row(0, named=True)
            mean = b.mean(best["config_key"], "quality", f"{best['model']}@{size}@{task}")
            n = b.count(best["config_key"], f"{best['model']}@{size}@{task}")
            text = (
                f"{_where(task, size, len(tasks))}, the best model is {best['model']} with "
                f"{prep.metric} {mean.text} (mean over {n.text} seed{'s' if n.value != 1 else ''} "
                f"at lr {fmt_lr(best['train.lr'])})."
            )
            out.append(Finding("ranking", text, [mean, n]))
    return out


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def _compare(
    b: _Builder, task: str, size: str, a_row, b_row, section: str, n_tasks: int, what: str = ""
) -> Finding:
    prep = b.prep
    tag = f"{a_row['model']}-{b_row['model']}@{size}@{task}"
    ma = b.mean(a_row["config_key"], "quality", f"{a_row['model']}@{size}@{task}")
    mb = b.mean(b_row["config_key"], "quality", f"{b_row['model']}@{size}@{task}")
    na = b.count(a_row["config_key"], f"{a_row['model']}@{size}@{task}")
    nb = b.count(b_row["config_key"], f"{b_row['model']}@{size}@{task}")
    d = b.diff(ma, mb, tag, prep.sign())
    raw = ma.value - mb.value
    better = _better_word(raw if prep.higher_is_better else -raw)
    text = (
        f"{_where(task, size, n_tasks)}, {a_row['model']}'s {prep.metric} {better} {b_row['model']}'s{what}: "
        f"{ma.text} against {mb.text}, a difference of {d.text} (positive: {a_row['model']} better; "
        f"mean over {na.text} and {nb.text} seeds, each at its best lr)."
    )
    return Finding(section, text, [ma, mb, na, nb, d])


def versus(b: _Builder) -> list[Finding]:
    prep = b.prep
    pal = analysis.main_label(prep, "palimpsa")
    if pal is None:
        return []
    ref_kind = next(
        (k for k in ("gated_deltanet", "mamba2", "deltanet") if analysis.main_label(prep, k)), None
    )
    if ref_kind is None:
        return []
    ref = analysis.main_label(prep, ref_kind)
    tasks = b.means.get_column("task").unique().sort().to_list()
    out = []
    for task in tasks:
        for size in size_order(prep):
            a_row, b_row = _model_row(b, task, size, pal), _model_row(b, task, size, ref)
            if a_row and b_row:
                out.append(_compare(b, task, size, a_row, b_row, "versus", len(tasks)))
    return out


def metaplastic_deltas(b: _Builder) -> tuple[list[Finding], list[tuple[str, str, Number]], str]:
    """Per size: metaplastic Palimpsa against its twin with metaplasticity off (else against Mamba2)."""
    prep = b.prep
    pairs = analysis.paired_delta(prep, "model.mixer.metaplastic", True, False, kinds=("palimpsa",))
    main = analysis.main_label(prep, "palimpsa")
    rows: list[tuple[str, str, dict, dict]] = []
    if pairs.height:
        for p in analysis.sorted_by_size(prep, pairs).iter_rows(named=True):
            if p["model"] != main:
                continue
            a_row = _model_row(b, p["task"], p["size"], p["model"])
            b_row = _model_row(b, p["task"], p["size"], p["model_b"])
            rows.append((p["task"], p["size"], a_row, b_row))
        baseline = "its twin with metaplasticity off (no precision gate)"
    else:
        mamba = analysis.main_label(prep, "mamba2")
        if main is None or mamba is None:
            return [], [], ""
        for task in b.means.get_column("task").unique().sort().to_list():
            for size in size_order(prep):
                a_row, b_row = _model_row(b, task, size, main), _model_row(b, task, size, mamba)
                if a_row and b_row:
                    rows.append((task, size, a_row, b_row))
        baseline = "Mamba2, its Ip -> infinity limit"
    n_tasks = len({r[0] for r in rows})
    findings, deltas = [], []
    for task, size, a_row, b_row in rows:
        f = _compare(b, task, size, a_row, b_row, "metaplasticity", n_tasks)
        findings.append(f)
        deltas.append((task, size, f.numbers[-1]))
    return findings, deltas, baseline


def _factor_means(b: _Builder, task: str, size: str, label: str, column: str) -> Number | None:
    row = _model_row(b, task, size, label)
    if row is None or column not in b.prep.selected.columns:
        return None
    sel = b.prep.selected.filter((pl.col("config_key") == row["config_key"]) & pl.col(column).is_not_null())
    if sel.height == 0:
        return None
    return b.mean(row["config_key"], column, f"{label}@{size}@{task}")


FACTORS = {
    "diag.consolidated": "fraction consolidated",
    "diag.horizon": "memory horizon",
    "diag.lr_eff": "effective learning rate 1/I",
}


def trend(b: _Builder, deltas: list[tuple[str, str, Number]], baseline: str) -> list[Finding]:
    """Where the metaplastic delta is positive, where it stops, and what moves with it across sizes."""
    prep = b.prep
    out = []
    main = analysis.main_label(prep, "palimpsa")
    gdn = analysis.main_label(prep, "gated_deltanet")
    for task in sorted({t for t, _, _ in deltas}):
        series = [(s, d) for t, s, d in deltas if t == task]
        where = f" on {task}" if len({t for t, _, _ in deltas}) > 1 else ""
        helps = [s for s, d in series if d.value > 0]
        nums = [d for _, d in series]
        if len(series) == 1:
            continue
        if len(helps) == len(series):
            text = (
                f"Metaplasticity helps{where} at every measured size, "
                f"against {baseline}: the delta runs {', '.join(f'{d.text} at {s}' for s, d in series)}."
            )
        elif not helps:
            text = (
                f"Metaplasticity does not help{where} at any measured size against {baseline}: the delta "
                "runs "
                f"{', '.join(f'{d.text} at {s}' for s, d in series)}."
            )
        else:
            stop = next(
                (
                    s
                    for i, (s, d) in enumerate(series)
                    if d.value <= 0 and any(dd.value > 0 for _, dd in series[:i])
                ),
                None,
            )
            text = (
                f"Metaplasticity helps{where} at {', '.join(helps)} against {baseline}"
                + (f"; the help stops at {stop}" if stop else "")
                + f": the delta runs {', '.join(f'{d.text} at {s}' for s, d in series)}."
            )
        out.append(Finding("trend", text, nums))

        # Measured factors across the same sizes: importance diagnostics and the throughput ratio.
        factor_series: dict[str, list[Number]] = {}
        for column, label in FACTORS.items():
            vals = [_factor_means(b, task, s, main, column) for s, _ in series]
            if all(v is not None for v in vals):
                factor_series[f"{main}'s {label}"] = vals
        operands: list[Number] = []  # the means behind ratios, kept so every recipe resolves
        if gdn is not None and "tokens_per_second" in prep.selected.columns:
            ratios = []
            for s, _ in series:
                a = _factor_means(b, task, s, main, "tokens_per_second")
                g = _factor_means(b, task, s, gdn, "tokens_per_second")
                ratios.append(b.ratio(a, g, f"tps {main}/{gdn}@{s}@{task}") if a and g else None)
                operands += [n for n in (a, g) if n is not None]
            if all(r is not None for r in ratios):
                factor_series[f"{main}'s throughput relative to {gdn}"] = ratios
        for label, vals in factor_series.items():
            moves = ", ".join(f"{v.text} at {s}" for (s, _), v in zip(series, vals, strict=True))
            r = b.corr(nums, vals, f"delta~{label}@{task}")
            corr = f"; its Pearson correlation with the delta across these sizes is {r.text}" if r else ""
            text = f"Across sizes{where}, {label} runs {moves}{corr}."
            extra = operands if "throughput" in label else []
            out.append(Finding("trend", text, [*vals, *([r] if r else []), *extra]))
    return out


def gates(b: _Builder) -> list[Finding]:
    prep = b.prep
    pairs = analysis.paired_delta(prep, "model.mixer.gates", "paper", "official")
    out = []
    n_tasks = pairs.get_column("task").n_unique() if pairs.height else 0
    for p in analysis.sorted_by_size(prep, pairs).iter_rows(named=True) if pairs.height else []:
        a_row = _model_row(b, p["task"], p["size"], p["model"])
        b_row = _model_row(b, p["task"], p["size"], p["model_b"])
        out.append(_compare(b, p["task"], p["size"], a_row, b_row, "gates", n_tasks))
    return out


def prior(b: _Builder) -> list[Finding]:
    prep = b.prep
    col = "model.mixer.ip"
    fam = analysis.ip_families(prep)
    if fam.height == 0:
        return []
    out = []
    tasks = b.means.get_column("task").unique().sort().to_list()
    for (task, size, family), grp in fam.group_by("task", "size", "family", maintain_order=True):
        ips = grp.select("config_key", col).unique(subset="config_key").sort(col)
        means = [
            (row[col], b.mean(row["config_key"], "quality", f"Ip={row[col]:g}@{family}@{size}@{task}"))
            for row in ips.iter_rows(named=True)
        ]
        best = (max if prep.higher_is_better else min)(means, key=lambda m: m[1].value)
        listing = ", ".join(f"Ip={ip:g}: {m.text}" for ip, m in means)
        text = (
            f"{_where(task, size, len(tasks))}, {family}'s best prior precision is "
            f"Ip={best[0]:g} ({prep.metric} by Ip, {listing})."
        )
        out.append(Finding("prior", text, [m for _, m in means]))
    return out


def throughput(b: _Builder) -> list[Finding]:
    prep = b.prep
    main, gdn = analysis.main_label(prep, "palimpsa"), analysis.main_label(prep, "gated_deltanet")
    if main is None or gdn is None or "tokens_per_second" not in prep.selected.columns:
        return []
    tasks = b.means.get_column("task").unique().sort().to_list()
    out = []
    for task in tasks:
        for size in size_order(prep):
            a = _factor_means(b, task, size, main, "tokens_per_second")
            g = _factor_means(b, task, size, gdn, "tokens_per_second")
            if a is None or g is None:
                continue
            r = b.ratio(a, g, f"tps {main}/{gdn}@{size}@{task}")
            text = (
                f"{_where(task, size, len(tasks))}, {main} trains at {r.text} times {gdn}'s throughput "
                f"({a.text} against {g.text} tokens/s, mean over seeds)."
            )
            out.append(Finding("throughput", text, [a, g, r]))
    return out


def compute_matched(b: _Builder) -> list[Finding]:
    prep = b.prep
    pts = analysis.curve_points(prep)
    key = analysis.curve_key(prep)
    out = []
    if pts.height == 0:
        return out
    n_tasks = pts.get_column("task").n_unique()
    for x, label, unit in (("wall", "training-time budget", " s"), ("flops_at", "FLOPs budget", " FLOPs")):
        vals = analysis.values_at_budget(pts, x)
        if vals.height == 0:
            continue
        for (task, size), grp in analysis.sorted_by_size(prep, vals).group_by(
            "task", "size", maintain_order=True
        ):
            if grp.get_column("model").n_unique() < 2:
                continue  # a budget comparison needs two models
            group_runs = pts.filter((pl.col("task") == task) & (pl.col("size") == size))
            budget_value = float(grp.get_column("budget")[0])
            budget = b.add(
                Number(
                    name=f"budget[{x}@{size}@{task}]",
                    value=budget_value,
                    text=fmt(budget_value),
                    op="budget",
                    x=x,
                    curve_key=key,
                    run_ids=sorted(group_runs.get_column("run_id").unique().to_list()),
                )
            )
            per_model = []
            for (model,), mg in grp.group_by("model", maintain_order=True):
                value = float(mg.get_column("value").mean())
                per_model.append(
                    b.add(
                        Number(
                            name=f"at_budget[{x}@{model}@{size}@{task}]",
                            value=value,
                            text=fmt(value),
                            op="at_budget",
                            x=x,
                            curve_key=key,
                            budget=budget.name,
                            run_ids=sorted(mg.get_column("run_id").to_list()),
                        )
                    )
                )
            models = [m for (m,), _ in grp.group_by("model", maintain_order=True)]
            order = sorted(
                zip(models, per_model, strict=True), key=lambda mv: mv[1].value, reverse=prep.higher_is_better
            )
            listing = ", ".join(f"{m} {v.text}" for m, v in order)
            everyone = pts.filter((pl.col("task") == task) & (pl.col("size") == size)).get_column("model")
            late = sorted(set(everyone.to_list()) - set(models))
            missing = f"; not yet evaluated within the budget: {', '.join(late)}" if late else ""
            text = (
                f"{_where(task, size, n_tasks)} and an equal {label} of {budget.text}{unit}, {key} reached "
                f"is: {listing} (mean over seeds at the best lr){missing}."
            )
            out.append(Finding("compute", text, [budget, *per_model]))
    return out


def compute_findings(prep: Prepared) -> list[Finding]:
    """Every finding the data supports, in report order."""
    b = _Builder(prep)
    findings = ranking(b) + versus(b)
    meta, deltas, baseline = metaplastic_deltas(b)
    findings += meta + trend(b, deltas, baseline) + gates(b) + prior(b) + throughput(b) + compute_matched(b)
    for f in findings:
        for n in f.numbers:
            if isinstance(n.value, float) and math.isnan(n.value):
                raise ValueError(f"finding number {n.name} is NaN: {f.text}")
    return findings


def all_numbers(findings: list[Finding]) -> dict[str, Number]:
    return {n.name: n for f in findings for n in f.numbers}
