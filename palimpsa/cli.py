"""``palimpsa`` command line: ``train``, ``convert``, ``eval`` (and whatever else :data:`COMMANDS` lists).

Adding a subcommand is one entry in :data:`COMMANDS`: ``name -> ("module:function", help)``, where
``function(parser)`` adds the subcommand's arguments and returns the callable that runs it
(``run(args) -> int | None``). Only the chosen subcommand's module is imported, so ``palimpsa train``
never pays for (or needs) the packages of the others.

User errors (bad config, missing file, unreadable checkpoint, a run that cannot go on) print one line
``error: <message>`` on stderr and exit with code 2, without a traceback. Whatever is printed has URL
passwords masked, tracebacks of unexpected errors included (they end up in job logs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palimpsa.credentials import mask_text, print_masked_traceback
from palimpsa.errors import USER_ERRORS

Runner = Callable[[argparse.Namespace], "int | None"]

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("palimpsa.cli:train_command", "train one run from a YAML config (resumes from --out)"),
    "convert": ("palimpsa.cli:convert_command", "metaplastic conversion of a checkpoint"),
    "eval": ("palimpsa.cli:eval_command", "evaluate a checkpoint on its validation set or zero-shot tasks"),
    "tune": ("palimpsa.tuning:cli_command", "run an Optuna study over a YAML search space"),
    "grid": ("palimpsa.grid:cli_command", "validate ablation grids and list their points"),
    "config": ("palimpsa.cli:config_command", "print a run config fully resolved (every default filled in)"),
    "results": ("palimpsa.results:cli_command", "tables of a results table: every seed, best lr per seed"),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _one_line(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: file not found"
    return mask_text(" ".join(str(err).split())) or type(err).__name__


# --------------------------------------------------------------------------- subcommands


def train_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("config", type=Path, help="run config (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, metrics.json, ...")
    _add_overrides(parser, "the config")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    parser.add_argument("--data-dir", type=Path, default=None, help="cache folder for generated task data")
    parser.add_argument("--quiet", action="store_true", help="no progress output")

    def run(args: argparse.Namespace) -> int:
        from palimpsa.config import load_config
        from palimpsa.training import train

        overrides = [*args.overrides, *(["tracking.enabled=false"] if args.no_track else [])]
        cfg = load_config(args.config, overrides)
        result = train(
            cfg, args.out, config_path=args.config, data_dir=args.data_dir, progress=not args.quiet
        )
        keys = ("val_accuracy", "val_loss", "steps", "wall_seconds", "tokens_per_second", "mlflow_run_id")
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, not one per process
            print(json.dumps({k: result[k] for k in keys if k in result}))
        return 0

    return run


def _add_overrides(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a key of {what}, e.g. --set train.lr=3e-3 (repeatable)",
    )


def config_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("config", type=Path, help="run config (YAML)")
    _add_overrides(parser, "the config")

    def run(args: argparse.Namespace) -> int:
        from palimpsa.config import config_to_dict, load_config
        from palimpsa.io import dump_yaml

        print(dump_yaml(config_to_dict(load_config(args.config, args.overrides))), end="")
        return 0

    return run


def convert_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("src", type=Path, help="checkpoint of a gated model (e.g. mamba2)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the converted checkpoint")
    _add_overrides(parser, "the converted config")

    def run(args: argparse.Namespace) -> int:
        from palimpsa.conversion import convert_checkpoint

        cfg = convert_checkpoint(args.src, args.out, args.overrides)
        print(f"{args.src} -> {args.out} ({cfg.model.mixer.kind})")
        return 0

    return run


def eval_command(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by train or convert")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    parser.add_argument("--data-dir", type=Path, default=None, help="cache folder for generated task data")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="TASK[,TASK...]",
        help="zero-shot tasks instead of the validation set: local multiple-choice files (YAML, JSON, JSONL) "
        "or lm-evaluation-harness names (needs lm-eval); repeatable. A run that trained a BPE finds it "
        "in --data-dir",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (harness tasks)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (--tasks)")

    def run(args: argparse.Namespace) -> int:
        from palimpsa.training import evaluate_checkpoint, write_json

        tasks = [name for value in args.tasks for name in value.split(",") if name]
        if tasks:
            from palimpsa.zero_shot import evaluate_zero_shot

            result = evaluate_zero_shot(
                args.checkpoint,
                tasks,
                data_dir=args.data_dir,
                device=args.device,
                batch_size=args.batch_size,
                limit=args.limit,
                num_fewshot=args.num_fewshot,
            )
        else:
            result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device)
        if args.out is not None:
            write_json(args.out, result)
        print(json.dumps(result))
        return 0

    return run


# --------------------------------------------------------------------------- entry point


def build_parser(chosen: str | None) -> tuple[argparse.ArgumentParser, Runner | None]:
    """The full parser; only the ``chosen`` subcommand's module is imported to configure it."""
    parser = argparse.ArgumentParser(prog="palimpsa", description="Palimpsa lab: train, convert, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runner = None
    for name, (target, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            runner = _resolve(target)(command_parser)
    return parser, runner


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser, runner = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)  # exits 2 with usage on bad arguments
    assert runner is not None
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt as err:
        print(f"error: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        print_masked_traceback()
        return 1


if __name__ == "__main__":
    sys.exit(main())
