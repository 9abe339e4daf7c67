"""Where the time goes: per-kernel GPU time of one Palimpsa fwd+bwd, and a sweep of launch shapes.

    python -m kernels.benchmarks.profile_palimpsa [--backward two_pass one_pass]
        [--sweep [--sub 1 2 4] [--bv 16 32 64] [--warps 4 8]] [--shapes design-1 design-3]

Per-kernel times come from the torch profiler (CUDA activity), summed over 5 steps and divided by 5, for each
backward path in ``--backward``. The sweep varies the walk of each of those paths (``main_*`` settings of the
two-pass backward, ``onepass_*`` of the one-pass one).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from kernels.benchmarks.bench_palimpsa import SHAPES, palimpsa_inputs, use_config
from kernels.palimpsa import chunk, palimpsa_attn

# the walk's settings each backward path reads
WALK_KEYS = {
    "two_pass": ("main_sub", "main_bv", "main_warps"),
    "one_pass": ("onepass_sub", "onepass_bv", "onepass_warps"),
}


def step_fn(shape, overrides: dict | None = None):
    """One fwd+bwd of the Triton op on fresh bf16 inputs (``overrides``: settings of ``chunk.CONFIG`` over
    its defaults; ``None`` leaves ``CONFIG`` as it is)."""
    if overrides is not None:
        use_config(overrides)
    x = palimpsa_inputs(*shape)
    dy = torch.randn(*shape[:3], shape[4], device="cuda").to(torch.bfloat16)

    def step():
        for t in x:
            t.grad = None
        palimpsa_attn(*x, backend="triton")[0].backward(dy)

    return step


def per_kernel(shape, overrides: dict | None = None) -> list[tuple[str, float]]:
    step = step_fn(shape, overrides)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key[:60], t / 5 / 1e3))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--backward", nargs="+", choices=sorted(WALK_KEYS), default=["two_pass", "one_pass"])
    ap.add_argument("--sub", type=int, nargs="+", default=[1, 2, 4], help="sweep: sub-chunk lengths")
    ap.add_argument("--bv", type=int, nargs="+", default=[16, 32, 64], help="sweep: V blocks of the walk")
    ap.add_argument("--warps", nargs="+", default=["auto", 4, 8], help="sweep: warps of the walk (or auto)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    ap.add_argument("--shapes", nargs="+", default=[SHAPES[0][0], SHAPES[2][0]], help="names in SHAPES")
    args = ap.parse_args(argv)
    base = dict(chunk.CONFIG)
    chosen = [(name, shape) for name, shape in SHAPES if name in args.shapes]
    for backward in args.backward:
        for name, shape in [] if args.no_profile else chosen:
            rows = per_kernel(shape, {"backward": backward})
            total = sum(t for _, t in rows)
            print(f"\n{name} {shape} {backward}: sum of kernel times {total:.3f} ms")
            for k, t in rows[:12]:
                print(f"  {t:8.3f} ms  {k}")
    if args.sweep:
        for backward in args.backward:
            grid = dict(zip(WALK_KEYS[backward], (args.sub, args.bv, args.warps), strict=True))
            for name, shape in chosen:
                for vals in itertools.product(*grid.values()):
                    vals = tuple(v if v == "auto" else int(v) for v in vals)
                    setting = {"backward": backward, **dict(zip(grid, vals, strict=True))}
                    try:
                        ms = do_bench(step_fn(shape, setting), warmup=10, rep=30, return_mode="median")
                        print(f"sweep {name} {setting} fwd+bwd {ms:.3f} ms", flush=True)
                    except Exception as exc:
                        why = f"{type(exc).__name__} {str(exc)[:120]}"
                        print(f"sweep {name} {setting} failed: {why}", flush=True)
    chunk.CONFIG.clear()
    chunk.CONFIG.update(base)


if __name__ == "__main__":
    main()
