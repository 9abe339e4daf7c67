"""The op's CUDA kernels side by side with their Triton twins on a GPU: the walk and the read-out.

    python -m kernels.benchmarks.check_cuda [--out kernels/benchmarks/gpu_check_cuda.md]
    compute-sanitizer --tool memcheck python -m kernels.benchmarks.check_cuda --memcheck

Both versions of a kernel get the same inputs (fresh random draws, the forward's boundary states, random
upstream gradients). For the one-pass backward's walk every output it hands the rest of the backward is
compared (relative error of the CUDA walk's against the Triton walk's; ``dc`` and ``dip`` summed over V
blocks, which the two cut differently); for the forward read-out, ``y`` and the variance. Then each kernel
alone is timed at the design, 170M-layer and MQAR shapes (bf16, median ms of ``do_bench``). ``--memcheck``
only runs both CUDA kernels once at a few small shapes (``MEMCHECK``), for a memory checker to watch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from kernels.palimpsa import chunk, chunk_onepass, output_cuda, walk_cuda
from kernels.palimpsa.utils import dot_precision, sequence_layout

DEV = torch.device("cuda")
OUTPUTS = ["dq", "dk", "du", "dbeta", "dc", "dip", "pull_S0", "pull_M", "pull_I"]
CASES = [  # name, (B, T, H, K, V), dtype, gates, cu_seqlens, variance gradient
    ("K=V=64", (2, 256, 2, 64, 64), torch.float32, "normal", None, False),
    ("K=V=64, variance", (2, 256, 2, 64, 64), torch.float32, "normal", None, True),
    ("K 48, V 40, T 300", (2, 300, 3, 48, 40), torch.float32, "normal", None, True),
    ("K 5, V 12", (2, 130, 2, 5, 12), torch.float32, "normal", None, False),
    ("K=V=128", (1, 200, 2, 128, 128), torch.float32, "normal", None, True),
    ("K 64, V 128 (two V blocks)", (1, 200, 2, 64, 128), torch.float32, "normal", None, False),
    ("K 16, V 32 (MQAR)", (4, 512, 2, 16, 32), torch.float32, "normal", None, False),
    ("varlen, 3 sequences", (1, 333, 2, 48, 64), torch.float32, "normal", [0, 70, 200, 333], True),
    ("extreme gates", (2, 200, 2, 32, 48), torch.float32, "extreme", None, True),
    ("K=V=64, bf16", (2, 256, 2, 64, 64), torch.bfloat16, "normal", None, False),
]
MEMCHECK = [(4, 512, 2, 16, 32), (2, 300, 2, 5, 12), (1, 200, 2, 128, 128), (2, 256, 2, 64, 72)]
TIMED = [
    ("design-1", (8, 2048, 16, 64, 64)),
    ("design-3", (8, 2048, 16, 128, 128)),
    ("paper-170M", (4, 4096, 16, 48, 48)),
    ("mqar-512", (128, 512, 8, 16, 32)),
]


def walk_args(B, T, H, K, V, dtype, gates="normal", cu=None, has_dvar=False, sub=4, seed=0, device=DEV):
    """The arguments the one-pass backward gives its walk: fresh random inputs (extreme gates: alpha = e^-30
    next to 1 - 1e-7, beta 0 or large, Ip 1e-4 next to 1e4), the forward's boundary states, random upstream
    gradients. Also the tests' inputs, on the CPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    q, k, u = r(1, B * T, H, K), r(1, B * T, H, K) / K**0.5, r(1, B * T, H, V)
    beta = torch.rand(1, B * T, H, V, device=device, generator=g)
    la = torch.nn.functional.logsigmoid(r(1, B * T, H) + 2.0)
    ip = torch.rand(H, device=device, generator=g) + 0.5
    if gates == "extreme":
        sel = torch.rand(1, B * T, H, device=device, generator=g)
        la = torch.where(sel < 0.3, torch.full_like(la, -30.0), torch.where(sel < 0.6, -1e-7 * sel, la))
        off = torch.rand(beta.shape, device=device, generator=g) < 0.3
        beta = torch.where(off, torch.zeros_like(beta), beta * 50)
        ip = torch.tensor([1e-4, 1e4] * H, device=device)[:H]
    cu_t = None if cu is None else torch.tensor(cu, device=device, dtype=torch.int32)
    layout = sequence_layout(1 if cu else B, B * T if cu else T, cu_t, 64, device)
    q, k, u, beta = (x.to(dtype) for x in (q, k, u, beta))
    BK = max(16, triton.next_power_of_2(K))
    BV = chunk._bv(V, BK, chunk.CONFIG["states_bv"], floor=16)
    hm = torch.empty(layout.num_chunks, H, V, K, device=device)
    hi = torch.empty_like(hm)
    chunk._states_fwd[(triton.cdiv(V, BV), layout.num_seqs * H)](
        k, u, beta, la, hm, hi, hm, hi, hm, hi, layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, C=64, BK=BK, BV=BV, USE_INIT=False, STORE_FINAL=False, PREC=dot_precision(dtype),
        num_warps=4,
    )  # fmt: skip
    dy, dvar = r(1, B * T, H, V).to(dtype), r(1, B * T, H, V).to(dtype)
    om = -torch.expm1(la)
    return (q, k, u, beta, la, om, ip, hm, hi, dy, dvar, has_dvar, K**-0.5, layout, 64, sub)


