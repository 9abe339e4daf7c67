"""GPU correctness of our simple-GLA and (gated) delta-rule Triton kernels against float64 references.

    python -m kernels.benchmarks.check_gpu_baselines [--out kernels/benchmarks/gpu_check_baselines.md]

Same contract as ``check_gpu`` (the Palimpsa op): fp32 inputs must reach relative error <= 1e-5 on every
output and <= 1e-4 on every input gradient (``||x - ref|| / ||ref||``, the reference being the step-by-step
recurrence in float64 on the same inputs); bf16 is reported for information. Fresh random inputs each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

from kernels.delta_rule.chunk import chunk_delta_rule
from kernels.delta_rule.naive import naive_recurrent_delta_rule
from kernels.gla.chunk import chunk_simple_gla
from kernels.gla.naive import naive_recurrent_simple_gla

DEV = torch.device("cuda")
TOL_OUT, TOL_GRAD = 1e-5, 1e-4
# (name, B, T, H, K, V, decay): decay "normal", "none" (linear attention / DeltaNet) or "strong"
CASES = [
    ("mqar-official", 2, 512, 8, 16, 32, "normal"),
    ("odd-T", 2, 333, 2, 64, 64, "normal"),
    ("design-1", 1, 1024, 4, 64, 64, "strong"),
    ("no-decay", 2, 200, 2, 32, 48, "none"),
    ("wide", 1, 256, 2, 128, 128, "normal"),
]


def inputs(B, T, H, K, V, decay, gen):
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    q, k, v = r(B, T, H, K), torch.nn.functional.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V)
    la = torch.nn.functional.logsigmoid(r(B, T, H) + (0.0 if decay == "strong" else 3.0))
    if decay == "none":
        la = torch.zeros_like(la)
    beta = torch.rand(B, T, H, device=DEV, generator=gen)
    h0 = r(B, H, V, K) * 0.1
    return q, k, v, la, beta, h0


def errors(fast, ref, args, dtype) -> dict[str, float]:
    """Relative errors of outputs, final state and every input gradient (through a random functional)."""
    gen = torch.Generator(device=DEV).manual_seed(7)
    outs = {}
    for name, fn, cast in (("fast", fast, dtype), ("ref", ref, torch.float64)):
        xs = [a.to(cast).detach().requires_grad_() for a in args]
        y, ht = fn(*xs)
        if name == "fast":
            wy = torch.randn(y.shape, device=DEV, generator=gen, dtype=torch.float64)
            wh = torch.randn(ht.shape, device=DEV, generator=gen, dtype=torch.float64)
        ((y.double() * wy).sum() + (ht.double() * wh).sum()).backward()
        outs[name] = [y.double(), ht.double()] + [x.grad.double() for x in xs]
    names = ["y", "state", *[f"d{n}" for n in ("q", "k", "v", "log_alpha", "beta", "h0")[: len(args)]]]
    return {
        n: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        for n, a, b in zip(names, outs["fast"], outs["ref"], strict=False)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    gen = torch.Generator(device=DEV).manual_seed(torch.seed() % 2**31)
    lines = [
        f"# Baseline kernels against float64 on {torch.cuda.get_device_name()}",
        f"torch {torch.__version__}, triton {triton.__version__}; worst relative error, outputs / gradients",
        "",
        "| op | case | dtype | worst output | worst gradient | pass (fp32) |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for name, B, T, H, K, V, decay in CASES:
        q, k, v, la, beta, h0 = inputs(B, T, H, K, V, decay, gen)
        ops = {
            "simple_gla": (
                lambda q, k, v, la, h0: chunk_simple_gla(q, k, v, la, None, h0, True),
                lambda q, k, v, la, h0: naive_recurrent_simple_gla(q, k, v, la, None, h0, True),
                (q, k, v, la, h0),
            ),
            "gated_delta_rule": (
                lambda q, k, v, la, b, h0: chunk_delta_rule(q, k, v, b, la, None, h0, True),
                lambda q, k, v, la, b, h0: naive_recurrent_delta_rule(q, k, v, b, la, None, h0, True),
                (q, k, v, la, beta, h0),
            ),
        }
        for op, (fast, ref, xs) in ops.items():
            for dtype in (torch.float32, torch.bfloat16):
                err = errors(fast, ref, xs, dtype)
                out = max(err["y"], err["state"])
                grad = max(v for n, v in err.items() if n.startswith("d"))
                passed = out <= TOL_OUT and grad <= TOL_GRAD
                if dtype == torch.float32:
                    ok &= passed
                verdict = ("yes" if passed else "NO") if dtype == torch.float32 else "-"
                shape = f"{name} {B},{T},{H},{K},{V}"
                lines.append(f"| {op} | {shape} | {str(dtype)[6:]} | {out:.1e} | {grad:.1e} | {verdict} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print("all fp32 cases pass" if ok else "SOME fp32 CASES FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
