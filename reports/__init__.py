"""Analysis reports rendered from tracked runs (polars + seaborn), never from retraining.

``python -m reports.build`` reads the runs and curves tables (exported parquet, a results folder
copied from another machine, or the MLflow store through :mod:`palimpsa.results`), picks each
model's best learning rate by its mean over seeds while keeping every seed, screens every run
against the chance level of its task (:mod:`reports.chance`), draws the figures of
:mod:`reports.figures`, computes the findings of :mod:`reports.findings` (verdicts with intervals
from :mod:`reports.stats`, each number with its recipe) and writes one self-contained HTML file
(:mod:`reports.html`).
"""
