"""Language-model data: BPE training (deterministic, cached by digest), packing into windows, byte-level
configs unchanged, clear errors, the streamed source, data built once and shared, and the workflow rules
that prepare it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_config

import palimpsa.tasks as tasks_module
from palimpsa.config import ConfigError, config_from_dict
from palimpsa.tasks import LMConfig, TaskError, build_task, resolve_tokenizer
from palimpsa.tasks import lm as lm_module
from palimpsa.tasks import tokenizer as tok_module
from palimpsa.tasks.tokenizer import EOD_TOKEN, pack

pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "workflow" / "scripts" / "prepare_lm.py"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda", "sigma"]
VAL_WORD = "zyzzyva"  # written only into validation documents


def write_corpus(folder: Path, docs: int = 24, words: int = 300) -> Path:
    """Documents of common words; those the split sends to validation also hold VAL_WORD."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        name = f"doc{i:02d}.txt"
        text = " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words))
        if lm_module._bucket(name) < 0.25:
            text += f" {VAL_WORD}" * 40
        (folder / name).write_text(text)
    return folder


def lm_task(corpus: Path, **extra) -> LMConfig:
    fields = dict(source="text", path=str(corpus), tokenizer="bpe:320", seq_len=32, num_train=60, num_val=8)
    return LMConfig(**{**fields, "val_fraction": 0.25, **extra})


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


# --------------------------------------------------------------------------- tokenizer


