"""How the Palimpsa-minus-baseline gap moves with scale, and which measured factor moves with it.

Both are stated only over sizes where Palimpsa and the baseline learned in every seed with at least
two seeds each (so that every gap has an interval), and only with at least three such sizes: a trend
is a least-squares slope per doubling of parameters with its t interval, and a factor "tracks" the
gap only when its Pearson r across those sizes is beyond what that few points can tell from no
relation (:func:`reports.stats.r_critical`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from reports.comparisons import Gap
from reports.numbers import Builder, Comparison, Finding, Number

MIN_SIZES = 3  # fewer learned sizes: no trend and no factor is stated

DIAG_FACTORS = {
    "diag.horizon": "memory horizon in tokens",
    "diag.consolidated": "fraction of consolidated synapses",
    "diag.lr_eff": "effective learning rate (inverse importance)",
}


@dataclass
class Factor:
    label: str
    values: list[Number]  # one per size of the series
    r: Number | None = None
    r_crit: Number | None = None
    support: list[Number] = field(default_factory=list)  # means behind ratios and differences


@dataclass
class GapSeries:
    """Palimpsa against one baseline over the sizes of one task where both learned."""

    task: str
    a_label: str
    b_label: str
    sizes: list[str]
    comparisons: list[Comparison]
    gaps: list[Number]  # Palimpsa minus baseline (positive: Palimpsa better), one per size
    params: list[Number] | None  # Palimpsa's parameter count per size (the trend's x)
    factors: list[Factor]


def _gap(b: Builder, c: Comparison, tag: str) -> Number:
    """The difference of a comparison (made here when single seeds left it unprinted)."""
    return c.diff if c.diff is not None else b.diff(c.mean_a, c.mean_b, tag, b.prep.sign())


def _lr_sensitivity(b: Builder, key: str, tag: str) -> tuple[Number, list[Number]] | None:
    """Best-lr mean minus worst-lr mean of one model (its drop when the lr is off by one grid step)."""
    choice = b.prep.lr_choice.filter(pl.col("config_key") == key)
    if choice.height == 0 or choice.get_column("lrs_tried")[0].len() < 2:
        return None
    runs = b.prep.runs.filter(pl.col("config_key") == key)
    per_lr = runs.group_by("train.lr").agg(pl.col("quality").mean()).sort("quality")
    worst_lr = per_lr.get_column("train.lr")[0 if b.prep.higher_is_better else -1]
    best = b.mean(key, "quality", f"best lr {tag}")
    worst = b.mean(key, "quality", f"worst lr {tag}", lr=worst_lr)
    return b.diff(best, worst, f"lr sensitivity {tag}", b.prep.sign()), [best, worst]


def _factors(b: Builder, task: str, comps: list[Comparison], b_label: str) -> list[Factor]:
    prep = b.prep
    a_keys = [c.a["config_key"] for c in comps]
    tags = [f"{c.a['model']}@{c.a['size']}@{task}" for c in comps]
    out: list[Factor] = []
    per_pair = [b.state(k, t, per_pair=True) for k, t in zip(a_keys, tags, strict=True)]
    if all(v is not None for v in per_pair):
        out.append(Factor(f"{comps[0].a['model']}'s state elements per stored pair", per_pair))
    for column, label in DIAG_FACTORS.items():
        if column not in prep.selected.columns:
            continue
        sel = prep.selected.filter(pl.col("config_key").is_in(a_keys) & pl.col(column).is_not_null())
        if sel.get_column("config_key").n_unique() < len(a_keys):
            continue
        vals = [b.mean(k, column, t) for k, t in zip(a_keys, tags, strict=True)]
        out.append(Factor(f"{comps[0].a['model']}'s {label}", vals))
    sens = [_lr_sensitivity(b, k, t) for k, t in zip(a_keys, tags, strict=True)]
    if all(s is not None for s in sens):
        out.append(
            Factor(
                f"{comps[0].a['model']}'s learning-rate sensitivity (best-lr mean minus worst-lr mean)",
                [s[0] for s in sens],
                support=[n for s in sens for n in s[1]],
            )
        )
    if "tokens_per_second" in prep.selected.columns:
        keys = [k for c in comps for k in (c.a["config_key"], c.b["config_key"])]
        sel = prep.selected.filter(pl.col("config_key").is_in(keys))
        if sel.get_column("tokens_per_second").null_count() == 0:
            ratios, support = [], []
            for c, t in zip(comps, tags, strict=True):
                ta = b.mean(c.a["config_key"], "tokens_per_second", t)
                tb = b.mean(c.b["config_key"], "tokens_per_second", f"{c.b['model']}@{c.b['size']}@{task}")
                ratios.append(b.ratio(ta, tb, f"tps {c.a['model']}/{b_label}@{c.a['size']}@{task}"))
                support += [ta, tb]
            out.append(
                Factor(f"{comps[0].a['model']}'s throughput relative to {b_label}", ratios, support=support)
            )
    return out


def gap_series(b: Builder, gaps: list[Gap], b_label: str) -> list[GapSeries]:
    """One series per task with at least :data:`MIN_SIZES` learned sizes, with its factors' r values."""
    out = []
    gaps = [g for g in gaps if g.comparison.ci_diff is not None]  # a single-seed gap has no interval
    for task in sorted({g.task for g in gaps}):
        series = [g for g in gaps if g.task == task]
        if len(series) < MIN_SIZES:
            continue
        comps = [g.comparison for g in series]
        a_label = comps[0].a["model"]
        nums = [
            _gap(b, c, f"gap {a_label}-{b_label}@{g.size}@{task}") for g, c in zip(series, comps, strict=True)
        ]
        params = None
        if "num_params" in b.prep.selected.columns and all(c.a.get("num_params") for c in comps):
            params = [
                b.mean(c.a["config_key"], "num_params", f"{a_label}@{c.a['size']}@{task}") for c in comps
            ]
        factors = _factors(b, task, comps, b_label)
        for f in factors:
            f.r = b.corr(f.values, nums, f"gap {a_label}-{b_label}~{f.label}@{task}")
            f.r_crit = b.r_crit(len(series), f"{len(series)} points")
        out.append(GapSeries(task, a_label, b_label, [g.size for g in series], comps, nums, params, factors))
    return out


