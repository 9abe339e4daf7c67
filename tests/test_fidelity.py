"""The published MQAR setup as config values: sizes, inits, blocks, optimizer groups and the lr schedule."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from palimpsa.config import ModelConfig, RunConfig, config_from_dict, load_config
from palimpsa.grid import load_grid
from palimpsa.io import dump_yaml, yaml_load
from palimpsa.layers.common import A_RAMPS, init_a_log, init_dt_bias
from palimpsa.model import build_model
from palimpsa.training import epoch_lr_factor, param_groups, train

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_GRID = ROOT / "ablations" / "mqar-official.yaml"


def official_point(variant: str) -> RunConfig:
    """The grid's L = 512, lr 4.64e-3, seed 1 point of one mixer."""
    grid = load_grid(OFFICIAL_GRID)
    (point,) = [
        p
        for p in grid.points
        if p.axes["variant"] == variant
        and p.axes["seed"] == 1
        and p.axes["train.lr"] == 4.64e-3
        and p.axes["task.seq_len"] == 512
    ]
    return config_from_dict(point.resolve())


def test_official_grid_is_the_published_sweep() -> None:
    grid = load_grid(OFFICIAL_GRID)
    assert len(grid.points) == 5 * 4 * 8 * 2
    variants = {p.axes["variant"] for p in grid.points}
    assert variants == {"palimpsa", "notpalimpsa", "metamamba2", "mamba2", "gated_deltanet"}
    assert {p.axes["train.lr"] for p in grid.points} == {1e-3, 2.15e-3, 4.64e-3, 1e-2}
    pairs = {
        (p.config["task"]["seq_len"], p.config["task"]["num_kv_pairs"], p.config["train"]["batch_size"])
        for p in grid.points
    }
    assert pairs == {(512, 128, 128), (1024, 256, 64)}


# Parameter counts, by hand from the published dimensions: d = 128, vocab 8192, 2 layers, no MLP,
# 8 heads, K = 16, V = 32 (H*K = 128, H*V = 256), conv 4, rank 8, tied embedding, final LayerNorm.
D, VOCAB, H, K, V, R, CONV = 128, 8192, 8, 16, 32, 8, 4
HK, HV = H * K, H * V
EMBED = VOCAB * D  # tied with the output head: counted once
FINAL_LAYERNORM = 2 * D  # weight and bias
BLOCK_NORM = D  # the pre-norm RMSNorm of each block
CONVS = (HK + HK + HV) * CONV  # depthwise, no bias: q, k, v
DT_GATE = D * H + H + H  # w_dt, dt_bias, A_log
PRECISION_GATE = D * R + R * HV + H  # beta_down, beta_up, b_scale

PALIMPSA_MIXER = (
    D * HK * 2  # q_proj, k_proj
    + D * HV  # v_proj
    + CONVS
    + D * HV  # g_proj (output gate)
    + H  # D skip
    + V  # per-head gated RMSNorm weight, shared across heads
    + HV * D  # o_proj
    + DT_GATE
    + D * H  # w_bs
    + PRECISION_GATE
)
MAMBA2_MIXER = (
    (D * HK + HK) * 2  # C and B projections with bias (n_groups = heads)
    + (D * HV + HV) * 2  # x and z projections with bias
    + (D * H + H)
    + H
    + H  # dt projection with bias, dt_bias, A_log
    + CONVS
    + H  # D skip
    + HV  # RMSNorm over all H*V channels
    + HV * D
    + D  # out_proj with bias
)
GDN_MIXER = (
    D * HK * 2 + D * HV + CONVS + D * HV  # q, k, v, convs, g_proj
    + V  # per-head gated RMSNorm
    + HV * D  # o_proj
    + D * H  # w_beta
    + DT_GATE  # no D skip
)  # fmt: skip


