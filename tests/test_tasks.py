"""Tasks: MQAR layout, MAD invariants, LM corpora, seeding, caching and the accuracy metric."""

from __future__ import annotations

import math
import os
import re
import sys
import time
import types

import pytest
import torch

from palimpsa.config import ConfigError, config_from_dict
from palimpsa.tasks import (
    IGNORE_INDEX,
    MAD_VARIANTS,
    TASK_CONFIGS,
    LMConfig,
    MADConfig,
    MQARConfig,
    TaskError,
    build_task,
    sequence_accuracy,
)
from palimpsa.tasks import lm as lm_module
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
    assert set(TASK_CONFIGS) == {"mqar", "mad", "lm"}
    for name, cls in TASK_CONFIGS.items():
        assert cls().name == name


# --------------------------------------------------------------------------- MAD


def _mad(variant: str, **kwargs) -> tuple[MADConfig, object]:
    cfg = MADConfig(variant=variant, num_train=kwargs.pop("num_train", 256), num_val=128, **kwargs)
    return cfg, build_task(cfg, seed=11)


def _check_pairs_recall(inputs, targets, num_keys: int, noise_from: int) -> float:
    """Multi-query recall invariants on k v pairs; returns the fraction of noise pairs."""
    noise_pairs = total_pairs = 0
    for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
        mapping: dict[int, int] = {}
        for t in range(0, len(row_in) - 1, 2):
            k, v = row_in[t], row_in[t + 1]
            total_pairs += 1
            if k >= noise_from:  # a noise slot: both tokens noise, nothing scored
                assert v >= noise_from and row_tg[t] == IGNORE_INDEX
                noise_pairs += 1
                continue
            assert 0 <= k < num_keys <= v < noise_from
            assert mapping.setdefault(k, v) == v  # one value per key within an example
            seen_before = sum(1 for s in range(0, t, 2) if row_in[s] == k) > 0
            assert row_tg[t] == (v if seen_before else IGNORE_INDEX)
            assert row_tg[t + 1] == IGNORE_INDEX  # values are never asked to predict the next key
        assert sum(x != IGNORE_INDEX for x in row_tg) >= 1
        last = (len(row_in) + 1) // 2 * 2 - 2  # the final complete pair always re-asks a key
        assert row_tg[last] != IGNORE_INDEX
    return noise_pairs / total_pairs


def test_mad_in_context_recall() -> None:
    cfg, data = _mad("in_context_recall")
    assert (cfg.vocab_size, cfg.seq_len) == (16, 128)  # MAD defaults
    _check_pairs_recall(data.val_inputs, data.val_targets, num_keys=8, noise_from=16)
    # MAD trains on every next token and validates on the recall positions only.
    assert torch.equal(data.train_targets[:, :-1], data.train_inputs[:, 1:])
    _, probes = _mad("in_context_recall", train_targets="probes", seq_len=33)
    _check_pairs_recall(probes.train_inputs, probes.train_targets, num_keys=8, noise_from=16)


