"""The Triton Palimpsa kernels, run by Triton's interpreter on CPU, against the float64 recurrence.

Every case draws fresh random inputs, and checks the outputs and every input gradient (q, k, u, beta,
log_alpha, Ip, initial state) through a random linear functional of all outputs, on every backward path
(``BACKWARDS``: the two-pass backward of ``chunk.py`` and the one-pass backward of ``chunk_onepass.py`` with
its d log alpha by the identity; its per-element form has a case of its own) from one forward. Small chunk
sizes put several chunks and sub-chunks into short sequences, so the cross-chunk paths run too.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("triton was imported without its interpreter and there is no GPU", allow_module_level=True)

from kernels.palimpsa import chunk, fused_recurrent_palimpsa, naive_recurrent_palimpsa, palimpsa_attn  # noqa: E402
from kernels.palimpsa.chunk import chunk_palimpsa  # noqa: E402

NAMES = ["y", "var", "mu_T", "I_T", "dq", "dk", "du", "dbeta", "dlog_alpha", "dIp", "dmu_0", "dI_0"]
# the backward paths (chunk.CONFIG settings read at the backward); the one-pass path's per-element
# d log alpha has its own test
BACKWARDS = {
    "two-pass": {"backward": "two_pass"},
    "one-pass": {"backward": "one_pass", "onepass_dla": "identity"},
    "one-pass-direct": {"backward": "one_pass", "onepass_dla": "direct"},
}


@pytest.fixture(params=[1, 3, 4], ids=["walk-sub1", "walk-sub3", "walk-sub4"])
def reverse_walk(request, config):
    """Every backward case runs several sub-chunk lengths of the backward walks (``main_sub``,
    ``onepass_sub``): a product per token; per 3 tokens (3 divides no chunk size, so sub-chunks straddle the
    chunk's end); per 4 (the default). Returns the backward paths every case checks."""
    config["main_sub"] = config["onepass_sub"] = request.param
    return ["two-pass", "one-pass"]


def make_inputs(B, T, H, K, V, gen, gates="normal", N=None):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, u = r(B, T, H, K), r(B, T, H, K) / K**0.5, r(B, T, H, V)
    beta = torch.rand(B, T, H, V, generator=gen, dtype=torch.float64)
    la = torch.nn.functional.logsigmoid(r(B, T, H) + 2.0)
    ip = torch.rand(H, generator=gen, dtype=torch.float64) + 0.5
    if gates == "extreme":
        sel = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
        la = torch.where(sel < 0.3, torch.full_like(la, -30.0), torch.where(sel < 0.6, -1e-7 * sel, la))
        beta = torch.where(torch.rand(beta.shape, generator=gen) < 0.3, torch.zeros_like(beta), 50 * beta)
        ip = torch.tensor([1e-4, 1e4] * H, dtype=torch.float64)[:H]
    N = B if N is None else N
    mu0 = r(N, H, V, K)
    I0 = torch.rand(N, H, V, K, generator=gen, dtype=torch.float64) + ip[None, :, None, None]
    return [q, k, u, beta, la, ip, mu0, I0]


def forward_backward(fn, xs, dtype, seed, with_init=True, with_final=True, paths=None, **kw):
    """Outputs and input gradients of ``sum_j <w_j, out_j>`` for random weights ``w_j``; with ``paths`` (names
    in ``BACKWARDS``), ``{path: gradients}`` from one forward, one backward per path."""
    xs = [x.detach().to(dtype).clone().requires_grad_(True) for x in xs]
    q, k, u, beta, la, ip, mu0, I0 = xs
    init = (mu0, I0) if with_init else None
    y, var, final = fn(q, k, u, beta, la, ip, initial_state=init, output_final_state=with_final,
                       output_variance=True, **kw)  # fmt: skip
    outs = [y, var] + (list(final) if with_final else [])
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    leaves = xs[: 8 if with_init else 6]
    if paths is None:
        return outs, list(torch.autograd.grad(loss, leaves))
    grads = {}
    for path in paths:
        chunk.CONFIG.update(BACKWARDS[path])
        grads[path] = list(torch.autograd.grad(loss, leaves, retain_graph=True))
    return outs, grads


def assert_close(got, want, names, out_tol=1e-5, grad_tol=1e-4, n_out=4, where=""):
    for i, (name, a, b) in enumerate(zip(names, got, want, strict=True)):
        assert a is not None, f"{where}{name}"
        assert torch.isfinite(a).all(), f"{where}{name} has NaN or inf"
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()
        tol = out_tol if i < n_out else grad_tol
        assert err <= tol, f"{where}{name}: relative error {err:.2e} > {tol:.0e}"


def assert_paths_close(out, grads, ref_out, ref_grad, names=NAMES):
    """Outputs once, then every backward path's gradients, against the float64 reference."""
    assert_close(out, ref_out, names[: len(out)], n_out=len(out))
    for path, grad in grads.items():
        assert_close(grad, ref_grad, names[len(out) :], n_out=0, where=f"{path} backward: ")


def _triton(chunk_size):
    return lambda *a, **kw: chunk_palimpsa(*a, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize(
    ("shape", "chunk_size"),
    [
        ((2, 37, 2, 5, 12), 16),  # odd K and V; T % chunk != 0; several chunks and sub-chunks
        ((1, 40, 1, 48, 20), 32),  # K = 48 (not a power of two)
        ((1, 30, 1, 3, 80), 16),  # V = 80 > one V block: dk, dq, d log alpha summed over V blocks
        ((1, 18, 1, 130, 7), 16),  # K = 130 > 128
        ((1, 150, 1, 64, 64), 64),  # the default chunk at the benchmark's head size: full-size tiles
    ],
)
def test_outputs_and_all_gradients_match_float64(shape, chunk_size, reverse_walk):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    xs = make_inputs(*shape, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)
    out, grads = forward_backward(_triton(chunk_size), xs, torch.float32, seed, paths=reverse_walk)
    assert_paths_close(out, grads, ref_out, ref_grad)


def test_without_initial_state_and_through_the_dispatch(reverse_walk):
    gen = torch.Generator().manual_seed(3)
    xs = make_inputs(2, 21, 2, 16, 16, gen)
    seed = 11
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed, with_init=False)
    triton_attn = lambda *a, **kw: palimpsa_attn(*a, backend="triton", **kw)  # noqa: E731
    out, grads = forward_backward(triton_attn, xs, torch.float32, seed, with_init=False, paths=reverse_walk)
    assert_paths_close(out, grads, ref_out, ref_grad, NAMES[:10])


def test_without_final_state_gradient(config):
    """No final state: each sequence's last chunk starts the scan from zero and the identity reads no final
    state; a plain batch of two sequences, both backward paths, sub-chunks of 3."""
    config["main_sub"] = config["onepass_sub"] = 3
    gen = torch.Generator().manual_seed(4)
    xs = make_inputs(2, 19, 1, 6, 10, gen)
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, 2, with_final=False)
    paths = ["two-pass", "one-pass"]
    out, grads = forward_backward(_triton(16), xs, torch.float32, 2, with_final=False, paths=paths)
    assert_paths_close(out, grads, ref_out, ref_grad, NAMES[:2] + NAMES[4:])


