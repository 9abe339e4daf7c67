"""What the Triton kernels compile to, without a GPU: registers, spills, shared memory, instruction mix.

    python -m kernels.benchmarks.sass_report [--arch 90] [--shape design-1] [--sub 1 4 8] [--out FILE]
                                             [--kernels palimpsa walk]

Each Triton kernel of the chunked Palimpsa op (``palimpsa``), or of the fused-chunk walk behind simple GLA
and the delta rule and of the delta rule's WY pieces (``walk``: ``kernels/gla/chunk.py``,
``kernels/delta_rule/wy.py``), is compiled for the target (``sm_90`` = H100/H200)
with the launch constants the op would use for bf16 inputs at that shape, then read back with the
``cuobjdump`` that Triton ships. Compilation needs no device, so launch shapes can be compared before a GPU
is at hand: spills (``stack`` bytes), barriers (``BAR``) and shuffles (``SHFL``) in a per-token loop are what
make a recurrence latency-bound, and ``HGMMA`` marks the tensor-core products. Static counts, not timings: a
loop body counts once however often it runs (the reverse walk's body holds ``main_sub`` unrolled tokens).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.delta_rule import wy
from kernels.gla import chunk as walk
from kernels.palimpsa import chunk
from kernels.palimpsa.utils import next_pow2

SHAPES = {
    "design-1": (8, 2048, 16, 64, 64),
    "design-2": (4, 4096, 16, 64, 128),
    "design-3": (8, 2048, 16, 128, 128),
    "baseline": (128, 512, 8, 16, 32),  # the Mamba2 / Gated DeltaNet training step of the baselines
}
# pointer arguments that are not in the inputs' dtype
FP32_POINTERS = {"la", "ip", "hm", "hi", "dhm", "dhi", "lm", "li", "h0m", "h0i", "hTm", "hTi", "dTm", "dTi",
                 "d0m", "d0i", "zla"}  # fmt: skip
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
        elif name == "dip":
            sig[name] = "*fp64"
        elif name in FP32_POINTERS or (atomic and name in ("dq", "dk")):
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def launches(shape, sub: int, chunk_size: int = 64) -> list[tuple[str, object, dict, int, bool]]:
    """(label, kernel, constexprs, num_warps, atomic) for each kernel, mirroring the host code in chunk.py."""
    _, _, H, K, V = shape
    BK = max(16, next_pow2(K))
    cfg = chunk.CONFIG
    common = dict(H=H, K=K, V=V, C=chunk_size, BK=BK)
    bv_main = chunk._bv(V, BK, cfg["main_bv"], floor=16)
    atomic = triton.cdiv(V, bv_main) > 1
    bv_states = chunk._bv(V, BK, cfg["states_bv"], floor=16)
    return [
        ("states_fwd", chunk._states_fwd,
         {**common, "BV": bv_states, "USE_INIT": False, "STORE_FINAL": False, "PREC": "tf32"}, 4, False),
        ("output_fwd", chunk._output_fwd,
         {**common, "BV": chunk._bv(V, BK, cfg["out_bv"]), "STORE_VAR": False}, cfg["out_warps"], False),
        ("local_bwd", chunk._local_bwd,
         {**common, "BV": chunk._bv(V, BK, cfg["local_bv"]), "HAS_DVAR": False}, cfg["local_warps"], False),
        (f"main_bwd sub={sub}", chunk._main_bwd,
         {**common, "BV": bv_main, "SUB": sub, "HAS_DVAR": False, "ATOMIC": atomic, "PREC": "tf32"},
         cfg["main_warps"], atomic),
    ]  # fmt: skip


# the walk's pointers that are fp32 whatever the inputs' dtype (states, partial sums, decays); the delta
# rule's chunk-major U and W_k (and dU) are fp32 too, they come out of the WY solve
WALK_FP32 = frozenset({"la", "h0", "hs", "ht", "dht", "dq", "dk", "dwk", "dla", "dh0"})


def walk_launches(shape, chunk_size: int = 64) -> list[tuple[str, object, dict, int, frozenset]]:
    """(label, kernel, constexprs, num_warps, fp32 pointers) of the GLA and delta-rule walks and of the delta
    rule's WY pieces, as in the host code of kernels/gla/chunk.py and kernels/delta_rule/wy.py."""
    _, _, H, K, V = shape
    BK, BV = walk._blocks(K, V)
    common = dict(H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, PREC="tf32")
    rows = []
    for op, state_values in (("gla", False), ("delta", True)):
        fp32 = WALK_FP32 | ({"u", "wk", "du"} if state_values else set())
        fwd = {**common, "STATE_VALUES": state_values, "USE_INIT": False, "STORE_FINAL": False}
        bwd = {**common, "STATE_VALUES": state_values, "USE_DFINAL": False}
        rows.append((f"walk_fwd {op}", walk._walk_fwd, fwd, walk.NUM_WARPS, fp32))
        rows.append((f"walk_bwd {op}", walk._walk_bwd, bwd, walk.NUM_WARPS, fp32))
    wy_common = dict(H=H, K=K, V=V, C=chunk_size, BK=BK, BV=max(16, next_pow2(V)), GATED=True, PREC="tf32")
    wy_fp32 = frozenset({"g", "u", "wk", "du", "dwk", "dg"})
    rows.append(("wy_fwd", wy._wy_fwd, wy_common, wy.NUM_WARPS, wy_fp32))
    rows.append(("wy_bwd", wy._wy_bwd, wy_common, wy.NUM_WARPS, wy_fp32))
    return rows


def _bin(tool: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def report(
    fn,
    constexprs: dict,
    num_warps: int,
    atomic: bool,
    arch: int,
    dtype: str = "bf16",
    fp32: frozenset = frozenset(),
) -> dict:
    sig = _signature(fn, constexprs, dtype, atomic, fp32)
    # as at a real launch: torch allocates 16-byte aligned and the JIT says so, which lets loads vectorize
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
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
        "shared": compiled.metadata.shared,
        "warps": num_warps,
        "instructions": sum(ops.values()),
        **{op: ops.get(op, 0) for op in SHOWN},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["design-1", "design-3"])
    ap.add_argument("--sub", type=int, nargs="+", default=[chunk.CONFIG["main_sub"]])
    ap.add_argument("--kernels", choices=("palimpsa", "walk"), nargs="+", default=["palimpsa"])
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    head = f"sm_{args.arch}, triton {triton.__version__}, bf16 inputs; static counts (one loop body each)"
    lines = [head, "", "| shape | kernel | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name in args.shape:
        todo = []  # (label, kernel, constexprs, warps, atomic, fp32 pointers)
        if "palimpsa" in args.kernels:
            todo += [(*launch, frozenset()) for sub in args.sub for launch in launches(SHAPES[name], sub)]
        if "walk" in args.kernels:
            todo += [(label, fn, c, w, False, fp32) for label, fn, c, w, fp32 in walk_launches(SHAPES[name])]
        seen = set()
        for label, fn, constexprs, warps, atomic, fp32 in todo:
            if label in seen:
                continue
            seen.add(label)
            row = report(fn, constexprs, warps, atomic, args.arch, fp32=fp32)
            lines.append(f"| {name} | {label} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
