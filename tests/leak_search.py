"""Where a secret could show up, searched: files (every byte), the process list while something runs, an
MLflow store (experiments, params, tags, metric keys, inputs), an Optuna study (user and system attributes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote


def forms(secret: str) -> list[str]:
    """The secret as written and percent-encoded (how it sits in a URL)."""
    return list(dict.fromkeys([secret, quote(secret, safe="")]))


def file_hits(roots: Iterable[Path], secrets: Iterable[str]) -> list[str]:
    """``path: secret`` for every file under ``roots`` whose bytes (or name) contain a secret."""
    needles = [form.encode() for secret in secrets for form in forms(secret)]
    hits = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if any(n in str(path).encode() for n in needles):
                hits.append(f"{path}: in the name")
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


def text_hits(text: str, secrets: Iterable[str]) -> list[str]:
    return [form for secret in secrets for form in forms(secret) if form in text]


def _command_lines() -> Iterator[tuple[str, str]]:
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield entry.parent.name, entry.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue


@contextmanager
def watch_processes(secrets: Iterable[str], every_s: float = 0.05) -> Iterator[dict[str, Any]]:
    """Sample every process's command line (what ``ps`` shows any user) while the block runs; the yielded
    mapping gets ``samples`` (how many sweeps) and ``hits`` (``pid: command line`` holding a secret)."""
    needles = [form for secret in secrets for form in forms(secret)]
    seen: dict[str, Any] = {"samples": 0, "hits": []}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid, line in _command_lines():
                if any(n in line for n in needles):
                    seen["hits"].append(f"{pid}: {line[:300]}")
            seen["samples"] += 1
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def mlflow_store_text(client: Any) -> tuple[str, int]:
    """Everything a user of the MLflow UI reads about every experiment and run, as one text; and the number
    of runs (a search over an empty store proves nothing)."""
    parts, runs = [], 0
    for exp in client.search_experiments():
        parts.append(json.dumps([exp.name, exp.artifact_location, exp.tags], default=str))
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            runs += 1
            data = run.data
            parts.append(json.dumps([run.info.run_name, data.params, data.tags, sorted(data.metrics)]))
            for item in run.inputs.dataset_inputs if run.inputs else []:
                d = item.dataset
                parts.append(json.dumps([d.name, d.source, d.profile, d.schema], default=str))
    return "\n".join(parts), runs


def optuna_text(study: Any) -> str:
    """A study's attributes and every trial's, as one text (system attributes read from its storage)."""
    storage = study._storage  # the study object no longer exposes its system attributes
    parts = [json.dumps([study.user_attrs, storage.get_study_system_attrs(study._study_id)], default=str)]
    for trial in study.get_trials(deepcopy=False):
        system = storage.get_trial_system_attrs(trial._trial_id)
        parts.append(json.dumps([trial.params, trial.user_attrs, system], default=str))
    return "\n".join(parts)
