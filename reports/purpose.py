"""Whether a report can speak about the science at all, or only shows that the pipeline runs.

The default CPU pipeline trains a few hundred steps on a tiny task: its runs stay at chance and
have one seed each, so its report checks that training, tracking, tables and rendering work end to
end. The header says so, and why, from the data itself (or from the workflow's flag).
"""

from __future__ import annotations

import polars as pl

from reports.tables import Prepared


def pipeline_check_reasons(prep: Prepared, flagged: bool = False) -> list[str]:
    """Why this report only checks the pipeline; empty when its runs can support comparisons."""
    reasons = []
    if flagged:
        reasons.append("the workflow marks these runs as a pipeline check (--pipeline-check)")
    sel = prep.selected
    if prep.chance_known and not sel.get_column("learned").fill_null(False).any():
        reasons.append(
            f"none of the {sel.height} runs at the chosen learning rates is clearly above chance "
            f"({prep.metric}; the rule is in Methods)"
        )
    seeds = sel.group_by("config_key").agg(pl.col("seed").n_unique().alias("n")).get_column("n")
    if seeds.max() == 1:
        reasons.append("every model has a single seed, so no difference between models has an interval")
    return reasons
