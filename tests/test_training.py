"""Trainer: which parameters decay, the lr schedule, tiny real MQAR runs, exact resume, NaN handling."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny_config as tiny_run
from torch import nn

from palimpsa.config import RunConfig, config_from_dict
from palimpsa.model import build_model, load_model
from palimpsa.training import (
    CHECKPOINT,
    FAILED,
    HISTORY,
    METRICS,
    Plan,
    TrainingError,
    decays,
    epoch_order,
    lr_factor,
    param_groups,
    train,
)


def tiny_config(**train_overrides) -> RunConfig:
    """A 1-layer Palimpsa on MQAR small enough that a run takes about a second on one core."""
    train = {"epochs": 2, "max_steps": None, "eval_every": 8, "checkpoint_every": 4, "num_threads": 1}
    return config_from_dict(
        tiny_run(
            seed=3,
            task={"vocab_size": 32, "num_train": 256, "num_val": 64},
            mixer={"num_heads": 2, "beta_rank": 4},
            train={**train, **train_overrides},
            tracking={"enabled": False},
        )
    )


# --------------------------------------------------------------------------- optimizer groups


def test_decay_rule_on_names_and_shapes():
    matrix = torch.zeros(4, 4)
    assert decays("blocks.0.mixer.q_proj.weight", matrix)
    assert decays("blocks.0.mixer.q_conv.weight", torch.zeros(4, 1, 4))
    assert not decays("blocks.0.mixer.q_proj.bias", torch.zeros(4))  # 1-D
    assert not decays("embed.weight", matrix)  # embeddings
    assert not decays("blocks.0.token_embedding.weight", matrix)
    assert not decays("blocks.0.mixer_norm.weight", matrix)  # a 2-D norm parameter still never decays
    marked = torch.nn.Parameter(torch.zeros(4, 4))
    marked._no_weight_decay = True  # a gate a layer marks, even when stored as a matrix
    assert not decays("blocks.1.mixer.A_log", marked)


@pytest.mark.parametrize("kind", ["palimpsa", "mamba2", "gated_deltanet"])
def test_param_groups_of_real_models(kind):
    cfg = tiny_config()
    cfg.model.mixer.kind = kind
    model = build_model(cfg, 32)
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay_ids = {id(p) for p in groups[0]["params"]}
    names = dict(model.named_parameters())
    for name, param in names.items():
        gate = name.rsplit(".", 1)[-1] in {"A_log", "dt_bias", "D", "b_scale"}
        if param.ndim < 2 or gate or "norm" in name or name.startswith("embed"):
            assert id(param) not in decay_ids, name
    assert id(names["blocks.0.mixer.q_proj.weight"]) in decay_ids
    assert id(names["blocks.0.mlp.w_up.weight"]) in decay_ids
    # every trainable parameter is in exactly one group (the tied head is the embedding: counted once)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len([p for p in model.parameters() if p.requires_grad])


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert groups[0]["params"] == []
    assert len(groups[1]["params"]) == 3  # linear bias + norm weight and bias


# --------------------------------------------------------------------------- schedule and plan


def test_lr_schedule_shape():
    warmup, total, floor = 10, 100, 0.1
    f = [lr_factor(s, warmup, total, floor) for s in range(total)]
    assert f[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup], strict=False))  # linear rise
    assert f[warmup - 1] == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :], strict=False))  # cosine decay
    assert f[-1] == pytest.approx(floor, abs=1e-3)
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(floor + (1 - floor) * 0.5, abs=1e-2)
    assert lr_factor(total + 5, warmup, total, floor) == pytest.approx(floor)  # clamped past the end
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)  # no warmup starts at the peak


def test_plan_caps_and_data_order():
    cfg = tiny_config(epochs=3, max_steps=20)
    plan = Plan.make(cfg.train, num_train=250)
    assert plan.steps_per_epoch == 15  # ragged tail dropped
    assert plan.total_steps == 20
    assert plan.eval_every == 8
    assert Plan.make(tiny_config(eval_every=None).train, 250).eval_every == 15
    assert torch.equal(epoch_order(1, 2, 50), epoch_order(1, 2, 50))
    assert not torch.equal(epoch_order(1, 2, 50), epoch_order(1, 3, 50))
    assert not torch.equal(epoch_order(1, 2, 50), epoch_order(2, 2, 50))


# --------------------------------------------------------------------------- real runs


def test_tiny_run_writes_outputs(tmp_path):
    result = train(tiny_config(), tmp_path, progress=False)
    on_disk = json.loads((tmp_path / METRICS).read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in (
        "val_accuracy",
        "val_loss",
        "best_val_accuracy",
        "best_val_loss",
        "steps",
        "epochs",
        "wall_seconds",
        "tokens_per_second",
        "num_params",
        "peak_memory_mib",
        "status",
        "mlflow_run_id",
        "device",
        "backends",
        "diag.horizon",
        "diag.consolidated",
    ):
        assert key in on_disk, key
    assert on_disk["status"] == "FINISHED" and on_disk["steps"] == 32 and on_disk["epochs"] == 2
    assert on_disk["tokens_per_second"] > 0 and on_disk["mlflow_run_id"] is None
    assert 0 <= on_disk["val_accuracy"] <= 1 and math.isfinite(on_disk["val_loss"])
    assert any(k.startswith("diag.l0.h1.i_over_ip_q") for k in on_disk)
    history = [json.loads(line) for line in (tmp_path / HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [8, 16, 24, 32]
    assert history[-1]["val_loss"] == pytest.approx(on_disk["val_loss"])
    model, cfg = load_model(tmp_path / CHECKPOINT)  # the trainer's checkpoint is a model checkpoint
    assert cfg == tiny_config() and model.num_params() == on_disk["num_params"]
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_target_stops_early(tmp_path):
    result = train(tiny_config(target=0.0), tmp_path, progress=False)
    assert result["stop_reason"] == "target" and result["steps"] == 8


def test_patience_stops_early(tmp_path):
    # lr 0 never improves after the first eval: stop after `patience` evals without improvement
    result = train(tiny_config(lr=1e-12, warmup_steps=0, patience=1, eval_every=4), tmp_path, progress=False)
    assert result["stop_reason"] == "patience"
    assert result["steps"] < 32


def _stop_after_first_checkpoint(out: Path) -> threading.Thread:
    """SIGTERM this process once the run's first checkpoint exists (a graceful stop mid-run)."""

    def watch() -> None:
        deadline = time.time() + 60
        while not (out / CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_resume_after_stop_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config()
    full = train(cfg, tmp_path / "full", progress=False)

    out = tmp_path / "resumed"
    watcher = _stop_after_first_checkpoint(out)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    watcher.join()
    stopped_at = torch.load(out / CHECKPOINT, weights_only=True)["trainer"]["step"]
    assert 0 < stopped_at < full["steps"] and not (out / METRICS).exists()

    resumed = train(cfg, out, progress=False)
    assert resumed["resumed"] is True
    for key in (
        "val_loss",
        "val_accuracy",
        "best_val_loss",
        "best_val_accuracy",
        "steps",
        "best_step",
        "diag.horizon",
        "diag.consolidated",
    ):
        assert resumed[key] == full[key], key  # bit-exact on CPU
    strip = ("wall_seconds", "train_seconds")  # timings
    history = [json.loads(x) for x in (out / HISTORY).read_text().splitlines()]
    full_history = [json.loads(x) for x in (tmp_path / "full" / HISTORY).read_text().splitlines()]
    assert [{k: v for k, v in h.items() if k not in strip} for h in history] == [
        {k: v for k, v in h.items() if k not in strip} for h in full_history
    ]


def test_rerun_of_finished_run_reproduces_metrics(tmp_path):
    first = train(tiny_config(), tmp_path, progress=False)
    again = train(tiny_config(), tmp_path, progress=False)
    assert again["steps"] == first["steps"] and again["val_loss"] == first["val_loss"]


def test_resume_refuses_another_config(tmp_path):
    train(tiny_config(max_steps=4), tmp_path, progress=False)
    with pytest.raises(TrainingError, match=r"train\.lr"):
        train(tiny_config(max_steps=4, lr=3e-3), tmp_path, progress=False)
    # runtime-only keys may change between sessions
    train(tiny_config(max_steps=4, num_threads=2, checkpoint_every=2), tmp_path, progress=False)


def test_non_finite_loss_fails_the_run(tmp_path):
    with pytest.raises(TrainingError, match="non-finite"):
        train(tiny_config(lr=1e30, warmup_steps=0), tmp_path, progress=False)
    failed = json.loads((tmp_path / FAILED).read_text())
    assert failed["status"] == "FAILED" and "non-finite" in failed["reason"]
    assert not (tmp_path / METRICS).exists()


def test_mqar_tiny_config_is_the_acceptance_setup():
    from palimpsa.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "ablations" / "mqar-tiny.yaml")
    task, model, t = cfg.task, cfg.model, cfg.train
    assert (task.name, task.seq_len, task.num_kv_pairs, task.vocab_size) == ("mqar", 64, 8, 256)
    assert (model.d_model, model.n_layers, model.init_std) == (64, 2, 0.02)
    assert (model.mixer.kind, model.mixer.gates) == ("palimpsa", "official")
    assert (t.lr, t.batch_size, t.num_threads) == (1e-2, 32, 2) and t.target is not None and t.target >= 0.9