def _on(s: GapSeries, n_tasks: int) -> str:
    return f" on {s.task}" if n_tasks > 1 else ""


def trend(b: Builder, series: list[GapSeries], n_tasks: int) -> list[Finding]:
    """The gap's least-squares slope per doubling of Palimpsa's parameters, with its interval."""
    out = []
    for s in series:
        if s.params is None:
            continue
        fit = b.slope(s.params, s.gaps, f"gap {s.a_label}-{s.b_label}@{s.task}")
        if fit is None:
            continue
        slope, lo, hi = fit
        if lo.value > 0:
            verdict = f"the gap moves in {s.a_label}'s favour as size grows"
        elif hi.value < 0:
            verdict = f"the gap moves against {s.a_label} as size grows"
        else:
            verdict = "cannot tell whether the gap grows or shrinks over these sizes"
        text = (
            f"Across {', '.join(s.sizes)}{_on(s, n_tasks)}, where {s.a_label} and {s.b_label} both learned "
            f"in every seed, the {s.a_label}-minus-{s.b_label} gap in {b.prep.metric} changes by "
            f"{slope.text} per doubling of {s.a_label}'s parameters ({lo.level * 100:g}% interval "
            f"[{lo.text}, {hi.text}], least squares over the per-size mean gaps): {verdict}."
        )
        out.append(Finding("trend", text, [*s.params, *s.gaps, slope, lo, hi]))
    return out


def why(b: Builder, series: list[GapSeries], n_tasks: int) -> list[Finding]:
    """Each measured factor against the gap across sizes, then which one (if any) tracks it."""
    out = []
    for s in series:
        tracked: list[Factor] = []
        for f in s.factors:
            moves = ", ".join(f"{v.text} at {size}" for v, size in zip(f.values, s.sizes, strict=True))
            if f.r is None:
                text = (
                    f"Across {', '.join(s.sizes)}{_on(s, n_tasks)}, {f.label} runs {moves}: constant, so it "
                    f"cannot track the {s.a_label}-minus-{s.b_label} gap."
                )
                out.append(Finding("why", text, [*f.values, *f.support]))
                continue
            tracked.append(f)
            text = (
                f"Across {', '.join(s.sizes)}{_on(s, n_tasks)}, {f.label} runs {moves}; its Pearson r with "
                f"the {s.a_label}-minus-{s.b_label} gap is {f.r.text}, and these sizes need |r| above "
                f"{f.r_crit.text} to tell a relation from none ({f.r_crit.level * 100:g}%)."
            )
            out.append(Finding("why", text, [*f.values, *f.support, *s.gaps, f.r, f.r_crit]))
        if not tracked:
            continue
        top = max(tracked, key=lambda f: abs(f.r.value))
        if abs(top.r.value) > top.r_crit.value:
            text = (
                f"Of the measured factors, {top.label} tracks the {s.a_label}-minus-{s.b_label} "
                f"gap{_on(s, n_tasks)} (r {top.r.text}, beyond {top.r_crit.text}). Over this few sizes every "
                "factor that grows with size moves together, so this is an association, not a cause."
            )
        else:
            text = (
                f"No measured factor tracks the {s.a_label}-minus-{s.b_label} gap{_on(s, n_tasks)} beyond "
                f"what these sizes can tell from no relation: the largest |r| is that of {top.label}, "
                f"{top.r.text}, within {top.r_crit.text}."
            )
        out.append(Finding("why", text, [*top.values, *top.support, *s.gaps, top.r, top.r_crit]))
    return out


def not_enough(gaps: dict[str, list[Gap]]) -> str | None:
    """Why trends and factors are not stated, or None when at least one series has enough sizes."""
    for gs in gaps.values():
        usable = [g for g in gs if g.comparison.ci_diff is not None]
        if any(sum(g.task == t for g in usable) >= MIN_SIZES for t in {g.task for g in usable}):
            return None
    return (
        f"Not stated: a trend or a factor needs at least {MIN_SIZES} sizes where Palimpsa and the baseline "
        f"both learned in every seed, with at least two seeds each, and no baseline ({', '.join(gaps)}) has "
        "that many."
    )