def test_mad_noisy_recall() -> None:
    cfg, data = _mad("noisy_recall", frac_noise=0.4, num_train=64)
    content = cfg.vocab_size - cfg.noise_vocab_size
    frac = _check_pairs_recall(data.val_inputs, data.val_targets, num_keys=content // 2, noise_from=content)
    assert 0.3 < frac < 0.45  # forced key pairs pull it a little under frac_noise
    assert (data.val_inputs < cfg.vocab_size).all()


def _runs(row: list[int], num_keys: int, pad: int) -> list[tuple[bool, int, list[int]]]:
    """Maximal runs of key tokens / value tokens: (is_key, start, tokens); pads must lead."""
    runs: list[tuple[bool, int, list[int]]] = []
    for t, tok in enumerate(row):
        if tok == pad:
            assert not runs, "pad tokens only at the start"
            continue
        is_key = tok < num_keys
        if runs and runs[-1][0] == is_key:
            runs[-1][2].append(tok)
        else:
            runs.append((is_key, t, [tok]))
    return runs


@pytest.mark.parametrize("split", ["val", "train"])
def test_mad_fuzzy_recall(split: str) -> None:
    cfg, data = _mad("fuzzy_recall", vocab_size=20, seq_len=96, train_targets="probes")
    pad, num_keys = cfg.vocab_size - 1, (cfg.vocab_size - 1) // 2
    inputs, targets = (
        (data.val_inputs, data.val_targets) if split == "val" else (data.train_inputs, data.train_targets)
    )
    key_lengths: set[int] = set()
    for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
        runs = _runs(row_in, num_keys, pad)
        if not runs[0][0]:  # a value cut by the window start would have no key: never happens
            raise AssertionError("sequence must start with a key after the padding")
        expected = [IGNORE_INDEX] * len(row_in)
        mapping: dict[tuple[int, ...], tuple[int, ...]] = {}
        body = runs[:-1] if len(runs) % 2 == 1 else runs[:-2]  # the final probe is cut by one token
        pairs = [(body[i], body[i + 1]) for i in range(0, len(body), 2)]
        for (_, _, key), (_, vstart, value) in pairs:
            key_lengths.add(len(key))
            assert 1 <= len(key) <= cfg.k_motif_size and 1 <= len(value) <= cfg.v_motif_size
            assert len(set(key)) == len(key) and len(set(value)) == len(value)
            if tuple(key) in mapping:
                assert mapping[tuple(key)] == tuple(value)
                for i, tok in enumerate(value):
                    expected[vstart + i - 1] = tok  # predicted one step earlier
            mapping.setdefault(tuple(key), tuple(value))
        # The stream ends inside the final probe's value; its last token is the one target past the inputs.
        if len(runs) % 2 == 1:
            (_, _, key), tail = runs[-1], []
        else:
            (_, _, key), (_, _, tail) = runs[-2], runs[-1]
        for i, tok in enumerate(tail):
            expected[len(row_in) - len(tail) + i - 1] = tok
        assert mapping[tuple(key)][: len(tail)] == tuple(tail)  # the probe re-asks a key seen before
        assert row_tg[:-1] == expected[:-1]
        assert row_tg[-1] != IGNORE_INDEX  # the probe's last value token is scored
    assert key_lengths == ({cfg.k_motif_size} if split == "val" else set(range(1, cfg.k_motif_size + 1)))


def test_mad_fuzzy_recall_trains_on_every_real_token() -> None:
    cfg, data = _mad("fuzzy_recall")
    pad = cfg.vocab_size - 1
    nxt = data.train_inputs[:, 1:]
    expected = torch.where(nxt == pad, IGNORE_INDEX, nxt)
    assert torch.equal(data.train_targets[:, :-1], expected)
    assert (data.train_targets[:, -1] != IGNORE_INDEX).all()


def test_mad_memorize() -> None:
    cfg, data = _mad("memorize")
    insert, num_keys = cfg.vocab_size - 1, (cfg.vocab_size - 1) // 2
    table: dict[int, int] = {}
    for inputs, targets in ((data.train_inputs, data.train_targets), (data.val_inputs, data.val_targets)):
        assert (inputs[:, 1::2] == insert).all() and (inputs[:, 0::2] < num_keys).all()
        assert (targets[:, 0::2] == IGNORE_INDEX).all()
        for k, v in zip(inputs[:, 0::2].flatten().tolist(), targets[:, 1::2].flatten().tolist(), strict=True):
            assert num_keys <= v < insert
            assert table.setdefault(k, v) == v  # one fixed map across examples and splits
    assert len(set(table.values())) == len(table) > num_keys // 2  # distinct values, most keys drawn
    other = build_task(cfg, seed=12)  # another seed draws another map
    assert not torch.equal(
        other.val_targets[:, 1::2],
        torch.tensor([[table.get(k, -1) for k in row] for row in other.val_inputs[:, 0::2].tolist()]),
    )


def test_mad_selective_copy() -> None:
    cfg, data = _mad("selective_copy", seq_len=64, num_tokens_to_copy=8)
    n, copy, blank = cfg.num_tokens_to_copy, cfg.vocab_size - 1, cfg.vocab_size - 2
    body = cfg.seq_len - n - 1
    for inputs, targets in ((data.train_inputs, data.train_targets), (data.val_inputs, data.val_targets)):
        assert (inputs[:, body] == copy).all() and (inputs[:, body + 1 :] == blank).all()
        assert (inputs[:, :body] != copy).all()
        assert (targets[:, : body + 1] == IGNORE_INDEX).all()
        for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
            content = [tok for tok in row_in[:body] if tok != blank]
            assert len(content) == n and content == row_tg[body + 1 :]
    spread = (data.train_inputs[:, :body] != blank).float().mean(0)
    assert spread[: body // 2].sum() > 0.3 * spread.sum()  # content is scattered, not packed at one end


def test_mad_compress() -> None:
    for length in (32, 33):
        cfg, data = _mad("compress", seq_len=length)
        marker, blank = cfg.vocab_size - 1, cfg.vocab_size - 2
        count = (length - 1) // 2
        start = length - 2 * count - 1
        inputs, targets = data.val_inputs, data.val_targets
        assert (inputs[:, start + count] == marker).all() and (inputs[:, start + count + 1 :] == blank).all()
        assert (inputs[:, start : start + count] < blank).all()
        assert torch.equal(targets[:, start + count + 1 :], inputs[:, start : start + count])
        assert (targets[:, : start + count + 1] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    ("task", "key", "message"),
    [
        (
            {"variant": "selective_copy", "seq_len": 32, "num_tokens_to_copy": 16},
            "num_tokens_to_copy",
            "seq_len must be >",
        ),
        (
            {"variant": "noisy_recall", "vocab_size": 16, "noise_vocab_size": 14},
            "noise_vocab_size",
            "need >= 4",
        ),
        ({"variant": "noisy_recall", "frac_noise": 1.0}, "frac_noise", r"\[0, 1\)"),
        ({"variant": "fuzzy_recall", "vocab_size": 5}, "k_motif_size", "exceeds"),
        ({"variant": "fuzzy_recall", "seq_len": 8}, "seq_len", "must be >= 2"),
        ({"variant": "copy"}, "variant", "must be one of"),
    ],
)
def test_mad_rejects_impossible_shapes(task: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"task\.{key}: .*{message}"):
        config_from_dict({"task": {"name": "mad", **task}})


def test_mad_every_variant_builds_and_caches(tmp_path) -> None:
    for variant in MAD_VARIANTS:
        cfg = MADConfig(variant=variant, num_train=32, num_val=16)
        data = build_task(cfg, cache_dir=tmp_path, seed=0)
        again = build_task(cfg, cache_dir=tmp_path, seed=0)
        assert torch.equal(data.val_targets, again.val_targets) and data.metric == "accuracy"
        assert data.train_inputs.shape == (32, cfg.seq_len) and int(data.val_inputs.max()) < cfg.vocab_size
        assert (data.val_targets != IGNORE_INDEX).any(dim=1).all()
    assert len(list(tmp_path.glob("mad-*.pt"))) == len(MAD_VARIANTS)


# --------------------------------------------------------------------------- LM


def test_lm_stdlib_builds_offline_with_disjoint_split() -> None:
    cfg = LMConfig(seq_len=64, num_train=200, num_val=50)
    data = build_task(cfg, seed=0)
    assert data.metric == "loss" and data.vocab_size == 256
    assert data.train_inputs.shape == (200, 64) and data.val_inputs.shape == (50, 64)
    assert torch.equal(data.train_inputs[:, 1:], data.train_targets[:, :-1])
    files = lm_module.corpus_files(cfg)
    assert [name for name, _ in files] == sorted(name for name, _ in files)
    assert all(name.endswith(".py") and "site-packages" not in name for name, _ in files)
    val_names = {name for name, _ in files if lm_module._bucket(name) < cfg.val_fraction}
    assert 0 < len(val_names) < len(files) // 5
    train_stream, val_stream = lm_module._read_files(cfg)
    val_files = b"".join(path.read_bytes() + b"\x00" for name, path in files if name in val_names)
    assert val_stream == val_files  # val holds exactly the val files; train holds all the others
    assert len(train_stream) + len(val_stream) == sum(path.stat().st_size + 1 for _, path in files)
    for row in data.val_inputs[:10]:
        assert bytes(row.tolist()) in val_stream
    assert torch.equal(build_task(cfg, seed=0).val_inputs, data.val_inputs)


def test_lm_text_folder_and_single_file(tmp_path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i} " * 50)
    (folder / ".hidden").write_text("never read " * 100)
    cfg = LMConfig(source="text", path=str(folder), seq_len=32, num_train=100, num_val=10, val_fraction=0.2)
    data = build_task(cfg, seed=0)
    assert b"never read" not in bytes(data.train_inputs.flatten().tolist())
    single = folder / "doc00.txt"
    one = build_task(LMConfig(source="text", path=str(single), seq_len=16, num_train=20, num_val=1), seed=0)
    text = single.read_bytes()
    assert bytes(one.train_inputs[0].tolist()) in text and bytes(one.val_inputs[0].tolist()) in text


def test_lm_cache_follows_the_files(tmp_path) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("abcdefgh" * 200)
    cfg = LMConfig(source="text", path=str(corpus), seq_len=16, num_train=20, num_val=2)
    first = build_task(cfg, cache_dir=tmp_path / "cache")
    corpus.write_text("ABCDEFGH" * 300)
    second = build_task(cfg, cache_dir=tmp_path / "cache")
    assert not torch.equal(first.train_inputs, second.train_inputs)
    assert len(list((tmp_path / "cache").glob("lm-*.pt"))) == 2


def test_lm_missing_text_path_names_the_file(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "corpus.txt"
    cfg = config_from_dict({"task": {"name": "lm", "source": "text", "path": str(missing)}}).task
    with pytest.raises(TaskError, match=rf"task\.path: .*{missing}"):
        build_task(cfg, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"task\.path: required when source is 'text'"):
        config_from_dict({"task": {"name": "lm", "source": "text"}})
    with pytest.raises(ConfigError, match=r"task\.vocab_size: .*byte-level"):
        config_from_dict({"task": {"name": "lm", "vocab_size": 512}})


def test_lm_too_few_windows_is_a_clear_error(tmp_path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text("x" * 1000)
    with pytest.raises(TaskError, match=r"task\.num_train: .*fewer than the 500"):
        build_task(LMConfig(source="text", path=str(corpus), seq_len=16, num_train=500, num_val=1))


def test_lm_hf_without_datasets_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = LMConfig(source="hf", hf_dataset="HuggingFaceFW/fineweb-edu", num_train=4, num_val=1)
    with pytest.raises(TaskError, match=r"task\.source: 'hf' needs the `datasets` package"):
        build_task(cfg)


def test_lm_hf_streams_only_what_it_needs(monkeypatch) -> None:
    """The streaming loop against a stand-in for the absent ``datasets`` package (same call signature)."""
    pulled: list[int] = []

    def load_dataset(name, config, split, streaming):
        assert (name, config, split, streaming) == ("org/corpus", "sample", "train", True)
        for i in range(10**6):
            pulled.append(i)
            yield {"text": f"record {i} " + "lorem ipsum " * 20, "id": i}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = LMConfig(
        source="hf", hf_dataset="org/corpus", hf_config="sample", seq_len=32, num_train=50, num_val=5
    )
    data = build_task(cfg)
    assert data.train_inputs.shape == (50, 32) and data.val_inputs.shape == (5, 32)
    assert len(pulled) < 200  # stops once both splits are full
    val_text = bytes(data.val_inputs.flatten().tolist())
    train_text = bytes(data.train_inputs.flatten().tolist())
    val_ids = {int(m) for m in re.findall(rb"record (\d+) ", val_text)}
    train_ids = {int(m) for m in re.findall(rb"record (\d+) ", train_text)}
    assert val_ids and train_ids and not val_ids & train_ids  # split by document
    bad = LMConfig(source="hf", hf_dataset="org/corpus", hf_config="sample", text_field="body")
    with pytest.raises(TaskError, match=r"task\.text_field: 'body' is not a field"):
        build_task(bad)