def test_variable_length_batch_matches_each_sequence(reverse_walk):
    gen = torch.Generator().manual_seed(5)
    lens = [9, 1, 30]
    cu = torch.tensor([0, 9, 10, 40], dtype=torch.int32)
    xs = make_inputs(1, sum(lens), 2, 12, 10, gen, N=len(lens))
    seed = 17
    ref_out, ref_grad = forward_backward(
        lambda *a, **kw: palimpsa_attn(*a, backend="reference", cu_seqlens=cu, **kw), xs, torch.float64, seed
    )
    varlen = lambda *a, **kw: chunk_palimpsa(*a, cu_seqlens=cu, chunk_size=16, **kw)  # noqa: E731
    out, grads = forward_backward(varlen, xs, torch.float32, seed, paths=reverse_walk)
    assert_paths_close(out, grads, ref_out, ref_grad)


def test_extreme_gates_stay_finite_and_accurate(reverse_walk):
    """alpha near 0 (log -30) and near 1 (log -1e-7), beta = 0 and 50x, Ip of 1e-4 and 1e4."""
    gen = torch.Generator().manual_seed(9)
    xs = make_inputs(1, 35, 2, 8, 12, gen, gates="extreme")
    seed = 23
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, seed)
    out, grads = forward_backward(_triton(16), xs, torch.float32, seed, paths=reverse_walk)
    assert_paths_close(out, grads, ref_out, ref_grad)


