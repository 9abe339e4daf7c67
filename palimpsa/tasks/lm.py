"""Language modelling on the Python standard library, local text or a streamed HF dataset; bytes or BPE."""

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
from palimpsa.tasks.base import TaskData, split_generator, token_dtype
from palimpsa.tasks.tokenizer import (
    BYTE_VOCAB,
    ByteTokenizer,
    Packer,
    TextTokenizer,
    bpe_fingerprint,
    bpe_vocab_size,
    cached_bpe,
    file_fingerprint,
    load_tokenizer,
    pack,
    parse_spec,
)

DOC_SEPARATOR = b"\x00"  # ends every document, so windows that span two files see the boundary
# Fields that only matter with a tokenizer: a byte-level config's data does not depend on them.
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_train_chars")


@dataclass
class LMConfig:
    """Next-token prediction on windows of ``seq_len + 1`` tokens; train and val come from disjoint documents.

    ``stdlib`` (the default, present on every machine): the interpreter's own ``.py`` sources, sorted by
    relative path. ``text``: one file or every file under a folder. ``hf``: a dataset streamed with
    ``datasets`` (``hf_dataset``, ``hf_config``, ``hf_split``, ``text_field``). A document goes to val when
    a hash of its name (or stream index) falls below ``val_fraction``, so the split does not depend on
    the seed or on which other files exist.

    ``tokenizer``: None for bytes (``vocab_size`` 256); ``bpe:<n>`` trains a byte-level BPE of ``n`` tokens
    on the first ``tokenizer_train_chars`` of the training documents; a ``tokenizer.json`` path or a hub
    name loads one (``vocab_size`` then defaults to its size; a larger value pads the model's vocabulary).
    Documents are joined with an end-of-document token and cut into windows (``palimpsa/tasks/README.md``).
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
    vocab_size: int | None = None  # None: 256 for bytes, n for bpe:<n>, the loaded tokenizer's size
    tokenizer: str | None = None
    tokenizer_train_chars: int = 100_000_000

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            if self.vocab_size is None:
                self.vocab_size = BYTE_VOCAB
            if self.vocab_size != BYTE_VOCAB:
                message = f"the LM task is byte-level without a tokenizer: must be {BYTE_VOCAB}"
                raise FieldError("vocab_size", f"{message}, got {self.vocab_size}")
        else:
            size = bpe_vocab_size(self.tokenizer)
            if size is not None and self.vocab_size is None:
                self.vocab_size = size
            if size is not None and self.vocab_size != size:
                message = f"must be {size} with tokenizer {self.tokenizer!r} (or left out)"
                raise FieldError("vocab_size", f"{message}, got {self.vocab_size}")
            if self.vocab_size is not None and self.vocab_size < 2:
                raise FieldError("vocab_size", f"must be >= 2, got {self.vocab_size}")
        if self.source == "text" and not self.path:
            raise FieldError("path", "required when source is 'text' (a text file or a folder)")
        if self.source == "hf" and not self.hf_dataset:
            raise FieldError("hf_dataset", "required when source is 'hf' (e.g. 'HuggingFaceFW/fineweb-edu')")
        if self.seq_len < 1:
            raise FieldError("seq_len", f"must be >= 1, got {self.seq_len}")
        for key in ("num_train", "num_val", "tokenizer_train_chars"):
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


def _files_fingerprint(cfg: LMConfig) -> str | None:
    if cfg.source == "hf":
        return None
    digest = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    for name, path in corpus_files(cfg):
        stat = path.stat()
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def corpus_fingerprint(cfg: LMConfig) -> str | None:
    """What the cached data depends on beyond the config: the files' names, sizes and times, and with a
    tokenizer the BPE trainer's version or the tokenizer file's content."""
    files = _files_fingerprint(cfg)
    if cfg.tokenizer is None:
        return files
    spec = parse_spec(cfg.tokenizer)
    tokenizer = bpe_fingerprint() if spec.kind == "bpe" else file_fingerprint(spec)
    return f"{files}|{tokenizer}"


# --------------------------------------------------------------------------- documents


def _hf_documents(cfg: LMConfig) -> Iterator[tuple[str, str]]:
    """``(stream index, text)`` of the streamed dataset; never downloads the whole dataset."""
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
    for index, record in enumerate(records):
        if cfg.text_field not in record:
            raise TaskError(
                f"task.text_field: {cfg.text_field!r} is not a field of {cfg.hf_dataset!r}: {sorted(record)}"
            )
        yield str(index), str(record[cfg.text_field])


def _file_texts(cfg: LMConfig) -> list[tuple[str, str]]:
    return [(name, path.read_bytes().decode("utf-8", errors="replace")) for name, path in corpus_files(cfg)]


def _tokenizer_texts(cfg: LMConfig) -> Iterator[str]:
    """What a BPE is trained on: the training documents in corpus order, up to ``tokenizer_train_chars``.

    A file corpus whose documents all fall on one side of the split (one file) gives the head of its text,
    the part that the split cut by length trains on.
    """
    if cfg.source == "hf":
        docs = _hf_documents(cfg)
        texts: Iterable[str] = (text for name, text in docs if _bucket(name) >= cfg.val_fraction)
    else:
        files = _file_texts(cfg)
        texts = [text for name, text in files if _bucket(name) >= cfg.val_fraction]
        if len(texts) in (0, len(files)):
            joined = "".join(text for _, text in files)
            texts = [joined[: int(len(joined) * (1 - cfg.val_fraction))]]
    budget = cfg.tokenizer_train_chars
    for text in texts:
        if budget <= 0:
            return
        yield text[:budget]
        budget -= len(text)


def tokenizer_corpus(cfg: LMConfig) -> dict[str, object]:
    """What identifies a BPE's training text (its cache key): the corpus fields and its files."""
    fields = ("source", "path", "hf_dataset", "hf_config", "hf_split", "text_field", "val_fraction")
    corpus: dict[str, object] = {k: getattr(cfg, k) for k in fields}
    corpus.update(train_chars=cfg.tokenizer_train_chars, files=_files_fingerprint(cfg))
    return corpus