@pytest.mark.parametrize(
    ("variant", "mixer"),
    [
        ("palimpsa", PALIMPSA_MIXER),  # 138,304 a layer
        ("notpalimpsa", PALIMPSA_MIXER),  # the same layer with beta = 0
        ("metamamba2", MAMBA2_MIXER + PRECISION_GATE),  # 138,408
        ("mamba2", MAMBA2_MIXER),  # 135,328
        ("gated_deltanet", GDN_MIXER),  # 135,216
    ],
)
def test_official_parameter_counts_match_the_hand_count(variant: str, mixer: int) -> None:
    model = build_model(official_point(variant))
    expected = EMBED + FINAL_LAYERNORM + 2 * (BLOCK_NORM + mixer)
    assert model.num_params() == expected
    assert not any("mlp" in name for name, _ in model.named_parameters())


def test_hand_counts_written_out() -> None:
    """The same arithmetic as literal totals, so a change to the constants above cannot hide."""
    assert EMBED + FINAL_LAYERNORM + 2 * (BLOCK_NORM + PALIMPSA_MIXER) == 1_325_696
    assert EMBED + FINAL_LAYERNORM + 2 * (BLOCK_NORM + MAMBA2_MIXER + PRECISION_GATE) == 1_325_904
    assert EMBED + FINAL_LAYERNORM + 2 * (BLOCK_NORM + MAMBA2_MIXER) == 1_319_744
    assert EMBED + FINAL_LAYERNORM + 2 * (BLOCK_NORM + GDN_MIXER) == 1_319_520


@pytest.mark.parametrize("kind", ["small", "very_small", "normal"])
def test_forgetting_ramps_equal_their_formulas(kind: str) -> None:
    heads = 8
    a_lo, a_hi = {"small": (0.01, 0.16), "very_small": (0.001, 0.016), "normal": (1.0, 16.0)}[kind]
    assert A_RAMPS[kind] == (a_lo, a_hi)
    a = init_a_log(heads, 1.0, 16.0, kind).exp()
    expected_a = [a_lo + (a_hi - a_lo) * h / (heads - 1) for h in range(heads)]
    torch.testing.assert_close(a, torch.tensor(expected_a), rtol=1e-6, atol=0)
    dt = torch.nn.functional.softplus(init_dt_bias(heads, 1e-3, 1e-1, kind).double())
    lo, hi = math.log(1e-3), math.log(1e-1)
    expected_dt = [max(math.exp((1 - h / (heads - 1)) * (hi - lo) + lo), 1e-4) for h in range(heads)]
    torch.testing.assert_close(dt, torch.tensor(expected_dt, dtype=torch.float64), rtol=1e-5, atol=0)


def test_official_init_statistics() -> None:
    cfg = official_point("mamba2")
    torch.manual_seed(0)
    model = build_model(cfg)
    std = 128**-0.5
    assert abs(model.embed.weight.std().item() - std) < 0.01 * std * 10
    mixer = model.blocks[0].mixer
    for name in ("q_proj", "v_proj", "o_proj"):  # no residual rescaling of o_proj
        assert abs(getattr(mixer, name).weight.std().item() - std) < 0.1 * std, name
        assert torch.count_nonzero(getattr(mixer, name).bias) == 0, name
    assert abs(mixer.q_conv.weight.std().item() - std) < 0.15 * std  # convs too
    meta = build_model(official_point("palimpsa")).blocks[0].mixer
    bound = meta.beta_up.in_features**-0.5
    assert meta.beta_up.weight.abs().max() <= bound and meta.beta_up.weight.abs().max() > 0.8 * bound
    assert abs(meta.beta_down.weight.std().item() - std) < 0.1 * std


def test_default_init_scales_residual_projections() -> None:
    cfg = RunConfig(model=ModelConfig(d_model=64, n_layers=2, init_std=0.02))
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300)
    o = model.blocks[0].mixer.o_proj.weight.std().item()
    assert abs(o - 0.02 / 2) < 0.002  # 1/sqrt(2 * n_layers)


