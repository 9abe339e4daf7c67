"""GPU correctness of the Palimpsa Triton op against the float64 recurrence (run on a CUDA machine).

    python -m kernels.benchmarks.check_gpu [--out kernels/benchmarks/gpu_check.md] [--set backward=one_pass]
        [--cuda-walk] [--case NAME ...]
    TRITON_INTERPRET=1 python -m kernels.benchmarks.check_gpu --device cpu --case "64 chunks, extreme gates"

``--set KEY=VALUE`` overrides ``chunk.CONFIG`` (the header lists them); ``--cuda-walk`` runs the one-pass
backward with its CUDA walk on every case that walk takes (the others say which walk they used);
``--case`` runs only the named cases (same draws as in the full run); ``--device cpu`` runs the same kernels
in Triton's interpreter (minutes for the 4096-token cases; its float32 arithmetic is not the GPU's, so it
reproduces rounding that follows from the algorithm, not the hardware's).

fp32 inputs must reach relative error <= 1e-5 on every output and <= 1e-4 on every input gradient
(``||x - ref|| / ||ref||``); bf16 inputs are reported against the same reference for information.
Inputs are fresh random draws each run. Cases cover odd K and V, T not a multiple of the chunk,
varlen batches, initial and final states, the variance, K = V = 256, extreme gates (two draws) and
sequences of 64 chunks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton

from kernels.palimpsa import (
    chunk,
    fused_recurrent_palimpsa,
    naive_recurrent_palimpsa,
    palimpsa_attn,
    walk_cuda,
)

DEV = torch.device("cuda")
NAMES = ["y", "var", "mu_T", "I_T", "dq", "dk", "du", "dbeta", "dlog_alpha", "dIp", "dmu_0", "dI_0"]


def make(B, T, H, K, V, gates="normal", seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    q, k, u = r(B, T, H, K), r(B, T, H, K) / K**0.5, r(B, T, H, V)
    beta = torch.rand(B, T, H, V, device=DEV, generator=g)
    la = torch.nn.functional.logsigmoid(r(B, T, H) + 2.0)
    ip = torch.rand(H, device=DEV, generator=g) + 0.5
    if gates == "extreme":
        sel = torch.rand(B, T, H, device=DEV, generator=g)
        la = torch.where(sel < 0.3, torch.full_like(la, -30.0), torch.where(sel < 0.6, -1e-7 * sel, la))
        off = torch.rand(beta.shape, device=DEV, generator=g) < 0.3  # beta = 0 on 30% of the entries
        beta = torch.where(off, torch.zeros_like(beta), beta * 50)
        ip = torch.tensor([1e-4, 1e4] * H, device=DEV)[:H]
    mu0, I0 = r(B, H, V, K), torch.rand(B, H, V, K, device=DEV, generator=g) + ip[None, :, None, None]
    return [q, k, u, beta, la, ip, mu0, I0]


def run(xs, backend, dtype, cu=None):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    q, k, u, beta, la, ip, mu0, I0 = xs
    cast = [t.to(dtype) for t in (q, k, u, beta)]
    y, var, (mu, I) = palimpsa_attn(
        *cast, la, ip, initial_state=(mu0, I0), output_final_state=True, output_variance=True,
        cu_seqlens=cu, backend=backend,
    )  # fmt: skip
    g = torch.Generator(device=DEV).manual_seed(7)
    w = lambda t: torch.randn(t.shape, device=DEV, generator=g, dtype=torch.float64)  # noqa: E731
    loss = sum((t.double() * w(t)).sum() for t in (y, var, mu, I))
    loss.backward()
    return [y, var, mu, I] + [x.grad for x in xs]


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a chunk.CONFIG setting")
    ap.add_argument("--cuda-walk", action="store_true", help="one-pass, CUDA walk")
    ap.add_argument("--case", action="append", default=[], metavar="NAME", help="run only this case")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: with TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    global DEV
    DEV = torch.device(args.device)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in chunk.CONFIG:
            ap.error(f"--set {item}: no chunk.CONFIG key {key!r}")
        overrides[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    chunk.CONFIG.update(overrides)
    if args.cuda_walk:
        chunk.CONFIG["backward"] = "one_pass"
    cases = [
        ("odd K,V; T % 64 != 0", (2, 300, 3, 48, 40), "normal", None),
        ("K=V=64", (2, 256, 2, 64, 64), "normal", None),
        ("K=V=128", (1, 200, 2, 128, 128), "normal", None),
        ("K=5, V=12", (2, 130, 2, 5, 12), "normal", None),
        ("K=V=256", (1, 96, 1, 256, 256), "normal", None),
        ("varlen 3 seqs", (1, 333, 2, 48, 64), "normal", [0, 70, 71, 333]),
        ("extreme gates", (2, 200, 2, 32, 48), "extreme", None),
        ("extreme gates, 2nd draw", (2, 200, 2, 32, 48), "extreme", None),
        # d log alpha's tail sums the later chunks' totals: its rounding grows with the sequence
        ("64 chunks", (1, 4096, 2, 64, 64), "normal", None),
        ("64 chunks, extreme gates", (1, 4096, 2, 32, 48), "extreme", None),
    ]
    unknown = set(args.case) - {c[0] for c in cases}
    if unknown:
        ap.error(f"--case: no case named {sorted(unknown)}; the cases: {[c[0] for c in cases]}")
    where = torch.cuda.get_device_name() if DEV.type == "cuda" else "Triton interpreter on the CPU"
    lines = [
        f"# GPU check: Triton Palimpsa vs float64 recurrence\n\n{where}, torch "
        f"{torch.__version__}, triton {triton.__version__}. Relative error ||x - ref|| / ||ref||.\n"
        "Targets (fp32 inputs): outputs <= 1e-5, gradients <= 1e-4.\n"
        f"chunk.CONFIG: {chunk.CONFIG}\n",
        "| case | (B,T,H,K,V) | dtype | " + " | ".join(NAMES) + " | pass |",
        "|---|---|---|" + "---|" * len(NAMES) + "---|",
    ]
    ok_all = True
    for seed, (name, shape, gates, cu) in enumerate(cases):
        if args.case and name not in args.case:
            continue
        xs = make(*shape, gates=gates, seed=seed)
        cu_t = torch.tensor(cu, device=DEV, dtype=torch.int32) if cu else None
        if cu:
            xs[6], xs[7] = (
                xs[6].expand(len(cu) - 1, *xs[6].shape[1:]),
                xs[7].expand(len(cu) - 1, *xs[7].shape[1:]),
            )
        ref = run([x.double() for x in xs], "reference", torch.float64, cu_t)
        for dtype in (torch.float32, torch.bfloat16):
            if args.cuda_walk:
                sub = chunk.CONFIG["onepass_sub"]
                reason = walk_cuda.unsupported_reason(shape[3], shape[4], 64, dtype, sub)
                chunk.CONFIG["onepass_walk"] = "cuda" if reason is None else "triton"
                name = name.split(" (")[0] + ("" if reason is None else f" (Triton walk: {reason})")
            try:
                out = run(xs, "triton", dtype, cu_t)
                errs = [rel(a, b) for a, b in zip(out, ref, strict=True)]
            except Exception as exc:  # a case that fails to build or run fails its row, not the check
                print(f"{name} {dtype}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                errs = [float("inf")] * len(NAMES)
            ok = all(e <= (1e-5 if i < 4 else 1e-4) for i, e in enumerate(errs))
            ok = ok if dtype == torch.float32 else all(e < 0.1 for e in errs)
            ok_all &= ok
            cells = " | ".join(f"{e:.1e}" for e in errs)
            lines.append(f"| {name} | {shape} | {str(dtype)[6:]} | {cells} | {'yes' if ok else 'NO'} |")
    # inference kernel: prefill then one-token decodes equal the full forward
    xs = make(2, 40, 2, 48, 40)
    q, k, u, beta, la, ip, mu0, I0 = xs
    y_full = naive_recurrent_palimpsa(
        *[t.double() for t in (q, k, u, beta, la, ip)], initial_state=(mu0, I0)
    )[0]
    y1, _, st = fused_recurrent_palimpsa(q[:, :37], k[:, :37], u[:, :37], beta[:, :37], la[:, :37], ip,
                                         initial_state=(mu0, I0))  # fmt: skip
    ys = [y1]
    for t in range(37, 40):
        sl = slice(t, t + 1)
        yt, _, st = fused_recurrent_palimpsa(q[:, sl], k[:, sl], u[:, sl], beta[:, sl], la[:, sl], ip,
                                             initial_state=st)  # fmt: skip
        ys.append(yt)
    e = rel(torch.cat(ys, 1), y_full)
    ok_all &= e <= 1e-5
    lines.append(f"\nfused recurrent prefill (37) + 3 decode steps vs full reference: {e:.1e}")
    text = "\n".join(lines) + f"\n\nall pass: {ok_all}\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
