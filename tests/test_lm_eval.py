"""Language-model evaluation: loss by position and the unigram loss in the validation metrics, and the
zero-shot hook (``palimpsa eval CHECKPOINT --tasks ...``) on a local multiple-choice task, offline."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from palimpsa import cli, zero_shot
from palimpsa.config import config_from_dict
from palimpsa.model import build_model, save_model
from palimpsa.tasks import TaskError, build_task
from palimpsa.tasks import tokenizer as tok_module
from palimpsa.tasks.tokenizer import ByteTokenizer
from palimpsa.training.evaluation import (
    ValidationSet,
    evaluate,
    position_bin,
    summary_metrics,
    unigram_loss,
)
from palimpsa.zero_shot import LocalTask, Scorer, load_local_task, score_multiple_choice

ROOT = Path(__file__).resolve().parents[1]
MC_TASK = ROOT / "tests" / "data" / "mc_tiny.yaml"


def lm_config(task: dict | None = None) -> dict:
    return {
        "name": "tiny-lm",
        "task": {"name": "lm", "seq_len": 24, "num_train": 16, "num_val": 8, **(task or {})},
        "model": {
            "d_model": 16,
            "n_layers": 1,
            "mixer": {"kind": "palimpsa", "num_heads": 2, "head_k_dim": 8, "head_v_dim": 8, "beta_rank": 2},
        },
        "train": {"batch_size": 4, "device": "cpu"},
        "tracking": {"enabled": False},
    }


@pytest.fixture
def byte_checkpoint(tmp_path: Path) -> Path:
    cfg = config_from_dict(lm_config())
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pt"
    save_model(path, build_model(cfg), cfg)
    return path


def direct_logprob(model, ids: list[int], start: int) -> float:
    """sum of log p(ids[t] | ids[:t]) for t >= start, from one plain forward."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


# --------------------------------------------------------------------------- validation metrics


