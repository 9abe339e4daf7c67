"""Time the Palimpsa Triton op against its torch forms and fla's kernels, in one run on one GPU.

    python -m kernels.benchmarks.bench_palimpsa [--out kernels/benchmarks] [--quick]

Per shape and implementation: median forward and forward+backward milliseconds (``triton.testing.do_bench``),
training tokens/s (``B*T / fwd+bwd``) and extra peak memory of one forward+backward: the allocator's peak
minus what was allocated once the inputs existed, so saved activations, states and input gradients count.
All inputs are bf16 except the log-decays (fp32, as fla recommends); fresh random data, never zeros.

Shapes: the three design shapes (notes.md), and one Palimpsa layer of the published 170M and 760M language
models at their context of 4096 (``ablations/base/lm-170m.yaml``, ``lm-760m.yaml``): 170M = 16 heads of
K = V = 48; 760M = 16 heads of K = 96, V = 192; batch 4 sequences a step here.

fla 0.6.0 refuses the gated chunk backward on Hopper with Triton < 3.7.1 (fla issue #640: its gradients
there are wrong). For TIMING only this script lifts that guard by setting the module flag the check reads;
nothing here uses those gradients, and training must never do this.

Our op runs once per variant (``VARIANTS``: settings of ``chunk.CONFIG`` over its defaults, set at the
forward): ``palimpsa_triton`` as shipped (``"auto"``: where nvcc is found, the forward read-out in CUDA C++
and the one-pass backward with the CUDA walk; without nvcc, Triton kernels and the one-pass backward only from
K * V = 2048),
``_triton_only`` the same with Triton kernels only (what runs without nvcc), ``_twopass`` the two-pass
backward, ``_onepass`` the one-pass backward (``kernels/palimpsa/chunk_onepass.py``, d log alpha by the
identity) with its Triton walk, ``palimpsa_cuda_walk`` the one-pass backward with its walk in CUDA C++
(``walk_bwd.cu``) at every head size (``_sub2``: S = 2), ``_onepass_direct`` the same with the per-element
d log alpha, the neighbouring sub-chunk lengths of
each Triton walk (``_sub2``, ``_sub8``, ``_onepass_sub2``, ``_onepass_sub8``), and both Triton paths at the
fixed launch widths that preceded ``"auto"`` warps (``_fixedwarps``). Each record carries its ``config``
and the per-kernel times of one step. Rows run in priority order (the first four variants and GDN on every
shape first, then the other variants and baselines); ``--budget-s`` stops starting new rows after that many
seconds.

Writes ``latest.json`` (a list of records) and ``latest.md`` (the table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from kernels.palimpsa import chunk, naive_chunk_palimpsa, palimpsa_attn

SHAPES: list[tuple[str, tuple[int, int, int, int, int]]] = [
    ("design-1", (8, 2048, 16, 64, 64)),
    ("design-2", (4, 4096, 16, 64, 128)),
    ("design-3", (8, 2048, 16, 128, 128)),
    ("paper-170M", (4, 4096, 16, 48, 48)),
    ("paper-760M", (4, 4096, 16, 96, 192)),
    ("mqar-512", (128, 512, 8, 16, 32)),
]
DEV = torch.device("cuda")
SHIPPED = dict(chunk.CONFIG)  # the defaults every variant starts from


def _rand(*shape, dtype=torch.bfloat16, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale + offset).to(dtype)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def palimpsa_inputs(B, T, H, K, V):
    q = _rand(B, T, H, K)
    k = torch.nn.functional.normalize(_rand(B, T, H, K, dtype=torch.float32), dim=-1).to(torch.bfloat16)
    u = _rand(B, T, H, V)
    beta = torch.rand(B, T, H, V, device=DEV).to(torch.bfloat16)
    la = torch.nn.functional.logsigmoid(_rand(B, T, H, dtype=torch.float32, offset=3.0))
    ip = torch.full((H,), 1.0, device=DEV)
    return [_leaf(x) for x in (q, k, u, beta, la, ip)]


def fla_inputs(B, T, H, K, V, kind):
    q = _rand(B, T, H, K)
    k = torch.nn.functional.normalize(_rand(B, T, H, K, dtype=torch.float32), dim=-1).to(torch.bfloat16)
    v = _rand(B, T, H, V)
    g = torch.nn.functional.logsigmoid(_rand(B, T, H, dtype=torch.float32, offset=3.0))
    xs = [q, k, v, g]
    if kind in ("gdn", "mesa"):
        xs.append(torch.rand(B, T, H, device=DEV).to(torch.bfloat16 if kind == "gdn" else torch.float32))
    if kind == "mesa":
        xs.append(torch.rand(H, K, device=DEV) + 0.5)  # lambda, per head and key channel
    return [_leaf(x) for x in xs]


FIXED_WARPS = {"out_warps": 4, "local_warps": 4, "main_warps": 8, "onepass_warps": 8}
VARIANTS: dict[str, dict] = {
    "palimpsa_triton": {},
    "palimpsa_triton_only": {"out_kernel": "triton", "onepass_walk": "triton"},
    "palimpsa_cuda_walk": {"backward": "one_pass", "onepass_walk": "cuda"},
    "palimpsa_triton_twopass": {"backward": "two_pass"},
    "palimpsa_triton_onepass": {"backward": "one_pass", "onepass_walk": "triton"},
    "palimpsa_triton_onepass_direct": {"backward": "one_pass", "onepass_dla": "direct"},
    "palimpsa_cuda_walk_sub2": {"backward": "one_pass", "onepass_walk": "cuda", "onepass_sub": 2},
    "palimpsa_triton_sub2": {"backward": "two_pass", "main_sub": 2},
    "palimpsa_triton_sub8": {"backward": "two_pass", "main_sub": 8},
    "palimpsa_triton_onepass_sub2": {"backward": "one_pass", "onepass_walk": "triton", "onepass_sub": 2},
    "palimpsa_triton_onepass_sub8": {"backward": "one_pass", "onepass_walk": "triton", "onepass_sub": 8},
    # the launch widths before "auto" (the same as auto from K * V = 4096 up; differ on small heads)
    "palimpsa_triton_fixedwarps": {"backward": "two_pass", **FIXED_WARPS},
    "palimpsa_triton_onepass_fixedwarps": {"backward": "one_pass", "onepass_walk": "triton", **FIXED_WARPS},
}
PRIORITY = (*list(VARIANTS)[:4], "fla_gdn_chunk")


def use_config(overrides: dict) -> None:
    """``chunk.CONFIG`` = the shipped defaults with ``overrides``."""
    chunk.CONFIG.clear()
    chunk.CONFIG.update(SHIPPED | overrides)


def _ours(x: list, overrides: dict) -> torch.Tensor:
    """Our Triton op with ``chunk.CONFIG`` = defaults + ``overrides``.

    Set at the forward: the backward that follows in the same step reads it.
    """
    use_config(overrides)
    return palimpsa_attn(*x, backend="triton")[0]


def impls(B, T, H, K, V) -> dict[str, tuple[Callable[[], list], Callable[[list], torch.Tensor]]]:
    """name -> (make inputs, forward returning the output)."""
    out = {
        name: (lambda: palimpsa_inputs(B, T, H, K, V), lambda x, o=overrides: _ours(x, o))
        for name, overrides in VARIANTS.items()
    }
    if SHAPES[0][1] == (B, T, H, K, V):  # the torch form keeps per-token states of a chunk: one shape only
        out["palimpsa_torch_chunk"] = (
            lambda: palimpsa_inputs(B, T, H, K, V),
            lambda x: naive_chunk_palimpsa(*(t.float() for t in x[:4]), x[4], x[5], chunk_size=64)[0],
        )
    try:
        import fla.ops.common.chunk_o as fla_chunk_o
        from fla.ops import chunk_gated_delta_rule, chunk_mesa_net, chunk_simple_gla

        fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # lift the #640 guard: timing only (see module docstring)
    except ImportError:
        return out
    out["fla_gdn_chunk"] = (
        lambda: fla_inputs(B, T, H, K, V, "gdn"),
        lambda x: chunk_gated_delta_rule(x[0], x[1], x[2], x[3], x[4])[0],
    )
    out["fla_simple_gla_chunk"] = (
        lambda: fla_inputs(B, T, H, K, V, "sgla"),
        lambda x: chunk_simple_gla(x[0], x[1], x[2], g=x[3])[0],
    )
    if K == V == 64:  # as in the design shapes; fla's Mesa CG solver is slow to build at 128
        out["fla_mesa_chunk"] = (
            lambda: fla_inputs(B, T, H, K, V, "mesa"),
            lambda x: chunk_mesa_net(x[0], x[1], x[2], x[3], x[4], x[5])[0],
        )
    return out


def measure(make, fwd, warmup=25, rep=100) -> dict[str, float]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    x = make()
    dy = torch.randn_like(fwd(x).float()).to(torch.bfloat16)
    for t in x:
        t.grad = None
    torch.cuda.synchronize()

    def step():
        for t in x:
            t.grad = None
        fwd(x).backward(dy)

    step()  # compile and warm up outside the measured peak
    for t in x:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad():
        fwd_ms = do_bench(lambda: fwd(x), warmup=warmup, rep=rep, return_mode="median")
    fb_ms = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    return {"fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "peak_mib": peak}


def elementwise_floor_ms(B, T, H, K, V) -> float:
    """Forward floor: ~8 flop per state element per token at the fp32 CUDA-core rate."""
    return 8 * B * T * H * K * V / 67e12 * 1e3


# lane-issue slots per state element and token (notes.md, run 6): forward 6 FP32 + 1 reciprocal; the one-pass
# backward 16 + 1; H200: 132 SMs x 128 lanes x 1.98 GHz
ISSUE_SLOTS = {"fwd": 7, "fwdbwd": 24}
ISSUES_PER_S = 132 * 128 * 1.98e9


def issue_floor_ms(B, T, H, K, V, what: str = "fwdbwd") -> float:
    """Issue-slot floor of the elementwise work at 100% issue efficiency (no other cost counted)."""
    return ISSUE_SLOTS[what] * B * T * H * K * V / ISSUES_PER_S * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    ap.add_argument("--shapes", nargs="*", help="shape names to run (default: all)")
    ap.add_argument("--impls", nargs="*", help="implementations to run (default: all available)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    args = ap.parse_args(argv)
    device = torch.cuda.get_device_name()
    versions = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    try:
        import fla

        versions["fla"] = fla.__version__
    except ImportError:
        versions["fla"] = None
    records = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    shapes = [s for s in shapes if not args.shapes or s[0] in args.shapes]
    start = time.monotonic()
    # our rows and GDN on every shape first, then the other baselines
    todo = [(0 if impl in PRIORITY else 1, i, name, shape, impl, fns)
            for i, (name, shape) in enumerate(shapes) for impl, fns in impls(*shape).items()
            if not args.impls or impl in args.impls]  # fmt: skip
    for _, _, name, shape, impl, (make, fwd) in sorted(todo, key=lambda r: r[:2]):
        B, T, H, K, V = shape
        rec = {"shape_name": name, "shape": dict(zip("BTHKV", shape, strict=True)), "impl": impl}
        rec |= {"device": device, **versions}
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            rec["error"] = f"skipped: time budget of {args.budget_s:.0f} s spent"
            records.append(rec)
            continue
        try:
            reps = (2, 5) if "torch" in impl else ((10, 30) if args.quick else (10, 50))
            rec |= measure(make, fwd, *reps)
            rec["tokens_per_s"] = B * T / (rec["fwdbwd_ms"] * 1e-3)
            if impl in VARIANTS:  # where the time goes, per kernel
                from kernels.benchmarks.profile_palimpsa import per_kernel

                rec["config"] = SHIPPED | VARIANTS[impl]
                rec["kernel_ms"] = dict(per_kernel(shape, VARIANTS[impl])[:8])
        except Exception as exc:  # record and go on: one failing baseline must not hide the rest
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            torch.cuda.empty_cache()
        records.append(rec)
        print(json.dumps(rec), flush=True)
        write(args.out, records, device, versions)  # after every record: a cut-off run keeps its rows
    for name, shape in shapes:
        records.append(
            {"shape_name": name, "shape": dict(zip("BTHKV", shape, strict=True)), "impl": "official_palimpsa",
             "error": "published kernels not installed on the benchmark machine; notes.md quotes them",
             "device": device, **versions}
        )  # fmt: skip
    use_config({})
    order = {name: i for i, (name, _) in enumerate(SHAPES)}
    records.sort(key=lambda r: order.get(r["shape_name"], len(order)))  # stable: priority order per shape
    write(args.out, records, device, versions)
    print(render(records, device, versions))


def write(out: Path, records: list[dict], device: str, versions: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "latest.md").write_text(render(records, device, versions))


def render(records: list[dict], device: str, versions: dict) -> str:
    lines = [
        f"# Palimpsa kernel benchmark\n\n{device}; torch {versions['torch']}, triton {versions['triton']}, "
        f"fla {versions['fla']}. bf16 inputs, median ms (do_bench), extra peak MiB of one fwd+bwd.\n",
        "| shape (B,T,H,K,V) | impl | fwd ms | fwd+bwd ms | Mtok/s | peak MiB | fwd+bwd / GDN | peak / GDN "
        "| of floor (fwd, fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gdn = {r["shape_name"]: r for r in records if r["impl"] == "fla_gdn_chunk" and "error" not in r}
    for r in records:
        s = ",".join(str(v) for v in r["shape"].values())
        if "error" in r:
            lines.append(f"| {r['shape_name']} ({s}) | {r['impl']} | - | - | - | - | {r['error'][:80]} | | |")
            continue
        g = gdn.get(r["shape_name"])
        rt = f"{r['fwdbwd_ms'] / g['fwdbwd_ms']:.2f}" if g else "-"
        rm = f"{r['peak_mib'] / g['peak_mib']:.2f}" if g else "-"
        floor = "-"
        if r["impl"].startswith("palimpsa"):  # the issue floors count this op's work, not another model's
            dims = tuple(r["shape"].values())
            f_fwd = issue_floor_ms(*dims, "fwd") / r["fwd_ms"]
            floor = f"{f_fwd:.0%}, {issue_floor_ms(*dims) / r['fwdbwd_ms']:.1%}"
        lines.append(
            f"| {r['shape_name']} ({s}) | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{r['tokens_per_s'] / 1e6:.2f} | {r['peak_mib']:.0f} | {rt} | {rm} | {floor} |"
        )
    lines.append(
        "\nElementwise forward floor (8 flop per state element per token at 67 TFLOP/s); issue floors"
    )
    lines.append("(7 and 24 lane-issues per element-token for fwd and fwd+bwd, notes.md run 6):")
    for name, shape in SHAPES:
        fwd, both = issue_floor_ms(*shape, "fwd"), issue_floor_ms(*shape)
        lines.append(
            f"- {name}: {elementwise_floor_ms(*shape):.3f} ms; issues fwd {fwd:.3f}, fwd+bwd {both:.3f} ms"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
