"""One self-contained HTML file: figures embedded as base64 PNG, inline CSS, no script, no external asset.

A report has to open from an e-mail attachment or an artifact store with no network, so nothing
is linked: every image is a data URI and the stylesheet sits in the page.
"""

from __future__ import annotations

import base64
import datetime as dt
import html

import polars as pl

from reports import analysis, matching, methods
from reports.findings import SECTIONS, Finding
from reports.numbers import Builder, fmt
from reports.plotting import FigureResult
from reports.tables import SIZE_SHORT, Prepared
from reports.tuning import TuningData

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1.2em; color: #1d232a; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em;
       margin-top: 2em; } h3 { margin-bottom: 0.3em; }
.meta { color: #57606a; font-size: 0.92em; }
.findings li { margin: 0.35em 0; }
figure { margin: 1.6em 0; padding: 0.8em; border: 1px solid #d0d7de; border-radius: 6px; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 0.92em; color: #30363d; margin-top: 0.6em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.8em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.skipped { color: #6e4c00; background: #fff8e1; border: 1px solid #f0d58a; padding: 0.6em 1em;
           border-radius: 6px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.88em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; border-radius: 6px; }
details { margin: 0.8em 0; } summary { cursor: pointer; color: #0969da; }
.check { background: #fff4e5; border: 1px solid #e3a44a; border-left: 6px solid #d9822b; padding: 0.7em 1em;
         border-radius: 6px; margin: 1em 0; }
.caveats { background: #f6f8fa; border-left: 6px solid #57606a; padding: 0.5em 1em; margin: 1em 0; }
.note { color: #57606a; font-style: italic; }
ul.methods li { margin: 0.4em 0; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(df: pl.DataFrame, max_rows: int = 200) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for row in df.head(max_rows).iter_rows():
        cells = []
        for v in row:
            if v is None:
                cells.append("<td>&ndash;</td>")
            elif isinstance(v, float):
                cells.append(f"<td class='num'>{v:.4g}</td>")
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f"<td class='num'>{v}</td>")
            elif isinstance(v, list):
                cells.append(
                    f"<td>{_e(', '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in v))}</td>"
                )
            else:
                cells.append(f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='meta'>{df.height - max_rows} more rows not shown.</p>" if df.height > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _figure(i: int, res: FigureResult) -> str:
    data = base64.b64encode(res.png or b"").decode("ascii")
    return (
        f"<figure id='{_e(res.name)}'><img alt='{_e(res.title)}' "
        f"src='data:image/png;base64,{data}'><figcaption><b>Figure {i}. {_e(res.title)}.</b> "
        f"{_e(res.caption)}</figcaption></figure>"
    )


def _findings(findings: list[Finding], notes: dict[str, str], matched_table: str) -> str:
    parts = []
    for key, title in SECTIONS.items():
        items = [f for f in findings if f.section == key]
        if not items and key not in notes:
            continue
        parts.append(f"<h3>{_e(title)}</h3>")
        if key in notes:
            parts.append(f"<p class='note'>{_e(notes[key])}</p>")
        if items:
            parts.append("<ul class='findings'>" + "".join(f"<li>{_e(f.text)}</li>" for f in items) + "</ul>")
        if key == "matched" and matched_table:
            parts.append(matched_table)
    if not findings:
        return "<p>No finding: the runs table lacks the model pairs the findings compare.</p>" + "".join(
            parts
        )
    recipes = pl.DataFrame(
        [
            {
                "number": n.name,
                "printed": n.text,
                "value": n.value,
                "op": n.op,
                "column": n.column or n.curve_key or "",
                "filter / operands": ", ".join(f"{k}={v}" for k, v in n.filter.items())
                or ", ".join(n.operands)
                or f"{len(n.run_ids)} runs",
            }
            for f in findings
            for n in f.numbers
        ]
    ).unique(subset="number", maintain_order=True)
    parts.append(
        f"<details><summary>How every number above was computed ({recipes.height} numbers, also in "
        f"findings.json)</summary>{_table(recipes, 1000)}</details>"
    )
    return "".join(parts)


def matched_table(prep: Prepared) -> str:
    """Palimpsa at each size against each baseline, the four matchings side by side: verdict or reason."""
    cells = matching.matches(Builder(prep))
    if not cells:
        return ""
    rows: dict[tuple, dict[str, str]] = {}
    for m in cells:
        key = (m.task, m.size_rank, m.size, m.baseline)
        row = rows.setdefault(key, {"Palimpsa at": m.size, "against": m.baseline})
        partner = f"{m.partner_size}: " if m.partner_size and m.partner_size != m.size else ""
        c = m.comparison
        if c is None:
            row[matching.MATCHINGS[m.matching]] = f"{partner}{m.note}"
        elif c.ci_diff is None:
            row[matching.MATCHINGS[m.matching]] = f"{partner}cannot tell (one seed)"
        else:
            lo, hi = c.ci_diff
            row[matching.MATCHINGS[m.matching]] = f"{partner}{c.verdict} {c.diff.text} [{lo.text}, {hi.text}]"
    if len({k[0] for k in rows}) > 1:
        for (task, *_), row in rows.items():
            row["task"] = task
    table = pl.DataFrame([rows[k] for k in sorted(rows)])
    return (
        "<p class='meta'>Side by side: Palimpsa's difference to the baseline (positive: Palimpsa better) "
        "and its 95% Welch interval under each matching; a size before the colon is the baseline partner's "
        "when it differs from Palimpsa's.</p>" + _table(table)
    )


def summary_table(prep: Prepared) -> pl.DataFrame:
    """Per (task, size, model): seeds, how many learned, mean with its 95% interval, and the cost columns."""
    means = analysis.model_means(prep)
    sel = prep.selected
    extra = [c for c in ("num_params", "state_elements", "tokens_per_second", "flops") if c in sel.columns]
    costs = sel.group_by("config_key").agg(*[pl.col(c).mean() for c in extra])
    learned = [
        "not screened" if status == "unscreened" else f"{k} of {n}"
        for status, k, n in means.select("status", "n_learned", "n").iter_rows()
    ]
    interval = [
        "one seed" if lo is None else f"[{fmt(lo)}, {fmt(hi)}]"
        for lo, hi in means.select("lo", "hi").iter_rows()
    ]
    out = (
        means.with_columns(
            pl.Series("learned", learned, dtype=pl.String),
            pl.Series("95% interval", interval, dtype=pl.String),
        )
        .join(costs, on="config_key", how="left")
        .sort("task", "size_rank", "model")
        .select(
            "task",
            "size",
            "model",
            pl.col("train.lr").alias("lr"),
            pl.col("n").alias("seeds"),
            "learned",
            pl.col("mean").alias(f"mean {prep.metric}"),
            "95% interval",
            *extra,
        )
    )
    return out if out.get_column("task").n_unique() > 1 else out.drop("task")


def _sizes_legend(prep: Prepared) -> str:
    used = [f"{SIZE_SHORT[c]} = {c.rsplit('.', 1)[-1]}" for c in prep.size_columns if c in SIZE_SHORT]
    return f" Sizes read {', '.join(used)}." if used else ""


def _pipeline_check(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return (
        "<div class='check'><b>This report checks the pipeline, not the science.</b> It shows that "
        "training, tracking, the tables and this report run end to end; its numbers say nothing about which "
        f"mixer is better, because {_e('; and '.join(reasons))}. To compare mixers, train until runs leave "
        "chance, with at least two (better three or more) seeds per model.</div>"
    )


def _caveats(caveats: list[str]) -> str:
    if not caveats:
        return ""
    items = "".join(f"<li>{_e(c)}</li>" for c in caveats)
    head = "<b>Caveats</b> (given with the build, not computed from the runs):"
    return f"<div class='caveats'>{head}<ul>{items}</ul></div>"


def render(
    title: str,
    prep: Prepared,
    figures: list[FigureResult],
    findings: list[Finding],
    source: str,
    tuning: list[TuningData] | None = None,
    notes: dict[str, str] | None = None,
    check: list[str] | None = None,
    caveats: list[str] | None = None,
) -> str:
    shown = [r for r in figures if r.has_data]
    skipped = [r for r in figures if not r.has_data and not r.silent]
    sel = prep.selected
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stats = (
        f"{prep.runs.height} finished runs with {_e(prep.metric)} ({sel.height} at the chosen learning "
        f"rates), {sel.get_column('model').n_unique()} models, {sel.get_column('size').n_unique()} sizes, "
        f"{sel.get_column('task').n_unique()} task(s), {sel.get_column('seed').n_unique()} distinct seeds."
    )
    excluded = "".join(f"<li>{n} runs: {_e(why)}</li>" for why, n in prep.excluded.items())
    toc = "".join(f"<li><a href='#{_e(r.name)}'>{_e(r.title)}</a></li>" for r in shown)
    body = [
        f"<h1>{_e(title)}</h1>",
        _pipeline_check(check or []),
        _caveats(caveats or []),
        f"<p class='meta'>Generated {now} from {_e(source)}. {stats}</p>",
        f"<p class='meta'>Quality metric: <code>{_e(prep.metric)}</code> "
        f"({'higher' if prep.higher_is_better else 'lower'} is better). Each model's learning rate is the "
        "one with the best mean over its seeds; every seed at that learning rate is "
        f"kept.{_e(_sizes_legend(prep))}</p>",
        "<h2>Findings</h2>",
        "<p class='meta'>Generated from the data: every number is computed from the runs table, and the "
        "recipe of each is listed below the sentences. Runs are first screened against chance; a comparison "
        "is a verdict (better, worse, or cannot tell at this number of seeds) with the 95% interval of the "
        "difference; the rules are in Methods.</p>",
        _findings(findings, notes or {}, matched_table(prep)),
        f"<h2>Figures ({len(shown)})</h2><ol>{toc}</ol>",
        *[_figure(i + 1, r) for i, r in enumerate(shown)],
    ]
    if skipped:
        items = "".join(f"<li><b>{_e(r.title)}</b>: {_e(r.skipped)}</li>" for r in skipped)
        body.append(f"<h2>Figures not drawn ({len(skipped)})</h2><div class='skipped'><ul>{items}</ul></div>")
    body += [
        "<h2>Results table</h2>",
        "<p class='meta'>Per model and size, at the chosen learning rate, over all its seeds: how many "
        "seeds learned (Methods), the mean and its 95% Student t interval (none with one seed).</p>",
        _table(summary_table(prep)),
        "<h2>Learning-rate selection</h2>",
        _table(
            prep.lr_choice.drop("config_key").rename(
                {
                    "train.lr": "chosen lr",
                    "lr_mean": f"mean {prep.metric}",
                    "n_seeds": "seeds",
                    "chosen_on": "chosen on seeds",
                    "lrs_tried": "lrs tried",
                }
            )
        ),
    ]
    if excluded:
        body.append(f"<p>Runs left out of every figure and finding:</p><ul>{excluded}</ul>")
    for t in tuning or []:
        body.append(
            f"<p class='meta'>Tuning study <code>{_e(t.study_name)}</code>: {t.trials.height} trials; "
            f"importances: {_e(t.importance_note)}.</p>"
        )
    body.append(methods.render(prep))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
        "content='width=device-width, "
        f"initial-scale=1'><title>{_e(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
