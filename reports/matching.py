"""Palimpsa against each baseline under four matchings: equal parameters, state, training time and FLOPs.

A size grid compares models at equal width, which is neither equal parameters nor equal state
(Palimpsa's importance state doubles its recurrent state) nor equal compute. Here each matching
picks its own partner: the baseline config nearest in parameters or in state elements (within
:data:`TOLERANCE`), or the same size read off the learning curves at the budget both runs reached
in training time or in FLOPs. Every cell is a verdict with its interval, or the reason there is none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from reports import analysis
from reports.comparisons import one_side_unlearned, reference_kind, tasks_of
from reports.numbers import (
    Builder,
    Comparison,
    Finding,
    Number,
    comparable,
    comparison_clause,
    model_row,
    where,
)
from reports.tables import size_order

TOLERANCE = 1.25  # a partner's parameters or state must lie within this factor of Palimpsa's
MATCHINGS = {
    "params": "equal parameters",
    "state": "equal state",
    "wall": "equal training time",
    "flops_at": "equal FLOPs",
}
BASELINE_KINDS = ("gated_deltanet", "mamba2", "deltanet")


@dataclass
class Match:
    """One cell of the side-by-side table: Palimpsa at ``size`` against ``baseline`` under ``matching``."""

    task: str
    size: str
    size_rank: int
    baseline: str
    matching: str
    partner_size: str | None = None
    comparison: Comparison | None = None
    note: str = ""  # why there is no comparison
    numbers: list[Number] = field(default_factory=list)  # the matched quantities behind the cell
    text: str = ""  # the finding's sentence, when there is a comparison


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def baselines(b: Builder) -> list[str]:
    """Every baseline kind's main label, the strongest (the versus reference) first."""
    ref = reference_kind(b)
    kinds = sorted(BASELINE_KINDS, key=lambda k: k != ref)
    return [lab for k in kinds if (lab := analysis.main_label(b.prep, k))]


def _nearest(groups: pl.DataFrame, column: str, value: float) -> dict | None:
    rows = [r for r in groups.iter_rows(named=True) if r.get(column)]
    if not rows or not value:
        return None
    return min(rows, key=lambda r: (abs(math.log(r[column] / value)), r["size_rank"]))


def _by_size_match(b: Builder, m: Match, a: dict, partners: pl.DataFrame, kind: str) -> None:
    """Equal parameters or equal state: the partner nearest in that quantity, within the tolerance."""
    column = "num_params" if kind == "params" else "state_elements"
    unit = "parameters" if kind == "params" else "state floats"
    partner = _nearest(partners, column, a.get(column) or 0.0)
    if partner is None:
        m.note = f"no {column}"
        return
    m.partner_size = partner["size"]
    ratio = a[column] / partner[column]
    if not 1 / TOLERANCE <= ratio <= TOLERANCE:
        m.note = f"no {m.baseline} within x{TOLERANCE:g} of its {unit}"
        return
    if not (comparable(a) and comparable(partner)):
        m.note = "not learned in every seed"
        return
    ta = f"{a['model']}@{a['size']}@{m.task}"
    tb = f"{partner['model']}@{partner['size']}@{m.task}"
    if kind == "params":
        va, vb = b.mean(a["config_key"], "num_params", ta), b.mean(partner["config_key"], "num_params", tb)
    else:
        va, vb = b.state(a["config_key"], ta), b.state(partner["config_key"], tb)
    r = b.ratio(va, vb, f"{kind} {ta}/{tb}")
    c = b.compare(
        a, partner, f"{kind} {a['model']}-{partner['model']}@{a['size']}-{partner['size']}@{m.task}"
    )
    m.comparison, m.numbers = c, [va, vb, r]
    m.text = (
        f"{_capital(MATCHINGS[kind])}: {a['model']} at {a['size']} ({va.text} {unit}) against "
        f"{partner['model']} at {partner['size']} ({vb.text}, ratio {r.text}); "
        f"{comparison_clause(c, a['model'], partner['model'])}."
    )


def _values_at(pts: pl.DataFrame, run_ids: list[str], x: str) -> tuple[float, dict[str, float]] | None:
    """(budget, run -> last curve value at or before it): the budget is the smallest final spend."""
    d = pts.filter(pl.col("run_id").is_in(run_ids) & pl.col(x).is_not_null())
    if d.get_column("run_id").n_unique() < len(run_ids):
        return None
    budget = float(d.group_by("run_id").agg(pl.col(x).max()).get_column(x).min())
    within = d.filter(pl.col(x) <= budget * (1 + 1e-9)).sort("run_id", x)
    last = within.group_by("run_id", maintain_order=True).last()
    if last.height < len(run_ids):
        return None
    return budget, dict(
        zip(last.get_column("run_id").to_list(), last.get_column("value").to_list(), strict=True)
    )


