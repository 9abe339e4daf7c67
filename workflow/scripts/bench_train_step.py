"""Whole training steps per mixer on one GPU, alone and packed: ``kernels/benchmarks/train_step.{json,md}``.

    python workflow/scripts/bench_train_step.py            # every mixer of the published grid, alone
    python workflow/scripts/bench_train_step.py --packed 4 8 --packed-variants palimpsa gated_deltanet

Each mixer trains through the real :class:`~palimpsa.training.Trainer` (data on the device, the model's
precision, the optimizer) on one point of a grid (default: ``ablations/mqar-official.yaml`` at L = 512, lr
4.64e-3, seed 1), with tracking off and a smaller training set (``task.num_train``; the step does not depend
on it). Alone: ``--steps`` timed steps after ``--warmup`` (device synchronized around the window). Packed:
N worker processes of the same mixer start together; once all have warmed up, each counts the steps it
makes in ``--seconds``; the aggregate is their sum. Whether CUDA MPS was running is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from palimpsa.config import config_from_dict  # noqa: E402
from palimpsa.grid import load_grid  # noqa: E402
from palimpsa.io import yaml_load  # noqa: E402
from palimpsa.training import Trainer  # noqa: E402

VARIANTS = ("palimpsa", "notpalimpsa", "metamamba2", "mamba2", "gated_deltanet")
POINT = {"task.seq_len": 512, "train.lr": 4.64e-3, "seed": 1}


def point_config(grid: Path, variant: str, overrides: list[str]) -> Any:
    points = [
        p
        for p in load_grid(grid).points
        if p.axes.get("variant") == variant and all(p.axes.get(k) == v for k, v in POINT.items())
    ]
    if len(points) != 1:
        raise SystemExit(f"{grid}: expected one point of variant {variant!r} at {POINT}, found {len(points)}")
    extra = {"tracking.enabled": False}
    for item in overrides:
        key, _, value = item.partition("=")
        extra[key] = yaml_load(value)
    return config_from_dict(points[0].resolve(extra))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mps_running() -> bool:
    """The MPS control daemon is up when its control pipe exists."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()


def warmed_up(cfg: Any, out: str, warmup: int) -> tuple[Trainer, Any]:
    """A trainer past its first ``warmup`` steps (compilation, autotuning) and its batch stream."""
    trainer = Trainer(cfg, out)
    batches = trainer.train_batches.from_step(0)
    for _ in range(warmup):
        trainer.train_step(*next(batches))
    sync()
    return trainer, batches


def alone(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        trainer, batches = warmed_up(cfg, out, warmup)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = trainer.train_step(*next(batches))
        sync()
        ms = (time.perf_counter() - start) / steps * 1e3
        tokens = trainer.plan.batch_size * trainer.data.seq_len
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return {
            "ms_per_step": ms,
            "steps_per_s": 1e3 / ms,
            "tokens_per_s": tokens * 1e3 / ms,
            "peak_mib": peak,
            "backends": trainer.model.backends(),
            "num_params": trainer.model.num_params(),
            "final_loss": float(loss),
        }


def worker(cfg: Any, warmup: int, seconds: float, ready_dir: Path, index: int, total: int) -> dict[str, Any]:
    """One packed run: warm up, wait for the others, then count steps for ``seconds``."""
    with tempfile.TemporaryDirectory() as out:
        trainer, batches = warmed_up(cfg, out, warmup)
        (ready_dir / f"ready-{index}").touch()
        while len(list(ready_dir.glob("ready-*"))) < total:
            time.sleep(0.05)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(5):
                trainer.train_step(*next(batches))
            sync()
            steps += 5
        elapsed = time.perf_counter() - start
        return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed}


def packed(args: argparse.Namespace, variant: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as ready:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    variant,
                    "--index",
                    str(i),
                    "--total",
                    str(n),
                    "--ready",
                    ready,
                    "--warmup",
                    str(args.warmup),
                    "--seconds",
                    str(args.seconds),
                    "--grid",
                    str(args.grid),
                    *sum((["--set", s] for s in args.set), []),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(n)
        ]
        results = []
        for proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"packed worker failed ({proc.returncode})")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    per_run = [r["steps_per_s"] for r in results]
    return {"runs": n, "steps_per_s_each": per_run, "aggregate_steps_per_s": sum(per_run)}


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Training steps on {record['device']}",
        "",
        f"torch {record['torch']}, triton {record['triton']}; `{record['grid']}` at {POINT}, "
        f"overrides {record['overrides']}; CUDA MPS during packed runs: {record['mps']}.",
        "",
        "| mixer | ms a step | steps/s | tokens/s | peak MiB | params | implementation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in record["alone"].items():
        impl = ", ".join(sorted(set(r["backends"].values())))
        lines.append(
            f"| {name} | {r['ms_per_step']:.2f} | {r['steps_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_mib'] or 0:.0f} | {r['num_params']:,} | {impl} |"
        )
    if record["packed"]:
        lines += ["", "| mixer | runs on the GPU | MPS | steps/s each | aggregate steps/s | vs one alone |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in record["packed"]:
            one = record["alone"].get(row["variant"], {}).get("steps_per_s")
            gain = f"{row['aggregate_steps_per_s'] / one:.2f}x" if one else "-"
            each = " / ".join(f"{v:.1f}" for v in row["steps_per_s_each"])
            lines.append(
                f"| {row['variant']} | {row['runs']} | {row['mps']} | {each} | "
                f"{row['aggregate_steps_per_s']:.1f} | {gain} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=ROOT / "ablations/mqar-official.yaml")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--set", action="append", default=["task.num_train=20000"], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--packed", type=int, nargs="*", default=[])
    ap.add_argument("--packed-variants", nargs="+", default=["palimpsa", "gated_deltanet"])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--merge", type=Path, help="add this run's rows to an existing record (JSON)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = point_config(args.grid, args.worker, args.set)
        print(json.dumps(worker(cfg, args.warmup, args.seconds, args.ready, args.index, args.total)))
        return 0
    import triton

    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "CPU",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "grid": str(args.grid.relative_to(ROOT) if args.grid.is_relative_to(ROOT) else args.grid),
        "overrides": args.set,
        "mps": mps_running(),
        "alone": {},
        "packed": [],
    }
    if args.merge and args.merge.is_file():
        old = json.loads(args.merge.read_text())
        record["alone"], record["packed"] = old.get("alone", {}), old.get("packed", [])
    for variant in args.variants:
        record["alone"][variant] = alone(point_config(args.grid, variant, args.set), args.steps, args.warmup)
        r = record["alone"][variant]
        print(f"{variant}: {r['ms_per_step']:.2f} ms a step, peak {r['peak_mib'] or 0:.0f} MiB", flush=True)
    for variant in args.packed_variants if args.packed else []:
        for n in args.packed:
            row = {"variant": variant, "mps": mps_running(), **packed(args, variant, n)}
            record["packed"].append(row)
            print(f"{variant} x{n}: aggregate {row['aggregate_steps_per_s']:.1f} steps/s", flush=True)
    text = markdown(record)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
