"""One self-contained HTML file: figures embedded as base64 PNG, inline CSS, no script, no external asset.

A report has to open from an e-mail attachment or an artifact store with no network, so nothing
is linked: every image is a data URI and the stylesheet sits in the page.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import inspect

import polars as pl

from reports import compute
from reports.figures import FigureResult
from reports.findings import SECTIONS, Finding
from reports.tables import Prepared
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
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(df: pl.DataFrame, max_rows: int = 200) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = []
    for row in df.head(max_rows).iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
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
        f"<figure id='{_e(res.name)}'><img alt='{_e(res.title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption><b>Figure {i}. {_e(res.title)}.</b> {_e(res.caption)}</figcaption></figure>"
    )


def _findings(findings: list[Finding]) -> str:
    if not findings:
        return "<p>No finding: the runs table lacks the model pairs the findings compare.</p>"
    parts = []
    for key, title in SECTIONS.items():
        items = [f for f in findings if f.section == key]
        if items:
            lis = "".join(f"<li>{_e(f.text)}</li>" for f in items)
            parts.append(f"<h3>{_e(title)}</h3><ul class='findings'>{lis}</ul>")
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
        "<details><summary>How every number above was computed "
        f"({recipes.height} numbers, also in findings.json)</summary>{_table(recipes, 1000)}</details>"
    )
    return "".join(parts)


def summary_table(prep: Prepared) -> pl.DataFrame:
    """Mean and sd of the metric with the measured cost columns, one row per (task, size, model)."""
    sel = prep.selected
    extra = [c for c in ("num_params", "state_elements", "tokens_per_second", "flops") if c in sel.columns]
    out = (
        sel.group_by("task", "size", "model")
        .agg(
            pl.col("train.lr").first().alias("lr"),
            pl.col("seed").n_unique().alias("seeds"),
            pl.col("quality").mean().alias(f"mean {prep.metric}"),
            pl.col("quality").std().alias("sd"),
            *[pl.col(c).mean() for c in extra],
        )
        .sort("task", "size", "model")
    )
    return out if out.get_column("task").n_unique() > 1 else out.drop("task")


def render(
    title: str,
    prep: Prepared,
    figures: list[FigureResult],
    findings: list[Finding],
    source: str,
    tuning: list[TuningData] | None = None,
) -> str:
    shown = [r for r in figures if r.has_data]
    skipped = [r for r in figures if not r.has_data]
    sel = prep.selected
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    stats = (
        f"{prep.runs.height} finished runs with {_e(prep.metric)} ({sel.height} at the chosen learning "
        "rates), "
        f"{sel.get_column('model').n_unique()} models, {sel.get_column('size').n_unique()} sizes, "
        f"{sel.get_column('task').n_unique()} task(s), {sel.get_column('seed').n_unique()} distinct seeds."
    )
    excluded = "".join(f"<li>{n} runs: {_e(why)}</li>" for why, n in prep.excluded.items())
    toc = "".join(f"<li><a href='#{_e(r.name)}'>{_e(r.title)}</a></li>" for r in shown)
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>Generated {now} from {_e(source)}. {stats}</p>",
        f"<p class='meta'>Quality metric: <code>{_e(prep.metric)}</code> "
        f"({'higher' if prep.higher_is_better else 'lower'} is better). Each model's learning rate is the "
        "one with "
        "the best mean over its seeds; every seed at that learning rate is kept.</p>",
        "<h2>Findings</h2>",
        "<p class='meta'>Generated from the data: every number is computed from the runs table; the recipe "
        "of "
        "each is listed below the sentences.</p>",
        _findings(findings),
        f"<h2>Figures ({len(shown)})</h2><ol>{toc}</ol>",
        *[_figure(i + 1, r) for i, r in enumerate(shown)],
    ]
    if skipped:
        items = "".join(f"<li><b>{_e(r.title)}</b>: {_e(r.skipped)}</li>" for r in skipped)
        body.append(f"<h2>Figures not drawn ({len(skipped)})</h2><div class='skipped'><ul>{items}</ul></div>")
    body += [
        "<h2>Results table</h2>",
        "<p class='meta'>Per model and size, at the chosen learning rate, over all its seeds.</p>",
        _table(summary_table(prep)),
        "<h2>Learning-rate selection</h2>",
        _table(
            prep.lr_choice.drop("config_key").rename(
                {"train.lr": "chosen lr", "lr_mean": f"mean {prep.metric}", "n_seeds": "seeds"}
            )
        ),
    ]
    if excluded:
        body.append(f"<p>Runs left out of every figure and finding:</p><ul>{excluded}</ul>")
    for t in tuning or []:
        body.append(
            f"<p class='meta'>Tuning study <code>{_e(t.study_name)}</code>: {t.trials.height} "
            f"trials; importances: {_e(t.importance_note)}.</p>"
        )
    body += [
        "<h2>Methods</h2>",
        "<h3>Training FLOPs</h3>",
        f"<pre>{_e(inspect.getdoc(compute.training_flops))}</pre>",
        f"<p class='meta'>Mixer state work per state element and token (forward): "
        f"{_e(', '.join(f'{k} {v:g}' for k, v in compute.STATE_FLOPS_PER_ELEMENT.items()))}; "
        f"softmax attention counts Q K^T and A V over half the sequence.</p>",
        "<h3>State size</h3>",
        f"<pre>{_e(inspect.getdoc(compute.state_elements))}</pre>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