def test_many_hard_resets_in_one_chunk_keep_fp32_accuracy(config):
    """Full 64-token chunks with ~20 gates of e^-30 each: cumulative log-decays reach -600, whose fp32 ulp is
    6e-5, so weights taken as differences of two cumulative sums lose that much; the chunk's weights from
    the sums of the later tokens' log-decays keep the outputs at fp32 rounding (this draw: y 5.8e-6 and
    mu_T 8.1e-6 with the differences)."""
    gen = torch.Generator().manual_seed(2)
    xs = make_inputs(1, 128, 2, 8, 12, gen, gates="extreme")
    ref_out, ref_grad = forward_backward(naive_recurrent_palimpsa, xs, torch.float64, 23)
    out, grads = forward_backward(_triton(64), xs, torch.float32, 23, paths=["two-pass", "one-pass"])
    assert_close(out, ref_out, NAMES[:4], out_tol=1e-6, n_out=4)
    for path, grad in grads.items():
        assert_close(grad, ref_grad, NAMES[4:], grad_tol=1e-5, n_out=0, where=f"{path} backward: ")


def test_one_pass_per_element_decay_gradient(config):
    """The one-pass backward with d log alpha in the per-element form (``onepass_dla = "direct"``): a varlen
    batch with extreme gates, two V blocks of the walk (dk, dq and the walk's d log alpha rows summed over
    blocks), a sequence shorter than a chunk and one ending mid-chunk; sub-chunks of 3."""
    gen = torch.Generator().manual_seed(41)
    cu = torch.tensor([0, 20, 25, 46], dtype=torch.int32)
    xs = make_inputs(1, 46, 2, 7, 24, gen, gates="extreme", N=3)
    config.update(onepass_bv=16, onepass_sub=3)
    varlen = lambda *a, **kw: chunk_palimpsa(*a, cu_seqlens=cu, chunk_size=16, **kw)  # noqa: E731
    ref_out, ref_grad = forward_backward(
        lambda *a, **kw: palimpsa_attn(*a, backend="reference", cu_seqlens=cu, **kw), xs, torch.float64, 3
    )
    out, grads = forward_backward(varlen, xs, torch.float32, 3, paths=["one-pass-direct"])
    assert_paths_close(out, grads, ref_out, ref_grad)


def test_one_pass_reuses_the_saved_states_once(config):
    """With ``onepass_reuse_states`` (the default) the one-pass backward writes its chunk pulls over the saved
    boundary states: the same gradients as with buffers of their own, bit for bit, and a second backward
    through the graph raises, naming the setting, instead of reading the overwritten states; without it two
    backwards agree. A backward refused for a bad setting writes nothing: the graph's next one still runs."""
    gen = torch.Generator().manual_seed(8)
    xs = make_inputs(2, 37, 2, 5, 12, gen)
    config.update(backward="one_pass", onepass_sub=3)

    def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [x.detach().float().requires_grad_(True) for x in xs]
        q, k, u, beta, la, ip, mu0, I0 = leaves
        y, var, (mu, I) = chunk_palimpsa(
            q, k, u, beta, la, ip, initial_state=(mu0, I0), output_final_state=True, output_variance=True,
            chunk_size=16,
        )  # fmt: skip
        return (y * y).sum() + var.sum() + (mu * I).sum(), leaves

    def backwards(reuse: object, n: int) -> list[list[torch.Tensor]]:
        config["onepass_reuse_states"] = reuse
        loss, leaves = forward()
        return [list(torch.autograd.grad(loss, leaves, retain_graph=True)) for _ in range(n)]

    kept = backwards(False, 2)
    for name, a, b in zip(NAMES[4:], *kept, strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="onepass_reuse_states"):
        backwards(True, 2)
    (reused,) = backwards(True, 1)
    for name, a, b in zip(NAMES[4:], reused, kept[0], strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="onepass_reuse_states"):
        backwards("False", 1)  # a string from a command line is not a switch
    config["onepass_reuse_states"] = True
    loss, leaves = forward()
    config["onepass_sub"] = 0
    with pytest.raises(ValueError, match="onepass_sub"):
        torch.autograd.grad(loss, leaves, retain_graph=True)
    config["onepass_sub"] = 3
    for name, a, b in zip(NAMES[4:], torch.autograd.grad(loss, leaves), kept[0], strict=True):
        assert torch.equal(a, b), name


