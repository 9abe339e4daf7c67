"""Multi-query associative recall (MQAR) with the Zoology layout (``palimpsa/tasks/README.md``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palimpsa.errors import FieldError
from palimpsa.tasks.base import IGNORE_INDEX, TaskData, sample_without_replacement, split_generator


@dataclass
class MQARConfig:
    """Keys, values and queries of MQAR.

    Layout of one example of length ``seq_len`` with ``kv = num_kv_pairs``: the first ``2 * kv`` tokens
    are ``k1 v1 k2 v2 ...`` (distinct keys from ``[1, vocab/2)``, distinct values from ``[vocab/2, vocab)``);
    the rest re-asks every key once, key ``i`` at offset ``2 * gap_i`` after the context, where the gaps are
    distinct slots drawn with probability proportional to ``slot ** (power_a - 1)`` (small ``power_a``:
    queries crowd near the context). Every other position holds 0 (or a random token when
    ``random_non_queries``). Only the position of each query is scored, with that key's value as target.
    """

    name: str = "mqar"
    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    num_train: int = 20000
    num_val: int = 1000
    random_non_queries: bool = False

    def __post_init__(self) -> None:
        kv, length, vocab = self.num_kv_pairs, self.seq_len, self.vocab_size
        if vocab < 4:
            raise FieldError("vocab_size", f"must be >= 4, got {vocab}")
        if length < 4:
            raise FieldError("seq_len", f"must be >= 4, got {length}")
        if kv < 1:
            raise FieldError("num_kv_pairs", f"must be >= 1, got {kv}")
        if kv * 4 > length:
            raise FieldError(
                "num_kv_pairs",
                f"num_kv_pairs * 4 must be <= seq_len (context and queries must fit): "
                f"{kv} * 4 = {kv * 4} > seq_len {length}",
            )
        if kv > vocab // 2 - 1:
            raise FieldError(
                "num_kv_pairs",
                f"keys are distinct tokens of [1, {vocab // 2}): need num_kv_pairs <= {vocab // 2 - 1}",
            )
        if self.power_a <= 0:
            raise FieldError("power_a", f"must be > 0, got {self.power_a}")
        for key in ("num_train", "num_val"):
            if getattr(self, key) < 1:
                raise FieldError(key, f"must be >= 1, got {getattr(self, key)}")


def generate_mqar(
    cfg: MQARConfig, num_examples: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` LongTensors ``[num_examples, seq_len]``; fully vectorised over examples."""
    n, kv, length, vocab = num_examples, cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
    half = vocab // 2
    keys = 1 + sample_without_replacement(n, half - 1, kv, gen)
    values = half + sample_without_replacement(n, vocab - half, kv, gen)

    context = 2 * kv
    space = (length - context) // 2  # query slots: even offsets after the context
    slots = torch.arange(1, space + 1, dtype=torch.float32)
    log_p = (cfg.power_a - 1.0) * torch.log(slots)  # p(slot) proportional to slot ** (power_a - 1)
    gaps = sample_without_replacement(n, space, kv, gen, log_weights=log_p)

    inputs = torch.zeros(n, length, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)  # predicted at the query: the next token is the answer

    if cfg.random_non_queries:
        noise = torch.randint(vocab, (n, length), generator=gen)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def build_mqar(cfg: MQARConfig, seed: int) -> TaskData:
    train = generate_mqar(cfg, cfg.num_train, split_generator(cfg, seed, "train"))
    val = generate_mqar(cfg, cfg.num_val, split_generator(cfg, seed, "val"))
    return TaskData(*train, *val, vocab_size=cfg.vocab_size, metric="accuracy")
