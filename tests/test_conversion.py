"""Metaplastic conversion: function-preserving at init, plasticity trainable, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palimpsa.config import ConfigError, MixerConfig, ModelConfig, RunConfig
from palimpsa.conversion import convert_checkpoint, convert_model
from palimpsa.model import build_model, load_model, save_model
from palimpsa.tasks import MQARConfig

SOURCES = [
    ("mamba2", {}),
    ("palimpsa", {"metaplastic": False}),
    ("palimpsa", {"metaplastic": False, "gates": "paper"}),
    ("metamamba2", {"metaplastic": False}),
]


def trained(kind: str, seed: int = 0, **mixer):
    """A source model whose weights are all off their init (a stand-in for training)."""
    torch.manual_seed(seed)
    cfg = RunConfig(
        task=MQARConfig(vocab_size=64),
        model=ModelConfig(
            d_model=32, n_layers=2, mixer=MixerConfig(kind=kind, head_k_dim=16, head_v_dim=16, **mixer)
        ),
    )
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, cfg


def ids(batch: int = 4, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kind", "mixer"), SOURCES)
def test_converted_checkpoint_reproduces_source_logits(tmp_path, kind, mixer):
    model, cfg = trained(kind, **mixer)
    src, dst = tmp_path / "src.pt", tmp_path / "dst.pt"
    save_model(src, model, cfg)
    overrides = ["model.mixer.ip=2.0", "model.mixer.ip_trainable=true"] if kind == "mamba2" else []
    new_cfg = convert_checkpoint(src, dst, overrides)
    converted, loaded_cfg = load_model(dst)
    assert loaded_cfg == new_cfg
    mixer_cfg = new_cfg.model.mixer
    assert mixer_cfg.kind == ("metamamba2" if kind == "mamba2" else kind)
    assert mixer_cfg.metaplastic and mixer_cfg.plasticity_gain
    if kind == "mamba2":
        assert mixer_cfg.ip == 2.0 and "blocks.0.mixer.ip_log" in dict(converted.named_parameters())
    assert converted.num_params() > model.num_params()
    x = ids()
    with torch.no_grad():
        reference, got = model(x), converted(x)
    assert (got - reference).abs().max().item() <= 1e-5
    # the importance state exists but has not moved off the prior yet
    diag = converted.importance_diagnostics(x)
    assert diag["diag.l1.h0.i_over_ip_q90"] == pytest.approx(1.0, abs=1e-6)
    assert diag["diag.consolidated"] == 0.0


@pytest.mark.parametrize(("kind", "mixer"), SOURCES[:2])
def test_plasticity_becomes_nonzero_after_one_step(kind, mixer):
    model, cfg = trained(kind, **mixer)
    converted, _ = convert_model(model, cfg)
    gains = [b.mixer.beta_gain for b in converted.blocks]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gains)
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    x = ids()
    loss = F.cross_entropy(converted(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert all(g.grad is not None and g.grad.abs().min() > 0 for g in gains)
    opt.step()
    block = converted.blocks[0]
    with torch.no_grad():
        h = block.mixer_norm(converted.embed(x))
        beta = block.mixer.recurrence_inputs(h, torch.ones(4, 48, 2, 16))["beta"]
        assert (beta >= 0).all() and beta.min() > 0  # every head became plastic
        I, ip = block.mixer.importance(h)
        assert (I / ip[None, :, None, None]).max() > 1.0


def test_convert_model_in_float64_is_exact_to_rounding():
    model, cfg = trained("mamba2")
    model = model.double()
    converted, new_cfg = convert_model(model, cfg)
    assert next(converted.parameters()).dtype == torch.float64
    x = ids()
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-12)


def test_unconvertible_sources_and_bad_overrides(tmp_path):
    for kind, mixer in (("attention", {}), ("gated_deltanet", {}), ("palimpsa", {})):
        model, cfg = trained(kind, **mixer)
        with pytest.raises(ConfigError, match="model.mixer"):
            convert_model(model, cfg)
    model, cfg = trained("palimpsa", metaplastic=False)
    src = tmp_path / "src.pt"
    save_model(src, model, cfg)
    with pytest.raises(ConfigError, match="model.mixer.ip"):  # the read-out M/Ip would change
        convert_checkpoint(src, tmp_path / "a.pt", ["model.mixer.ip=3.0"])
    with pytest.raises(ConfigError, match="model.d_model"):
        convert_checkpoint(src, tmp_path / "b.pt", ["model.d_model=48"])
    with pytest.raises(ConfigError, match="model.mixer.gates"):
        convert_checkpoint(src, tmp_path / "c.pt", ["model.mixer.gates=paper"])
    with pytest.raises(ConfigError, match="model.mixer.nope"):
        convert_checkpoint(src, tmp_path / "d.pt", ["model.mixer.nope=1"])
    assert not any(p.name != "src.pt" for p in tmp_path.iterdir())