def test_autocast_runs_the_op_in_its_dtype():
    """Under autocast a layer hands the op fp32 q, k and gates (rsqrt and softplus are fp32-listed ops) next
    to a bf16 v: the op runs as if all four had come in autocast's dtype (bit for bit, y in that dtype, not in
    IEEE fp32 products) and returns each gradient in its input's dtype."""
    gen = torch.Generator().manual_seed(12)
    q, k, u, beta, la, ip, _, _ = make_inputs(1, 37, 2, 16, 16, gen)
    mixed = [q.float(), k.float(), u.bfloat16(), beta.float(), la.float()]
    cast = [x.bfloat16() for x in mixed[:4]] + [mixed[4]]

    def run(xs: list[torch.Tensor], autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [x.clone().requires_grad_(True) for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _, _ = chunk_palimpsa(*leaves, ip.float(), chunk_size=16)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        return y, list(torch.autograd.grad((y.float() * w).sum(), leaves))

    y, grads = run(mixed, autocast=True)
    y_ref, grads_ref = run(cast, autocast=False)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    for name, x, g, g_ref in zip(NAMES[4:9], mixed, grads, grads_ref, strict=True):
        assert g.dtype == x.dtype, name
        assert torch.equal(g, g_ref.to(x.dtype)), name
    # one-token decode takes them as the chunked forward does
    state = (torch.randn(1, 2, 16, 16), torch.rand(1, 2, 16, 16) + 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, _, s1 = fused_recurrent_palimpsa(*(x[:, :1] for x in mixed), ip.float(), initial_state=state,
                                             backend="triton")  # fmt: skip
    y1_ref, _, s1_ref = fused_recurrent_palimpsa(*(x[:, :1] for x in cast), ip.float(), initial_state=state,
                                                 backend="triton")  # fmt: skip
    assert y1.dtype == torch.bfloat16
    assert torch.equal(y1, y1_ref) and torch.equal(s1[0], s1_ref[0]) and torch.equal(s1[1], s1_ref[1])
    # float64 is left alone, as autocast leaves it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64, _, _ = chunk_palimpsa(q, k, u, beta, la, ip, chunk_size=16)
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("full", [False, True], ids=["no-states", "init-and-final"])
@pytest.mark.parametrize("gates", ["normal", "extreme"])
def test_decay_and_prior_gradients_follow_from_the_identity(full, gates):
    """The one-pass backward's identity, on the float64 recurrence: with ``c_t`` the cumulative log-decay,
    ``dL/dc_t = -Ip z_t - <dvar_t, var_t> - <u_t, du_t> - <beta_t, dbeta_t>`` (plus ``<dS_T, S_T>`` on the raw
    final state at the last token), ``d log alpha_s = sum_{t >= s} dL/dc_t`` and ``dIp = sum_t z_t`` plus the
    initial and final states' direct terms; ``z_t`` sums the read-out's direct adjoint on ``I_t``."""
    gen = torch.Generator().manual_seed(31)
    B, T, H, K, V = 2, 29, 2, 6, 5
    xs = make_inputs(B, T, H, K, V, gen, gates=gates)
    outs, (dq, dk, du, db, dla, dip, *d0) = forward_backward(
        naive_recurrent_palimpsa, xs, torch.float64, 7, with_init=full, with_final=full
    )
    q, k, u, beta, la, ip, mu0, I0 = xs
    gen = torch.Generator().manual_seed(7)  # the weights forward_backward drew, in its order
    w = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    ipb = ip[None, :, None, None]
    M = mu0 * I0 if full else torch.zeros(B, H, V, K, dtype=torch.float64)
    Ib = I0 - ipb if full else torch.zeros_like(M)
    z = torch.zeros(B, T, H, dtype=torch.float64)
    scale = K**-0.5
    for t in range(T):
        kt, qt = k[:, t, :, None, :], q[:, t, :, None, :]
        M = la[:, t, :, None, None].exp() * M + u[:, t, :, :, None] * kt
        Ib = la[:, t, :, None, None].exp() * Ib + beta[:, t, :, :, None] * kt * kt
        I = Ib + ipb
        d_i = -(scale * w[0][:, t, :, :, None] * qt * M + scale**2 * w[1][:, t, :, :, None] * qt * qt) / I**2
        z[:, t] = d_i.sum((-1, -2))
    dc = -ip * z - (w[1] * outs[1]).sum(-1) - (u * du).sum(-1) - (beta * db).sum(-1)
    want_dip = z.sum((0, 1))
    if full:
        dmu_T, dI_T = w[2], w[3]
        dc[:, -1] += (dmu_T / I * M).sum((-1, -2)) + ((dI_T - dmu_T * M / I**2) * Ib).sum((-1, -2))
        dmu0, dI0 = d0
        want_dip += -(dI0 - dmu0 * mu0 / I0).sum((0, 2, 3)) + (dI_T - dmu_T * M / I**2).sum((0, 2, 3))
    want_dla = dc.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(want_dla, dla, rtol=1e-10, atol=1e-10 * dla.abs().max().item())
    torch.testing.assert_close(want_dip, dip, rtol=1e-10, atol=0.0)


def test_beta_zero_is_the_gated_linear_attention_limit():
    gen = torch.Generator().manual_seed(13)
    q, k, u, beta, la, ip, *_ = make_inputs(1, 20, 1, 8, 8, gen)
    y, _, _ = chunk_palimpsa(*(x.float() for x in (q, k, u, torch.zeros_like(beta), la, ip)), chunk_size=16)
    # with beta = 0, I_t == Ip and y = scale * (M_t / Ip) q: a plain gated linear recurrence
    M = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    for t in range(20):
        M = la[:, t, :, None, None].exp() * M + u[:, t, :, :, None] * k[:, t, :, None, :]
        want = (M / ip[None, :, None, None] * q[:, t, :, None, :]).sum(-1) * 8**-0.5
        torch.testing.assert_close(y[:, t].double(), want, rtol=1e-5, atol=1e-6)


def test_fused_recurrent_prefill_then_decode_equals_the_full_forward():
    gen = torch.Generator().manual_seed(21)
    q, k, u, beta, la, ip, mu0, I0 = (x.float() for x in make_inputs(2, 12, 2, 12, 20, gen))
    full, var_full, (mu_f, I_f) = naive_recurrent_palimpsa(
        *(x.double() for x in (q, k, u, beta, la, ip)), initial_state=(mu0.double(), I0.double()),
        output_final_state=True, output_variance=True,
    )  # fmt: skip
    y, var, state = fused_recurrent_palimpsa(
        q[:, :9], k[:, :9], u[:, :9], beta[:, :9], la[:, :9], ip, initial_state=(mu0, I0),
        output_variance=True, backend="triton",
    )  # fmt: skip
    ys, vs = [y], [var]
    for t in range(9, 12):
        s = slice(t, t + 1)
        y, var, state = fused_recurrent_palimpsa(
            q[:, s], k[:, s], u[:, s], beta[:, s], la[:, s], ip, initial_state=state, output_variance=True,
            backend="triton",
        )  # fmt: skip
        ys.append(y)
        vs.append(var)
    torch.testing.assert_close(torch.cat(ys, 1).double(), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(vs, 1).double(), var_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[0].double(), mu_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1].double(), I_f, rtol=1e-5, atol=1e-6)


def test_dispatch_rules():
    """One vocabulary for every op (kernels.backends); the Palimpsa torch form picks itself by length."""
    q = torch.zeros(1, 2, 1, 4)
    from kernels.backends import resolve_backend
    from kernels.palimpsa.naive import naive_chunk_palimpsa, naive_recurrent_palimpsa
    from kernels.palimpsa.ops import torch_form

    assert resolve_backend("palimpsa", q.device, "auto") == "torch"
    assert resolve_backend("palimpsa", q.device, "triton") == "triton"  # the interpreter is on here
    assert torch_form(q.device, 16) is naive_recurrent_palimpsa
    assert torch_form(q.device, 4096) is naive_chunk_palimpsa
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("palimpsa", q.device, "cuda")
    with pytest.raises(ValueError, match="B == 1"):
        chunk_palimpsa(*(torch.randn(2, 3, 1, 4) for _ in range(4)), torch.zeros(2, 3, 1), 1.0,
                       cu_seqlens=torch.tensor([0, 3]))  # fmt: skip


def test_gpu_check_script_runs_a_named_case_in_the_interpreter(tmp_path, config):
    """``check_gpu --device cpu --case NAME``: the GPU correctness check's table for one case (fp32 and bf16
    rows, each with its verdict) from the same kernels in the interpreter; an unknown case is refused."""
    from kernels.benchmarks import check_gpu

    out = tmp_path / "check.md"
    with pytest.raises(SystemExit) as done:
        check_gpu.main(["--device", "cpu", "--case", "K=5, V=12", "--out", str(out)])
    assert done.value.code == 0
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| K=5, V=12 |")]
    assert [row[3].strip() for row in rows] == ["float32", "bfloat16"]
    assert [row[-2].strip() for row in rows] == ["yes", "yes"]
    assert "Triton interpreter on the CPU" in out.read_text()
    with pytest.raises(SystemExit) as refused:
        check_gpu.main(["--device", "cpu", "--case", "K=5"])
    assert refused.value.code == 2
