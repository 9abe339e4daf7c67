"""What the Triton kernels compile to, without a GPU: registers, spills, shared memory, instruction mix.

    python -m kernels.benchmarks.sass_report [--arch 90] [--shape design-1] [--sub 1 4 8] [--out FILE]
                                             [--kernels palimpsa walk cuda] [--dtype bf16]
    python -m kernels.benchmarks.sass_report --shared-grid [--heads 16 32 48 64 128 256] [--jobs N]

Each Triton kernel of the chunked Palimpsa op (``palimpsa``), or of the fused-chunk walk behind simple GLA
and the delta rule and of the delta rule's WY pieces (``walk``: ``kernels/gla/chunk.py``,
``kernels/delta_rule/wy.py``), is compiled for the target (``sm_90`` = H100/H200)
with the launch constants the op would use at that shape (bf16 inputs, or ``--dtype``), read back with the
``cuobjdump`` that Triton ships; ``cuda`` adds the op's two CUDA C++ kernels (``output_fwd.cu``,
``walk_bwd.cu``, built by ``nvcc`` as the op builds them, so it needs an ``nvcc``). Compilation needs no
device, so launch shapes can be compared before a GPU
is at hand: spills (``stack`` bytes), barriers (``BAR``) and shuffles (``SHFL``) in a per-token loop are what
make a recurrence latency-bound, and ``HGMMA`` marks the tensor-core products. Static counts, not timings: a
loop body counts once however often it runs (the reverse walk's body holds ``main_sub`` unrolled tokens).

``--shared-grid`` compiles every distinct launch of the walks and the WY kernels over K, V in ``--heads``,
bf16 and fp32, with the constants the host code picks (``kernels.gla.chunk.walk_config``), only as far as
Triton's shared-memory allocation, and tabulates the bytes each needs against the sm_90 limit (227 KiB per
block; more fails at launch with ``OutOfResources``); exit status 1 if one needs more.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.delta_rule import wy
from kernels.gla import chunk as walk
from kernels.palimpsa import chunk, chunk_onepass, cuda_build, output_cuda, walk_cuda
from kernels.palimpsa.utils import next_pow2

SHAPES = {
    "design-1": (8, 2048, 16, 64, 64),
    "design-2": (4, 4096, 16, 64, 128),
    "design-3": (8, 2048, 16, 128, 128),
    "baseline": (128, 512, 8, 16, 32),  # the Mamba2 / Gated DeltaNet training step of the baselines
}
# pointer arguments that are not in the inputs' dtype
FP32_POINTERS = {"la", "om", "ip", "hm", "hi", "dhm", "dhi", "lm", "li", "h0m", "h0i", "hTm", "hTi", "dTm",
                 "dTi", "d0m", "d0i", "zla", "dc"}  # fmt: skip
FP64_POINTERS = {"dip", "dla", "tot"}  # the Ip gradient's partial sums; d log alpha's chunk parts and totals
INT_POINTERS = {"cu", "chunk_index", "chunk_offsets"}
SHOWN = ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "BAR", "HGMMA", "HMMA", "LDS", "STS", "LDG", "STG", "RED")
OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")  # '/*0a30*/ @P0 FFMA ...'
COLUMNS = ("regs", "stack", "shared", "warps", "instructions", *SHOWN)


def _signature(
    fn, constexprs: dict, dtype: str, atomic: bool, fp32: frozenset = frozenset()
) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in ("TT", "NT"):  # token and chunk counts
            sig[name] = "i32"
        elif name in fp32:
            sig[name] = "*fp32"
        elif name in INT_POINTERS:
            sig[name] = "*i32"
        elif name in FP64_POINTERS:
            sig[name] = "*fp64"
        elif name in FP32_POINTERS or (atomic and name in ("dq", "dk")):
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def launches(shape, sub: int, chunk_size: int = 64) -> list[tuple[str, object, dict, int, bool]]:
    """(label, kernel, constexprs, num_warps, atomic) for each kernel, mirroring the host code in chunk.py and
    chunk_onepass.py: the forward, the two-pass backward (``local_bwd``, ``main_bwd``) and the one-pass
    backward (``walk_bwd``, its d log alpha by the identity, and ``correct_bwd``); the scan both share is
    left out."""
    _, _, H, K, V = shape
    BK = max(16, next_pow2(K))
    cfg = chunk.CONFIG
    common = dict(H=H, K=K, V=V, C=chunk_size, BK=BK)
    bv_main = chunk._bv(V, BK, cfg["main_bv"], floor=16)
    atomic = triton.cdiv(V, bv_main) > 1
    bv_states = chunk._bv(V, BK, cfg["states_bv"], floor=16)
    bv_walk = chunk._bv(V, BK, cfg["onepass_bv"], floor=16)
    atomic_walk = triton.cdiv(V, bv_walk) > 1
    block = cfg["correct_block"]
    correct = dict(
        common, BK=min(BK, block), BV=min(max(16, next_pow2(V)), block), NV=triton.cdiv(V, bv_walk)
    )
    return [
        ("states_fwd", chunk._states_fwd,
         {**common, "BV": bv_states, "USE_INIT": False, "STORE_FINAL": False, "PREC": "tf32"}, 4, False),
        ("output_fwd", chunk._output_fwd,
         {**common, "BV": chunk._bv(V, BK, cfg["out_bv"]), "STORE_VAR": False, "FAST_RCP": True},
         chunk.num_warps("out_warps", BK, chunk._bv(V, BK, cfg["out_bv"])), False),
        ("local_bwd", chunk._local_bwd,
         {**common, "BV": chunk._bv(V, BK, cfg["local_bv"]), "HAS_DVAR": False},
         chunk.num_warps("local_warps", BK, chunk._bv(V, BK, cfg["local_bv"])), False),
        (f"main_bwd sub={sub}", chunk._main_bwd,
         {**common, "BV": bv_main, "SUB": sub, "HAS_DVAR": False, "ATOMIC": atomic, "PREC": "tf32"},
         chunk.num_warps("main_warps", BK, bv_main), atomic),
        (f"walk_bwd sub={sub}", chunk_onepass._walk_bwd,
         {**common, "BV": bv_walk, "SUB": sub, "HAS_DVAR": False, "ATOMIC": atomic_walk, "DLA_DIRECT": False,
          "FAST_RCP": True, "PREC": "tf32"}, chunk.num_warps("onepass_warps", BK, bv_walk), atomic_walk),
        ("correct_bwd", chunk_onepass._correct_bwd,
         {**correct, "HAS_DFINAL": False, "DLA_DIRECT": False, "PREC": "tf32"}, cfg["correct_warps"],
         atomic_walk),
    ]  # fmt: skip


# the walk's pointers that are fp32 whatever the inputs' dtype (states, partial sums, decays); the delta
# rule's chunk-major U and W_k (and dU) are fp32 too, they come out of the WY solve
WALK_FP32 = frozenset({"la", "h0", "hs", "ht", "dht", "dq", "dk", "dwk", "dla", "dh0"})


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def walk_launches(
    shape, chunk_size: int | None = None, dtype: str = "bf16", states: bool = False, gated: tuple = (True,)
) -> list[tuple[str, object, dict, int, int, frozenset]]:
    """(label, kernel, constexprs, num_warps, num_stages, fp32 pointers) of the GLA and delta-rule walks and
    of the delta rule's WY pieces, as the host code of kernels/gla/chunk.py and kernels/delta_rule/wy.py
    launches them for ``dtype`` inputs: chunk size from ``default_chunk_size`` (per op) unless given, blocks
    and stages from ``walk_config``. ``states``: with an initial and a final state (and the final state's
    gradient); ``gated``: the WY kernels with decays (True), without (False) or both."""
    _, _, H, K, V = shape
    tdtype = DTYPES[dtype]
    prec = walk.dot_precision(tdtype)
    rows = []
    for op, state_values in (("gla", False), ("delta", True)):
        C = chunk_size or walk.default_chunk_size(K, V, state_values)
        fp32 = WALK_FP32 | ({"u", "wk", "du"} if state_values else set())
        for name, fn, backward, flags in (
            ("walk_fwd", walk._walk_fwd, False, {"USE_INIT": states, "STORE_FINAL": states}),
            ("walk_bwd", walk._walk_bwd, True, {"USE_DFINAL": states}),
        ):
            BK, BV, stages = walk.walk_config(K, V, C, tdtype, state_values, backward)
            constexprs = dict(H=H, K=K, V=V, C=C, BK=BK, BV=BV, STATE_VALUES=state_values, PREC=prec, **flags)
            rows.append((f"{name} {op}", fn, constexprs, walk.NUM_WARPS, stages, fp32))
    C = chunk_size or walk.default_chunk_size(K, V, state_values=True)
    BK, BV = wy.wy_blocks(K, V, C)
    wy_fp32 = frozenset({"g", "u", "wk", "du", "dwk", "dg"})
    for g in gated:
        constexprs = dict(H=H, K=K, V=V, C=C, BK=BK, BV=BV, GATED=g, PREC=prec)
        suffix = "" if g else " ungated"
        # no loop loads a tile in the WY kernels: nothing to pipeline, Triton's default stages
        rows.append((f"wy_fwd{suffix}", wy._wy_fwd, constexprs, wy.NUM_WARPS, None, wy_fp32))
        rows.append((f"wy_bwd{suffix}", wy._wy_bwd, constexprs, wy.NUM_WARPS, None, wy_fp32))
    return rows


def _bin(tool: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _source(fn, constexprs: dict, dtype: str, atomic: bool, fp32: frozenset) -> ASTSource:
    sig = _signature(fn, constexprs, dtype, atomic, fp32)
    # as at a real launch: torch allocates 16-byte aligned and the JIT says so, which lets loads vectorize
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)


def _options(num_warps: int, num_stages: int | None) -> dict:
    return {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})


def report(
    fn,
    constexprs: dict,
    num_warps: int,
    atomic: bool,
    arch: int,
    dtype: str = "bf16",
    fp32: frozenset = frozenset(),
    num_stages: int | None = None,
) -> dict:
    src = _source(fn, constexprs, dtype, atomic, fp32)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options=_options(num_warps, num_stages))
    return counts(compiled.asm["cubin"], compiled.metadata.shared, num_warps)


def counts(cubin: bytes, shared: int, warps: int) -> dict:
    """The report's columns for one compiled kernel, read back with ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_bin("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))  # spills live in the stack frame
    ops = collections.Counter(OPCODE.findall(sass))
    return {
        "regs": int(res.get("REG", 0)),
        "stack": int(res.get("STACK", 0)),
        "shared": shared,
        "warps": warps,
        "instructions": sum(ops.values()),
        **{op: ops.get(op, 0) for op in SHOWN},
    }


