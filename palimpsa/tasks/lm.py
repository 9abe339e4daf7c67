"""Byte-level language modelling on the Python standard library, local text, or a streamed HF dataset."""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from palimpsa.errors import FieldError, TaskError
from palimpsa.tasks.base import TaskData, split_generator

BYTE_VOCAB = 256
DOC_SEPARATOR = b"\x00"  # ends every document, so windows that span two files see the boundary


@dataclass
class LMConfig:
    """Next-byte prediction on windows of ``seq_len + 1`` bytes; train and val come from disjoint documents.

    ``stdlib`` (the default, present on every machine): the interpreter's own ``.py`` sources, sorted by
    relative path. ``text``: one file or every file under a folder. ``hf``: a dataset streamed with
    ``datasets`` (``hf_dataset``, ``hf_config``, ``hf_split``, ``text_field``). A document goes to val when
    a hash of its name (or stream index) falls below ``val_fraction``, so the split does not depend on
    the seed or on which other files exist.
    """

    name: str = "lm"
    source: Literal["stdlib", "text", "hf"] = "stdlib"
    path: str | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    seq_len: int = 128
    num_train: int = 20000
    num_val: int = 1000
    val_fraction: float = 0.05
    vocab_size: int = BYTE_VOCAB

    def __post_init__(self) -> None:
        if self.vocab_size != BYTE_VOCAB:
            raise FieldError(
                "vocab_size", f"the LM task is byte-level: must be {BYTE_VOCAB}, got {self.vocab_size}"
            )
        if self.source == "text" and not self.path:
            raise FieldError("path", "required when source is 'text' (a text file or a folder)")
        if self.source == "hf" and not self.hf_dataset:
            raise FieldError("hf_dataset", "required when source is 'hf' (e.g. 'HuggingFaceFW/fineweb-edu')")
        if self.seq_len < 1:
            raise FieldError("seq_len", f"must be >= 1, got {self.seq_len}")
        for key in ("num_train", "num_val"):
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 < self.val_fraction < 1:
            raise FieldError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")


def _bucket(name: str) -> float:
    """A stable number in [0, 1) per document name."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little") / 2.0**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(cfg: LMConfig) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every document of a file corpus, sorted by name."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    else:
        root = Path(cfg.path).expanduser()
        if root.is_file():
            return [(root.name, root)]
        if not root.exists():
            raise TaskError(f"task.path: text corpus not found: {root}")
        files = [
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ]
    named = sorted((p.relative_to(root).as_posix(), p) for p in files)
    if not named:
        raise TaskError(
            f"task.path: no files under {root}" if cfg.source == "text" else f"no .py files in {root}"
        )
    return named


def corpus_fingerprint(cfg: LMConfig) -> str | None:
    """What the cached data depends on beyond the config: the files' names, sizes and times."""
    if cfg.source == "hf":
        return None
    digest = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    for name, path in corpus_files(cfg):
        stat = path.stat()
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _split_streams(docs: Iterable[tuple[str, bytes]], cfg: LMConfig) -> tuple[bytes, bytes]:
    train, val = bytearray(), bytearray()
    for name, text in docs:
        (val if _bucket(name) < cfg.val_fraction else train).extend(text + DOC_SEPARATOR)
    if not train or not val:  # one document (or a split that left a side empty): cut the bytes instead
        stream = bytes(train or val)
        cut = int(len(stream) * (1 - cfg.val_fraction))
        return stream[:cut], stream[cut:]
    return bytes(train), bytes(val)


def _windows(stream: bytes, count: int, length: int, gen: torch.Generator, key: str) -> torch.Tensor:
    """``count`` distinct windows of ``length + 1`` bytes at multiples of ``length``, in seeded order."""
    available = (len(stream) - 1) // length if len(stream) > 1 else 0
    if available < count:
        raise TaskError(
            f"task.{key}: the corpus split holds {available} windows of seq_len {length} "
            f"({len(stream)} bytes), fewer than the {count} asked for; lower {key} or seq_len"
        )
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    starts = torch.randperm(available, generator=gen)[:count] * length
    return data[starts[:, None] + torch.arange(length + 1)].long()


def _read_files(cfg: LMConfig) -> tuple[bytes, bytes]:
    files = corpus_files(cfg)
    return _split_streams(((name, path.read_bytes()) for name, path in files), cfg)


def _stream_hf(cfg: LMConfig) -> tuple[bytes, bytes]:
    """Stream documents until both splits hold enough bytes; never downloads the whole dataset."""
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise TaskError("task.source: 'hf' needs the `datasets` package (pip install datasets)") from None
    try:
        records: Iterator[dict] = iter(
            datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
        )
    except Exception as err:  # unknown name, no network, bad config: one line for the user
        raise TaskError(f"task.hf_dataset: cannot stream {cfg.hf_dataset!r}: {err}".splitlines()[0]) from None
    need = {"train": cfg.num_train * cfg.seq_len + 1, "val": cfg.num_val * cfg.seq_len + 1}
    out = {"train": bytearray(), "val": bytearray()}
    for index, record in enumerate(records):
        if cfg.text_field not in record:
            raise TaskError(
                f"task.text_field: {cfg.text_field!r} is not a field of {cfg.hf_dataset!r}: {sorted(record)}"
            )
        split = "val" if _bucket(str(index)) < cfg.val_fraction else "train"
        if len(out[split]) < need[split]:
            out[split].extend(str(record[cfg.text_field]).encode("utf-8") + DOC_SEPARATOR)
        if all(len(out[s]) >= need[s] for s in need):
            break
    return bytes(out["train"]), bytes(out["val"])


def build_lm(cfg: LMConfig, seed: int) -> TaskData:
    train_bytes, val_bytes = _stream_hf(cfg) if cfg.source == "hf" else _read_files(cfg)
    train = _windows(
        train_bytes, cfg.num_train, cfg.seq_len, split_generator(cfg, seed, "train"), "num_train"
    )
    val = _windows(val_bytes, cfg.num_val, cfg.seq_len, split_generator(cfg, seed, "val"), "num_val")
    return TaskData(
        train[:, :-1].contiguous(),
        train[:, 1:].contiguous(),
        val[:, :-1].contiguous(),
        val[:, 1:].contiguous(),
        vocab_size=BYTE_VOCAB,
        metric="loss",
    )