def test_shell_options_shape_the_layer() -> None:
    cfg = official_point("mamba2")
    mixer = build_model(cfg).blocks[0].mixer
    assert mixer.scale == 1.0 and mixer.o_norm.weight.shape == (HV,) and mixer.k_proj.bias is not None
    gdn = build_model(official_point("gated_deltanet")).blocks[0].mixer
    assert not hasattr(gdn, "D") and gdn.scale == K**-0.5 and gdn.o_norm.weight.shape == (V,)
    raw = tiny_config()
    raw["model"]["tie_embeddings"] = False
    raw["model"]["final_norm"] = "layer"
    model = build_model(config_from_dict(raw))
    assert model.lm_head is not None and model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert isinstance(model.final_norm, torch.nn.LayerNorm)


def test_full_output_norm_normalises_across_heads() -> None:
    """Mamba2's norm: RMS over all H*V channels of y * SiLU(z), so one head's scale moves the others'."""
    from palimpsa.layers.common import FullGatedRMSNorm

    norm = FullGatedRMSNorm(2 * 3)
    y = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    z = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    g = y * torch.nn.functional.silu(z)
    expected = g.reshape(1, 1, 6) / g.pow(2).mean().add(norm.eps).sqrt()
    torch.testing.assert_close(norm.double()(y, z).reshape(1, 1, 6), expected.double())


def test_weight_decay_groups() -> None:
    model = build_model(official_point("palimpsa"))
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    decay_all, none_left = param_groups(model, 0.1, "all")
    assert {id(p) for p in decay_all["params"]} == everything and not none_left["params"]
    decay, no_decay = param_groups(model, 0.1, "matrices")
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in skipped and any(n.endswith("A_log") for n in skipped)


def test_epoch_cosine_equals_cosine_annealing_stepped_per_epoch() -> None:
    epochs, per_epoch, lr = 6, 5, 0.01
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    for epoch in range(epochs):
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            assert math.isclose(
                lr * epoch_lr_factor(step, 0, per_epoch, epochs, 0.0), opt.param_groups[0]["lr"]
            )
        sched.step()


def test_no_clipping_and_pure_bf16_run(tmp_path: Path) -> None:
    """grad_clip null logs the raw norm; a pure-bf16 model trains with bf16 weights to a finite loss."""
    raw = tiny_config(train={"grad_clip": None, "precision": "pure_bf16", "max_steps": 4, "eval_every": 2})
    raw["tracking"] = {"enabled": False}
    result = train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert result["precision"] == "pure_bf16" and math.isfinite(result["val_loss"])
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["model"]["embed.weight"].dtype == torch.bfloat16


