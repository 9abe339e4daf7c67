"""Tokenizers of the LM task and the packing of documents into one token stream.

``task.tokenizer`` is None (bytes: no package needed), ``bpe:<vocab_size>`` (a byte-level BPE trained here
with ``tokenizers`` on the corpus's training documents), the path of a ``tokenizer.json`` (or of a folder
holding one), or a Hugging Face hub name. BPE training is deterministic, so a trained tokenizer is cached
on disk under a digest of what it was trained on: the same corpus and vocabulary size give the same file,
and every run, seed and evaluation that needs it reads that one file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from palimpsa.atomic import write_text
from palimpsa.errors import FieldError, TaskError

BYTE_VOCAB = 256
BYTE_EOD = 0  # the byte that ends every document of a byte-level corpus (b"\x00")
EOD_TOKEN = "<|endoftext|>"  # a trained BPE's end-of-document token (id 0)
# Looked up, in this order, in a loaded tokenizer to end documents.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BPE_PREFIX = "bpe:"
BPE_MIN_VOCAB = BYTE_VOCAB + 2  # the 256 byte symbols, the end-of-document token and at least one merge
# Bump when training changes what it writes for the same corpus and vocabulary size: old files stop matching.
BPE_FORMAT = 1
ENCODE_BATCH = 512  # documents per encode_batch call (tokenizers spreads a batch over the cores)


@dataclass(frozen=True)
class TokenizerSpec:
    """A parsed ``task.tokenizer``: what to train or where to load from."""

    kind: Literal["bpe", "file", "hub"]
    value: str
    vocab_size: int | None = None  # bpe only


def bpe_vocab_size(spec: str) -> int | None:
    """The vocabulary size of a ``bpe:<n>`` spec, None for any other spec; a malformed one is a FieldError."""
    if not spec.startswith(BPE_PREFIX):
        if not spec.strip():
            raise FieldError(
                "tokenizer", "empty: leave it out for bytes, or give bpe:<n>, a file, a hub name"
            )
        return None
    size = spec[len(BPE_PREFIX) :]
    if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
        raise FieldError("tokenizer", f"'bpe:<vocab_size>' needs an integer >= {BPE_MIN_VOCAB}, got {spec!r}")
    return int(size)


def parse_spec(spec: str) -> TokenizerSpec:
    """``bpe:<n>``; a path (an existing file or folder, or anything ending in .json); else a hub name."""
    size = bpe_vocab_size(spec)
    if size is not None:
        return TokenizerSpec("bpe", spec, size)
    path = Path(spec).expanduser()
    if path.suffix == ".json" or path.exists():
        return TokenizerSpec("file", str(path))
    return TokenizerSpec("hub", spec)


# --------------------------------------------------------------------------- tokenizers


class TextTokenizer:
    """What the LM task and zero-shot evaluation need: ids per text, the end-of-document id, decoding."""

    name: str
    vocab_size: int
    eod_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes: the tokenizer of a byte-level run (documents end with byte 0)."""

    name, vocab_size, eod_id = "bytes", BYTE_VOCAB, BYTE_EOD

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class SubwordTokenizer(TextTokenizer):
    """A ``tokenizers.Tokenizer``; special tokens (a BOS the tokenizer would add) are never inserted."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        ids = [tokenizer.token_to_id(token) for token in EOD_CANDIDATES]
        eod = next((i for i in ids if i is not None), None)
        if eod is None:
            raise TaskError(
                f"task.tokenizer: {name} has no end-of-document token (none of {list(EOD_CANDIDATES)})"
            )
        self.eod_id = int(eod)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def _tokenizers() -> Any:
    try:
        import tokenizers  # optional: only subword LM runs need it
    except ImportError:
        raise TaskError("task.tokenizer: needs the `tokenizers` package (pip install tokenizers)") from None
    return tokenizers


def load_tokenizer(spec: TokenizerSpec) -> SubwordTokenizer:
    """A tokenizer.json (a folder's ``tokenizer.json``) or a hub name; one-line TaskError on failure."""
    tk = _tokenizers()
    if spec.kind == "file":
        path = Path(spec.value)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise TaskError(f"task.tokenizer: tokenizer file not found: {path}")
        try:
            return SubwordTokenizer(tk.Tokenizer.from_file(str(path)), str(path))
        except TaskError:
            raise
        except Exception as err:
            raise TaskError(f"task.tokenizer: {path}: not a tokenizer.json ({err})".splitlines()[0]) from None
    try:
        loaded = tk.Tokenizer.from_pretrained(spec.value)
    except Exception as err:  # unknown name, no network: one line for the user
        where = f"cannot load {spec.value!r} from the Hugging Face hub (it is not a local file either)"
        raise TaskError(f"task.tokenizer: {where}: {err}".splitlines()[0]) from None
    return SubwordTokenizer(loaded, spec.value)


def train_bpe(texts: Iterable[str], vocab_size: int) -> SubwordTokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization, every byte in the alphabet, so nothing is unknown) with
    ``<|endoftext|>`` as id 0. Deterministic: the same texts in the same order give the same merges."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return SubwordTokenizer(tokenizer, f"bpe:{vocab_size}")


