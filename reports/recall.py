"""Recall accuracy against key-to-query distance, from the ``recall_gap.<lo>-<hi>`` metrics of MQAR runs.

Each such column holds a run's accuracy on the queries whose key stood ``lo`` to ``hi`` tokens
before them (power-of-two bins). Where a mixer's memory fades with distance is the most direct
evidence of why it gains or loses with scale; when no run logged these metrics, the figure and
its finding are left out.
"""

from __future__ import annotations

import re

import polars as pl

from reports import analysis
from reports.comparisons import reference_kind, tasks_of
from reports.numbers import Builder, Finding, comparable, comparison_clause, interval_text, model_row, where
from reports.tables import Prepared, size_order

RECALL = re.compile(r"^recall_gap\.(\d+)-(\d+)$")


def recall_columns(df: pl.DataFrame) -> list[tuple[str, int, int]]:
    """``(column, lo, hi)`` of every recall-by-distance column with a value, nearest bin first."""
    out = []
    for col in df.columns:
        m = RECALL.match(col)
        if m and df.get_column(col).drop_nulls().len():
            out.append((col, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda c: (c[1], c[2]))


def bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def recall_long(prep: Prepared) -> pl.DataFrame:
    """One row per (selected run, distance bin): run_id, task, size, size_rank, model, seed, lo, hi, value."""
    cols = recall_columns(prep.selected)
    if not cols:
        return pl.DataFrame()
    index = ["run_id", "task", "size", "size_rank", "model", "seed"]
    long = prep.selected.select(*index, *[c for c, _, _ in cols]).unpivot(
        index=index, variable_name="column", value_name="value"
    )
    bins = pl.DataFrame(
        {"column": [c for c, _, _ in cols], "lo": [lo for _, lo, _ in cols], "hi": [hi for _, _, hi in cols]}
    )
    return (
        long.join(bins, on="column")
        .filter(pl.col("value").is_not_null())
        .sort("task", "size_rank", "model", "lo")
    )


def findings(b: Builder) -> list[Finding]:
    """Per size: each learned model's recall at the nearest and farthest distance, then Palimpsa against
    the strongest baseline at the farthest distance both logged."""
    prep = b.prep
    cols = recall_columns(prep.selected)
    if not cols:
        return []
    tasks = tasks_of(b)
    pal = analysis.main_label(prep, "palimpsa")
    kind = reference_kind(b)
    ref = analysis.main_label(prep, kind) if kind else None
    out = []
    for task in tasks:
        for size in size_order(prep):
            groups = [
                r
                for r in b.means.filter((pl.col("task") == task) & (pl.col("size") == size)).iter_rows(
                    named=True
                )
                if comparable(r)
            ]
            parts, numbers = [], []
            for r in groups:
                sel = prep.selected.filter(pl.col("config_key") == r["config_key"])
                have = [c for c in cols if sel.get_column(c[0]).null_count() == 0]
                if len(have) < 2:
                    continue
                near, far = have[0], have[-1]
                tag = f"{r['model']}@{size}@{task}"
                bounds = b.bounds_of(near[0])
                items = []
                for col, lo, hi in (near, far):
                    m = b.mean(r["config_key"], col, tag)
                    ci = b.interval(m, m.name, bounds)
                    numbers += [m, *(ci or ())]
                    items.append(
                        f"{m.text}{interval_text(ci) or ' (one seed)'} at distance {bin_label(lo, hi)}"
                    )
                parts.append(f"{r['model']} {' and '.join(items)}")
            if not parts:
                continue
            text = f"{where(task, size, len(tasks))}, recall by key-to-query distance: {'; '.join(parts)}."
            a_row, b_row = model_row(b, task, size, pal or ""), model_row(b, task, size, ref or "")
            if pal and ref and comparable(a_row) and comparable(b_row):
                sel = prep.selected.filter(
                    pl.col("config_key").is_in([a_row["config_key"], b_row["config_key"]])
                )
                both = [c for c in cols if sel.get_column(c[0]).null_count() == 0]
                if both:
                    col, lo, hi = both[-1]
                    c = b.compare(a_row, b_row, f"recall {pal}-{ref}@{size}@{task}@{col}", column=col)
                    numbers += c.numbers
                    text += (
                        f" At the farthest distance both logged ({bin_label(lo, hi)}): "
                        f"{comparison_clause(c, pal, ref)}."
                    )
            out.append(Finding("recall", text, numbers))
    return out