def test_lm_validation_reports_loss_by_position_and_the_unigram_loss() -> None:
    cfg = config_from_dict(lm_config())
    data = build_task(cfg.task, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg, data.vocab_size)
    metrics = evaluate(model, ValidationSet(data, torch.device("cpu")), batch_size=3)
    bins = {k: v for k, v in metrics.items() if k.startswith("val_loss_pos.")}
    assert list(bins) == [f"val_loss_pos.{b}" for b in ("0-0", "1-1", "2-3", "4-7", "8-15", "16-31")]
    widths = {"0-0": 1, "1-1": 1, "2-3": 2, "4-7": 4, "8-15": 8, "16-31": 8}  # seq_len 24 cuts the last
    pooled = sum(v * widths[k.split(".", 1)[1]] for k, v in bins.items()) / 24
    assert pooled == pytest.approx(metrics["val_loss"], rel=1e-5)  # every position scores as many tokens
    with torch.no_grad():
        logits = model(data.val_inputs).float()
    first = F.cross_entropy(logits[:, 0], data.val_targets[:, 0].long())
    assert bins["val_loss_pos.0-0"] == pytest.approx(float(first), rel=1e-5)
    assert [position_bin(t) for t in (0, 1, 2, 3, 4, 100)] == ["0-0", "1-1", "2-3", "2-3", "4-7", "64-127"]
    counts = torch.bincount(data.train_targets.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    assert unigram_loss(data.train_targets) == pytest.approx(float(-(p * p.log()).sum()))
    assert 0 < unigram_loss(data.train_targets) < math.log(256)
    summary = summary_metrics(data, {**metrics, "step": 3})
    assert set(summary) == {*bins, "unigram_loss"}


def test_eval_without_tasks_keeps_the_validation_set(byte_checkpoint: Path, capsys) -> None:
    assert cli.main(["eval", str(byte_checkpoint), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "loss" and "val_loss" in result and "tasks" not in result
    assert "val_loss_pos.0-0" in result and 0 < result["unigram_loss"] < math.log(256)


# --------------------------------------------------------------------------- zero-shot scoring


def test_loglikelihood_is_the_models_own_probability(byte_checkpoint: Path) -> None:
    model, cfg = zero_shot.load_model(byte_checkpoint)
    scorer = Scorer(model, ByteTokenizer(), max_length=cfg.task.seq_len, batch_size=2)
    pairs = [("def f(x):", " return x"), ("", "abc"), ("a" * 40, "bc")]  # empty context; one cut to fit
    scores = scorer.loglikelihood(pairs)
    assert scores[0][0] == pytest.approx(direct_logprob(model, list(b"def f(x): return x"), 9), abs=1e-4)
    after_end_token = direct_logprob(model, [0, *b"abc"], 1)
    assert scores[1][0] == pytest.approx(after_end_token, abs=1e-4)
    assert scores[2][0] == pytest.approx(direct_logprob(model, list(b"a" * 23 + b"bc"), 23), abs=1e-4)
    # trailing spaces of the context move to the continuation, as the harness does
    assert scorer.encode_pair("x = ", "1") == (list(b"x ="), list(b" 1"))
    text = "import os\n" * 4  # 40 bytes: two windows of 24 predicted tokens
    (rolling,) = scorer.loglikelihood_rolling([text])
    ids = [0, *text.encode()]
    first, second = direct_logprob(model, ids[:25], 1), direct_logprob(model, ids[24:], 1)  # fresh state
    assert rolling == pytest.approx(first + second, abs=1e-4)
    (generated,) = scorer.generate_until([("def", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(generated, str) and "\n" not in generated


def test_multiple_choice_accuracy_counts_the_best_choice() -> None:
    task = LocalTask("t", [zero_shot.Example("c", ["aa", "b"], 0), zero_shot.Example("d", ["aa", "b"], 0)])

    class Fixed:
        def loglikelihood(self, pairs):  # "b" wins in total (-1.0 > -1.6), "aa" per character (-0.8 > -1.0)
            return [(-1.6 if cont == "aa" else -1.0, False) for _, cont in pairs]

    scores = score_multiple_choice(task, Fixed())  # type: ignore[arg-type]
    assert scores == {"acc": 0.0, "acc_norm": 1.0, "n": 2}
    assert score_multiple_choice(task, Fixed(), limit=1)["n"] == 1  # type: ignore[arg-type]


def test_eval_hook_scores_a_local_task_file(byte_checkpoint: Path, tmp_path: Path, capsys) -> None:
    task = load_local_task(MC_TASK)
    out = tmp_path / "zero_shot.json"
    code = cli.main(
        ["eval", str(byte_checkpoint), "--tasks", str(MC_TASK), "--out", str(out), "--device", "cpu"]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    scores = result["tasks"][task.name]
    assert scores["n"] == len(task.examples) == 6 and 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1
    assert result["tokenizer"] == "bytes"
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"context": "x", "choices": ["1", "2"], "answer": i}) for i in (0, 1))
    )
    assert cli.main(["eval", str(byte_checkpoint), "--tasks", f"{jsonl},{MC_TASK}", "--limit", "1"]) == 0
    both = json.loads(capsys.readouterr().out)["tasks"]
    assert both["two"]["n"] == 1 and both[task.name]["n"] == 1


def test_eval_hook_errors_are_one_line(byte_checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("examples:\n  - {context: x, choices: [a, b], answer: 2}\n")
    assert cli.main(["eval", str(byte_checkpoint), "--tasks", str(bad)]) == 2
    assert f"{bad}: examples[0].answer" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert cli.main(["eval", str(byte_checkpoint), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install lm-eval" in err and "Traceback" not in err
    mqar = config_from_dict({"task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_kv_pairs": 2}})
    save_model(tmp_path / "mqar.pt", build_model(mqar), mqar)
    with pytest.raises(TaskError, match="need a language model"):
        zero_shot.evaluate_zero_shot(tmp_path / "mqar.pt", [str(MC_TASK)])


def test_harness_tasks_go_through_lm_eval_when_it_is_installed(byte_checkpoint: Path, monkeypatch) -> None:
    """The adapter against a stand-in for lm_eval (same entry point and request shape)."""
    seen = {}

    class LM:
        pass

    def simple_evaluate(model, tasks, num_fewshot, limit):
        request = types.SimpleNamespace(args=("def f(x):", " return x"))
        seen.update(tasks=tasks, limit=limit, scores=model.loglikelihood([request]))
        seen["rolling"] = model.loglikelihood_rolling([types.SimpleNamespace(args=("import os\n",))])
        return {"results": {"fake_task": {"alias": "fake_task", "acc,none": 0.25, "acc_stderr,none": 0.1}}}

    api = types.SimpleNamespace(model=types.SimpleNamespace(LM=LM))
    fake = types.SimpleNamespace(simple_evaluate=simple_evaluate, api=api)
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.api", api)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", api.model)
    result = zero_shot.evaluate_zero_shot(byte_checkpoint, ["fake_task", str(MC_TASK)], limit=3)
    assert result["tasks"]["fake_task"] == {"acc": 0.25, "acc_stderr": 0.1}
    assert result["tasks"]["tiny_python_mc"]["n"] == 3
    assert seen["tasks"] == ["fake_task"] and seen["limit"] == 3
    ((score, greedy),) = seen["scores"]
    assert score < 0 and isinstance(greedy, bool) and seen["rolling"][0] < 0


def test_bpe_checkpoint_reads_its_cached_tokenizer(tmp_path: Path, monkeypatch) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.py").write_text("def f(x):\n    return x + 1\n" * (20 + i))
    raw = lm_config({"source": "text", "path": str(corpus), "tokenizer": "bpe:300", "val_fraction": 0.2})
    cfg = config_from_dict(raw)
    data = build_task(cfg.task, tmp_path / "data", cfg.seed)
    save_model(tmp_path / "bpe.pt", build_model(cfg, data.vocab_size), cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("the evaluation retrained the run's tokenizer")

    monkeypatch.setattr(tok_module, "train_bpe", no_training)
    result = zero_shot.evaluate_zero_shot(tmp_path / "bpe.pt", [str(MC_TASK)], data_dir=tmp_path / "data")
    assert result["tokenizer"] == "bpe:300" and result["tasks"]["tiny_python_mc"]["n"] == 6
