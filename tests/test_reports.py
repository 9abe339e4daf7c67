"""The analysis report, built from stored real tiny runs (tests/data/tiny_runs, see reports/tiny_runs.py).

Every number in the findings is recomputed here from the raw exported tables with code of its own
(filters, means, Pearson r, curve values at a budget), not through the report's own helpers.
"""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import polars as pl
import pytest

from reports import compute
from reports.build import build, parse_args
from reports.findings import fmt

DATA = Path(__file__).parent / "data" / "tiny_runs"
RUNS, CURVES, TUNING = DATA / "runs.parquet", DATA / "curves.parquet", DATA / "tuning"
NUMBER = re.compile(r"(?<![\w.=])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w]|\.\d)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "index.html"
    args = parse_args(
        ["--runs", str(RUNS), "--curves", str(CURVES), "--tuning", str(TUNING), "--out", str(out)]
    )
    return build(args)


@pytest.fixture(scope="module")
def raw() -> pl.DataFrame:
    return pl.read_parquet(RUNS)


def col(df: pl.DataFrame, name: str) -> str:
    """The raw table's column for a config key or metric (bare, ``cfg.`` or ``metric.`` prefixed)."""
    for candidate in (name, f"cfg.{name}", f"metric.{name}"):
        if candidate in df.columns:
            return candidate
    raise KeyError(name)


def run_ids(df: pl.DataFrame) -> pl.Series:
    if "run_id" in df.columns:
        return df.get_column("run_id")
    return df.select(pl.concat_str(pl.col("grid"), pl.lit("/"), pl.col("point"))).to_series()


def select(df: pl.DataFrame, filt: dict) -> pl.DataFrame:
    for key, value in filt.items():
        df = df.filter(pl.col(col(df, key)) == value)
    return df


# --------------------------------------------------------------------------- figures and HTML


def test_fixture_is_real_runs(raw):
    """The stored tables come from the trainer: finished runs with measured time and parameters."""
    assert raw.height >= 40
    assert set(raw.get_column(col(raw, "status")).to_list()) == {"FINISHED"}
    assert raw.get_column(col(raw, "train_seconds")).min() > 0
    assert raw.get_column(col(raw, "num_params")).n_unique() >= 6
    assert raw.get_column(col(raw, "model.d_model")).n_unique() >= 3


def test_report_has_at_least_eight_figures_with_data(report):
    shown = [f for f in report.figures if f.has_data]
    assert len(shown) >= 8, [(f.name, f.skipped) for f in report.figures]
    for fig in shown:
        assert fig.png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = int.from_bytes(fig.png[16:20], "big"), int.from_bytes(fig.png[20:24], "big")
        assert width > 200 and height > 150
        assert fig.n_points > 0 and len(fig.caption) > 40
        assert (report.out.parent / "figures" / f"{fig.name}.png").read_bytes() == fig.png
        assert (report.out.parent / "figures" / f"{fig.name}.rst").read_text().strip()
    html = report.out.read_text()
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == len(shown)
    assert {base64.b64decode(i) for i in imgs} == {f.png for f in shown}
    for fig in shown:
        assert fig.caption.replace("'", "&#x27;") in html
    for name in (
        "quality_vs_scale",
        "ablation_deltas",
        "prior_continuum",
        "diagnostics_vs_scale",
        "throughput_memory",
        "compute_matched",
        "optuna_history",
    ):
        assert name in {f.name for f in shown}, name


def test_html_is_self_contained(report):
    html = report.out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "<script" not in html and "@import" not in html
    assert all(src.startswith("data:") for src in re.findall(r"src='([^']*)'", html))


def test_best_lr_by_mean_keeps_every_seed(report, raw):
    prep = report.prepared
    swept = prep.lr_choice.filter(pl.col("lrs_tried").list.len() >= 2)
    assert swept.height >= 4
    for row in prep.lr_choice.iter_rows(named=True):
        members = prep.runs.filter(pl.col("config_key") == row["config_key"])
        means = members.group_by("train.lr").agg(pl.col("quality").mean())
        best = means.sort("quality", descending=True).row(0, named=True)
        assert row["train.lr"] == best["train.lr"]
        chosen_raw = raw.filter(run_ids(raw).is_in(members.get_column("run_id").to_list())).filter(
            pl.col(col(raw, "train.lr")) == row["train.lr"]
        )
        selected = prep.selected.filter(pl.col("config_key") == row["config_key"])
        assert selected.height == chosen_raw.height == row["n_seeds"]  # no seed dropped


# --------------------------------------------------------------------------- findings


def _flops(row: dict) -> float:
    return compute.training_flops(
        {k.split(".", 1)[1] if k.startswith(("cfg.", "metric.")) else k: v for k, v in row.items()}
    )


def _x_of_run(raw: pl.DataFrame, rid: str, x: str) -> tuple[float, float]:
    """(x per step, steps) of a run: train seconds or FLOPs spread over its steps."""
    row = raw.filter(run_ids(raw) == rid).row(0, named=True)
    steps = row[col(raw, "steps")]
    total = row[col(raw, "train_seconds")] if x == "wall" else _flops(row)
    return total / steps, steps


def recompute(number: dict, numbers: dict, raw: pl.DataFrame, curves: pl.DataFrame, cache: dict) -> float:
    name = number["name"]
    if name in cache:
        return cache[name]
    op = number["op"]
    if op in ("mean", "count"):
        rows = select(raw, number["filter"])
        assert sorted(run_ids(rows).to_list()) == sorted(number["run_ids"]), name
        values = rows.get_column(col(raw, number["column"]))
        value = float(values.mean()) if op == "mean" else float(values.n_unique())
    elif op in ("diff", "ratio"):
        a, b = (recompute(numbers[o], numbers, raw, curves, cache) for o in number["operands"])
        value = number["sign"] * (a - b) if op == "diff" else a / b
    elif op == "corr":
        vals = [recompute(numbers[o], numbers, raw, curves, cache) for o in number["operands"]]
        xs, ys = vals[: len(vals) // 2], vals[len(vals) // 2 :]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        value = cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    elif op == "budget":
        finals = []
        for rid in number["run_ids"]:
            per_step, _ = _x_of_run(raw, rid, number["x"])
            steps = curves.filter((run_ids(curves) == rid) & pl.col(number["curve_key"]).is_not_null())
            finals.append(per_step * steps.get_column("step").max())
        value = min(finals)
    elif op == "at_budget":
        budget = recompute(numbers[number["budget"]], numbers, raw, curves, cache)
        reached = []
        for rid in number["run_ids"]:
            per_step, _ = _x_of_run(raw, rid, number["x"])
            pts = curves.filter((run_ids(curves) == rid) & pl.col(number["curve_key"]).is_not_null()).sort(
                "step"
            )
            pts = pts.filter(pl.col("step") * per_step <= budget * (1 + 1e-9))
            reached.append(pts.get_column(number["curve_key"])[-1])
        value = sum(reached) / len(reached)
    else:
        raise AssertionError(f"unknown op {op} in {name}")
    cache[name] = value
    return value


def check_findings(findings: list[dict], raw: pl.DataFrame, curves: pl.DataFrame, html: str) -> None:
    """Every number of every finding recomputed from the tables, and every sentence in the HTML."""
    assert findings
    numbers = {n["name"]: n for f in findings for n in f["numbers"]}
    cache: dict[str, float] = {}
    kinds = {"diff": "signed", "ratio": "ratio", "corr": "corr", "count": "count"}
    for f in findings:
        for n in f["numbers"]:
            value = recompute(n, numbers, raw, curves, cache)
            assert math.isclose(value, n["value"], rel_tol=1e-9, abs_tol=1e-12), (
                n["name"],
                value,
                n["value"],
            )
            assert fmt(value, kinds.get(n["op"], "value")) == n["text"], n["name"]
        # Every number printed in the sentence is one of its computed numbers or a value it filters on.
        allowed = {n["text"] for n in f["numbers"]}
        for n in f["numbers"]:
            for v in n["filter"].values():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    allowed.add(f"{v:g}")
        printed = NUMBER.findall(f["text"])
        assert printed, f["text"]
        for token in printed:
            assert token in allowed, (token, f["text"])
    for f in findings:
        assert html_escape(f["text"]) in html


def test_every_number_in_the_findings_matches_the_tables(report, raw):
    findings = json.loads((report.out.parent / "findings.json").read_text())
    assert findings == [f.to_dict() for f in report.findings]
    check_findings(findings, raw, pl.read_parquet(CURVES), report.out.read_text())


def test_committed_gpu_example_matches_its_tables():
    """reports/examples/scale-gpu: the committed report's findings against the tables exported beside it."""
    example = Path(__file__).parents[1] / "reports" / "examples" / "scale-gpu"
    raw = pl.read_parquet(example / "runs.parquet")
    assert raw.height >= 18 and set(raw.get_column("metric.device")) == {"cuda"}
    curves = pl.read_parquet(example / "curves.parquet")  # long, as exported from MLflow: one row per value
    curves = curves.pivot(on="key", index=["run_id", "step"], values="value")
    findings = json.loads((example / "findings.json").read_text())
    check_findings(findings, raw, curves, (example / "index.html").read_text())


def test_findings_state_the_scale_trend(report):
    sections = {f.section for f in report.findings}
    assert {"versus", "metaplasticity", "trend", "throughput", "compute", "prior", "gates"} <= sections
    trend = [f.text for f in report.findings if f.section == "trend"]
    assert any(t.startswith("Metaplasticity") for t in trend)
    assert any("Pearson correlation" in t for t in trend)  # three sizes: a correlation per factor
    assert any("fraction consolidated" in t for t in trend)
    assert any("throughput relative to" in t for t in trend)


# --------------------------------------------------------------------------- missing data and errors


def test_figures_without_their_axis_are_skipped_with_a_reason(tmp_path, raw):
    one_size = raw.filter(pl.col(col(raw, "model.d_model")) == 32).filter(
        pl.col(col(raw, "train.lr")) == 1e-2
    )
    one_size.write_parquet(tmp_path / "runs.parquet")
    result = build(parse_args(["--runs", str(tmp_path / "runs.parquet"), "--out", str(tmp_path / "r.html")]))
    by_name = {f.name: f for f in result.figures}
    for name in ("quality_vs_scale", "learning_curves", "compute_matched", "lr_sweep", "optuna_history"):
        assert by_name[name].png is None and by_name[name].skipped, name
    assert "one model size only" in by_name["quality_vs_scale"].skipped
    assert "single learning rate" in by_name["lr_sweep"].skipped
    html = (tmp_path / "r.html").read_text()
    assert "Figures not drawn" in html and by_name["optuna_history"].skipped in html
    assert by_name["quality_vs_state"].has_data  # what the data does support is still drawn


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reports.build",
            "--runs",
            str(tmp_path / "nope.parquet"),
            "--out",
            str(tmp_path / "x.html"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope.parquet" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_flops_and_state_follow_the_mixer():
    row = {
        "model.mixer.kind": "palimpsa",
        "model.n_layers": 2,
        "model.mixer.num_heads": 2,
        "model.mixer.head_k_dim": 8,
        "model.mixer.head_v_dim": 8,
        "num_params": 1000,
        "steps": 10,
        "train.batch_size": 4,
        "task.seq_len": 16,
        "model.mixer.metaplastic": True,
    }
    tokens = 10 * 4 * 16
    assert compute.state_elements(row) == 2 * 2 * 8 * 8 * 2  # layers * heads * K * V * (M and I)
    assert compute.training_flops(row) == 6 * 1000 * tokens + 3 * tokens * 2 * 10.0 * 2 * 8 * 8
    off = {**row, "model.mixer.metaplastic": False}
    assert compute.state_elements(off) == compute.state_elements(row) / 2
    assert compute.training_flops(off) < compute.training_flops(row)
    attn = {**row, "model.mixer.kind": "attention", "model.d_model": 32}
    assert compute.state_elements({**attn, "task.seq_len": 32}) == 2 * compute.state_elements(attn)


# --------------------------------------------------------------------------- sources


TINY = """
name: tiny
seed: 0
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 256, num_val: 32}
model: {d_model: 16, n_layers: 2, mixer: {kind: palimpsa, num_heads: 2, head_k_dim: 8, head_v_dim: 8}}
train: {lr: 1.0e-2, batch_size: 16, epochs: 1, max_steps: 12, eval_every: 4, warmup_steps: 2, num_threads: 1}
tracking: {experiment: tiny-report}
"""


@pytest.mark.slow
def test_mlflow_store_and_exported_tables_give_the_same_report(tmp_path):
    """Two real runs tracked into a fresh store: the report rebuilt from the store alone (no run folder,
    no retraining) says what the report from the tables exported out of the run folders says."""
    import yaml

    from palimpsa.config import config_from_dict
    from palimpsa.results import collect_curves, collect_runs
    from palimpsa.training import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dirs = []
    for kind, d_model in (("palimpsa", 16), ("gated_deltanet", 16), ("palimpsa", 24), ("gated_deltanet", 24)):
        raw_cfg = yaml.safe_load(TINY)
        raw_cfg["model"]["mixer"]["kind"], raw_cfg["model"]["d_model"] = kind, d_model
        raw_cfg["tracking"]["tracking_uri"] = uri
        out = tmp_path / f"{kind}-{d_model}"
        train(config_from_dict(raw_cfg), out, progress=False)
        dirs.append(out)
    collect_runs(dirs).write_parquet(tmp_path / "runs.parquet")
    collect_curves(dirs).write_parquet(tmp_path / "curves.parquet")
    from_store = build(
        parse_args(
            [
                "--tracking-uri",
                uri,
                "--experiments",
                "tiny-report",
                "--out",
                str(tmp_path / "store" / "index.html"),
            ]
        )
    )
    from_tables = build(
        parse_args(
            [
                "--runs",
                str(tmp_path / "runs.parquet"),
                "--curves",
                str(tmp_path / "curves.parquet"),
                "--out",
                str(tmp_path / "t" / "index.html"),
            ]
        )
    )
    assert from_store.prepared.runs.height == from_tables.prepared.runs.height == 4
    shown = {f.name for f in from_store.figures if f.has_data}
    assert shown == {f.name for f in from_tables.figures if f.has_data}
    assert {"quality_vs_scale", "learning_curves", "throughput_memory", "compute_matched"} <= shown
    assert [f.text for f in from_store.findings] == [f.text for f in from_tables.findings]
    captions = [
        next(f.caption for f in built.figures if f.name == "throughput_memory")
        for built in (from_store, from_tables)
    ]
    assert captions[0] == captions[1] and "Recurrence implementations:" in captions[0], captions
    assert "palimpsa:" in captions[0].split("Recurrence implementations:")[1], captions[0]
    assert any(f.section == "versus" for f in from_store.findings)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "reports.build",
            "--tracking-uri",
            uri,
            "--experiments",
            "nope",
            "--out",
            str(tmp_path / "x.html"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
