"""Where a training step's time goes: wall time per step, GPU kernel time, the top kernels and host ops.

    python workflow/scripts/profile_train_step.py [--config ablations/base/mqar-paper.yaml]
        [--set KEY=VALUE ...] [--mixers palimpsa gated_deltanet mamba2] [--steps 20] [--out FILE.md]

Each mixer trains through the real ``Trainer`` (its data, model, optimizer, autocast and ``train_step``) on
the config's task, tracking off. After warm-up steps (compilation), ``--steps`` steps are timed with the
device synchronized, then three more run under the torch profiler. When the kernels' sum is far below
the wall time, the step is bound by the host (Python, launches, synchronizations), not by the GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from palimpsa.config import load_config  # noqa: E402
from palimpsa.training import Trainer  # noqa: E402

PROFILED_STEPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_mixer(config: Path, overrides: list[str], mixer: str, steps: int, warmup: int) -> list[str]:
    cfg = load_config(config, [*overrides, f"model.mixer.kind={mixer}", "tracking.enabled=false"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out)
        batches = trainer.train_batches.from_step(0)
        device = trainer.device
        for _ in range(warmup):
            trainer.train_step(*next(batches))
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            x, y, positions = next(batches)
            trainer.train_step(x, y, positions)
        _sync(device)
        step_ms = (time.perf_counter() - start) / steps * 1e3
        tokens = x.numel()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(PROFILED_STEPS):
                trainer.train_step(*next(batches))
            _sync(device)
    events = prof.key_averages()
    per_step = PROFILED_STEPS * 1e3  # microseconds over the profiled steps -> milliseconds a step
    kernels = sorted(
        ((e.key, e.self_device_time_total / per_step) for e in events if e.self_device_time_total > 0),
        key=lambda r: -r[1],
    )
    host = sorted(
        ((e.key, e.self_cpu_time_total / per_step, e.count // PROFILED_STEPS) for e in events),
        key=lambda r: -r[1],
    )
    gpu_ms = sum(ms for _, ms in kernels)
    rows = [
        f"### {mixer}: {step_ms:.1f} ms a step, {tokens / step_ms * 1e3:,.0f} tokens/s; "
        f"device kernels {gpu_ms:.1f} ms a step ({trainer.model.backends()})",
        "",
        *(["| device kernel | ms a step |", "|---|---|"] if kernels else []),
        *(f"| `{name[:70]}` | {ms:.3f} |" for name, ms in kernels[:10]),
        *([""] if kernels else []),
        "| host op (self time) | ms a step | calls a step |",
        "|---|---|---|",
        *(f"| `{name[:70]}` | {ms:.3f} | {n} |" for name, ms, n in host[:10]),
        "",
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "ablations/base/mqar-paper.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--mixers", nargs="+", default=["palimpsa", "gated_deltanet", "mamba2"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"# Training-step profile on {name}", "", f"`{args.config.name}` with {args.overrides}", ""]
    for mixer in args.mixers:
        lines += profile_mixer(args.config, args.overrides, mixer, args.steps, args.warmup)
        print("\n".join(lines[-30:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