def _budget_match(b: Builder, m: Match, a: dict, partner: dict | None, kind: str, pts: pl.DataFrame) -> None:
    """Equal training time or FLOPs: both at the same size, read off their curves at a common budget."""
    prep = b.prep
    if partner is None:
        m.note = f"no {m.baseline} at this size"
        return
    m.partner_size = partner["size"]
    if pts.height == 0 or kind not in pts.columns:
        m.note = "no curves"
        return
    got = _values_at(pts, [*a["run_ids"], *partner["run_ids"]], kind)
    if got is None:
        m.note = "a run has no evaluation within the budget"
        return
    budget_value, values = got
    limit = a["threshold"]
    if limit is not None and not all(
        v > limit if prep.higher_is_better else v < limit for v in values.values()
    ):
        m.note = "not learned at the budget in every seed"
        return
    key = analysis.curve_key(prep)
    tag = f"{kind} {a['model']}-{partner['model']}@{a['size']}@{m.task}"
    budget = b.budget(kind, key, list(values), budget_value, tag)
    mean_a = b.at_budget(
        kind, key, budget, {r: values[r] for r in a["run_ids"]}, f"{kind}@{a['model']}@{tag}"
    )
    mean_b = b.at_budget(
        kind, key, budget, {r: values[r] for r in partner["run_ids"]}, f"{kind}@{partner['model']}@{tag}"
    )
    n_a = b.count(a["config_key"], f"{a['model']}@{a['size']}@{m.task}")
    n_b = b.count(partner["config_key"], f"{partner['model']}@{partner['size']}@{m.task}")
    sign = prep.sign()
    c = b.compare_numbers(a, partner, mean_a, mean_b, n_a, n_b, tag, sign, b.bounds_of("quality"))
    unit = "s of optimizer steps" if kind == "wall" else "FLOPs"
    m.comparison, m.numbers = c, [budget]
    m.text = (
        f"{_capital(MATCHINGS[kind])} ({budget.text} {unit}, the smaller final spend), {key} reached: "
        f"{comparison_clause(c, a['model'], partner['model'])}."
    )


def matches(b: Builder) -> list[Match]:
    """Every (Palimpsa size, baseline, matching) cell, with a comparison or the reason for none."""
    prep = b.prep
    pal = analysis.main_label(prep, "palimpsa")
    if pal is None or b.means.height == 0:
        return []
    pts = analysis.curve_points(prep)
    out = []
    for task in b.means.get_column("task").unique().sort().to_list():
        groups = b.means.filter(pl.col("task") == task)
        for size in size_order(prep):
            rows = groups.filter((pl.col("model") == pal) & (pl.col("size") == size))
            if rows.height == 0:
                continue
            a = rows.row(0, named=True)
            for base in baselines(b):
                partners = groups.filter(pl.col("model") == base)
                if partners.height == 0:
                    continue
                same = partners.filter(pl.col("size") == size)
                for kind in MATCHINGS:
                    m = Match(task, size, a["size_rank"], base, kind)
                    if kind in ("params", "state"):
                        _by_size_match(b, m, a, partners, kind)
                    else:
                        _budget_match(b, m, a, same.row(0, named=True) if same.height else None, kind, pts)
                    out.append(m)
    return out


def twins(b: Builder) -> list[tuple[str, str]]:
    """Each metaplastic model with its twin without metaplasticity: Palimpsa with Palimpsa (meta off),
    MetaMamba2 with Mamba2 (the same recurrence with the importance state dropped)."""
    prep, out = b.prep, []
    for on, off in (
        (analysis.main_label(prep, "palimpsa", True), analysis.main_label(prep, "palimpsa", False)),
        (analysis.main_label(prep, "metamamba2"), analysis.main_label(prep, "mamba2")),
    ):
        if on and off:
            out.append((on, off))
    return out


def equal_state_twins(b: Builder) -> list[Finding]:
    """The paper's capacity claim as asked: a metaplastic model against its twin at equal recurrent state.

    At equal width the metaplastic side carries twice the state (its importance state), so each of its
    sizes is matched with the twin's size nearest in state elements (within :data:`TOLERANCE`).
    """
    out = []
    tasks = tasks_of(b)
    for on, off in twins(b):
        for task in tasks:
            groups = b.means.filter(pl.col("task") == task)
            partners = groups.filter(pl.col("model") == off)
            for size in size_order(b.prep):
                rows = groups.filter((pl.col("model") == on) & (pl.col("size") == size))
                if rows.height == 0 or partners.height == 0:
                    continue
                a = rows.row(0, named=True)
                m = Match(task, size, a["size_rank"], off, "state")
                _by_size_match(b, m, a, partners, "state")
                head = f"{where(task, size, len(tasks))}, against {off}. "
                if m.comparison is not None:
                    out.append(Finding("metaplasticity", head + m.text, [*m.numbers, *m.comparison.numbers]))
                elif m.note == "not learned in every seed":
                    partner = model_row(b, task, m.partner_size, off)
                    pair = f"Equal state: {on} at {size} against {off} at {m.partner_size}"
                    count = one_side_unlearned(b, task, a, partner, head + pair)
                    out += [count] if count else []
    return out


def findings(b: Builder, cells: list[Match]) -> list[Finding]:
    n_tasks = len(tasks_of(b))
    return [
        Finding(
            "matched",
            f"{where(m.task, m.size, n_tasks)}, against {m.baseline}. {m.text}",
            [*m.numbers, *m.comparison.numbers],
        )
        for m in cells
        if m.comparison is not None
    ]
