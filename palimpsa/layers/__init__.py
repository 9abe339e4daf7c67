"""Sequence mixers of the Palimpsa family, one module per family, built from a :class:`MixerConfig`.

Every mixer has ``forward(x [B, T, d_model], cache=None, use_cache=False) -> (out, cache or None)``,
``backend_name(device)``, ``log_alpha(x)`` (gated mixers) and ``importance(x)`` (metaplastic mixers).
Modules are imported lazily so that building one kind never needs another kind's kernels.
"""

from __future__ import annotations

import importlib

from torch import nn

from palimpsa.config import MIXER_KINDS, MixerConfig

MIXERS: dict[str, tuple[str, str]] = {
    "palimpsa": ("palimpsa.layers.palimpsa", "Palimpsa"),
    "metamamba2": ("palimpsa.layers.palimpsa", "MetaMamba2"),
    "mamba2": ("palimpsa.layers.mamba2", "Mamba2"),
    "gated_deltanet": ("palimpsa.layers.delta_net", "GatedDeltaNet"),
    "deltanet": ("palimpsa.layers.delta_net", "DeltaNet"),
    "longhorn": ("palimpsa.layers.longhorn", "Longhorn"),
    "mesa": ("palimpsa.layers.mesa", "Mesa"),
    "linear_attention": ("palimpsa.layers.linear_attention", "LinearAttention"),
    "attention": ("palimpsa.layers.attention", "Attention"),
}
assert set(MIXERS) == set(MIXER_KINDS), "every config kind needs a mixer"

GATED_KINDS = frozenset({"palimpsa", "metamamba2", "mamba2", "gated_deltanet", "mesa"})


def mixer_class(kind: str) -> type[nn.Module]:
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer kind {kind!r}; expected one of {sorted(MIXERS)}")
    module, name = MIXERS[kind]
    return getattr(importlib.import_module(module), name)


def build_mixer(cfg: MixerConfig, d_model: int, layer_idx: int, norm_eps: float = 1e-5) -> nn.Module:
    """The mixer named by ``cfg.kind`` for a model of width ``d_model``."""
    return mixer_class(cfg.kind)(cfg, d_model, layer_idx, norm_eps)


__all__ = ["GATED_KINDS", "MIXERS", "build_mixer", "mixer_class"]
