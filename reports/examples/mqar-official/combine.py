"""Join the tables of every batch of this campaign (``batches/*/runs.parquet``, ``curves.parquet``) into the
example's ``runs.parquet`` and ``curves.parquet``, the report's inputs.

    python reports/examples/mqar-official/combine.py
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent


def combine(name: str) -> pl.DataFrame:
    parts = sorted((HERE / "batches").glob(f"*/{name}"))
    if not parts:
        raise SystemExit(f"{HERE / 'batches'}: no batch has a {name}")
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def main() -> int:
    runs, curves = combine("runs.parquet"), combine("curves.parquet")
    if runs.get_column("run_id").is_duplicated().any():
        raise SystemExit("a run appears in two batches: remove it from one of them")
    runs.write_parquet(HERE / "runs.parquet")
    curves.write_parquet(HERE / "curves.parquet")
    print(f"{runs.height} runs, {curves.height} curve points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