def cuda_launches(shape, sub: int) -> list[tuple[str, cuda_build.Kernel]]:
    """The CUDA kernels' configurations at a shape (bf16, no variance): the read-out and the walk."""
    _, _, _, K, V = shape
    return [
        ("output_fwd.cu", output_cuda.output_shape(K, V, 64, torch.bfloat16, False)),
        (f"walk_bwd.cu sub={sub}", walk_cuda.walk_shape(K, V, torch.bfloat16, sub, False)),
    ]


def cuda_report(kernel: cuda_build.Kernel, arch: int) -> dict:
    """``report``'s columns for one of the CUDA kernels, compiled as ``cuda_build`` compiles it."""
    return counts(cuda_build._cubin(kernel, f"sm_{arch}"), kernel.smem_bytes, kernel.threads // 32)


class _Allocated(Exception):
    """Raised by the shared-memory-only compile as soon as Triton has allocated shared memory."""


def _allocate_only(backend, module, metadata, options, capability, make_llir) -> int:
    """Shared memory of a TritonGPU module: the passes that open NVIDIA's ``make_llir`` (Triton 3.9) up to
    and including the allocation, which records it as ``ttg.shared``. Where this Triton's passes differ (a
    missing pass, another signature), the whole ``make_llir`` instead, less LLVM's optimizer (its IR is
    dropped), which records the same figure in the metadata."""
    nvidia_compiler = sys.modules[type(backend).__module__]
    try:
        from triton._C.libtriton import ir, nvidia, passes

        ptx_version = nvidia_compiler.get_ptx_version_from_options(options, backend.target.arch)
        pm = ir.pass_manager(module.context)
        passes.ttgpuir.add_combine_tensor_select_and_if(pm)
        passes.ttgpuir.add_allocate_warp_groups(pm, False)
        passes.convert.add_scf_to_cf(pm)
        passes.gluon.add_inliner(pm)
        nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, ptx_version)
    except (AttributeError, ImportError, TypeError):
        optimize = nvidia_compiler.llvm.optimize_module
        nvidia_compiler.llvm.optimize_module = lambda *a, **k: None
        try:
            make_llir(module, metadata)
        finally:
            nvidia_compiler.llvm.optimize_module = optimize
        return metadata["shared"]
    pm.run(module, "sass_report.shared")
    return module.get_int_attr("ttg.shared")