def resolve_tokenizer(cfg: LMConfig, cache_dir: str | Path | None = None) -> TextTokenizer:
    """The run's tokenizer: bytes, a cached (or newly trained) BPE, or a loaded file or hub tokenizer."""
    if cfg.tokenizer is None:
        return ByteTokenizer()
    spec = parse_spec(cfg.tokenizer)
    if spec.kind == "bpe":
        assert spec.vocab_size is not None
        return cached_bpe(spec.vocab_size, tokenizer_corpus(cfg), lambda: _tokenizer_texts(cfg), cache_dir)
    tokenizer = load_tokenizer(spec)
    if cfg.vocab_size is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise TaskError(
            f"task.vocab_size: {cfg.vocab_size} is smaller than the {tokenizer.vocab_size} tokens "
            f"of {spec.value}"
        )
    return tokenizer


# --------------------------------------------------------------------------- byte streams


def _split_streams(docs: Iterable[tuple[str, bytes]], cfg: LMConfig) -> tuple[bytes, bytes]:
    train, val = bytearray(), bytearray()
    for name, text in docs:
        (val if _bucket(name) < cfg.val_fraction else train).extend(text + DOC_SEPARATOR)
    if not train or not val:  # one document (or a split that left a side empty): cut the bytes instead
        stream = bytes(train or val)
        cut = int(len(stream) * (1 - cfg.val_fraction))
        return stream[:cut], stream[cut:]
    return bytes(train), bytes(val)


def _read_files(cfg: LMConfig) -> tuple[bytes, bytes]:
    files = corpus_files(cfg)
    return _split_streams(((name, path.read_bytes()) for name, path in files), cfg)


def _stream_hf(cfg: LMConfig) -> tuple[bytes, bytes]:
    """Stream documents until both splits hold enough bytes."""
    need = {"train": cfg.num_train * cfg.seq_len + 1, "val": cfg.num_val * cfg.seq_len + 1}
    out = {"train": bytearray(), "val": bytearray()}
    for name, text in _hf_documents(cfg):
        split = "val" if _bucket(name) < cfg.val_fraction else "train"
        if len(out[split]) < need[split]:
            out[split].extend(text.encode("utf-8") + DOC_SEPARATOR)
        if all(len(out[s]) >= need[s] for s in need):
            break
    return bytes(out["train"]), bytes(out["val"])


