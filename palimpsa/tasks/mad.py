"""The MAD synthetic suite (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures").

Every generator is vectorised over examples with torch. Sequences are built as a token stream ``s`` of
``seq_len + 1`` tokens with a label stream aligned to it; ``inputs = s[:-1]`` and ``targets = labels[1:]``
(or, where a task scores the token *at* a position, inputs and targets are laid out directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from palimpsa.errors import FieldError
from palimpsa.tasks.base import IGNORE_INDEX, TaskData, sample_without_replacement, split_generator

MADVariant = Literal[
    "in_context_recall", "noisy_recall", "fuzzy_recall", "memorize", "selective_copy", "compress"
]
MAD_VARIANTS: tuple[str, ...] = get_args(MADVariant)

# (vocab_size, seq_len) of each variant when the config leaves them unset: the MAD defaults.
MAD_DEFAULTS: dict[str, tuple[int, int]] = {
    "in_context_recall": (16, 128),
    "noisy_recall": (32, 128),
    "fuzzy_recall": (16, 128),
    "memorize": (256, 32),
    "selective_copy": (16, 256),
    "compress": (16, 32),
}
RECALL_VARIANTS = ("in_context_recall", "noisy_recall", "fuzzy_recall")


@dataclass
class MADConfig:
    """One MAD task; ``vocab_size`` / ``seq_len`` left unset take the variant's MAD default.

    in_context_recall: a stream of key-value pairs (keys from the lower half of the vocabulary, values
    from the upper half) under a key->value map drawn afresh per example; keys repeat, and every value
    whose key already appeared earlier in the sequence is scored (multi-query recall). The last complete
    pair always re-asks a key seen before, so every example has a scored position.

    noisy_recall: in-context recall where each pair slot is, with probability ``frac_noise``, replaced by
    two tokens of a separate noise vocabulary (the top ``noise_vocab_size`` ids) that are never scored and
    never define a key; the model must ignore them.

    fuzzy_recall: keys and values are motifs of 1..``k_motif_size`` / 1..``v_motif_size`` distinct tokens;
    a key is the whole run of key tokens, its value motif is fixed at its first appearance, and every
    token of a repeated key's value is scored. Validation keys all have the maximal length (as in MAD),
    so the end of a key is never ambiguous there; sequences are left-padded with a pad token (id V-1).

    memorize: pairs ``key, insert`` where the insert token (id V-1) must be answered with the key's value
    under one fixed map shared by train and val (drawn from the run seed): recall from the weights, not
    from the context.

    selective_copy: ``num_tokens_to_copy`` content tokens scattered among blank tokens (id V-2), then a
    copy token (id V-1) and blanks at which the content tokens must be reproduced in order.

    compress: a dense random sequence, then a compression token (id V-1) and blanks (id V-2) at which the
    whole sequence is reproduced in order. MAD decodes the sequence from the compression token's output
    with a separate decoder; a causal model here has to carry it through its state in the same way,
    because the inputs after the compression token carry no information about the content.

    Recall variants train on every next token (``train_targets="all"``, as MAD does) and are validated on
    the recall positions only; ``train_targets="probes"`` scores the recall positions in training too.
    """

    name: str = "mad"
    variant: MADVariant = "in_context_recall"
    vocab_size: int | None = None
    seq_len: int | None = None
    num_train: int = 12800
    num_val: int = 1280
    train_targets: Literal["all", "probes"] = "all"
    noise_vocab_size: int = 16  # noisy_recall
    frac_noise: float = 0.2  # noisy_recall
    k_motif_size: int = 3  # fuzzy_recall
    v_motif_size: int = 3  # fuzzy_recall
    num_tokens_to_copy: int = 16  # selective_copy

    def __post_init__(self) -> None:
        if self.variant not in MAD_VARIANTS:
            raise FieldError("variant", f"must be one of {list(MAD_VARIANTS)}, got {self.variant!r}")
        default_vocab, default_len = MAD_DEFAULTS[self.variant]
        self.vocab_size = default_vocab if self.vocab_size is None else self.vocab_size
        self.seq_len = default_len if self.seq_len is None else self.seq_len
        for key in ("num_train", "num_val"):
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be >= 1, got {getattr(self, key)}")
        vocab, length = self.vocab_size, self.seq_len
        _require(vocab >= 4, "vocab_size", f"must be >= 4, got {vocab}")
        _require(length >= 4, "seq_len", f"must be >= 4, got {length}")
        if self.variant == "noisy_recall":
            _require(self.noise_vocab_size >= 1, "noise_vocab_size", "must be >= 1 for noisy_recall")
            _require(
                vocab - self.noise_vocab_size >= 4,
                "noise_vocab_size",
                f"leaves {vocab - self.noise_vocab_size} key/value tokens of vocab_size {vocab}; need >= 4",
            )
            _require(0 <= self.frac_noise < 1, "frac_noise", f"must be in [0, 1), got {self.frac_noise}")
        if self.variant == "fuzzy_recall":
            kmax, vmax = self.k_motif_size, self.v_motif_size
            _require(kmax >= 1, "k_motif_size", f"must be >= 1, got {kmax}")
            _require(vmax >= 1, "v_motif_size", f"must be >= 1, got {vmax}")
            num_keys = (vocab - 1) // 2
            _require(num_keys >= kmax, "k_motif_size", f"exceeds the {num_keys} key tokens of vocab {vocab}")
            _require(
                vocab - 1 - num_keys >= vmax, "v_motif_size", f"exceeds the value tokens of vocab {vocab}"
            )
            _require((num_keys + 1) ** kmax < 2**62, "k_motif_size", "key motifs too long for this vocab")
            _require(
                length + 1 >= 2 * (kmax + vmax),
                "seq_len",
                f"must be >= 2 * (k_motif_size + v_motif_size) - 1 = {2 * (kmax + vmax) - 1}, got {length}",
            )
        if self.variant == "selective_copy":
            n = self.num_tokens_to_copy
            _require(n >= 1, "num_tokens_to_copy", f"must be >= 1, got {n}")
            _require(
                length > 2 * n + 1,
                "num_tokens_to_copy",
                f"seq_len must be > 2 * num_tokens_to_copy + 1: {length} <= {2 * n + 1}",
            )

    @property
    def metric(self) -> str:
        return "accuracy"


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise FieldError(key, message)


# --------------------------------------------------------------------------- recall


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Per row, for each position the index of the first position holding the same id."""
    n, width = ids.shape
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)  # equal ids keep ascending positions
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    arange = torch.arange(width).expand(n, width)
    group_start = torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=1).values
    first = torch.empty_like(order)
    first.scatter_(1, order, order.gather(1, group_start))
    return first