def _stop_after_allocation(*args):
    """A Triton stages hook: called without arguments it names itself for the cache key; called with the
    stages it replaces the LLVM IR stage (where shared memory is allocated) by ``_allocate_only``, which
    ends the compile: TritonGPU IR is where the time goes after that (LLVM, PTX, ptxas) is skipped."""
    if not args:
        return "sass_report-shared-only", "sass_report-shared-only"
    backend, stages, options, _language, capability = args
    make_llir = stages["llir"]

    def llir(module, metadata):
        raise _Allocated(_allocate_only(backend, module, metadata, options, capability, make_llir))

    stages["llir"] = llir


def shared_bytes(
    fn, constexprs: dict, num_warps: int, num_stages: int | None, arch: int, dtype: str, fp32: frozenset
) -> int:
    """Shared memory (bytes) one block of this launch needs: what Triton records as ``metadata.shared`` and
    compares with the device's limit at launch (``OutOfResources: out of resource: shared memory``).
    Compiles only as far as the allocation where this Triton has the stages hook; fully otherwise."""
    src = _source(fn, constexprs, dtype, False, fp32)
    target, options = GPUTarget("cuda", arch, 32), _options(num_warps, num_stages)
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "add_stages_inspection_hook"):
        return triton.compile(src, target=target, options=options).metadata.shared
    saved, runtime.add_stages_inspection_hook = runtime.add_stages_inspection_hook, _stop_after_allocation
    try:
        return triton.compile(src, target=target, options=options).metadata.shared  # not reached
    except _Allocated as done:
        return done.args[0]
    finally:
        runtime.add_stages_inspection_hook = saved


