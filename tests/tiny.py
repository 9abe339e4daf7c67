"""The smallest real run the tests train: MQAR over 16 tokens through one 16-wide Palimpsa layer."""

from __future__ import annotations

from typing import Any


def tiny_config(
    name: str = "tiny",
    *,
    task: dict[str, Any] | None = None,
    mixer: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A fresh run-config mapping: ``task``, ``mixer`` and ``train`` extend the defaults; ``top`` sets
    top-level keys (``seed``, ``tracking``, ...)."""
    return {
        "name": name,
        "seed": 0,
        "task": {
            "name": "mqar",
            "vocab_size": 16,
            "seq_len": 16,
            "num_kv_pairs": 2,
            "num_train": 64,
            "num_val": 16,
            **(task or {}),
        },
        "model": {
            "d_model": 16,
            "n_layers": 1,
            "mixer": {
                "kind": "palimpsa",
                "num_heads": 1,
                "head_k_dim": 8,
                "head_v_dim": 8,
                "beta_rank": 2,
                **(mixer or {}),
            },
        },
        "train": {
            "lr": 1.0e-2,
            "batch_size": 16,
            "max_steps": 8,
            "eval_every": 4,
            "warmup_steps": 2,
            **(train or {}),
        },
        **top,
    }
