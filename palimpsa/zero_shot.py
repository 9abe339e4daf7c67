"""Zero-shot evaluation of a language-model checkpoint (``palimpsa eval CHECKPOINT --tasks ...``).

Two kinds of task, both scored by the log-likelihood of each answer given its context:

- a local multiple-choice file (YAML or JSON: ``{name, examples: [{context, choices, answer}]}``, or JSONL of
  examples), scored here, offline: ``acc`` picks the choice of highest summed log-likelihood, ``acc_norm``
  the highest per character (as lm-evaluation-harness does);
- any other name goes to lm-evaluation-harness (``lm_eval``, optional), which downloads its datasets and asks
  this module's :class:`Scorer` for log-likelihoods and greedy generations.

The checkpoint's own task config gives the tokenizer (bytes, or the run's BPE, read from ``--data-dir``'s
cache when the run trained one) and the context length (``task.seq_len``; longer inputs keep their end).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from palimpsa.errors import TaskError
from palimpsa.io import YamlFileError, read_yaml
from palimpsa.model import PalimpsaLM, load_model
from palimpsa.tasks import LMConfig, resolve_tokenizer
from palimpsa.tasks.tokenizer import TextTokenizer
from palimpsa.training.runtime import Autocast, autocast_for, resolve_device

LOCAL_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")


@dataclass
class Example:
    context: str
    choices: list[str]
    answer: int


@dataclass
class LocalTask:
    name: str
    examples: list[Example]


def is_local_task(name: str) -> bool:
    """A task given as a file (it exists, or its name ends like one) rather than a harness task name."""
    return Path(name).suffix in LOCAL_SUFFIXES or Path(name).is_file()


def _example(raw: Any, where: str) -> Example:
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected a mapping with context, choices and answer")
    context, choices, answer = raw.get("context"), raw.get("choices"), raw.get("answer")
    if not isinstance(context, str):
        raise TaskError(f"{where}.context: expected a string, got {context!r}")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise TaskError(
            f"{where}.choices: expected a list of at least two non-empty strings, got {choices!r}"
        )
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise TaskError(f"{where}.answer: expected the index of the right choice (0..{len(choices) - 1})")
    return Example(context, list(choices), answer)


def load_local_task(path: str | Path) -> LocalTask:
    """Read a local multiple-choice task; a malformed one raises one TaskError naming the file and example."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}: not JSON lines ({err})") from None
        name, examples = path.stem, rows
    else:
        try:
            data = read_yaml(path, "task file")  # JSON is YAML
        except YamlFileError as err:
            raise TaskError(f"{path}: {err.message}") from None
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
            raise TaskError(f"{path}: expected a mapping with a non-empty 'examples' list")
        name, examples = str(data.get("name") or path.stem), data["examples"]
    return LocalTask(name, [_example(raw, f"{path}: examples[{i}]") for i, raw in enumerate(examples)])


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Log-likelihoods and greedy continuations of text under a model and its tokenizer.

    Requests are batched by length and right-padded: every mixer is causal, so padding after a row's end
    never changes the logits of its positions.
    """

    def __init__(
        self,
        model: PalimpsaLM,
        tokenizer: TextTokenizer,
        max_length: int,
        batch_size: int = 16,
        amp: Autocast = contextlib.nullcontext,
    ):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max(1, max_length)
        self.batch_size, self.amp = max(1, batch_size), amp
        self.device = next(model.parameters()).device

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; trailing spaces of the context move to the continuation and the
        continuation is what encoding both adds to encoding the context (so merges across the seam count)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx) :]
        return (ctx or [self.tokenizer.eod_id]), cont

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per row, log-probabilities ``[len(row), vocab]`` of the next token at each position."""
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), self.tokenizer.eod_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        with self.amp():
            logits = self.model(batch.to(self.device))
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, : len(row)] for i, row in enumerate(rows)]

    def _score(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(sum log p(target | inputs), every target the argmax)`` per ``(inputs, targets)`` aligned at the
        end: the last ``len(targets)`` positions of ``inputs`` predict ``targets``."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, logp in zip(chunk, self._logprobs([items[i][0] for i in chunk]), strict=True):
                targets = torch.tensor(items[i][1], dtype=torch.long)
                if targets.numel() == 0:
                    continue
                span = logp[-targets.numel() :]
                picked = span.gather(1, targets[:, None]).squeeze(1)
                out[i] = (float(picked.double().sum()), bool((span.argmax(-1) == targets).all()))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per pair, the context cut to fit ``max_length``."""
        items = []
        for context, continuation in pairs:
            ctx, cont = self.encode_pair(context, continuation)
            whole = (ctx + cont)[-(self.max_length + 1) :]
            scored = min(len(cont), len(whole) - 1)  # a continuation longer than the window keeps its end
            items.append((whole[:-1], cont[len(cont) - scored :]))
        return self._score(items)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text, in windows of ``max_length`` predicted tokens (each window
        reads the tokens just before it; the first starts from the end-of-document token)."""
        out = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            full = [self.tokenizer.eod_id, *ids]
            targets = [ids[s : s + self.max_length] for s in range(0, len(ids), self.max_length)]
            windows = [(full[i * self.max_length :][: len(t)], t) for i, t in enumerate(targets)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy continuations, cut at the first of ``until`` (and at most ``max_gen_toks`` tokens)."""
        out = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tokenizer.encode(context)[-self.max_length :] or [self.tokenizer.eod_id]
            prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
            with self.amp():
                tokens = self.model.generate(prompt, int(kwargs.get("max_gen_toks", 256)))
            text = self.tokenizer.decode(tokens[0, len(ids) :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def score_multiple_choice(task: LocalTask, scorer: Scorer, limit: int | None = None) -> dict[str, float]:
    """``acc``, ``acc_norm`` (log-likelihood per character of the choice) and ``n`` over the examples."""
    examples = task.examples[:limit] if limit else task.examples
    pairs = [(ex.context, choice) for ex in examples for choice in ex.choices]
    scores = iter(lp for lp, _ in scorer.loglikelihood(pairs))
    hits = hits_norm = 0
    for ex in examples:
        lps = [next(scores) for _ in ex.choices]
        per_char = [lp / len(choice) for lp, choice in zip(lps, ex.choices, strict=True)]
        hits += max(range(len(lps)), key=lps.__getitem__) == ex.answer
        hits_norm += max(range(len(per_char)), key=per_char.__getitem__) == ex.answer
    n = len(examples)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}


# --------------------------------------------------------------------------- lm-evaluation-harness


def harness_model(scorer: Scorer) -> Any:
    """The scorer as an ``lm_eval.api.model.LM``: the three request types of the harness."""
    from lm_eval.api.model import LM

    class PalimpsaHarnessLM(LM):
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return scorer.generate_until([(r.args[0], r.args[1]) for r in requests])

    return PalimpsaHarnessLM()


def import_harness(names: list[str]) -> Any:
    """``lm_eval``, or one TaskError that names the tasks and the package."""
    try:
        import lm_eval  # optional: only named harness tasks need it
    except ImportError:
        raise TaskError(
            f"--tasks {','.join(names)}: harness tasks need lm-evaluation-harness (pip install lm-eval); "
            "local multiple-choice files run without it"
        ) from None
    return lm_eval


def run_harness(
    scorer: Scorer, names: list[str], limit: int | None = None, num_fewshot: int = 0
) -> dict[str, dict[str, float]]:
    """Harness results per task: its numeric metrics, with the ``,none`` filter suffix dropped."""
    lm_eval = import_harness(names)
    try:
        results = lm_eval.simple_evaluate(
            model=harness_model(scorer), tasks=names, num_fewshot=num_fewshot, limit=limit
        )
    except (KeyError, ValueError) as err:  # unknown task names, bad task configs: one line for the user
        raise TaskError(f"--tasks: lm-evaluation-harness: {err}".splitlines()[0]) from None
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {
            key.removesuffix(",none"): float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return out


# --------------------------------------------------------------------------- entry point


def evaluate_zero_shot(
    checkpoint: str | Path,
    tasks: list[str],
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    limit: int | None = None,
    num_fewshot: int = 0,
) -> dict[str, Any]:
    """Scores of a language-model checkpoint on ``tasks`` (local files and harness names, in any mix)."""
    local = [load_local_task(t) for t in tasks if is_local_task(t)]  # bad input fails before any work
    named = [t for t in tasks if not is_local_task(t)]
    if named:
        import_harness(named)
    model, cfg = load_model(checkpoint)
    if not isinstance(cfg.task, LMConfig):
        kind = getattr(cfg.task, "name", None)
        raise TaskError(f"{checkpoint}: zero-shot tasks need a language model (task.name 'lm'), not {kind!r}")
    dev = resolve_device(device)
    model.to(dev)
    tokenizer = resolve_tokenizer(cfg.task, data_dir)
    if tokenizer.vocab_size > model.vocab_size:
        sizes = f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.vocab_size}"
        raise TaskError(f"{checkpoint}: {sizes}")
    amp = autocast_for(dev, cfg.train.precision)
    scorer = Scorer(model, tokenizer, cfg.task.seq_len, batch_size, amp)
    results: dict[str, dict[str, float]] = {}
    for task in local:
        results[task.name] = score_multiple_choice(task, scorer, limit)
    if named:
        results.update(run_harness(scorer, named, limit, num_fewshot))
    return {"checkpoint": str(checkpoint), "name": cfg.name, "tokenizer": tokenizer.name, "tasks": results}
