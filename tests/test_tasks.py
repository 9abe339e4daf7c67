"""Tasks: MQAR layout, MAD invariants, LM corpora, seeding, caching and the accuracy metric."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from palimpsa.config import ConfigError, config_from_dict
from palimpsa.tasks import IGNORE_INDEX, TASK_CONFIGS, MQARConfig, build_task, sequence_accuracy
from palimpsa.tasks import mqar as mqar_module

# --------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_positions(random_non_queries: bool) -> None:
    cfg = MQARConfig(
        vocab_size=64,
        seq_len=48,
        num_kv_pairs=6,
        num_train=300,
        num_val=50,
        random_non_queries=random_non_queries,
    )
    data = build_task(cfg, seed=3)
    kv, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    for inputs, targets in ((data.train_inputs, data.train_targets), (data.val_inputs, data.val_targets)):
        assert inputs.shape == targets.shape == (len(inputs), cfg.seq_len)
        keys, values = inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]
        assert ((keys >= 1) & (keys < half)).all()
        assert ((values >= half) & (values < cfg.vocab_size)).all()
        assert all(len(set(row.tolist())) == kv for row in keys)  # distinct keys per example
        scored = targets != IGNORE_INDEX
        assert (scored.sum(dim=1) == kv).all()
        assert not scored[:, : 2 * kv].any()  # the context is never scored
        for row_in, row_tg, row_k, row_v in zip(inputs, targets, keys, values, strict=True):
            mapping = dict(zip(row_k.tolist(), row_v.tolist(), strict=True))
            positions = row_tg.ne(IGNORE_INDEX).nonzero().flatten().tolist()
            assert sorted(row_in[positions].tolist()) == sorted(mapping)  # each key asked once
            for pos in positions:
                assert (pos - 2 * kv) % 2 == 0  # queries sit on even offsets after the context
                assert row_tg[pos].item() == mapping[row_in[pos].item()]
            rest = torch.ones(cfg.seq_len, dtype=torch.bool)
            rest[: 2 * kv] = False
            rest[positions] = False
            if not random_non_queries:
                assert (row_in[rest] == 0).all()
            else:
                assert ((row_in[rest] >= 0) & (row_in[rest] < cfg.vocab_size)).all()


def test_mqar_power_law_gaps_prefer_near_queries() -> None:
    cfg = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=4, num_train=2000, num_val=1)
    targets = build_task(cfg).train_targets
    offsets = (targets != IGNORE_INDEX).nonzero()[:, 1] - 2 * cfg.num_kv_pairs
    slots = offsets // 2  # 0 .. 119; p(slot) ~ (slot + 1) ** -0.99
    near, far = (slots < 10).float().mean(), (slots >= 110).float().mean()
    assert near > 3 * far


def test_mqar_rejects_too_many_pairs() -> None:
    with pytest.raises(ConfigError, match=r"task\.num_kv_pairs: num_kv_pairs \* 4 must be <= seq_len"):
        config_from_dict({"task": {"name": "mqar", "seq_len": 64, "num_kv_pairs": 17}})
    cfg = config_from_dict({"task": {"name": "mqar", "seq_len": 64, "num_kv_pairs": 16}})
    assert cfg.task.num_kv_pairs == 16


def test_mqar_paper_grid_shape_is_feasible() -> None:
    cfg = MQARConfig(vocab_size=8192, seq_len=1024, num_kv_pairs=256, num_train=64, num_val=8)
    data = build_task(cfg)
    assert ((data.val_targets != IGNORE_INDEX).sum(dim=1) == 256).all()


def test_mqar_default_generation_is_fast() -> None:
    start = time.perf_counter()
    build_task(MQARConfig(num_train=20000, num_val=1000))
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------- seeding and cache


def test_seeding_is_deterministic() -> None:
    cfg = MQARConfig(num_train=64, num_val=16)
    a, b, c = build_task(cfg, seed=1), build_task(cfg, seed=1), build_task(cfg, seed=2)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.val_targets, b.val_targets)
    assert not torch.equal(a.train_inputs, c.train_inputs)
    assert not torch.equal(a.train_inputs[:16], a.val_inputs)  # train and val use separate streams


def test_cache_reuse(tmp_path, monkeypatch) -> None:
    cfg = MQARConfig(num_train=64, num_val=16)
    first = build_task(cfg, cache_dir=tmp_path, seed=5)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mqar-") and files[0].suffix == ".pt"
    stamp = files[0].stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the generator ran although the data was cached")

    monkeypatch.setattr(mqar_module, "generate_mqar", refuse)
    second = build_task(cfg, cache_dir=tmp_path, seed=5)
    assert torch.equal(first.train_inputs, second.train_inputs)
    assert torch.equal(first.val_targets, second.val_targets)
    assert (second.vocab_size, second.metric) == (cfg.vocab_size, "accuracy")
    assert files[0].stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="generator ran"):  # another seed is another file
        build_task(cfg, cache_dir=tmp_path, seed=6)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_corrupt_cache_file_is_rebuilt(tmp_path) -> None:
    cfg = MQARConfig(num_train=32, num_val=8)
    build_task(cfg, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"torn")
    again = build_task(cfg, cache_dir=tmp_path)
    assert torch.equal(again.train_inputs, build_task(cfg).train_inputs)
    assert os.path.getsize(path) > 100


# --------------------------------------------------------------------------- metric


def test_sequence_accuracy_hand_case() -> None:
    vocab = 5
    targets = torch.tensor(
        [
            [IGNORE_INDEX, 2, IGNORE_INDEX, 4],  # two scored, one right -> 0.5
            [1, 1, 1, IGNORE_INDEX],  # three scored, all right -> 1.0
            [IGNORE_INDEX] * 4,  # nothing scored -> NaN
        ]
    )
    predictions = torch.tensor([[0, 2, 3, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(predictions, vocab).float()
    acc = sequence_accuracy(logits, targets)
    assert acc[:2].tolist() == [0.5, 1.0] and math.isnan(acc[2].item())
    assert torch.nanmean(acc).item() == pytest.approx(0.75)


def test_registry_names() -> None:
    assert "mqar" in TASK_CONFIGS and TASK_CONFIGS["mqar"] is MQARConfig