def read_out_args(walk: tuple) -> tuple:
    """The read-out's arguments from ``walk_args``'s: the same inputs and boundary states, new ``y`` (and
    variance) buffers filled with NaN, so an element a kernel never writes shows."""
    q, k, u, beta, la, om, ip, hm, hi, dy, _, has_var, scale, layout, C, _ = walk
    y = torch.full_like(dy, float("nan"))  # every output element must be written
    var = torch.full_like(dy, float("nan")) if has_var else None
    return q, k, u, beta, la, om, ip, hm, hi, y, var, scale, layout, C


def read_outs(args: tuple) -> list[torch.Tensor]:
    """``y`` (and the variance) of the read-out whose arguments these are."""
    return [x for x in args[9:11] if x is not None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--memcheck", action="store_true", help="run the CUDA kernels once at MEMCHECK, no more")
    args = ap.parse_args(argv)
    if args.memcheck:
        for shape in MEMCHECK:
            for has_dvar in (False, True):
                xs = walk_args(*shape, torch.bfloat16, has_dvar=has_dvar)
                walk_cuda.walk_bwd(*xs)
                output_cuda.output_fwd(*read_out_args(xs))
                torch.cuda.synchronize()
        print(f"ran the CUDA walk and read-out at {MEMCHECK}, with and without the variance")
        return
    lines = [
        f"# The CUDA kernels against their Triton twins\n\n{torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}. Relative errors of the CUDA kernels'"
        " outputs against the Triton kernels' on the same inputs.\n",
        "## The CUDA walk against the Triton walk (S = 4)\n",
        "| case | (B,T,H,K,V) | dtype | " + " | ".join(OUTPUTS) + " |",
        "|---|---|---|" + "---|" * len(OUTPUTS),
    ]
    worst = 0.0
    for name, shape, dtype, gates, cu, has_dvar in CASES:
        xs = walk_args(*shape, dtype, gates, cu, has_dvar)
        want, got = chunk_onepass._triton_walk(*xs), walk_cuda.walk_bwd(*xs)
        errs = []
        for out, a, b in zip(OUTPUTS, got[:9], want[:9], strict=True):
            errs.append(rel(a.sum(0), b.sum(0)) if out in ("dc", "dip", "pull_S0") else rel(a, b))
        if dtype == torch.float32:
            worst = max(worst, *errs)
        cells = " | ".join(f"{e:.1e}" for e in errs)
        lines.append(f"| {name} | {shape} | {str(dtype)[6:]} | {cells} |")
        print(lines[-1], flush=True)
    lines.append(f"\nworst fp32: {worst:.1e}\n")
    lines.append("## The CUDA read-out against the Triton read-out\n")
    lines.append("| case | (B,T,H,K,V) | dtype | y | var |")
    lines.append("|---|---|---|---|---|")
    worst = 0.0
    for name, shape, dtype, gates, cu, has_var in CASES:
        xs = walk_args(*shape, dtype, gates, cu, has_var)
        want, got = read_out_args(xs), read_out_args(xs)  # the same inputs, each its own outputs
        chunk._triton_read_out(*want)
        output_cuda.output_fwd(*got)
        errs = [rel(a, b) for a, b in zip(read_outs(got), read_outs(want), strict=True)]
        if dtype == torch.float32:
            worst = max(worst, *errs)
        cells = " | ".join(f"{e:.1e}" for e in errs) + (" | -" if len(errs) == 1 else "")
        lines.append(f"| {name} | {shape} | {str(dtype)[6:]} | {cells} |")
        print(lines[-1], flush=True)
    lines.append(f"\nworst fp32: {worst:.1e}\n")
    lines.append("## Each kernel alone (bf16, median ms)\n")
    lines.append(
        "| shape (B,T,H,K,V) | Triton walk | CUDA walk | speed-up | Triton read-out | CUDA read-out"
        " | speed-up |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name, shape in TIMED:
        xs = walk_args(*shape, torch.bfloat16)
        t_tri = do_bench(lambda xs=xs: chunk_onepass._triton_walk(*xs), rep=50, return_mode="median")
        t_cu = do_bench(lambda xs=xs: walk_cuda.walk_bwd(*xs), rep=50, return_mode="median")
        ro = read_out_args(xs)
        r_tri = do_bench(lambda ro=ro: chunk._triton_read_out(*ro), rep=50, return_mode="median")
        r_cu = do_bench(lambda ro=ro: output_cuda.output_fwd(*ro), rep=50, return_mode="median")
        lines.append(
            f"| {name} {shape} | {t_tri:.3f} | {t_cu:.3f} | {t_tri / t_cu:.2f} | {r_tri:.3f} | {r_cu:.3f} |"
            f" {r_tri / r_cu:.2f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