def test_bpe_is_deterministic_cached_by_digest_and_trained_on_training_documents(corpus, tmp_path) -> None:
    cfg = lm_task(corpus)
    first = resolve_tokenizer(cfg, tmp_path / "a")
    resolve_tokenizer(cfg, tmp_path / "b")
    (file_a,) = (tmp_path / "a" / "tokenizers").iterdir()
    (file_b,) = (tmp_path / "b" / "tokenizers").iterdir()
    assert file_a.name == file_b.name and file_a.name.startswith("bpe320-")
    assert file_a.read_bytes() == file_b.read_bytes()
    # another process (another hash seed) trains the same file
    spec = json.dumps({"task": dataclasses.asdict(cfg), "seed": 0})
    proc = subprocess.run(
        [sys.executable, str(PREPARE), "--task-json", spec, "--cache", str(tmp_path / "c"),
         "--out", str(tmp_path / "c.json"), "--tokenizer-only"],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "7"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    marker = json.loads((tmp_path / "c.json").read_text())
    assert Path(marker["tokenizer"]["file"]).read_bytes() == file_a.read_bytes() and "data" not in marker
    assert first.vocab_size <= 320  # a small corpus may run out of merges before 320 tokens
    assert first.eod_id == 0 and first.tokenizer.id_to_token(0) == EOD_TOKEN
    assert len(first.encode("alpha")) == 1  # a training word is one token
    assert len(first.encode(VAL_WORD)) > 2  # a validation-only word was never merged
    assert first.decode(first.encode("gamma delta\n")) == "gamma delta\n"
    resolve_tokenizer(lm_task(corpus, tokenizer="bpe:300"), tmp_path / "a")
    assert len(list((tmp_path / "a" / "tokenizers").iterdir())) == 2  # another size, another file


def test_cached_tokenizer_is_read_back_not_retrained(corpus, tmp_path, monkeypatch) -> None:
    cfg = lm_task(corpus)
    trained = resolve_tokenizer(cfg, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached tokenizer")

    monkeypatch.setattr(tok_module, "train_bpe", no_training)
    again = resolve_tokenizer(cfg, tmp_path)
    assert again.encode("alpha beta") == trained.encode("alpha beta")


# --------------------------------------------------------------------------- packing


def test_packing_joins_documents_with_the_end_token_and_cuts_windows(corpus, tmp_path) -> None:
    cfg = lm_task(corpus)
    tok = resolve_tokenizer(cfg, tmp_path)
    stream = pack(tok, ["alpha beta", "gamma"])
    assert stream.tolist() == [*tok.encode("alpha beta"), tok.eod_id, *tok.encode("gamma"), tok.eod_id]
    data = build_task(cfg, tmp_path, seed=0)
    assert data.metric == "loss" and data.vocab_size == 320 and data.seq_len == 32
    assert data.train_inputs.shape == (60, 32) and data.val_inputs.shape == (8, 32)
    assert torch.equal(data.train_inputs[:, 1:], data.train_targets[:, :-1])
    train_stream, val_stream = lm_module._tokenize_files(cfg, tok)
    for inputs, targets, packed in ((data.train_inputs, data.train_targets, train_stream),
                                    (data.val_inputs, data.val_targets, val_stream)):  # fmt: skip
        for row in range(inputs.shape[0]):
            window = torch.cat([inputs[row], targets[row, -1:]])  # seq_len + 1 tokens
            starts = [
                s for s in range(0, len(packed) - 32, 32) if torch.equal(packed[s : s + 33].long(), window)
            ]
            assert starts, "every window is a slice of the packed stream at a multiple of seq_len"
    assert int((train_stream == tok.eod_id).sum()) == sum(
        lm_module._bucket(f"doc{i:02d}.txt") >= 0.25 for i in range(24)
    )
    assert VAL_WORD in tok.decode(data.val_inputs.flatten().tolist())
    assert VAL_WORD not in tok.decode(data.train_inputs.flatten().tolist())


def test_tokens_stay_compact_until_a_batch_is_drawn(corpus, tmp_path, monkeypatch) -> None:
    """LM data keeps int16 tokens (int32 above 32,768 ids): the windows, gathered a block at a time, equal
    the one-shot int64 gather; batches and the model get int64; a float or unsigned tensor is refused."""
    from palimpsa.config import TrainConfig
    from palimpsa.tasks.base import TaskData, token_dtype
    from palimpsa.training.batches import Batches, Plan, epoch_order

    assert token_dtype(320) == torch.int16 and token_dtype(32_768) == torch.int16
    assert token_dtype(32_769) == torch.int32
    monkeypatch.setattr(lm_module, "WINDOW_BLOCK", 7)  # 60 windows: 9 blocks, the last one short
    data = build_task(lm_task(corpus), tmp_path, seed=0)
    assert {getattr(data, name).dtype for name in TaskData.TENSORS} == {torch.int16}
    stream = torch.arange(1000, dtype=torch.int32) % 300
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    blocked = lm_module._windows(stream, 60, 16, gen(), "num_train", "tokens", torch.int16)
    starts = torch.randperm(999 // 16, generator=gen())[:60] * 16
    assert torch.equal(blocked.long(), stream[starts[:, None] + torch.arange(17)].long())
    plan = Plan.make(TrainConfig(batch_size=8, epochs=1), data.train_inputs.shape[0])
    inputs, targets, positions = next(Batches(data, plan, 0, torch.device("cpu"), None).from_step(0))
    assert inputs.dtype == targets.dtype == torch.long and positions is None
    idx = epoch_order(0, 0, data.train_inputs.shape[0])[:8]
    assert torch.equal(inputs, data.train_inputs[idx].long()) and torch.equal(
        targets, data.train_targets[idx].long()
    )
    with pytest.raises(ValueError, match="train_inputs must be a 2-D int16/int32/int64 tensor"):
        TaskData(*(data.train_inputs.float(), *(getattr(data, n) for n in TaskData.TENSORS[1:])), 320, "loss")


def test_byte_level_configs_stay_byte_level() -> None:
    default = config_from_dict({"task": {"name": "lm"}}).task
    assert default.vocab_size == 256 and default.tokenizer is None
    base = LMConfig(seq_len=16, num_train=20, num_val=4)
    other = dataclasses.replace(base, tokenizer_train_chars=123)
    for split in ("train", "val"):  # tokenizer-only fields never move a byte-level config's windows
        assert torch.equal(
            torch.randperm(99, generator=lm_module._generator(base, 0, split)),
            torch.randperm(99, generator=lm_module._generator(other, 0, split)),
        )
    bpe = config_from_dict({"task": {"name": "lm", "tokenizer": "bpe:1000"}}).task
    assert bpe.vocab_size == 1000


def test_tokenizer_errors_name_the_key_file_or_package(corpus, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"task\.tokenizer: 'bpe:<vocab_size>' needs an integer >= 258"):
        config_from_dict({"task": {"name": "lm", "tokenizer": "bpe:12"}})
    with pytest.raises(ConfigError, match=r"task\.vocab_size: must be 300 with tokenizer 'bpe:300'"):
        config_from_dict({"task": {"name": "lm", "tokenizer": "bpe:300", "vocab_size": 512}})
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(TaskError, match=rf"task\.tokenizer: tokenizer file not found: {missing}"):
        build_task(lm_task(corpus, tokenizer=str(missing), vocab_size=None), tmp_path / "cache")
    saved = tmp_path / "saved" / "tokenizer.json"
    saved.parent.mkdir()
    trained = resolve_tokenizer(lm_task(corpus))
    saved.write_text(trained.to_json())
    from_file = build_task(lm_task(corpus, tokenizer=str(saved.parent), vocab_size=None), seed=0)
    assert from_file.vocab_size == trained.vocab_size  # a folder holding tokenizer.json
    size = trained.vocab_size
    with pytest.raises(TaskError, match=rf"task\.vocab_size: {size - 1} is smaller than the {size} tokens"):
        build_task(lm_task(corpus, tokenizer=str(saved), vocab_size=size - 1))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(TaskError, match=r"task\.tokenizer: needs the `tokenizers` package"):
        build_task(lm_task(corpus))


def test_streamed_source_with_bpe_stops_once_both_splits_hold_enough_tokens(monkeypatch) -> None:
    pulled: list[int] = []

    def load_dataset(name, config, split, streaming):
        for i in range(10**6):
            pulled.append(i)
            yield {"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60))}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = LMConfig(source="hf", hf_dataset="org/corpus", tokenizer="bpe:300", seq_len=16, num_train=40,
                   num_val=4, tokenizer_train_chars=20_000)  # fmt: skip
    data = build_task(cfg, seed=0)
    assert data.train_inputs.shape == (40, 16) and data.vocab_size == 300
    assert len(pulled) < 300  # the tokenizer read ~20k characters (~50 documents), the windows ~700 tokens


# --------------------------------------------------------------------------- built once, shared


def test_data_is_built_once_and_shared_by_seeds_and_runs(corpus, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    built = []
    real = tasks_module.build_lm
    monkeypatch.setattr(tasks_module, "build_lm", lambda *a: built.append(a) or real(*a))
    first = build_task(lm_task(corpus), cache, seed=0)
    again = build_task(lm_task(corpus), cache, seed=0)
    assert len(built) == 1 and torch.equal(first.train_inputs, again.train_inputs)
    build_task(lm_task(corpus), cache, seed=1)
    assert len(built) == 2 and len(list(cache.glob("lm-*.pt"))) == 2
    assert len(list((cache / "tokenizers").iterdir())) == 1  # both seeds read one tokenizer
    spec = json.dumps({"task": dataclasses.asdict(lm_task(corpus)), "seed": 0})
    sys.path.insert(0, str(PREPARE.parent))
    try:
        import prepare_lm
    finally:
        sys.path.remove(str(PREPARE.parent))
    assert (
        prepare_lm.main(["--task-json", spec, "--cache", str(cache), "--out", str(tmp_path / "m.json")]) == 0
    )
    marker = json.loads((tmp_path / "m.json").read_text())
    assert marker["data"]["reused"] and len(built) == 2  # the trainer's cached file, found again
    assert Path(marker["data"]["file"]).is_file() and Path(marker["tokenizer"]["file"]).is_file()
    assert 0 < marker["data"]["unigram_loss"] < torch.log(torch.tensor(320.0)).item()
    bad = prepare_lm.main(["--config", str(ROOT / "ablations/base/mqar-smoke.yaml"), "--cache", str(cache),
                           "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert bad == 2 and not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- workflow rules


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[-1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.mark.slow
def test_workflow_trains_each_tokenizer_once_and_prepares_each_dataset(corpus, tmp_path) -> None:
    """The data rules on a two-seed LM grid and an MQAR grid, in a workflow folder linked to the checkout."""
    wf = tmp_path / "wf"
    wf.mkdir()
    for name in ("palimpsa", "kernels", "workflow", "environment.yml"):
        (wf / name).symlink_to(ROOT / name)
    (wf / "Snakefile").write_text(
        'include: "workflow/rules/common.smk"\n\n\n'
        "rule all:\n    input:\n        [data_marker(p.config) for g in GRIDS.values() for p in g.points],\n"
        "    default_target: True\n\n\n"
        'include: "workflow/rules/data.smk"\ninclude: "workflow/rules/lm_data.smk"\n'
    )
    task = {k: v for k, v in dataclasses.asdict(lm_task(corpus)).items() if v is not None}
    grids = {
        "lm": {"base": {"task": task, "model": {"d_model": 16, "n_layers": 1}}, "product": {"seed": [0, 1]}},
        "mqar": {"base": tiny_config(), "product": {"seed": [0]}},
    }
    for name, grid in grids.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(grid))
    config = yaml.safe_load((ROOT / "workflow" / "config.yaml").read_text())
    config.update(
        results=str(tmp_path / "results"),
        data_cache=str(tmp_path / "results" / "data"),
        grids=[str(tmp_path / f"{name}.yaml") for name in grids],
    )
    config["tuning"]["studies"] = []
    config["report"]["enabled"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SNAKEMAKE_PROFILE")}
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "2",
        "--configfile",
        str(tmp_path / "config.yaml"),
    ]
    proc = subprocess.run(command, cwd=wf, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert job_counts(out) == {"all": 1, "lm_tokenizer": 1, "lm_dataset": 2, "dataset": 1}, out[-3000:]
    data = tmp_path / "results" / "data"
    assert len(list((data / "tokenizers").glob("bpe320-*.json"))) == 1
    markers = sorted((data / "ready").glob("lm-*.json"))
    assert [json.loads(m.read_text())["seed"] for m in markers] != [] and len(markers) == 2
    for marker in markers:
        content = json.loads(marker.read_text())
        assert Path(content["data"]["file"]).is_file() and content["tokenizer"]["name"] == "bpe:320"
    again = subprocess.run(command, cwd=wf, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
