"""The Triton kernels compile for Hopper (sm_90) at the benchmark shapes, with no GPU present.

Triton's interpreter checks what the kernels compute, not whether the compiler accepts them: a construct
the interpreter runs (a named tuple index, a scalar mask) can still fail to compile. This compiles every
kernel of the chunked Palimpsa op, and the fused-chunk walks behind simple GLA and the delta rule, in a fresh
process without the interpreter, and reads the binaries back.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# only looked up, not imported: the interpreter tests must be the first to import triton in this process
if importlib.util.find_spec("triton") is None:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90_with_its_tensor_core_products(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    table = tmp_path / "sass.md"
    cmd = [sys.executable, "-m", "kernels.benchmarks.sass_report", "--shape", "design-1", "--sub", "1", "2",
           "--out", str(table)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    lines = table.read_text().splitlines()
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = {r[1]: dict(zip(head, r, strict=True)) for r in ([c.strip() for c in line.strip("|").split("|")]
                                                             for line in lines[4:])}  # fmt: skip
    assert set(rows) == {"states_fwd", "output_fwd", "local_bwd", "main_bwd sub=1", "main_bwd sub=2",
                         "walk_bwd sub=1", "walk_bwd sub=2", "correct_bwd"}  # fmt: skip
    for name, row in rows.items():
        assert int(row["instructions"]) > 100, name
        assert 0 < int(row["regs"]) <= 255, name
    # the boundary states, the reverse walks' sub-chunk starts (two-pass and one-pass) and the one-pass
    # backward's corrections are tensor-core products on Hopper
    for name in ("states_fwd", "main_bwd sub=1", "main_bwd sub=2", "walk_bwd sub=1", "walk_bwd sub=2",
                 "correct_bwd"):  # fmt: skip
        assert int(rows[name]["HGMMA"]) > 0, name
    # the per-token loops hold no tensor-core product: the forward replay and the local pulls are elementwise
    assert int(rows["output_fwd"]["HGMMA"]) == int(rows["local_bwd"]["HGMMA"]) == 0


def test_gla_and_delta_rule_walks_compile_for_sm90_with_tensor_core_products(tmp_path):
    """The fused-chunk walks of kernels/gla/chunk.py (simple GLA and, with state-dependent values, the delta
    rule) and the delta rule's WY kernels, forward and backward, at the baselines' head sizes (K = 16,
    V = 32) and at K = V = 64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    table = tmp_path / "sass.md"
    cmd = [sys.executable, "-m", "kernels.benchmarks.sass_report", "--kernels", "walk", "--shape", "baseline",
           "design-1", "--out", str(table)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    lines = table.read_text().splitlines()
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    cells = ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])
    rows = [dict(zip(head, r, strict=True)) for r in cells]
    kernels = {f"walk_{d} {op}" for d in ("fwd", "bwd") for op in ("gla", "delta")} | {"wy_fwd", "wy_bwd"}
    want = {(shape, kernel) for shape in ("baseline", "design-1") for kernel in kernels}
    assert {(r["shape"], r["kernel"]) for r in rows} == want
    for row in rows:
        assert 0 < int(row["regs"]) <= 255, row
        assert int(row["HGMMA"]) + int(row["HMMA"]) > 0, row  # every chunk product on tensor cores


# the most shared memory one block may use on an H100 / H200 (kernels.gla.chunk.SM90_SHARED_LIMIT), and
# what every launch leaves free below it
SM90_SHARED_LIMIT = 232448
MARGIN = 32 * 1024


def test_every_walk_and_wy_launch_fits_sm90_shared_memory(tmp_path):
    """Every distinct launch of the walks (simple GLA and the delta rule, forward and backward) and of the
    delta rule's WY kernels over K, V in {16, 32, 48, 64, 128, 256}, bf16 and fp32 inputs, at the default
    chunk size, with the blocks and stages ``walk_config`` picks: each needs at least 32 KiB less shared
    memory than an H200 has per block. With V blocks of 64 the delta rule's backward at K = V = 64, fp32,
    needed 262656 bytes and did not launch on an H200 (OutOfResources); the measure says so too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # the shared-memory-only compiles leave partial entries
    table = tmp_path / "shared.md"
    cmd = [sys.executable, "-m", "kernels.benchmarks.sass_report", "--shared-grid", "--out", str(table)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert f"limit {SM90_SHARED_LIMIT}" in lines[0]
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = [dict(zip(head, [c.strip() for c in line.strip("|").split("|")], strict=True))
            for line in lines[4:] if line.startswith("|")]  # fmt: skip
    kernels = {f"walk_{d} {op}" for d in ("fwd", "bwd") for op in ("gla", "delta")} | {"wy_fwd", "wy_bwd"}
    assert {r["kernel"] for r in rows} == kernels
    served = {(r["kernel"], r["dtype"], kv) for r in rows for kv in r["K x V served"].split()}
    heads = (16, 32, 48, 64, 128, 256)
    want = {(kernel, dtype, f"{K}x{V}") for kernel in kernels for dtype in ("bf16", "fp32")
            for K in heads for V in heads}  # fmt: skip
    assert served == want
    over = [r for r in rows if int(r["shared"]) > SM90_SHARED_LIMIT - MARGIN]
    assert not over, over
    # the launch that failed on the H200, as it was: V blocks of 64, 3 stages
    probe = (
        "from kernels.benchmarks import sass_report as s\n"
        "(_, fn, cx, warps, stages, fp32), = [r for r in s.walk_launches((2, 333, 2, 64, 64), dtype='fp32',"
        " states=True) if r[0] == 'walk_bwd delta']\n"
        "assert (cx['BV'], stages) == (32, 3), (cx['BV'], stages)\n"
        "print(s.shared_bytes(fn, {**cx, 'BV': 64}, warps, 3, 90, 'fp32', fp32))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) > SM90_SHARED_LIMIT