def bpe_fingerprint() -> str:
    """What a trained BPE depends on besides its corpus and size: the training code and the package."""
    return f"bpe-format{BPE_FORMAT}-tokenizers{_tokenizers().__version__}"


def bpe_path(cache_dir: str | Path, vocab_size: int, corpus: dict[str, Any]) -> Path:
    """``CACHE/tokenizers/bpe<n>-<digest>.json``: the digest covers the corpus identity and the trainer."""
    key = {"vocab_size": vocab_size, "corpus": corpus, "trainer": bpe_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{digest[:16]}.json"


def cached_bpe(
    vocab_size: int,
    corpus: dict[str, Any],
    texts: Callable[[], Iterable[str]],
    cache_dir: str | Path | None,
) -> SubwordTokenizer:
    """The BPE of ``corpus`` (a mapping that identifies it), trained once and read back after that.

    ``texts`` is called only on a cache miss; without ``cache_dir`` the tokenizer is trained and not kept.
    """
    if cache_dir is None:
        return train_bpe(texts(), vocab_size)
    path = bpe_path(cache_dir, vocab_size, corpus)
    if path.is_file():
        try:
            return SubwordTokenizer(_tokenizers().Tokenizer.from_file(str(path)), f"bpe:{vocab_size}")
        except TaskError:
            raise
        except Exception:  # a foreign or torn file is a cache miss, never an error
            pass
    trained = train_bpe(texts(), vocab_size)
    write_text(path, trained.to_json())
    return trained


def file_fingerprint(spec: TokenizerSpec) -> str | None:
    """sha256 of a tokenizer file (cached data follows an edited file); None for hub names and bpe."""
    if spec.kind != "file":
        return None
    path = Path(spec.value)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise TaskError(f"task.tokenizer: tokenizer file not found: {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- packing


class Packer:
    """Documents in, one int32 token stream out: each document's ids followed by the end-of-document id.

    Texts are buffered and encoded ``ENCODE_BATCH`` at a time; ``len()`` counts the tokens encoded so far.
    """

    def __init__(self, tokenizer: TextTokenizer, batch: int | None = None):
        self.tokenizer, self.batch = tokenizer, batch or ENCODE_BATCH
        self._texts: list[str] = []
        self._pending_chars = 0
        self._chunks: list[torch.Tensor] = []
        self._tokens = 0

    def add(self, text: str) -> None:
        self._texts.append(text)
        self._pending_chars += len(text)
        if len(self._texts) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self._texts:
            return
        eod = self.tokenizer.eod_id
        ids = [token for doc in self.tokenizer.encode_batch(self._texts) for token in (*doc, eod)]
        self._chunks.append(torch.tensor(ids, dtype=torch.int32))
        self._tokens += len(ids)
        self._texts, self._pending_chars = [], 0

    def holds(self, count: int) -> bool:
        """Whether the stream has ``count`` tokens; encodes the buffer only when it could tip the balance
        (a document never has more tokens than UTF-8 bytes, 4 per character at most, plus its end token)."""
        if self._tokens + 4 * self._pending_chars + len(self._texts) >= count:
            self.flush()
        return self._tokens >= count

    def __len__(self) -> int:
        return self._tokens

    def stream(self) -> torch.Tensor:
        self.flush()
        return torch.cat(self._chunks) if self._chunks else torch.zeros(0, dtype=torch.int32)


def pack(tokenizer: TextTokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Every text of ``texts`` into one stream (see :class:`Packer`)."""
    packer = Packer(tokenizer)
    for text in texts:
        packer.add(text)
    return packer.stream()
