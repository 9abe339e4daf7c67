"""Data-parallel throughput: the same small model and global batch on 1 GPU, then on N GPUs via torchrun.

    python workflow/scripts/ddp_benchmark.py [--gpus 2] [--steps 300] [--mixer palimpsa] [--out DIR]
    python workflow/scripts/ddp_benchmark.py --device cpu --tiny --steps 6     # CPU smoke (gloo)

Both runs go through ``python -m palimpsa train`` (tracking off, so only torch, triton, yaml and tqdm are
needed), with the same config and global batch; the N-process run is the ``torchrun`` one. Prints, for
each: overall tokens/s (compile and autotune included), steady tokens/s (training steps between the first
and the last eval, eval time excluded), and how far the N-process losses are from the 1-process ones.
Writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def config(args: argparse.Namespace) -> dict:
    """MQAR at the paper's sequence length with a small 2-layer model (or a seconds-long CPU variant)."""
    if args.tiny:
        task = {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "num_train": 512}
        model = {"d_model": 32, "n_layers": 1}
        mixer = {"kind": args.mixer, "num_heads": 2, "head_k_dim": 16, "head_v_dim": 16}
        batch = 16
    else:
        task = {"name": "mqar", "vocab_size": 8192, "seq_len": 512, "num_kv_pairs": 128, "num_train": 16384}
        model = {"d_model": 256, "n_layers": 4}
        mixer = {"kind": args.mixer, "num_heads": 4, "head_k_dim": 64, "head_v_dim": 64}
        batch = args.batch
    return {
        "name": f"ddp-bench-{args.mixer}",
        "seed": 0,
        "task": {**task, "num_val": 256},
        "model": {**model, "mixer": mixer},
        "train": {
            "lr": 3.0e-3,
            "batch_size": batch,
            "epochs": 1000,
            "max_steps": args.steps,
            "eval_every": max(1, args.steps // 5),
            "warmup_steps": max(1, args.steps // 10),
            "checkpoint_every": 10**9,
            "device": args.device,
            **({"num_threads": 1} if args.device == "cpu" else {}),
        },
        "tracking": {"enabled": False},
    }


def run(nproc: int, cfg_path: Path, out: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    train = ["-m", "palimpsa", "train", str(cfg_path), "--out", str(out), "--quiet"]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += train
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run with {nproc} process(es) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"nproc": nproc, "wall_s": wall, "metrics": metrics, "history": history}


def steady_tokens_per_second(result: dict, tokens_per_step: int) -> float | None:
    """Throughput of the training steps between the first and the last eval: compilation and start-up
    (before the first eval) and the evals themselves are left out."""
    h = result["history"]
    if len(h) < 2:
        return None
    steps = h[-1]["step"] - h[0]["step"]
    seconds = h[-1]["train_seconds"] - h[0]["train_seconds"]
    return steps * tokens_per_step / seconds if seconds > 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences per step)")
    parser.add_argument("--mixer", default="palimpsa")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a model that trains in seconds on CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ddp-benchmark")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.gpus:
            sys.exit(f"needs {args.gpus} CUDA devices, found {torch.cuda.device_count()}")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(args)
    cfg_path = args.out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tokens_per_step = cfg["train"]["batch_size"] * cfg["task"]["seq_len"]

    results = []
    for nproc in (1, args.gpus):
        out = args.out / f"np{nproc}"
        for stale in ("checkpoint.pt", "metrics.json", "history.jsonl"):  # a fresh run, never a resume
            (out / stale).unlink(missing_ok=True)
        results.append(run(nproc, cfg_path, out, args))

    base = results[0]
    rows = []
    for r in results:
        m = r["metrics"]
        steady = steady_tokens_per_second(r, tokens_per_step)
        drift = max(
            abs(a["train_loss"] - b["train_loss"]) for a, b in zip(base["history"], r["history"], strict=True)
        )
        rows.append(
            {
                "nproc": r["nproc"],
                "device": m["device"],
                "precision": m["precision"],
                "steps": m["steps"],
                "tokens_per_second": m["tokens_per_second"],
                "steady_tokens_per_second": steady,
                "train_seconds": m["train_seconds"],
                "wall_s": r["wall_s"],
                "final_train_loss": r["history"][-1]["train_loss"],
                "max_abs_train_loss_diff_vs_1": drift,
                "peak_memory_mib": m["peak_memory_mib"],
            }
        )
    print(f"\n{'procs':>5} {'tokens/s':>12} {'steady tok/s':>13} {'train s':>8} {'loss diff':>10}  device")
    for row in rows:
        steady = row["steady_tokens_per_second"]
        print(
            f"{row['nproc']:>5} {row['tokens_per_second']:>12.0f} {steady or float('nan'):>13.0f}"
            f" {row['train_seconds']:>8.1f} {row['max_abs_train_loss_diff_vs_1']:>10.2e}  {row['device']}"
        )
    one, many = rows[0]["steady_tokens_per_second"], rows[-1]["steady_tokens_per_second"]
    summary = {"config": cfg, "rows": rows}
    if one and many:
        summary["speedup"] = many / one
        summary["efficiency"] = many / one / args.gpus
        print(f"speedup {summary['speedup']:.2f}x on {args.gpus}, efficiency {summary['efficiency']:.0%}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
