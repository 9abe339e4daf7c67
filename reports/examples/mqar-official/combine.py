"""Join the tables of every batch of one part of this campaign (``batches/*/runs.parquet``,
``curves.parquet``) into the part's ``runs.parquet`` and ``curves.parquet``, its report's inputs.

    python reports/examples/mqar-official/combine.py            # part A, in this folder
    python reports/examples/mqar-official/combine.py capacity   # part B, in capacity/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent


def combine(folder: Path, name: str) -> pl.DataFrame:
    parts = sorted((folder / "batches").glob(f"*/{name}"))
    if not parts:
        raise SystemExit(f"{folder / 'batches'}: no batch has a {name}")
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default=".", help="the part's folder, relative to this one")
    folder = HERE / ap.parse_args(argv).part
    runs, curves = combine(folder, "runs.parquet"), combine(folder, "curves.parquet")
    if runs.get_column("run_id").is_duplicated().any():
        raise SystemExit("a run appears in two batches: remove it from one of them")
    runs.write_parquet(folder / "runs.parquet")
    curves.write_parquet(folder / "curves.parquet")
    print(f"{runs.height} runs, {curves.height} curve points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