HEADS = (16, 32, 48, 64, 128, 256)  # the head sizes the project's configs allow (K, V <= 256)


def grid_launches(heads=HEADS, dtypes=("bf16", "fp32"), gated=(True,)) -> list[dict]:
    """The distinct launches of the walks and of the WY kernels (with decays; ``gated=(True, False)`` adds
    them without, whose shared memory came out the same at every one of these shapes with Triton 3.9) over
    every K and V in ``heads`` and every input dtype, at the default chunk size, each with the (K, V) it
    serves. Launches that differ only in K and V inside the same tiles (K = 48 and 64 in BK = 64; V beyond
    one V block) are one entry: K and V enter the kernels only through masks and offsets, not tile shapes."""
    out: dict[tuple, dict] = {}
    for K in heads:
        for V in heads:
            for dtype in dtypes:
                launches = walk_launches((1, 1, 2, K, V), dtype=dtype, states=True, gated=gated)
                for label, fn, cx, warps, stages, fp32 in launches:
                    tiles = sorted((k, v) for k, v in cx.items() if k not in ("K", "V"))
                    entry = out.setdefault((label, dtype, warps, stages, *tiles), dict(
                        label=label, fn=fn, constexprs=cx, warps=warps, stages=stages, dtype=dtype, fp32=fp32,
                        shapes=[],
                    ))  # fmt: skip
                    entry["shapes"].append((K, V))
    return list(out.values())


def _shared_job(job: tuple) -> int:
    module, name, constexprs, warps, stages, arch, dtype, fp32 = job
    fn = getattr(importlib.import_module(module), name)
    return shared_bytes(fn, constexprs, warps, stages, arch, dtype, fp32)


GRID_COLUMNS = ("kernel", "dtype", "C", "BK", "BV", "stages", "shared", "of limit", "K x V served")


def shared_grid(
    heads=HEADS, dtypes=("bf16", "fp32"), gated=(True,), arch: int = 90, jobs: int | None = None
) -> list[dict]:
    """``grid_launches`` with each launch's shared memory (``shared``), compiled in ``jobs`` processes
    (default: one per CPU)."""
    entries = grid_launches(heads, dtypes, gated)
    todo = [(e["fn"].fn.__module__, e["fn"].fn.__name__, e["constexprs"], e["warps"], e["stages"], arch,
             e["dtype"], e["fp32"]) for e in entries]  # fmt: skip
    with ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as ex:
        shared = list(ex.map(_shared_job, todo))
    return [e | {"shared": nbytes} for e, nbytes in zip(entries, shared, strict=True)]


