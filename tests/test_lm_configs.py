"""The language-model configs: published sizes counted by hand, the scale ladder's points and budgets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palimpsa.config import RunConfig, config_from_dict, load_config
from palimpsa.grid import load_grid
from palimpsa.model import build_model, swiglu_hidden

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "ablations" / "base"


def params_on_meta(cfg: RunConfig) -> int:
    """Parameter count of the model a config describes, built without allocating its weights."""
    with torch.device("meta"):
        return build_model(cfg).num_params()


def palimpsa_hand_count(
    d: int, layers: int, heads: int, k: int, v: int, rank: int, hidden: int, vocab: int
) -> int:
    """Palimpsa LM with official gates, no biases, short convs of 4, tied embeddings, written out."""
    hk, hv = heads * k, heads * v
    projections = d * hk * 2 + d * hv * 2 + hv * d  # q, k, v, output gate, output projection
    convs = (hk * 2 + hv) * 4  # depthwise short convs on q, k, v
    precision_gate = d * rank + rank * hv  # W_down, W_up
    gates = d * heads * 2 + heads * 3  # w_dt and w_bs; dt_bias, A_log, b_scale
    skip_and_norm = heads + v  # D per head; the per-head output RMSNorm weight
    mixer = projections + convs + precision_gate + gates + skip_and_norm
    mlp = 3 * d * hidden  # SwiGLU gate, up, down
    norms = 2 * d  # before the mixer and before the MLP
    return vocab * d + layers * (mixer + mlp + norms) + d  # embedding (= head), blocks, final norm


def test_170m_palimpsa_has_the_published_shape_and_its_hand_count() -> None:
    cfg = load_config(BASE / "lm-170m.yaml")
    m, mixer = cfg.model, cfg.model.mixer
    assert (m.d_model, m.n_layers, m.norm_eps, m.vocab_size, m.tie_embeddings) == (768, 19, 1e-6, 32000, True)
    assert (mixer.kind, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim, mixer.beta_rank) == (
        "palimpsa", 16, 48, 48, 48,
    )  # fmt: skip
    assert swiglu_hidden(m.d_model, m.mlp_ratio) == 2048
    assert cfg.task.seq_len == 4096 and cfg.task.tokenizer == "bpe:32000" and cfg.task.vocab_size == 32000
    # Per block: projections 5 * 768 * 768 = 2,949,120; convs 3 * 768 * 4 = 9,216; precision gate
    # 2 * 768 * 48 = 73,728; gates 2 * 768 * 16 + 3 * 16 = 24,624; D + norm 16 + 48 = 64;
    # SwiGLU 3 * 768 * 2048 = 4,718,592; norms 1,536: 7,776,880. Embedding 32000 * 768 = 24,576,000.
    hand = 24_576_000 + 19 * 7_776_880 + 768
    assert hand == 172_337_488 == palimpsa_hand_count(768, 19, 16, 48, 48, 48, 2048, 32000)
    assert params_on_meta(cfg) == hand


def test_760m_palimpsa_hand_count() -> None:
    cfg = load_config(BASE / "lm-760m.yaml")
    mixer = cfg.model.mixer
    assert (cfg.model.d_model, cfg.model.n_layers, mixer.head_k_dim, mixer.head_v_dim, mixer.beta_rank) == (
        1536, 19, 96, 192, 96,
    )  # fmt: skip
    hidden = swiglu_hidden(1536, cfg.model.mlp_ratio)
    assert hidden == 4096
    hand = palimpsa_hand_count(1536, 19, 16, 96, 192, 96, hidden, 32000)
    assert hand == 776_248_576 == params_on_meta(cfg)


@pytest.mark.parametrize(
    ("grid", "layers", "expected"),
    [("lm-170m", 30, {"mamba2": 166_942_368, "metamamba2": 170_260_608}),
     ("lm-760m", 38, {"mamba2": 768_424_224, "metamamba2": 785_234_816})],
)  # fmt: skip
def test_published_mamba2_pair_is_mixer_only_and_parameter_matched(grid: str, layers: int, expected) -> None:
    points = {p.axes["variant"]: p for p in load_grid(ROOT / "ablations" / f"{grid}.yaml").points}
    reference = config_from_dict(points["palimpsa"].config)
    palimpsa = params_on_meta(reference)
    for kind, count in expected.items():
        cfg = config_from_dict(points[kind].config)
        assert (cfg.model.mixer.kind, cfg.model.n_layers, cfg.model.mlp_ratio) == (kind, layers, 0)
        assert cfg.model.mixer.num_heads == 16 and cfg.task == reference.task  # one dataset per size
        assert params_on_meta(cfg) == count
        assert abs(count / palimpsa - 1) < 0.035


def test_scale_ladder_points_validate_span_8x_and_share_a_budget_per_size() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "palimpsa", "grid", "--json", "ablations/lm-scale.yaml"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)[0]
    grid = load_grid(ROOT / "ablations" / "lm-scale.yaml")
    assert [p["id"] for p in listed["points"]] == [p.point_id for p in grid.points]
    sizes: dict[int, dict[str, tuple[int, int]]] = {}
    tasks = set()
    for point in grid.points:
        cfg = config_from_dict(point.resolve())  # every point validates
        tasks.add(json.dumps(point.config["task"], sort_keys=True))
        tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.task.seq_len
        sizes.setdefault(cfg.model.d_model, {})[cfg.model.mixer.kind] = (params_on_meta(cfg), tokens)
        assert cfg.model.mixer.num_heads == 16 and cfg.model.mixer.head_k_dim == cfg.model.d_model // 16
    assert len(tasks) == 1  # one tokenizer and one dataset for the whole ladder
    assert len(sizes) >= 4
    for by_kind in sizes.values():
        assert set(by_kind) == {"palimpsa", "gated_deltanet", "mamba2", "metamamba2"}
        assert len({tokens for _, tokens in by_kind.values()}) == 1  # the same token budget per size
        counts = [n for n, _ in by_kind.values()]
        assert max(counts) / min(counts) < 1.1
    palimpsa = sorted(by_kind["palimpsa"][0] for by_kind in sizes.values())
    assert palimpsa[-1] / palimpsa[0] >= 8
    windows = grid.points[0].config["task"]["num_train"]
    budgets = {tokens for by_kind in sizes.values() for _, tokens in by_kind.values()}
    assert max(budgets) <= windows * 4096  # one epoch of the shared data covers the largest budget
