"""Prepare one language-model dataset in the shared data cache, then write a marker.

    prepare_lm.py --task-json '{"task": {...}, "seed": 0}' --cache results/data --out MARKER
    prepare_lm.py --config run.yaml --cache results/data --out MARKER [--tokenizer-only]

First the tokenizer: a ``bpe:<n>`` tokenizer is trained once per corpus and vocabulary size and kept under
``CACHE/tokenizers/`` by a digest of what it was trained on; a tokenizer file or hub name is loaded. Then
(unless ``--tokenizer-only``) the documents are tokenized, joined with the end-of-document token and cut
into windows of ``seq_len + 1``, cached as ``CACHE/lm-<digest>.pt``: the file ``palimpsa train --data-dir
CACHE`` reads. Both are found again on a second call with the same task, and nothing is rebuilt.

The marker (JSON) names both files and what they hold: windows, tokens, vocabulary size, unigram loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from palimpsa.atomic import write_text  # noqa: E402
from palimpsa.config import load_config, parse_task  # noqa: E402
from palimpsa.errors import USER_ERRORS, FieldError  # noqa: E402
from palimpsa.tasks import LMConfig, build_task, data_path, resolve_tokenizer  # noqa: E402
from palimpsa.tasks.lm import tokenizer_corpus  # noqa: E402
from palimpsa.tasks.tokenizer import bpe_path, parse_spec  # noqa: E402
from palimpsa.training.evaluation import unigram_loss  # noqa: E402


def read_spec(args: argparse.Namespace) -> tuple[LMConfig, int]:
    """The LM task config and seed from ``--task-json`` ({task, seed} or a bare task) or ``--config``."""
    if args.config is not None:
        cfg = load_config(args.config)
        task, seed = cfg.task, cfg.seed
    else:
        try:
            spec = json.loads(args.task_json)
        except json.JSONDecodeError as err:
            raise FieldError("--task-json", f"not JSON ({err})") from None
        raw = spec.get("task", spec) if isinstance(spec, dict) else spec
        task = parse_task(raw)
        seed = int(spec.get("seed", 0)) if isinstance(spec, dict) and "task" in spec else 0
    if not isinstance(task, LMConfig):
        raise FieldError(
            "task.name", f"prepare_lm prepares language-model data: must be 'lm', got {task.name!r}"
        )
    return task, seed


def tokenizer_file(task: LMConfig, cache: Path) -> str | None:
    """Where the tokenizer lives on disk (None for bytes and hub names)."""
    if task.tokenizer is None:
        return None
    spec = parse_spec(task.tokenizer)
    if spec.kind == "bpe":
        assert spec.vocab_size is not None
        return str(bpe_path(cache, spec.vocab_size, tokenizer_corpus(task)))
    return spec.value if spec.kind == "file" else None


def prepare(task: LMConfig, seed: int, cache: Path, tokenizer_only: bool = False) -> dict[str, Any]:
    """Build (or find) the tokenizer and the data; the marker's content."""
    start = time.perf_counter()
    tokenizer = resolve_tokenizer(task, cache)
    out: dict[str, Any] = {
        "task": dataclasses.asdict(task),
        "seed": seed,
        "tokenizer": {
            "name": tokenizer.name,
            "file": tokenizer_file(task, cache),
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
        },
    }
    if not tokenizer_only:
        path = data_path(task, cache, seed)
        reused = path.is_file()
        data = build_task(task, cache, seed)
        out["data"] = {
            "file": str(path),
            "reused": reused,
            "seq_len": data.seq_len,
            "train_windows": int(data.train_inputs.shape[0]),
            "val_windows": int(data.val_inputs.shape[0]),
            "train_tokens": int(data.train_targets.numel()),
            "vocab_size": data.vocab_size,
            "unigram_loss": unigram_loss(data.train_targets),
        }
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task-json", help='JSON: {"task": mapping, "seed": int}, or the task mapping alone')
    source.add_argument("--config", type=Path, help="a run config (YAML): its task and seed")
    parser.add_argument("--cache", type=Path, required=True, help="the shared data cache (--data-dir)")
    parser.add_argument("--out", type=Path, required=True, help="the marker to write (JSON)")
    parser.add_argument("--tokenizer-only", action="store_true", help="build the tokenizer, not the data")
    args = parser.parse_args(argv)
    try:
        task, seed = read_spec(args)
        marker = prepare(task, seed, args.cache, args.tokenizer_only)
    except (*USER_ERRORS, FieldError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    write_text(args.out, json.dumps(marker, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
