"""Mixers of the family: build, gradients, gate ranges, the Mamba2 limit, Ip handling."""

from __future__ import annotations

import pytest
import torch

from kernels.gla import simple_gla
from kernels.palimpsa import palimpsa_attn
from palimpsa.config import MIXER_KINDS, MixerConfig
from palimpsa.layers import build_mixer
from palimpsa.layers.palimpsa import MetaMamba2, Palimpsa

D_MODEL = 32


def small(kind: str, **kw) -> MixerConfig:
    return MixerConfig(kind=kind, num_heads=2, head_k_dim=8, head_v_dim=8, beta_rank=4, **kw)


def perturb(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Move every weight off its init so tests do not pass by a symmetric or zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_every_kind_builds_runs_and_backpropagates(kind):
    torch.manual_seed(0)
    mixer = build_mixer(small(kind), D_MODEL, 0)
    x = torch.randn(2, 11, D_MODEL, requires_grad=True)
    y, cache = mixer(x)
    assert y.shape == x.shape and cache is None
    (y**2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert mixer.backend_name("cpu") == "torch"


@pytest.mark.parametrize("gates", ["paper", "official"])
@pytest.mark.parametrize("n_init", [2.0, 32.0])
def test_gates_give_alpha_in_unit_interval(gates, n_init):
    torch.manual_seed(1)
    layer = Palimpsa(small("palimpsa", gates=gates, n_init=n_init), D_MODEL, 0)
    perturb(layer, std=1.0)
    x = 10 * torch.randn(3, 17, D_MODEL)  # large inputs push the gates to their limits
    log_alpha = layer.log_alpha(x)
    # alpha in (0, 1] <=> log alpha finite and <= 0 (exp may underflow in float32; the ops take log alpha).
    assert torch.isfinite(log_alpha).all() and (log_alpha <= 0).all()
    assert (log_alpha < 0).any()
    r = layer.recurrence_inputs(x, torch.randn(3, 17, 2, 8))
    assert (r["beta"] >= 0).all() and r["beta"].abs().sum() > 0


def test_paper_log_alpha_is_log1p_of_gamma_over_n():
    layer = Palimpsa(small("palimpsa", gates="paper"), D_MODEL, 0).double()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    gamma = torch.sigmoid(layer.w_gamma(x))
    N = layer.cfg.n_init * layer.logN.exp()
    torch.testing.assert_close(layer.log_alpha(x), torch.log(1 - gamma / N), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gates", ["paper", "official"])
def test_numerator_choices(gates):
    torch.manual_seed(2)
    x, v = torch.randn(2, 6, D_MODEL), torch.randn(2, 6, 2, 8)
    beta_v = Palimpsa(small("palimpsa", gates=gates, numerator="beta_v"), D_MODEL, 0)
    r = beta_v.recurrence_inputs(x, v)
    torch.testing.assert_close(r["u"], r["beta"] * v)
    bs_v = Palimpsa(small("palimpsa", gates=gates, numerator="bs_v"), D_MODEL, 0)
    r = bs_v.recurrence_inputs(x, v)
    bs = torch.sigmoid(bs_v.w_bs(x))[..., None]
    torch.testing.assert_close(r["u"], bs * v)


@pytest.mark.parametrize("gates", ["paper", "official"])
def test_metaplastic_off_is_the_mamba2_limit(gates):
    """beta == 0 keeps I_t == Ip, and the read-out equals simple GLA on u / Ip (here Ip = 2.5)."""
    torch.manual_seed(3)
    layer = Palimpsa(small("palimpsa", gates=gates, metaplastic=False, ip=2.5), D_MODEL, 0).double()
    perturb(layer)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    q, k, v, _ = layer.project(x)
    r = layer.recurrence_inputs(x, v)
    assert torch.equal(r["beta"], torch.zeros_like(r["beta"]))
    y, _, (_, I) = palimpsa_attn(q, k, r["u"], r["beta"], r["log_alpha"], layer.ip, output_final_state=True)
    ip = layer.ip  # 2.5 up to the float32 rounding of its log at construction
    torch.testing.assert_close(ip, torch.full_like(ip, 2.5), rtol=1e-6, atol=0)
    y_gla, _ = simple_gla(q, k, r["u"] / ip[:, None], r["log_alpha"])
    torch.testing.assert_close(y, y_gla, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(I, ip[None, :, None, None].expand_as(I), rtol=0, atol=1e-12)
    assert layer.importance(x) is None


def test_metamamba2_without_metaplasticity_equals_mamba2():
    torch.manual_seed(4)
    mamba = build_mixer(small("mamba2"), D_MODEL, 0).double()
    perturb(mamba)
    meta = MetaMamba2(small("metamamba2", metaplastic=False, ip=3.0), D_MODEL, 0).double()
    missing, unexpected = meta.load_state_dict(mamba.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("beta_", "b_scale", "ip_log")) for k in missing)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(meta(x)[0], mamba(x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["palimpsa", "metamamba2", "mesa"])
def test_ip_trainable_puts_ip_in_the_parameters(kind):
    frozen = build_mixer(small(kind, ip=2.0), D_MODEL, 0)
    assert "ip_log" not in dict(frozen.named_parameters()) and "ip_log" in frozen.state_dict()
    torch.testing.assert_close(frozen.ip_log.exp(), torch.full((2,), 2.0))
    layer = build_mixer(small(kind, ip=2.0, ip_trainable=True), D_MODEL, 0)
    perturb(layer, std=0.1)
    params = dict(layer.named_parameters())
    assert "ip_log" in params
    layer(torch.randn(2, 7, D_MODEL))[0].pow(2).sum().backward()
    assert params["ip_log"].grad is not None and params["ip_log"].grad.abs().sum() > 0


def test_output_variance_is_exposed():
    layer = Palimpsa(small("palimpsa", output_variance=True), D_MODEL, 0)
    layer(torch.randn(2, 5, D_MODEL))
    var = layer.last_variance
    assert var is not None and var.shape == (2, 5, 2, 8) and (var > 0).all()


def test_plasticity_gain_zero_gives_zero_beta_with_gradient():
    torch.manual_seed(5)
    layer = Palimpsa(small("palimpsa", plasticity_gain=True), D_MODEL, 0).double()
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    r = layer.recurrence_inputs(x, torch.randn(2, 8, 2, 8, dtype=torch.float64))
    assert torch.equal(r["beta"], torch.zeros_like(r["beta"]))
    layer(x)[0].pow(2).sum().backward()
    assert layer.beta_gain.grad.abs().min() > 0


def test_unknown_or_invalid_backend_is_refused():
    from palimpsa.config import FieldError

    with pytest.raises(FieldError, match="backend"):
        MixerConfig(kind="palimpsa", backend="fla")
    with pytest.raises(FieldError, match="even"):
        MixerConfig(kind="attention", head_k_dim=7)


def test_qk_norm_follows_the_member_and_can_be_set():
    """Mamba2's C and B are not normalized (as in Mamba2); every other member L2-normalizes q and k."""
    assert [small(k).resolved_qk_norm for k in ("mamba2", "metamamba2", "palimpsa", "gated_deltanet")] == [
        "none", "none", "l2", "l2",
    ]  # fmt: skip
    torch.manual_seed(5)
    x = torch.randn(2, 7, D_MODEL)
    cases = [("mamba2", "auto", False), ("mamba2", "l2", True), ("palimpsa", "none", False)]
    for kind, setting, unit in cases:
        layer = build_mixer(small(kind, qk_norm=setting), D_MODEL, 0)
        q, k, _, _ = layer.project(x)
        norms = torch.cat([q, k]).norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4) == unit, (kind, setting)