def test_grid_base_reads_exponents_as_numbers(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    raw = tiny_config()
    raw["train"]["lr"] = "LR"
    base.write_text(dump_yaml(raw).replace("LR", "1e-3"))  # written as a user would: 1e-3, no dot
    assert "lr: 1e-3" in base.read_text()
    (tmp_path / "grid.yaml").write_text("base: base.yaml\nproduct:\n  seed: [0, 1]\n")
    grid = load_grid(tmp_path / "grid.yaml")
    assert [p.config["train"]["lr"] for p in grid.points] == [1e-3, 1e-3]
    assert yaml_load("lr: 1e-3") == {"lr": 0.001}


def test_config_command_prints_the_resolved_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "palimpsa", "config", str(ROOT / "ablations/base/mqar-official.yaml"),
         "--set", "model.mixer.kind=gated_deltanet", "--set", "train.lr=1e-2"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    resolved = yaml_load(out.stdout)
    assert resolved["model"]["mixer"]["kind"] == "gated_deltanet"
    assert resolved["train"]["lr"] == 0.01 and resolved["train"]["schedule"] == "epoch_cosine"
    assert resolved["model"]["mixer"]["qk_norm"] == "auto"  # a default the file does not write
    assert load_config(ROOT / "ablations/base/mqar-official.yaml").model.mixer.forgetting == "small"


def test_best_lr_views() -> None:
    """Per seed each seed keeps its own best lr; per setting one lr (best mean over the seeds every lr has)
    and every seed at it."""
    import polars as pl

    from palimpsa.results import best_lr

    acc = {  # (variant, lr, seed) -> final val accuracy
        ("palimpsa", 1e-3, 1): 0.9, ("palimpsa", 1e-3, 2): 0.1, ("palimpsa", 1e-3, 5): 0.0,
        ("palimpsa", 1e-2, 1): 0.5, ("palimpsa", 1e-2, 2): 0.6, ("palimpsa", 1e-2, 5): 0.7,
        ("mamba2", 1e-3, 1): 0.2, ("mamba2", 1e-3, 2): 0.3, ("mamba2", 1e-3, 5): 0.4,
    }  # fmt: skip
    runs = pl.DataFrame(
        {
            "variant": [k[0] for k in acc],
            "status": ["FINISHED"] * len(acc),
            "cfg.train.lr": [k[1] for k in acc],
            "cfg.seed": [k[2] for k in acc],
            "metric.val_accuracy": list(acc.values()),
        }
    )
    per_seed = best_lr(runs, "seed", drop_seeds=(5,)).filter(pl.col("variant") == "palimpsa")
    assert per_seed.select("seed", "lr", "value").rows() == [(1, 1e-3, 0.9), (2, 1e-2, 0.6)]
    per_setting = best_lr(runs, "setting").filter(pl.col("variant") == "palimpsa")
    assert per_setting["lr"].unique().to_list() == [1e-2]  # mean 0.6 against 0.33
    assert per_setting["seed"].to_list() == [1, 2, 5] and per_setting["n_lr"].to_list() == [2, 2, 2]
    assert best_lr(runs, "setting").filter(pl.col("variant") == "mamba2")["n_lr"].to_list() == [1, 1, 1]
    # seeds 7 and 8 added later at 1e-3 only (both perfect): the choice stays on the seeds every lr has
    later = pl.concat([runs, runs.head(2).with_columns(pl.Series("cfg.seed", [7, 8]), pl.lit(1.0).alias(
        "metric.val_accuracy"))])  # fmt: skip
    added = best_lr(later, "setting").filter(pl.col("variant") == "palimpsa")
    assert added["lr"].unique().to_list() == [1e-2] and added["seed"].to_list() == [1, 2, 5]
    flipped = later.with_columns(  # 1e-3 wins on seeds 1, 2, 5 (0.67 against 0.6) and keeps its later seeds
        pl.when(pl.col("cfg.train.lr") == 1e-3).then(1.0 - pl.col("metric.val_accuracy"))
        .otherwise(pl.col("metric.val_accuracy")).alias("metric.val_accuracy")
    )  # fmt: skip
    chosen = best_lr(flipped, "setting").filter(pl.col("variant") == "palimpsa")
    assert chosen["lr"].unique().to_list() == [1e-3] and chosen["seed"].to_list() == [1, 2, 5, 7, 8]
    assert best_lr(later, "seed").filter(pl.col("seed") == 7)["n_lr"].to_list() == [1]  # this seed's lrs


def test_fp32_residual_under_pure_bf16_tracks_the_fp64_model_closer() -> None:
    """A bf16 model with the residual stream in fp32 (the published blocks) rounds less than one in bf16."""
    raw = tiny_config(task={"vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4})
    raw["model"].update(n_layers=6, d_model=32)
    torch.manual_seed(0)
    reference = build_model(config_from_dict(raw)).double()
    x = torch.randint(0, 64, (4, 64))
    exact = reference(x)
    errors = {}
    for fp32 in (False, True):
        raw["model"]["residual_in_fp32"] = fp32
        model = build_model(config_from_dict(raw))
        model.load_state_dict(reference.state_dict())
        logits = model.to(torch.bfloat16)(x)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
        errors[fp32] = (logits.double() - exact).norm().item() / exact.norm().item()
    assert errors[True] < errors[False], errors
