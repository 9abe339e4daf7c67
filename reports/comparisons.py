"""Findings that compare models at one size: the chance screen first, then verdicts with intervals.

Only groups whose every seed learned enter a comparison (:func:`reports.numbers.comparable`), and
every comparison is a verdict (better / worse / cannot tell) with the 95% interval of the
difference. The screen itself is a finding, so a reader sees which runs were left out and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from reports import analysis
from reports.numbers import (
    Builder,
    Comparison,
    Finding,
    comparable,
    comparison_clause,
    interval_text,
    model_row,
    seeds_text,
    verdict_text,
    where,
)
from reports.tables import size_order


@dataclass
class Gap:
    """Palimpsa against one baseline at one size where both learned: the input of trends and factors."""

    task: str
    size: str
    comparison: Comparison


def tasks_of(b: Builder) -> list[str]:
    return b.means.get_column("task").unique().sort().to_list() if b.means.height else []


def _names(rows: list[dict[str, Any]]) -> str:
    """``Palimpsa at d64 H1, d128 H2; Mamba2 at d64 H1`` (sizes grouped per model, in size order)."""
    by_model: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["model"], r["size_rank"])):
        by_model.setdefault(r["model"], []).append(r["size"])
    return "; ".join(f"{m} at {', '.join(sizes)}" for m, sizes in by_model.items())


def screening(b: Builder) -> tuple[list[Finding], dict[str, str]]:
    """Per task: the chance level, the learned threshold and which models learned in which seeds."""
    prep, out, notes = b.prep, [], {}
    tasks = tasks_of(b)
    for task in tasks:
        on = f" on {task}" if len(tasks) > 1 else ""
        levels = b.chance(task)
        if levels is None:
            notes["learned"] = (
                f"The chance level of {prep.metric}{on} is not known, so its runs are not screened: the "
                "comparisons below treat every run as learned."
            )
            continue
        ch, th = levels
        groups = b.means.filter(pl.col("task") == task).sort("size_rank", "model")
        full = [r for r in groups.iter_rows(named=True) if r["status"] == "learned"]
        some = [r for r in groups.iter_rows(named=True) if r["status"] == "some"]
        none = [r for r in groups.iter_rows(named=True) if r["status"] == "none"]
        above = "above" if prep.higher_is_better else "below"
        numbers = [ch, th]
        parts = [f"Chance{on} is {prep.metric} {ch.text}; a run counts as learned {above} {th.text}."]
        if full:
            parts.append(f"Learned in every seed: {_names(full)}.")
        if some:
            items = []
            for r in some:
                k = b.count_learned(r["config_key"], th, f"{r['model']}@{r['size']}@{task}")
                n = b.count(r["config_key"], f"{r['model']}@{r['size']}@{task}")
                numbers += [k, n]
                items.append(f"{r['model']} at {r['size']} ({k.text} of {n.text} seeds)")
            parts.append(f"Learned in some seeds only (not compared): {', '.join(items)}.")
        if none:
            parts.append(f"Learned in no seed (not compared): {_names(none)}.")
        if not full:
            parts.append(
                "No model learned in every seed at any size, so no model's quality is compared with "
                "another's."
            )
        out.append(Finding("learned", " ".join(parts), numbers))
    return out, notes


def ranking(b: Builder) -> list[Finding]:
    """The best model per size, named only when its lead over the next one has an interval above zero."""
    prep, out = b.prep, []
    tasks = tasks_of(b)
    for task in tasks:
        for size in size_order(prep):
            m = b.means.filter((pl.col("task") == task) & (pl.col("size") == size))
            ok = m.filter(pl.col("status").is_in(list(analysis.COMPARABLE)))
            if ok.height < 2:
                continue
            ranked = ok.sort("mean", descending=prep.higher_is_better).to_dicts()
            top, nxt = ranked[0], ranked[1]
            c = b.compare(top, nxt, f"rank {top['model']}-{nxt['model']}@{size}@{task}")
            left_out = sorted(set(m.get_column("model").to_list()) - set(ok.get_column("model").to_list()))
            unranked = (
                f" Not ranked (did not learn in every seed): {', '.join(left_out)}." if left_out else ""
            )
            head = where(task, size, len(tasks))
            if c.verdict == "better":
                text = (
                    f"{head}, the best model is {top['model']}: "
                    f"{comparison_clause(c, top['model'], nxt['model'])}, the next best.{unranked}"
                )
            else:
                clause = comparison_clause(c, top["model"], nxt["model"])
                text = f"{head}, no single best model: {clause}.{unranked}"
            out.append(Finding("ranking", text, c.numbers))
    return out


def reference_kind(b: Builder) -> str | None:
    """The strongest baseline kind present: Gated DeltaNet, else Mamba2, else DeltaNet."""
    return next((k for k in ("gated_deltanet", "mamba2", "deltanet") if analysis.main_label(b.prep, k)), None)


def _pair_findings(
    b: Builder, rows: list[tuple[str, str, dict, dict]], section: str, what: str = ""
) -> tuple[list[Finding], list[Gap]]:
    n_tasks = len(tasks_of(b))  # as every section counts them, so one place reads the same in all
    findings, gaps = [], []
    for task, size, a_row, b_row in rows:
        if not (comparable(a_row) and comparable(b_row)):
            continue
        c = b.compare(a_row, b_row, f"{a_row['model']}-{b_row['model']}@{size}@{task}")
        text = f"{where(task, size, n_tasks)}{what}, {comparison_clause(c, a_row['model'], b_row['model'])}."
        findings.append(Finding(section, text, c.numbers))
        gaps.append(Gap(task, size, c))
    return findings, gaps


def _rows_against(b: Builder, a_label: str, b_label: str) -> list[tuple[str, str, dict, dict]]:
    rows = []
    for task in tasks_of(b):
        for size in size_order(b.prep):
            a_row, b_row = model_row(b, task, size, a_label), model_row(b, task, size, b_label)
            if a_row and b_row:
                rows.append((task, size, a_row, b_row))
    return rows


def versus(b: Builder) -> tuple[list[Finding], list[Gap], str | None]:
    """Palimpsa against the strongest baseline at every size where both learned."""
    pal = analysis.main_label(b.prep, "palimpsa")
    kind = reference_kind(b)
    if pal is None or kind is None:
        return [], [], None
    ref = analysis.main_label(b.prep, kind)
    findings, gaps = _pair_findings(b, _rows_against(b, pal, ref), "versus")
    return findings, gaps, ref


def metaplasticity(b: Builder) -> tuple[list[Finding], list[Gap], str | None]:
    """Palimpsa against its twin with metaplasticity off, else against Mamba2 (its Ip -> inf limit).

    Returns the findings, the gaps at sizes where both learned, and the baseline's label.
    """
    prep = b.prep
    main = analysis.main_label(prep, "palimpsa")
    pairs = analysis.paired_delta(prep, "model.mixer.metaplastic", True, False, kinds=("palimpsa",))
    rows: list[tuple[str, str, dict, dict]] = []
    baseline = None
    if pairs.height:
        for p in pairs.iter_rows(named=True):
            if p["model"] == main:
                a_row = model_row(b, p["task"], p["size"], p["model"])
                b_row = model_row(b, p["task"], p["size"], p["model_b"])
                rows.append((p["task"], p["size"], a_row, b_row))
                baseline = p["model_b"]
    else:
        baseline = analysis.main_label(prep, "mamba2")
        if main is None or baseline is None:
            return [], [], None
        rows = _rows_against(b, main, baseline)
    findings, gaps = _pair_findings(b, rows, "metaplasticity")
    return findings, gaps, baseline


def one_side_unlearned(
    b: Builder, task: str, a_row: dict, b_row: dict, head: str, section: str = "metaplasticity"
) -> Finding | None:
    """``HEAD: not compared; X learned in k of n seeds, Y in every seed`` when exactly one side of a pair
    learned in every seed: a count, not an estimate. None when both or neither did, or chance is unknown."""
    levels = b.chance(task)
    if comparable(a_row) == comparable(b_row) or levels is None:
        return None
    failed, learned = (b_row, a_row) if comparable(a_row) else (a_row, b_row)
    tag = f"{failed['model']}@{failed['size']}@{task}"
    k = b.count_learned(failed["config_key"], levels[1], tag)
    n = b.count(failed["config_key"], tag)
    text = (
        f"{head}: not compared; {failed['model']} learned in {k.text} of {n.text} seeds, "
        f"{learned['model']} in every seed."
    )
    return Finding(section, text, [*levels, k, n])


def metamamba2_vs_mamba2(b: Builder) -> list[Finding]:
    """MetaMamba2 against Mamba2 at every size: a verdict where both learned in every seed, else which
    side did not. Neither learning is left to the screen."""
    prep = b.prep
    meta, plain = analysis.main_label(prep, "metamamba2"), analysis.main_label(prep, "mamba2")
    if meta is None or plain is None:
        return []
    rows = _rows_against(b, meta, plain)
    findings, _ = _pair_findings(b, rows, "metaplasticity")
    n_tasks = len(tasks_of(b))
    for task, size, a_row, b_row in rows:
        head = f"{where(task, size, n_tasks)}, {meta} against {plain}"
        if (count := one_side_unlearned(b, task, a_row, b_row, head)) is not None:
            findings.append(count)
    return findings


def gates(b: Builder) -> list[Finding]:
    pairs = analysis.paired_delta(b.prep, "model.mixer.gates", "paper", "official")
    if pairs.height == 0:
        return []
    rows = [
        (
            p["task"],
            p["size"],
            model_row(b, p["task"], p["size"], p["model"]),
            model_row(b, p["task"], p["size"], p["model_b"]),
        )
        for p in pairs.iter_rows(named=True)
    ]
    return _pair_findings(b, rows, "gates")[0]


def prior(b: Builder) -> list[Finding]:
    """Per Ip sweep: the best prior precision, named only when it beats the next one."""
    prep, col = b.prep, "model.mixer.ip"
    fam = analysis.ip_families(prep)
    if fam.height == 0:
        return []
    out = []
    tasks = tasks_of(b)
    for (task, size, family), grp in fam.group_by("task", "size", "family", maintain_order=True):
        keys = grp.select("config_key", col).unique(subset="config_key").sort(col)
        rows = [
            (ip, b.means.filter(pl.col("config_key") == key).row(0, named=True))
            for key, ip in keys.iter_rows()
        ]
        ok = [(ip, r) for ip, r in rows if comparable(r)]
        if len(ok) < 2:
            continue
        ok.sort(key=lambda ir: ir[1]["mean"], reverse=prep.higher_is_better)
        (ip_a, a_row), (ip_b, b_row) = ok[0], ok[1]
        c = b.compare(a_row, b_row, f"Ip={ip_a:g}-Ip={ip_b:g}@{family}@{size}@{task}")
        head = f"{where(task, size, len(tasks))}, {family}"
        clause = comparison_clause(c, f"Ip={ip_a:g}", f"Ip={ip_b:g}")
        if c.verdict == "better":
            text = f"{head}'s best prior precision is Ip={ip_a:g}: {clause}, the next best."
        else:
            text = f"{head}: cannot tell which prior precision is best; {clause}."
        out.append(Finding("prior", text, c.numbers))
    return out


def throughput(b: Builder) -> list[Finding]:
    """Measured tokens/s of Palimpsa against Gated DeltaNet: a cost, valid whether or not runs learned."""
    prep = b.prep
    main, gdn = analysis.main_label(prep, "palimpsa"), analysis.main_label(prep, "gated_deltanet")
    if main is None or gdn is None or "tokens_per_second" not in prep.selected.columns:
        return []
    tasks = tasks_of(b)
    out = []
    for task in tasks:
        for size in size_order(prep):
            a_row, g_row = model_row(b, task, size, main), model_row(b, task, size, gdn)
            if a_row is None or g_row is None:
                continue
            sel = prep.selected.filter(pl.col("config_key").is_in([a_row["config_key"], g_row["config_key"]]))
            if sel.get_column("tokens_per_second").null_count():
                continue
            c = b.compare(a_row, g_row, f"tps {main}-{gdn}@{size}@{task}", column="tokens_per_second")
            r = b.ratio(c.mean_a, c.mean_b, f"tps {main}/{gdn}@{size}@{task}")
            verdict = verdict_text(c, main, gdn, better="faster", worse="slower", unit=" tokens/s")
            text = (
                f"{where(task, size, len(tasks))}, {main} trains at {r.text} times {gdn}'s throughput "
                f"({c.mean_a.text}{interval_text(c.ci_a)} against {c.mean_b.text}{interval_text(c.ci_b)} "
                f"tokens/s, {seeds_text(c)}): {verdict}."
            )
            out.append(Finding("throughput", text, [*c.numbers, r]))
    return out
