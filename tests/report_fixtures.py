"""Constructed runs tables that exercise the report's statistics where the real tiny runs cannot.

The stored tiny runs (tests/data/tiny_runs) never leave chance, so they only show that nothing is
compared. These tables are built, not trained: every value is set here on purpose, with seed
offsets symmetric around the intended mean, so that each verdict is known in advance:

- Palimpsa clearly above Mamba2 (three seeds, small spread): a "better" verdict at every size where
  both learned; the gap shrinks linearly with size and Palimpsa's memory horizon follows it exactly;
- Palimpsa and Gated DeltaNet close with a wide seed spread: "cannot tell";
- Mamba2 at the smallest size stays at chance and Gated DeltaNet there learns in two of three seeds;
- sizes d8 < d16 < d32 < d64, whose labels sort wrongly as text;
- ``recall_gap.<lo>-<hi>`` columns (accuracy by key-to-query distance) and validation curves.

``python tests/report_fixtures.py`` rewrites tests/data/synthetic_runs/{runs,curves}.parquet; a test
checks that the stored tables equal what this module builds.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

OUT = Path(__file__).parent / "data" / "synthetic_runs"
GRID = "synthetic"
VOCAB, SEQ_LEN, PAIRS, BATCH, STEPS, EVAL_EVERY = 64, 64, 8, 16, 400, 100
CHANCE = 1.0 / (VOCAB - VOCAB // 2)
SIZES = [(8, 1), (16, 2), (32, 4), (64, 8)]  # (d_model, heads): heads of 8 x 8
SEEDS = (0, 1, 2)
OFFSETS = (-1.0, 0.0, 1.0)  # seed offsets in units of the spread: means are exact
BINS = [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63)]

# Accuracy at the best learning rate (1e-2) per size, and the spread across seeds.
ACCURACY = {
    "palimpsa": ([0.60, 0.72, 0.82, 0.90], 0.01),
    "mamba2": ([0.04, 0.50, 0.66, 0.80], 0.01),
    "gated_deltanet": ([None, 0.70, 0.84, 0.92], 0.04),
}
GDN_SMALLEST = (0.03, 0.55, 0.60)  # learned in two of three seeds
LR_DROP = {"palimpsa": [0.05, 0.10, 0.15, 0.20], "gated_deltanet": [0.10, 0.10, 0.10, 0.10]}
TOKENS_PER_SECOND = {
    "palimpsa": [9000, 8000, 7000, 6000],
    "mamba2": [12000, 10000, 8500, 7000],
    "gated_deltanet": [8000, 7000, 6000, 5000],
}
DECAY = {"palimpsa": 0.93, "mamba2": 0.75, "gated_deltanet": 0.9}  # recall kept per distance bin
PARAM_FACTOR = {"palimpsa": 1.05, "mamba2": 1.0, "gated_deltanet": 1.02}
HORIZON = [30.0, 60.0, 90.0, 120.0]  # linear in size step, as the Mamba2 gap is
CONSOLIDATED = [0.30, 0.10, 0.25, 0.15]


def _params(kind: str, d: int, heads: int) -> int:
    inner = 8 * heads
    per_layer = 3 * d * inner + inner * d + 8 * d * d
    return int(round((VOCAB * d + 2 * per_layer) * PARAM_FACTOR[kind]))


def _accuracies(kind: str, i: int, lr: float) -> list[float]:
    if kind == "gated_deltanet" and i == 0:
        values = list(GDN_SMALLEST)
    else:
        means, spread = ACCURACY[kind]
        values = [means[i] + o * spread for o in OFFSETS]
    if lr != 1e-2:
        values = [max(v - LR_DROP[kind][i], 0.01) for v in values]
    return [round(v, 6) for v in values]


def _recall(final: float, decay: float, k: int) -> float:
    top = final + (1.0 - final) * 0.5
    return round(CHANCE + (top - CHANCE) * decay**k, 6) if final > 0.1 else round(final, 6)


def build_tables() -> tuple[pl.DataFrame, pl.DataFrame]:
    """(runs, curves) laid out as ``palimpsa.results`` exports them (prefixed columns, wide curves)."""
    runs, curves = [], []
    tokens = STEPS * BATCH * SEQ_LEN
    for kind in ACCURACY:
        for i, (d, heads) in enumerate(SIZES):
            for lr in (3e-3, 1e-2) if kind in LR_DROP else (1e-2,):
                for seed, offset, acc in zip(SEEDS, OFFSETS, _accuracies(kind, i, lr), strict=True):
                    point = f"{kind}_d{d}_lr{lr:g}_s{seed}"
                    tps = TOKENS_PER_SECOND[kind][i] + 100 * offset
                    row = {
                        "grid": GRID,
                        "point": point,
                        "status": "FINISHED",
                        "cfg.seed": seed,
                        "cfg.task.name": "mqar",
                        "cfg.task.vocab_size": VOCAB,
                        "cfg.task.seq_len": SEQ_LEN,
                        "cfg.task.num_kv_pairs": PAIRS,
                        "cfg.model.d_model": d,
                        "cfg.model.n_layers": 2,
                        "cfg.model.mixer.kind": kind,
                        "cfg.model.mixer.num_heads": heads,
                        "cfg.model.mixer.head_k_dim": 8,
                        "cfg.model.mixer.head_v_dim": 8,
                        "cfg.model.mixer.metaplastic": True,
                        "cfg.train.lr": lr,
                        "cfg.train.batch_size": BATCH,
                        "cfg.train.max_steps": STEPS,
                        "metric.val_accuracy": acc,
                        "metric.num_params": _params(kind, d, heads),
                        "metric.steps": STEPS,
                        "metric.tokens": tokens,
                        "metric.tokens_per_second": tps,
                        "metric.train_seconds": tokens / tps,
                        "metric.device": "cpu",
                        "metric.diag.horizon": HORIZON[i] + offset if kind == "palimpsa" else None,
                        "metric.diag.consolidated": CONSOLIDATED[i] if kind == "palimpsa" else None,
                        "metric.diag.lr_eff": 0.5 if kind == "palimpsa" else None,
                    }
                    for k, (lo, hi) in enumerate(BINS):
                        row[f"metric.recall_gap.{lo}-{hi}"] = _recall(acc, DECAY[kind], k)
                    runs.append(row)
                    for step in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY):
                        value = CHANCE + (acc - CHANCE) * (step / STEPS) ** 2
                        curves.append(
                            {"grid": GRID, "point": point, "step": step, "val_accuracy": round(value, 6)}
                        )
    return pl.DataFrame(runs), pl.DataFrame(curves)


def write(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs, curves = build_tables()
    runs.write_parquet(out / "runs.parquet")
    curves.write_parquet(out / "curves.parquet")


if __name__ == "__main__":
    write()
    print(f"wrote {OUT}/runs.parquet and curves.parquet")
