"""The causal LM: generation cache == full forward, diagnostics, checkpoints, init."""

from __future__ import annotations

import pytest
import torch

from palimpsa.config import MIXER_KINDS, MixerConfig, ModelConfig, RunConfig
from palimpsa.model import (
    CONSOLIDATED_RATIO,
    CheckpointError,
    PalimpsaLM,
    build_model,
    load_model,
    save_model,
)
from palimpsa.tasks import MQARConfig

VOCAB = 40


def small_model(kind: str, dtype=torch.float64, seed: int = 0, **mixer) -> PalimpsaLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=24,
        n_layers=2,
        mixer=MixerConfig(kind=kind, num_heads=2, head_k_dim=8, head_v_dim=6, beta_rank=4, **mixer),
    )
    model = PalimpsaLM(cfg, VOCAB).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move off the init so gates, convs and norms all matter
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize(
    ("kind", "mixer"),
    [(kind, {}) for kind in MIXER_KINDS]
    + [
        ("palimpsa", {"gates": "paper", "conv_size": 0}),
        ("metamamba2", {"metaplastic": False, "conv_size": 2}),
    ],
)
def test_cached_decoding_equals_full_forward(kind, mixer):
    model = small_model(kind, **mixer)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    logits, state = model(ids[:, :5], return_state=True)
    steps = [logits]
    for t in range(5, ids.shape[1]):
        logits, state = model(ids[:, t : t + 1], state=state, return_state=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-8)
    # A multi-token chunk after the prefill goes through the same cache path.
    logits, state = model(ids[:, :3], return_state=True)
    rest, _ = model(ids[:, 3:], state=state, return_state=True)
    torch.testing.assert_close(rest, full[:, 3:], rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", ["palimpsa", "attention", "gated_deltanet"])
def test_generate_matches_greedy_decoding_by_full_forward(kind):
    model = small_model(kind)
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (3, 11) and torch.equal(out[:, :6], prompt)
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    sampled = model.generate(prompt, 4, greedy=False, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 10) and sampled.max() < VOCAB


def test_importance_diagnostics_keys_and_ranges():
    model = small_model("palimpsa", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (4, 20), generator=torch.Generator().manual_seed(3))
    diag = model.importance_diagnostics(ids)
    for layer in range(2):
        for head in range(2):
            p = f"diag.l{layer}.h{head}."
            q10, q50, q90 = (diag[p + f"i_over_ip_q{q}"] for q in (10, 50, 90))
            assert 1.0 - 1e-6 <= q10 <= q50 <= q90  # I >= Ip always
            assert 0.0 <= diag[p + "consolidated"] <= 1.0
            assert 0.0 < diag[p + "lr_eff"] <= 1 / model.blocks[layer].mixer.ip[head].item() + 1e-6
            assert diag[p + "horizon"] >= 1.0
        assert 0.0 <= diag[f"diag.l{layer}.consolidated"] <= 1.0 and diag[f"diag.l{layer}.horizon"] >= 1
    for key in ("diag.consolidated", "diag.horizon", "diag.lr_eff"):
        assert key in diag
    assert all(isinstance(v, float) for v in diag.values())
    assert q90 > 1.0  # the importance state has actually grown somewhere

    # consolidated is the fraction of synapses with I/Ip >= CONSOLIDATED_RATIO, recomputed independently
    mixer = model.blocks[0].mixer
    x = model.blocks[0].mixer_norm(model.embed(ids))
    I, ip = mixer.importance(x)
    frac = (I / ip[None, :, None, None] >= CONSOLIDATED_RATIO).float().mean(dim=(0, 2, 3))
    assert diag["diag.l0.h1.consolidated"] == pytest.approx(frac[1].item(), abs=1e-6)


def test_diagnostics_of_non_metaplastic_mixers():
    ids = torch.randint(0, VOCAB, (2, 10))
    mamba = small_model("mamba2", dtype=torch.float32).importance_diagnostics(ids)
    assert "diag.horizon" in mamba and mamba["diag.horizon"] >= 1.0
    assert not any("i_over_ip" in k or "consolidated" in k for k in mamba)
    assert small_model("deltanet", dtype=torch.float32).importance_diagnostics(ids) == {}
    off = small_model("palimpsa", dtype=torch.float32, metaplastic=False).importance_diagnostics(ids)
    assert "diag.l0.horizon" in off and "diag.consolidated" not in off


def run_config(kind: str = "palimpsa", **model) -> RunConfig:
    return RunConfig(
        task=MQARConfig(),
        model=ModelConfig(d_model=16, mixer=MixerConfig(kind=kind, head_k_dim=8, head_v_dim=8), **model),
    )


def test_checkpoint_roundtrip(tmp_path):
    cfg = run_config("metamamba2")
    model = build_model(cfg)
    assert model.vocab_size == cfg.task.vocab_size
    path = tmp_path / "sub" / "ckpt.pt"
    save_model(path, model, cfg)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary left behind
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg
    ids = torch.randint(0, model.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="no such"):
        load_model(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": 1}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pt.*'config'"):
        load_model(wrong)
    cfg = run_config("palimpsa")
    mismatched = tmp_path / "mismatched.pt"
    save_model(mismatched, build_model(run_config("mamba2")), cfg)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(mismatched)
    bad_cfg = tmp_path / "bad_cfg.pt"
    torch.save({"config": {"task": {"name": "nope"}}, "model": {}}, bad_cfg)
    with pytest.raises(CheckpointError, match="bad_cfg.pt.*task.name"):
        load_model(bad_cfg)


def test_vocab_size_and_init():
    cfg = run_config("palimpsa", vocab_size=300, init_std=0.02)
    model = build_model(cfg)
    assert model.vocab_size == 300
    assert build_model(run_config("palimpsa"), vocab_size=77).vocab_size == 77
    assert abs(model.embed.weight.std().item() - 0.02) < 2e-3
    # tied head: the embedding is the only vocab-sized matrix and is counted once
    vocab_sized = [n for n, p in model.named_parameters() if 300 in p.shape]
    assert vocab_sized == ["embed.weight"]
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.backends() == {"layer0": "torch", "layer1": "torch"}
    assert build_model(run_config("gated_deltanet")).backends()["layer1"] == "torch"


def test_short_conv_is_a_causal_depthwise_conv1d():
    """The shifted sums equal ``conv1d`` over left-padded input, in float64 and (to fp32 accumulation) bf16,
    and feeding the input in two pieces through the cache gives the same outputs, bit for bit."""
    import torch.nn.functional as F

    from palimpsa.layers.common import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    with torch.no_grad():
        conv.weight.normal_()  # values fp32 cannot hold
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y, tail = conv(x)
    padded = torch.cat([x.new_zeros(2, 6, 3), x.transpose(1, 2)], dim=-1)
    ref = F.conv1d(padded, conv.weight, groups=6).transpose(1, 2)
    assert torch.allclose(y, ref, rtol=0, atol=1e-14)
    assert torch.equal(tail, x[:, -3:].transpose(1, 2))
    y1, t1 = conv(x[:, :5])
    y2, t2 = conv(x[:, 5:], t1)
    assert torch.equal(torch.cat([y1, y2], dim=1), y) and torch.equal(t2, tail)
    yb, _ = conv.float()(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.double(), F.conv1d(padded.bfloat16().double(), conv.weight.double(), groups=6)
                          .transpose(1, 2), rtol=1e-2, atol=1e-2)  # fmt: skip


def test_l2norm_normalises_in_fp32_and_keeps_the_dtype():
    """16-bit q and k stay 16-bit (the op then runs its products in their dtype), normalised in fp32: the
    float64 norm rounded once; float64 keeps its precision."""
    from palimpsa.layers.common import L2_EPS, l2norm

    x = torch.randn(4, 7, 3, 64, generator=torch.Generator().manual_seed(0)).bfloat16().double()
    want = x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)
    assert torch.equal(l2norm(x.bfloat16()), want.bfloat16())
    assert torch.allclose(l2norm(x), want, rtol=1e-15, atol=0)