def _recall(cfg: MADConfig, n: int, gen: torch.Generator, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context and noisy recall: pairs ``k v`` under a per-example map, repeated keys scored."""
    length, vocab = cfg.seq_len, cfg.vocab_size
    noisy = cfg.variant == "noisy_recall"
    content = vocab - (cfg.noise_vocab_size if noisy else 0)
    num_keys = content // 2
    pairs = length // 2 + 1  # 2 * pairs >= seq_len + 1 tokens; the stream is cut to seq_len + 1
    last = (length + 1) // 2 - 1  # the last pair whose value lies inside the stream: the final probe

    keys = torch.randint(num_keys, (n, pairs), generator=gen)
    table = num_keys + torch.randint(content - num_keys, (n, num_keys), generator=gen)
    rows = torch.arange(n)
    if noisy and cfg.frac_noise > 0:
        noise = torch.rand(n, pairs, generator=gen) < cfg.frac_noise
        noise[rows, torch.randint(last, (n,), generator=gen)] = False  # at least one pair before the probe
    else:
        noise = torch.zeros(n, pairs, dtype=torch.bool)
    noise[:, last] = False
    eligible = ~noise
    eligible[:, last:] = False
    source = torch.where(eligible, torch.rand(n, pairs, generator=gen), torch.full((n, pairs), -1.0)).argmax(
        1
    )
    keys[:, last] = keys[rows, source]
    values = table.gather(1, keys)

    stream = torch.empty(n, 2 * pairs, dtype=torch.long)
    stream[:, 0::2], stream[:, 1::2] = keys, values
    if noisy:
        noise_tokens = content + torch.randint(cfg.noise_vocab_size, (n, 2 * pairs), generator=gen)
        stream = torch.where(noise.repeat_interleave(2, dim=1), noise_tokens, stream)

    first = torch.full((n, num_keys + 1), pairs, dtype=torch.long)  # column num_keys collects noise slots
    slot = torch.arange(pairs).expand(n, pairs)
    first.scatter_reduce_(1, torch.where(noise, num_keys, keys), slot, reduce="amin")
    seen = (first.gather(1, keys) < slot) & ~noise
    labels = torch.full_like(stream, IGNORE_INDEX)
    labels[:, 1::2] = torch.where(seen, values, IGNORE_INDEX)

    stream, labels = stream[:, : length + 1], labels[:, : length + 1]
    targets = stream[:, 1:] if train and cfg.train_targets == "all" else labels[:, 1:]
    return stream[:, :-1].contiguous(), targets.contiguous()


def _fuzzy_recall(
    cfg: MADConfig, n: int, gen: torch.Generator, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall with multi-token keys and values; see :class:`MADConfig`."""
    length, vocab, kmax, vmax = cfg.seq_len, cfg.vocab_size, cfg.k_motif_size, cfg.v_motif_size
    pad, content = vocab - 1, vocab - 1
    num_keys = content // 2
    pairs = length // 2 + 1  # each pair has >= 2 tokens: a bound on the pairs that fit, probe included
    rows = torch.arange(n)

    ksize = torch.randint(1, kmax + 1, (n, pairs), generator=gen) if train else torch.full((n, pairs), kmax)
    vsize = torch.randint(1, vmax + 1, (n, pairs), generator=gen)
    ktok = sample_without_replacement(n * pairs, num_keys, kmax, gen).view(n, pairs, kmax)
    vtok = num_keys + sample_without_replacement(n * pairs, content - num_keys, vmax, gen).view(
        n, pairs, vmax
    )

    # A key keeps the value motif of its first appearance (first occurrences always come earlier).
    within = torch.arange(kmax) < ksize[..., None]
    ids = ((ktok + 1) * within * (num_keys + 1) ** torch.arange(kmax)).sum(-1)
    first = _first_occurrence(ids)
    vsize = vsize.gather(1, first)
    vtok = vtok.gather(1, first[..., None].expand(n, pairs, vmax))

    # Body pairs fill the stream up to room for one maximal probe pair; the probe re-asks a body key.
    ends = (ksize + vsize).cumsum(1)
    body = (ends <= length + 1 - (kmax + vmax)).sum(1)  # >= 1 by the seq_len check
    source = (torch.rand(n, generator=gen) * body).long().clamp_max(body - 1)
    origin = first[rows, source]
    ksize[rows, body], ktok[rows, body] = ksize[rows, source], ktok[rows, source]
    vsize[rows, body], vtok[rows, body] = vsize[rows, origin], vtok[rows, origin]
    first[rows, body] = origin
    within = torch.arange(kmax) < ksize[..., None]

    slot = torch.arange(pairs).expand(n, pairs)
    valid = slot <= body[:, None]
    seen = (first < slot) & valid

    sizes = torch.where(valid, ksize + vsize, 0)
    starts = sizes.cumsum(1) - sizes + (length + 1 - sizes.sum(1, keepdim=True))  # left-padded
    stream = torch.full((n, length + 1), pad, dtype=torch.long)
    labels = torch.full((n, length + 1), IGNORE_INDEX, dtype=torch.long)
    row_idx = rows[:, None, None]
    kpos = starts[..., None] + torch.arange(kmax)
    kmask = within & valid[..., None]
    stream[row_idx.expand_as(kpos)[kmask], kpos[kmask]] = ktok[kmask]
    vpos = (starts + ksize)[..., None] + torch.arange(vmax)
    vmask = (torch.arange(vmax) < vsize[..., None]) & valid[..., None]
    vrows = row_idx.expand_as(vpos)
    stream[vrows[vmask], vpos[vmask]] = vtok[vmask]
    smask = vmask & seen[..., None]
    labels[vrows[smask], vpos[smask]] = vtok[smask]

    if train and cfg.train_targets == "all":
        targets = torch.where(stream[:, 1:] == pad, IGNORE_INDEX, stream[:, 1:])
    else:
        targets = labels[:, 1:]
    return stream[:, :-1].contiguous(), targets.contiguous()


# --------------------------------------------------------------------------- memorize, copy, compress


def memorize_map(cfg: MADConfig, seed: int) -> torch.Tensor:
    """The fixed key -> value table of ``memorize``: distinct values, shared by train and val."""
    content = cfg.vocab_size - 1
    num_keys = content // 2
    perm = torch.randperm(content - num_keys, generator=split_generator(cfg, seed, "map"))
    return num_keys + perm[:num_keys]


def _memorize(
    cfg: MADConfig, n: int, gen: torch.Generator, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    length, insert = cfg.seq_len, cfg.vocab_size - 1
    pairs = (length + 1) // 2
    keys = torch.randint(len(table), (n, pairs), generator=gen)
    inputs = torch.full((n, 2 * pairs), insert, dtype=torch.long)
    targets = torch.full((n, 2 * pairs), IGNORE_INDEX, dtype=torch.long)
    inputs[:, 0::2] = keys
    targets[:, 1::2] = table[keys]  # answered at the insert token
    return inputs[:, :length].contiguous(), targets[:, :length].contiguous()


def _selective_copy(cfg: MADConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    length, vocab, count = cfg.seq_len, cfg.vocab_size, cfg.num_tokens_to_copy
    copy, blank = vocab - 1, vocab - 2
    body = length - count - 1
    tokens = torch.randint(vocab - 2, (n, count), generator=gen)
    positions = sample_without_replacement(n, body, count, gen).sort(dim=1).values  # order is kept
    inputs = torch.full((n, length), blank, dtype=torch.long)
    inputs.scatter_(1, positions, tokens)
    inputs[:, body] = copy
    targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    targets[:, body + 1 :] = tokens
    return inputs, targets


def _compress(cfg: MADConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    length, vocab = cfg.seq_len, cfg.vocab_size
    marker, blank = vocab - 1, vocab - 2
    count = (length - 1) // 2
    lead = length - 1 - 2 * count  # one leading blank when seq_len is even
    tokens = torch.randint(vocab - 2, (n, count), generator=gen)
    inputs = torch.full((n, length), blank, dtype=torch.long)
    inputs[:, lead : lead + count] = tokens
    inputs[:, lead + count] = marker
    targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    targets[:, lead + count + 1 :] = tokens
    return inputs, targets


def generate_mad(
    cfg: MADConfig, n: int, gen: torch.Generator, train: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of ``n`` examples of ``cfg.variant``; ``seed`` fixes the memorize map."""
    if cfg.variant in ("in_context_recall", "noisy_recall"):
        return _recall(cfg, n, gen, train)
    if cfg.variant == "fuzzy_recall":
        return _fuzzy_recall(cfg, n, gen, train)
    if cfg.variant == "memorize":
        return _memorize(cfg, n, gen, memorize_map(cfg, seed))
    if cfg.variant == "selective_copy":
        return _selective_copy(cfg, n, gen)
    return _compress(cfg, n, gen)


def build_mad(cfg: MADConfig, seed: int) -> TaskData:
    train = generate_mad(cfg, cfg.num_train, split_generator(cfg, seed, "train"), train=True, seed=seed)
    val = generate_mad(cfg, cfg.num_val, split_generator(cfg, seed, "val"), train=False, seed=seed)
    return TaskData(*train, *val, vocab_size=cfg.vocab_size, metric="accuracy")