# --------------------------------------------------------------------------- token streams


def _tokenize_files(cfg: LMConfig, tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    docs = _file_texts(cfg)
    train = [text for name, text in docs if _bucket(name) >= cfg.val_fraction]
    val = [text for name, text in docs if _bucket(name) < cfg.val_fraction]
    if not train or not val:  # as for bytes: cut the one stream
        stream = pack(tokenizer, (text for _, text in docs))
        cut = int(len(stream) * (1 - cfg.val_fraction))
        return stream[:cut], stream[cut:]
    return pack(tokenizer, train), pack(tokenizer, val)


def _tokenize_hf(cfg: LMConfig, tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream and encode documents until both splits hold enough tokens."""
    need = {"train": cfg.num_train * cfg.seq_len + 1, "val": cfg.num_val * cfg.seq_len + 1}
    out = {"train": Packer(tokenizer), "val": Packer(tokenizer)}
    for name, text in _hf_documents(cfg):
        split = "val" if _bucket(name) < cfg.val_fraction else "train"
        if not out[split].holds(need[split]):
            out[split].add(text)
        if all(out[s].holds(need[s]) for s in need):
            break
    return out["train"].stream(), out["val"].stream()


WINDOW_BLOCK = 4096  # windows gathered at a time: the int64 index of a block stays small


def _windows(
    data: torch.Tensor, count: int, length: int, gen: torch.Generator, key: str, unit: str, dtype: torch.dtype
) -> torch.Tensor:
    """``count`` distinct windows of ``length + 1`` tokens at multiples of ``length``, in seeded order, as
    ``dtype``; gathered a block at a time, so no ``[count, length + 1]`` int64 tensor is ever made."""
    available = (len(data) - 1) // length if len(data) > 1 else 0
    if available < count:
        raise TaskError(
            f"task.{key}: the corpus split holds {available} windows of seq_len {length} "
            f"({len(data)} {unit}), fewer than the {count} asked for; lower {key} or seq_len"
        )
    starts = torch.randperm(available, generator=gen)[:count] * length
    offsets = torch.arange(length + 1)
    out = torch.empty(count, length + 1, dtype=dtype)
    for lo in range(0, count, WINDOW_BLOCK):
        out[lo : lo + WINDOW_BLOCK] = data[starts[lo : lo + WINDOW_BLOCK, None] + offsets].to(dtype)
    return out


def _byte_tensor(stream: bytes) -> torch.Tensor:
    if not stream:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8)


def _generator(cfg: LMConfig, seed: int, split: str) -> torch.Generator:
    """The split's generator; a byte-level config draws the windows it drew before tokenizers existed."""
    return split_generator(cfg, seed, split, exclude=TOKENIZER_FIELDS if cfg.tokenizer is None else ())


def build_lm(cfg: LMConfig, seed: int, cache_dir: str | Path | None = None) -> TaskData:
    """Windows of the corpus; ``cache_dir`` keeps a trained BPE (``CACHE/tokenizers/``) for later runs."""
    if cfg.tokenizer is None:
        raw = _stream_hf(cfg) if cfg.source == "hf" else _read_files(cfg)
        streams = tuple(_byte_tensor(stream) for stream in raw)
        unit, vocab = "bytes", BYTE_VOCAB
    else:
        tokenizer = resolve_tokenizer(cfg, cache_dir)
        streams = _tokenize_hf(cfg, tokenizer) if cfg.source == "hf" else _tokenize_files(cfg, tokenizer)
        unit, vocab = "tokens", cfg.vocab_size or tokenizer.vocab_size
    train_stream, val_stream = streams
    length = cfg.seq_len
    dtype = token_dtype(vocab)
    train = _windows(
        train_stream, cfg.num_train, length, _generator(cfg, seed, "train"), "num_train", unit, dtype
    )
    val = _windows(val_stream, cfg.num_val, length, _generator(cfg, seed, "val"), "num_val", unit, dtype)
    return TaskData(
        train[:, :-1].contiguous(),
        train[:, 1:].contiguous(),
        val[:, :-1].contiguous(),
        val[:, 1:].contiguous(),
        vocab_size=vocab,
        metric="loss",
    )
