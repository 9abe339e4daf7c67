"""Float64 checks of the reference ops: chunked == recurrent, the family's exact limits, and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention, naive_attention
from kernels.delta_rule import delta_rule, naive_chunk_delta_rule, naive_recurrent_delta_rule
from kernels.gla import linear_attention, naive_chunk_simple_gla, naive_recurrent_simple_gla, simple_gla
from kernels.longhorn import longhorn, naive_recurrent_longhorn
from kernels.mesa import mesa, naive_chunk_mesa, naive_recurrent_mesa
from kernels.palimpsa import naive_chunk_palimpsa, naive_recurrent_palimpsa

DT = torch.float64
TOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(seed: int, B=2, T=37, H=3, K=5, V=4, decay=2.0):
    """Random ``q, k, v, beta (vector), log_alpha`` with ``log_alpha`` in ``(-decay, 0]``."""
    g = _gen(seed)
    q, k = torch.randn(B, T, H, K, generator=g, dtype=DT), torch.randn(B, T, H, K, generator=g, dtype=DT)
    v = torch.randn(B, T, H, V, generator=g, dtype=DT)
    beta = torch.rand(B, T, H, V, generator=g, dtype=DT)
    log_alpha = -decay * torch.rand(B, T, H, generator=g, dtype=DT)
    return q, k, v, beta, log_alpha


def _maxdiff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_maxdiff(x, y) for x, y in zip(a, b, strict=True))
    assert (a is None) == (b is None)
    return 0.0 if a is None else (a - b).abs().max().item()


def _palimpsa_state(seed: int, B=2, H=3, K=5, V=4):
    g = _gen(seed)
    return torch.randn(B, H, V, K, generator=g, dtype=DT), 1 + torch.rand(B, H, V, K, generator=g, dtype=DT)


# ---------------------------------------------------------------- Palimpsa: chunked == recurrent


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_palimpsa_chunk_matches_recurrent(chunk_size, with_state):
    q, k, v, beta, log_alpha = _inputs(0)
    u = v * beta
    ip = torch.tensor([0.5, 1.0, 3.0], dtype=DT)
    init = _palimpsa_state(1) if with_state else None
    kw = dict(initial_state=init, output_final_state=True, output_variance=True)
    ref = naive_recurrent_palimpsa(q, k, u, beta, log_alpha, ip, **kw)
    out = naive_chunk_palimpsa(q, k, u, beta, log_alpha, ip, chunk_size=chunk_size, **kw)
    assert out[1] is not None and out[2] is not None
    assert _maxdiff(ref, out) < TOL


def test_palimpsa_chunk_defaults_match_recurrent():
    """Scalar ip, default scale, no variance and no final state requested."""
    q, k, v, beta, log_alpha = _inputs(2, T=20)
    ref = naive_recurrent_palimpsa(q, k, v, beta, log_alpha, 2.0)
    out = naive_chunk_palimpsa(q, k, v, beta, log_alpha, 2.0)
    assert out[1] is None and out[2] is None
    assert _maxdiff(ref[0], out[0]) < TOL


def test_palimpsa_chunk_survives_strong_decay():
    """Cumulative log-decay of -800 inside one chunk: the masked differences keep exp finite."""
    q, k, v, beta, log_alpha = _inputs(3, T=32)
    log_alpha = log_alpha * 0 - 50.0
    args = (q, k, v * beta, beta, log_alpha, 1.0)
    ref = naive_recurrent_palimpsa(*args)[0]
    qg = q.clone().requires_grad_()
    la = log_alpha.clone().requires_grad_()
    out = naive_chunk_palimpsa(qg, k, v * beta, beta, la, 1.0, chunk_size=16)[0]
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(qg.grad).all() and torch.isfinite(la.grad).all()
    assert _maxdiff(ref, out) < TOL


def test_palimpsa_chunk_gradients_match_recurrent():
    q, k, v, beta, log_alpha = _inputs(4, T=23)
    ip = torch.tensor([0.7, 1.3, 2.0], dtype=DT)
    mu0, I0 = _palimpsa_state(5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, log_alpha, ip, mu0, I0)]
    go = torch.randn(2, 23, 3, 4, generator=_gen(6), dtype=DT)
    grads = []
    for fn, kw in ((naive_recurrent_palimpsa, {}), (naive_chunk_palimpsa, {"chunk_size": 8})):
        x = [t.detach().clone().requires_grad_() for t in leaves]
        y, var, (mu, I) = fn(
            *x[:6], initial_state=(x[6], x[7]), output_final_state=True, output_variance=True, **kw
        )
        ((y * go).sum() + var.sum() + (mu * I).sum()).backward()
        grads.append([t.grad for t in x])
    assert _maxdiff(grads[0], grads[1]) < 1e-9


@pytest.mark.parametrize("fn", [naive_recurrent_palimpsa, naive_chunk_palimpsa])
def test_palimpsa_gradcheck(fn):
    """Every differentiable input, ip and the initial state included, against finite differences."""
    g = _gen(7)
    B, T, H, K, V = 1, 5, 2, 3, 2
    q, k = torch.randn(B, T, H, K, generator=g, dtype=DT), torch.randn(B, T, H, K, generator=g, dtype=DT)
    u = torch.randn(B, T, H, V, generator=g, dtype=DT)
    beta = 0.2 + torch.rand(B, T, H, V, generator=g, dtype=DT)
    log_alpha = -torch.rand(B, T, H, generator=g, dtype=DT)
    ip = 0.5 + torch.rand(H, generator=g, dtype=DT)
    mu0 = torch.randn(B, H, V, K, generator=g, dtype=DT)
    I0 = 1 + torch.rand(B, H, V, K, generator=g, dtype=DT)
    kw = {"chunk_size": 2} if fn is naive_chunk_palimpsa else {}

    def f(q, k, u, beta, log_alpha, ip, mu0, I0):
        y, var, (mu, I) = fn(
            q,
            k,
            u,
            beta,
            log_alpha,
            ip,
            initial_state=(mu0, I0),
            output_final_state=True,
            output_variance=True,
            **kw,
        )
        return y, var, mu, I

    inputs = tuple(x.requires_grad_() for x in (q, k, u, beta, log_alpha, ip, mu0, I0))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- Palimpsa's limits in the family


def test_palimpsa_beta_zero_is_simple_gla():
    """With beta = 0, I_t == Ip, so y = scale * (M_t / Ip) q_t = simple_gla(q, k, u, log_alpha) / Ip."""
    q, k, u, beta, log_alpha = _inputs(8)
    ip = torch.tensor([0.5, 2.0, 7.0], dtype=DT)
    y_p = naive_recurrent_palimpsa(q, k, u, torch.zeros_like(beta), log_alpha, ip)[0]
    y_g = naive_recurrent_simple_gla(q, k, u, log_alpha)[0]
    assert _maxdiff(y_p, y_g / ip[:, None]) < TOL
    y_pc = naive_chunk_palimpsa(q, k, u, torch.zeros_like(beta), log_alpha, ip)[0]
    assert _maxdiff(y_pc, naive_chunk_simple_gla(q, k, u, log_alpha)[0] / ip[:, None]) < TOL


def test_palimpsa_converges_to_mamba2_as_prior_grows():
    """u = Ip * v: y -> simple_gla(q, k, v) as Ip -> inf, with an O(1/Ip) error that shrinks every decade."""
    q, k, v, beta, log_alpha = _inputs(9)
    y_m = naive_recurrent_simple_gla(q, k, v, log_alpha)[0]
    ips = [10.0**e for e in range(1, 7)]
    errs = [
        (naive_chunk_palimpsa(q, k, ip * v, beta, log_alpha, ip)[0] - y_m).abs().max().item() for ip in ips
    ]
    print(
        "Ip -> max |y_palimpsa - y_mamba2|:",
        ", ".join(f"{ip:.0e}: {e:.3e}" for ip, e in zip(ips, errs, strict=True)),
    )
    assert all(b < a for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    # First order in 1/Ip: each decade divides the error by about ten.
    assert all(5 < a / b < 20 for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    assert errs[-1] < 1e-4


def test_linear_attention_is_gla_without_decay_and_palimpsa_without_forgetting():
    q, k, v, beta, _ = _inputs(10)
    zero = torch.zeros(q.shape[:3], dtype=DT)
    y_lin = linear_attention(q, k, v)[0]
    y_gla = naive_recurrent_simple_gla(q, k, v, zero)[0]
    y_pal = naive_recurrent_palimpsa(q, k, 3.0 * v, torch.zeros_like(beta), zero, 3.0)[0]
    # Written out: y_t = scale * sum_{j<=t} (k_j . q_t) v_j.
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril()
    y_direct = q.shape[-1] ** -0.5 * torch.einsum("bhts,bshv->bthv", scores, v)
    assert _maxdiff(y_lin, y_gla) < TOL and _maxdiff(y_pal, y_gla) < TOL and _maxdiff(y_direct, y_gla) < TOL


# ---------------------------------------------------------------- GLA / delta rule: chunked == recurrent


@pytest.mark.parametrize("chunk_size", [1, 8, 16])
def test_simple_gla_chunk_matches_recurrent(chunk_size):
    q, k, v, _, log_alpha = _inputs(11)
    S0 = torch.randn(2, 3, 4, 5, generator=_gen(12), dtype=DT)
    kw = dict(initial_state=S0, output_final_state=True)
    ref = naive_recurrent_simple_gla(q, k, v, log_alpha, **kw)
    assert _maxdiff(ref, naive_chunk_simple_gla(q, k, v, log_alpha, chunk_size=chunk_size, **kw)) < TOL
    assert _maxdiff(ref, simple_gla(q, k, v, log_alpha, **kw)) < TOL
    assert _maxdiff(ref, simple_gla(q, k, v, log_alpha, backend="reference", **kw)) < TOL


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 8, 16])
def test_delta_rule_chunk_matches_recurrent(gated, chunk_size):
    q, k, v, _, log_alpha = _inputs(13)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(q.shape[:3], generator=_gen(14), dtype=DT)
    la = log_alpha if gated else None
    S0 = torch.randn(2, 3, 4, 5, generator=_gen(15), dtype=DT)
    kw = dict(initial_state=S0, output_final_state=True)
    ref = naive_recurrent_delta_rule(q, k, v, beta, la, **kw)
    assert _maxdiff(ref, naive_chunk_delta_rule(q, k, v, beta, la, chunk_size=chunk_size, **kw)) < TOL
    assert _maxdiff(ref, delta_rule(q, k, v, beta, la, **kw)) < TOL


def test_delta_rule_is_the_stated_recurrence():
    """One step written as S (I - beta k k^T) + beta v k^T from an explicit state."""
    q, k, v, _, log_alpha = _inputs(16, T=1)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(q.shape[:3], generator=_gen(17), dtype=DT)
    S0 = torch.randn(2, 3, 4, 5, generator=_gen(18), dtype=DT)
    _, S1 = naive_recurrent_delta_rule(q, k, v, beta, log_alpha, initial_state=S0, output_final_state=True)
    kk = k[:, 0, :, :, None] @ k[:, 0, :, None, :]
    b = beta[:, 0, :, None, None]
    expected = log_alpha[:, 0].exp()[..., None, None] * S0 @ (torch.eye(5, dtype=DT) - b * kk) + b * (
        v[:, 0, :, :, None] @ k[:, 0, :, None, :]
    )
    assert _maxdiff(S1, expected) < TOL


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_chunk_gradients_match_recurrent(gated):
    q, k, v, _, log_alpha = _inputs(19, T=19)
    beta = torch.rand(q.shape[:3], generator=_gen(20), dtype=DT)
    leaves = [q, F.normalize(k, dim=-1), v, beta] + ([log_alpha] if gated else [])
    grads = []
    for fn in (naive_recurrent_delta_rule, naive_chunk_delta_rule):
        x = [t.clone().requires_grad_() for t in leaves]
        y, _ = fn(*x[:4], x[4] if gated else None)
        (y * y).sum().backward()
        grads.append([t.grad for t in x])
    assert _maxdiff(grads[0], grads[1]) < 1e-9


# ---------------------------------------------------------------- Mesa


def _mesa_by_explicit_inverse(q, k, v, beta, log_alpha, ip, G0, Hm0):
    """Closed-form sums over the past, then an explicit inverse: independent of the recurrent solve."""
    B, T, H, K = q.shape
    scale = K**-0.5
    eye = torch.eye(K, dtype=DT)
    ip_h = ip[None, :, None, None]
    ys = []
    for t in range(T):
        decay_all = log_alpha[:, : t + 1].sum(1).exp()[..., None, None]  # prod_{i<=t} alpha_i
        Hm, G = decay_all * Hm0, decay_all * G0
        for j in range(t + 1):
            d = log_alpha[:, j + 1 : t + 1].sum(1).exp()[..., None, None]  # prod_{j<i<=t} alpha_i
            a_j = log_alpha[:, j].exp()[..., None, None]
            kk = k[:, j, :, :, None] @ k[:, j, :, None, :]
            b = beta[:, j, :, None, None]
            Hm = Hm + d * ((1 - a_j) * ip_h * eye + b * kk)
            G = G + d * b * (v[:, j, :, :, None] @ k[:, j, :, None, :])
        ys.append(scale * (G @ torch.linalg.inv(Hm) @ q[:, t, :, :, None])[..., 0])
    return torch.stack(ys, 1)


@pytest.mark.parametrize("with_state", [False, True])
def test_mesa_matches_explicit_inverse(with_state):
    q, k, v, _, log_alpha = _inputs(21, T=9)
    beta = torch.rand(q.shape[:3], generator=_gen(22), dtype=DT)
    ip = torch.tensor([0.5, 1.0, 4.0], dtype=DT)
    eye = torch.eye(5, dtype=DT)
    if with_state:
        A = torch.randn(2, 3, 5, 5, generator=_gen(23), dtype=DT)
        G0, Hm0 = torch.randn(2, 3, 4, 5, generator=_gen(24), dtype=DT), A @ A.transpose(-1, -2) + eye
        init = (G0, Hm0)
    else:
        G0, Hm0 = torch.zeros(2, 3, 4, 5, dtype=DT), ip[None, :, None, None] * eye
        init = None
    expected = _mesa_by_explicit_inverse(q, k, v, beta, log_alpha, ip, G0, Hm0)
    y = naive_recurrent_mesa(q, k, v, beta, log_alpha, ip, initial_state=init)[0]
    assert _maxdiff(y, expected) < TOL


def test_mesa_chunk_matches_recurrent():
    q, k, v, _, log_alpha = _inputs(25)
    beta = torch.rand(q.shape[:3], generator=_gen(26), dtype=DT)
    A = torch.randn(2, 3, 5, 5, generator=_gen(27), dtype=DT)
    init = (torch.randn(2, 3, 4, 5, generator=_gen(28), dtype=DT), A @ A.transpose(-1, -2) + torch.eye(5))
    kw = dict(initial_state=init, output_final_state=True)
    ref = naive_recurrent_mesa(q, k, v, beta, log_alpha, 2.0, **kw)
    assert _maxdiff(ref, naive_chunk_mesa(q, k, v, beta, log_alpha, 2.0, chunk_size=8, **kw)) < TOL
    assert _maxdiff(ref, mesa(q, k, v, beta, log_alpha, 2.0, **kw)) < TOL


# ---------------------------------------------------------------- Longhorn


def test_longhorn_with_one_hot_keys_is_exact_online_regression():
    """For one-hot keys k k^T is diagonal, so the diagonal form is the exact minimiser of
    ||S - S_{t-1}||^2 + sum_i beta_i (S_i . k - v_i)^2, i.e. of
    (I + beta_i k k^T) s_i = s_{i,prev} + beta_i v_i k."""
    B, T, H, K, V = 2, 12, 2, 5, 3
    g = _gen(29)
    q = torch.randn(B, T, H, K, generator=g, dtype=DT)
    k = F.one_hot(torch.randint(0, K, (B, T, H), generator=g), K).to(DT) * 1.7
    v = torch.randn(B, T, H, V, generator=g, dtype=DT)
    beta = 2 * torch.rand(B, T, H, V, generator=g, dtype=DT)
    S = torch.randn(B, H, V, K, generator=g, dtype=DT)
    y, S_T = naive_recurrent_longhorn(q, k, v, beta, initial_state=S, output_final_state=True)
    eye = torch.eye(K, dtype=DT)
    for t in range(T):
        k_t = k[:, t]  # [B, H, K]
        lhs = eye + beta[:, t, :, :, None, None] * (k_t[:, :, None, :, None] * k_t[:, :, None, None, :])
        rhs = S + beta[:, t, :, :, None] * v[:, t, :, :, None] * k_t[:, :, None, :]
        S = torch.linalg.solve(lhs, rhs[..., None])[..., 0]
        assert _maxdiff(y[:, t], K**-0.5 * (S @ q[:, t, :, :, None])[..., 0]) < TOL
    assert _maxdiff(S_T, S) < TOL


def test_longhorn_step_and_dispatch():
    q, k, v, beta, _ = _inputs(30, T=6)
    S0 = torch.randn(2, 3, 4, 5, generator=_gen(31), dtype=DT)
    y, S1 = naive_recurrent_longhorn(
        q[:, :1], k[:, :1], v[:, :1], beta[:, :1], initial_state=S0, output_final_state=True
    )
    k0, b0 = k[:, 0, :, None, :], beta[:, 0, :, :, None]
    eps = b0 / (1 + b0 * (k0 * k0).sum(-1, keepdim=True))
    assert _maxdiff(S1, (1 - eps * k0**2) * S0 + eps * v[:, 0, :, :, None] * k0) < TOL
    assert _maxdiff(longhorn(q, k, v, beta), naive_recurrent_longhorn(q, k, v, beta)) < TOL


# ---------------------------------------------------------------- softmax attention


def test_attention_matches_written_out_softmax():
    q, k, v, _, _ = _inputs(32, T=11)
    y_ref, _ = naive_attention(q, k, v)
    assert _maxdiff(y_ref[:, 0], v[:, 0]) < TOL  # the first token attends only to itself
    assert _maxdiff(attention(q, k, v)[0], y_ref) < TOL
    assert _maxdiff(attention(q, k, v, scale=0.3)[0], naive_attention(q, k, v, scale=0.3)[0]) < TOL
