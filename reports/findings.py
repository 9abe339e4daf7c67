"""Findings computed from the runs table: sentences whose every number carries its own recipe.

Nothing here is hand-written prose about results: a sentence exists only when the data for it
exists. Runs are screened against chance first (:mod:`reports.chance`); every comparison is a
verdict with its interval (:mod:`reports.numbers`); trends and factors need three learned sizes
(:mod:`reports.scaling`). Sections that would say nothing get a note saying why instead.
"""

from __future__ import annotations

import math

from reports import capacity, comparisons, matching, recall, scaling
from reports.numbers import Builder, Finding, Number, fmt  # noqa: F401  (re-exported)
from reports.tables import Prepared

SECTIONS = {
    "learned": "Which runs learned",
    "ranking": "Best model per size",
    "versus": "Palimpsa against its strongest baseline",
    "metaplasticity": "Where metaplasticity helps",
    "trend": "How the gap moves with scale",
    "why": "Why the gap moves with scale",
    "matched": "Matched comparisons: equal parameters, state, training time and FLOPs",
    "recall": "Recall against key-to-query distance",
    "capacity": "One model at two loads, the same state per stored pair",
    "gates": "Paper against official gate parameterization",
    "prior": "The prior continuum",
    "throughput": "Measured throughput",
}
# Sections that compare model quality: empty unless a run they compare learned (a verdict needs both sides
# learned in every seed; where one side did and the other did not, a count says so instead).
QUALITY_SECTIONS = (
    "ranking",
    "versus",
    "metaplasticity",
    "trend",
    "why",
    "matched",
    "recall",
    "capacity",
    "gates",
    "prior",
)


def collect(prep: Prepared) -> tuple[list[Finding], dict[str, str]]:
    """Every finding the data supports, in report order, and per empty section the reason it is empty."""
    b = Builder(prep)
    learned, notes = comparisons.screening(b)
    versus, ref_gaps, ref = comparisons.versus(b)
    meta, meta_gaps, meta_baseline = comparisons.metaplasticity(b)
    gaps: dict[str, list] = {}
    if ref is not None:
        gaps[ref] = ref_gaps
    if meta_baseline is not None:
        gaps.setdefault(meta_baseline, meta_gaps)
    series = [s for label, gs in gaps.items() for s in scaling.gap_series(b, gs, label)]
    n_tasks = len({s.task for s in series})
    cells = matching.matches(b)
    findings = (
        learned
        + comparisons.ranking(b)
        + versus
        + meta
        + matching.equal_state_twins(b)
        + comparisons.metamamba2_vs_mamba2(b)
        + scaling.trend(b, series, n_tasks)
        + scaling.why(b, series, n_tasks)
        + matching.findings(b, cells)
        + recall.findings(b)
        + capacity.load_findings(b)
        + comparisons.gates(b)
        + comparisons.prior(b)
        + comparisons.throughput(b)
    )
    for f in findings:
        for n in f.numbers:
            if isinstance(n.value, float) and math.isnan(n.value):
                raise ValueError(f"finding number {n.name} is NaN: {f.text}")
    if gaps and not series:
        reason = scaling.not_enough(gaps)
        if reason:
            notes.setdefault("trend", reason)
            notes.setdefault("why", reason)
    if cells and not any(m.comparison for m in cells):
        notes["matched"] = (
            "No matched pair in which both sides learned in every seed; the table below gives each reason."
        )
    return findings, notes


def compute_findings(prep: Prepared) -> list[Finding]:
    """Every finding the data supports, in report order."""
    return collect(prep)[0]


def all_numbers(findings: list[Finding]) -> dict[str, Number]:
    return {n.name: n for f in findings for n in f.numbers}
