"""One model at two loads with the same recurrent state per stored key-value pair.

The capacity figure puts every run at its state per stored pair; if what a model recalls were set by
that alone, its runs at two loads (``task.num_kv_pairs``) with the same state per pair would agree. This
section tests that directly: each model's config at the higher load against its config at the lower load
nearest in state per pair (within :data:`reports.matching.TOLERANCE`). Both sides learned in every seed:
a verdict with its interval. One side did and the other did not: each side's count of learned seeds.
Neither: nothing to say beyond the screen.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from reports.matching import TOLERANCE
from reports.numbers import Builder, Finding, comparable, comparison_clause

SECTION = "capacity"


def _pairs_of(b: Builder) -> dict[str, int]:
    """task label -> its number of stored pairs, for the tasks that have one."""
    if "task.num_kv_pairs" not in b.prep.selected.columns:
        return {}
    rows = b.prep.selected.select("task", "task.num_kv_pairs").unique().drop_nulls()
    compared = set(b.means.get_column("task"))
    return {t: int(p) for t, p in rows.iter_rows() if t in compared}


def _lighter(b: Builder, pairs: dict[str, int]) -> dict[str, list[str]]:
    """task -> the tasks that differ from it only in holding fewer pairs (same length, vocabulary, ...)."""
    others = [c for c in b.prep.task_columns if c != "task.num_kv_pairs" and c in b.prep.selected.columns]
    if others:
        rest = {t: b.prep.selected.filter(pl.col("task") == t).select(others).unique().rows() for t in pairs}
    else:  # the load is the only task column: every task is the same task at another load
        rest = {t: [()] for t in pairs}
    return {
        t: [u for u in pairs if pairs[u] < pairs[t] and len(rest[t]) == 1 and rest[u] == rest[t]]
        for t in pairs
    }


def _per_pair(row: dict[str, Any], pairs: int) -> float | None:
    s = row.get("state_elements")
    return s / pairs if s else None


def _counts(b: Builder, row: dict[str, Any], tag: str) -> tuple[list, str] | None:
    """(numbers, "k of n") of ``row``'s learned seeds against its own task's threshold."""
    levels = b.chance(row["task"])
    if levels is None:
        return None
    k = b.count_learned(row["config_key"], levels[1], tag)
    n = b.count(row["config_key"], tag)
    return [*levels, k, n], f"{k.text} of {n.text}"


def load_findings(b: Builder) -> list[Finding]:
    """Each model at a higher load against itself at a lower one, at the same state per stored pair."""
    pairs = _pairs_of(b)
    lighter = _lighter(b, pairs)
    out = []
    for model in b.means.get_column("model").unique().sort().to_list():
        rows = b.means.filter(pl.col("model") == model).sort("task", "size_rank").to_dicts()
        for a in rows:
            lower = [r for r in rows if r["task"] in lighter.get(a["task"], [])]
            partner = _nearest_per_pair(a, lower, pairs)
            finding = _one(b, model, a, partner, pairs) if partner else None
            out += [finding] if finding else []
    return out


def _nearest_per_pair(a: dict[str, Any], candidates: list[dict], pairs: dict[str, int]) -> dict | None:
    """The candidate nearest ``a`` in state per stored pair, within the tolerance; ties: the higher load."""
    x = _per_pair(a, pairs[a["task"]])
    scored = [(r, y) for r in candidates if x and (y := _per_pair(r, pairs[r["task"]]))]
    near = [(abs(math.log(x / y)), -pairs[r["task"]], i) for i, (r, y) in enumerate(scored)
            if 1 / TOLERANCE <= x / y <= TOLERANCE]  # fmt: skip
    return scored[min(near)[2]][0] if near else None


def _one(b: Builder, model: str, a: dict, partner: dict, pairs: dict[str, int]) -> Finding | None:
    ta, tb = f"{model}@{a['size']}@{a['task']}", f"{model}@{partner['size']}@{partner['task']}"
    sa, sb = b.state(a["config_key"], ta, per_pair=True), b.state(partner["config_key"], tb, per_pair=True)
    if sa is None or sb is None:
        return None
    r = b.ratio(sa, sb, f"per pair {ta}/{tb}")
    name_a, name_b = f"{pairs[a['task']]} pairs", f"{pairs[partner['task']]} pairs"
    head = (
        f"{model} at the same state per stored pair ({sa.text} floats with {name_a} at {a['size']}, "
        f"{sb.text} with {name_b} at {partner['size']}, ratio {r.text})"
    )
    if comparable(a) and comparable(partner):
        c = b.compare(a, partner, f"load {ta}-{tb}")
        return Finding(SECTION, f"{head}: {comparison_clause(c, name_a, name_b)}.", [sa, sb, r, *c.numbers])
    if comparable(a) == comparable(partner):
        return None  # neither learned in every seed: the screen says so
    got_a, got_b = _counts(b, a, ta), _counts(b, partner, tb)
    if got_a is None or got_b is None:
        return None
    text = f"{head}: learned in {got_a[1]} seeds with {name_a}, in {got_b[1]} with {name_b}; not compared."
    return Finding(SECTION, text, [sa, sb, r, *got_a[0], *got_b[0]])