GRID_COLUMNS = ("kernel", "dtype", "C", "BK", "BV", "stages", "shared", "of limit", "K x V served")


def grid_table(rows: list[dict], arch: int = 90) -> list[str]:
    """Markdown table of ``shared_grid``'s rows against ``SM90_SHARED_LIMIT``, largest first per kernel."""
    limit = walk.SM90_SHARED_LIMIT
    lines = [
        f"sm_{arch}, triton {triton.__version__}: shared memory (bytes) per block of each distinct launch; "
        f"limit {limit}",
        "",
        "| " + " | ".join(GRID_COLUMNS) + " |",
        "|---" * len(GRID_COLUMNS) + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["label"], r["dtype"], -r["shared"])):
        cx, nbytes = r["constexprs"], r["shared"]
        served = " ".join(f"{K}x{V}" for K, V in r["shapes"])
        stages = "default" if r["stages"] is None else r["stages"]
        cells = (r["label"], r["dtype"], cx["C"], cx["BK"], cx["BV"], stages, nbytes, f"{nbytes / limit:.0%}",
                 served)  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    worst = max(r["shared"] for r in rows)
    lines += ["", f"largest {worst} bytes ({worst / limit:.0%} of {limit}), {len(rows)} distinct launches"]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["design-1", "design-3"])
    ap.add_argument("--sub", type=int, nargs="+", default=[chunk.CONFIG["main_sub"]])
    ap.add_argument("--kernels", choices=("palimpsa", "walk", "cuda"), nargs="+", default=["palimpsa"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="inputs' dtype (walk kernels)")
    ap.add_argument("--shared-grid", action="store_true",
                    help="instead: shared memory of every distinct walk and WY launch over --heads x --heads,"
                         " bf16 and fp32; exit status 1 if one needs more than the sm_90 limit")  # fmt: skip
    ap.add_argument("--heads", type=int, nargs="+", default=list(HEADS))
    ap.add_argument(
        "--wy-ungated", action="store_true", help="--shared-grid: the WY kernels without decays too"
    )
    ap.add_argument("--jobs", type=int, help="compile processes for --shared-grid (default: one per CPU)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.shared_grid:
        gated = (True, False) if args.wy_ungated else (True,)
        rows = shared_grid(args.heads, gated=gated, arch=args.arch, jobs=args.jobs)
        lines = grid_table(rows, args.arch)
        print("\n".join(lines), flush=True)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        sys.exit(1 if any(r["shared"] >= walk.SM90_SHARED_LIMIT for r in rows) else 0)
    head = (
        f"sm_{args.arch}, triton {triton.__version__}, {args.dtype} inputs; "
        "static counts (one loop body each)"
    )
    if "cuda" in args.kernels:
        nvcc = subprocess.run([cuda_build.nvcc_path() or "nvcc", "--version"], capture_output=True, text=True)
        release = re.findall(r"release ([0-9.]+)", nvcc.stdout)[0]
        head += f"; CUDA kernels by nvcc {release}, bf16, no variance"
    lines = [head, "", "| shape | kernel | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in args.shape:
        todo = []  # (label, kernel, constexprs, warps, atomic, fp32 pointers, stages)
        if "palimpsa" in args.kernels:
            todo += [(*row, frozenset(), None) for sub in args.sub for row in launches(SHAPES[name], sub)]
        if "walk" in args.kernels:
            rows = walk_launches(SHAPES[name], dtype=args.dtype)
            todo += [(label, fn, c, w, False, fp32, st) for label, fn, c, w, st, fp32 in rows]
        seen = set()
        for label, fn, constexprs, warps, atomic, fp32, stages in todo:
            if label in seen:
                continue
            seen.add(label)
            row = report(fn, constexprs, warps, atomic, args.arch, args.dtype, fp32, stages)
            lines.append(f"| {name} | {label} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
        if "cuda" in args.kernels:
            kernels = dict(launch for sub in args.sub for launch in cuda_launches(SHAPES[name], sub))
            for label, kernel in kernels.items():
                row = cuda_report(kernel, args.arch)
                lines.append(f"| {name} | {label} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
                print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
