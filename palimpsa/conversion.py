"""Metaplastic conversion: a trained non-metaplastic model gains an importance state, function-preserving.

Supported sources: Mamba2 (-> MetaMamba2) and Palimpsa or MetaMamba2 trained with ``metaplastic=false``.
The converted layers keep every source weight and add fresh plasticity parameters: the low-rank precision
gate ``W_up W_down``, ``b_scale``, the prior ``Ip`` (kept from a Palimpsa source) and a per-head gain
``g_h`` with ``beta = |g_h| * gate`` (``plasticity_gain``), initialised to exactly 0.

Why the converted model equals its source before fine-tuning:

- ``g_h = 0`` makes ``beta == 0``, so ``Ibar_t = alpha_t Ibar_{t-1} + 0 == 0`` exactly and ``I_t == Ip``: the
  read-out is ``y = scale * (M_t / Ip) q_t``. A Palimpsa source with ``metaplastic=false`` computed exactly
  this (same op, same ``Ip``), so nothing changes. A Mamba2 source computed ``y = scale * S_t q_t`` with
  ``S_t = sum_j e^{G_t - G_j} dt_j x_j k_j^T``; MetaMamba2's numerator is ``u = Ip * dt * x``, so
  ``M_t / Ip == S_t`` for any ``Ip`` and the 1/Ip factor cancels. (The published surgery starts with
  ``beta > 0`` and so changes the function at step 0.)
- The gradient of ``g_h`` is not zero: ``dL/dbeta`` flows through ``I_t`` (``dy/dI = -scale (M/I^2) q``) and
  ``|g|`` is taken with slope ``+1`` at 0, so the first optimizer step makes ``beta`` non-zero. The gate's
  own weights only receive gradient once ``g_h != 0``, i.e. from the second step on.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from palimpsa.config import ConfigError, RunConfig, config_from_dict, config_to_dict, set_dotted
from palimpsa.model import PalimpsaLM, model_from_payload, read_checkpoint, save_model

# Parameters a converted layer may add on top of the source's (all belong to the precision gate / prior).
FRESH_PARAMETERS = ("beta_down.weight", "beta_up.weight", "b_scale", "beta_gain", "ip_log")
# Mixer fields a conversion (or its overrides) may change; any other change would alter the function.
CONVERTIBLE_FIELDS = frozenset(
    {"kind", "metaplastic", "plasticity_gain", "beta_rank", "b_scale_init", "ip", "ip_trainable"}
    | {"output_variance", "backend"}
)
MODEL_FIELDS_KEPT = ("d_model", "n_layers", "mlp_ratio", "norm_eps", "vocab_size")
VERIFY_RTOL = 1e-4


def converted_config(cfg: RunConfig) -> RunConfig:
    """The metaplastic counterpart of ``cfg``; raises :class:`ConfigError` for a source it cannot convert."""
    mixer = cfg.model.mixer
    if mixer.kind == "mamba2":
        kind = "metamamba2"
    elif mixer.kind in ("palimpsa", "metamamba2") and not mixer.metaplastic:
        kind = mixer.kind
    elif mixer.kind in ("palimpsa", "metamamba2"):
        raise ConfigError("model.mixer.metaplastic", f"the source {mixer.kind} is already metaplastic")
    else:
        raise ConfigError(
            "model.mixer.kind",
            f"cannot convert {mixer.kind!r}; conversion takes mamba2, "
            "or palimpsa/metamamba2 with metaplastic=false",
        )
    new = copy.deepcopy(cfg)
    new.model.mixer = dataclasses.replace(mixer, kind=kind, metaplastic=True, plasticity_gain=True)
    new.tracking.tags = {**new.tracking.tags, "converted_from": mixer.kind}
    return new


def _check_compatible(src: RunConfig, new: RunConfig) -> None:
    for name in MODEL_FIELDS_KEPT:
        if getattr(src.model, name) != getattr(new.model, name):
            raise ConfigError(f"model.{name}", "conversion keeps the source's architecture; do not change it")
    a, b = src.model.mixer, new.model.mixer
    for field in dataclasses.fields(a):
        if field.name not in CONVERTIBLE_FIELDS and getattr(a, field.name) != getattr(b, field.name):
            raise ConfigError(
                f"model.mixer.{field.name}",
                "changing it would change the function; conversion keeps the source's",
            )
    if b.kind != converted_config(src).model.mixer.kind or not (b.metaplastic and b.plasticity_gain):
        raise ConfigError(
            "model.mixer", "overrides must keep the converted kind, metaplastic and plasticity_gain"
        )
    if a.kind != "mamba2" and a.ip != b.ip:
        raise ConfigError(
            "model.mixer.ip", "the converted layer keeps the source's prior Ip (its read-out is M/Ip)"
        )


def convert_model(
    model: PalimpsaLM, cfg: RunConfig, new_cfg: RunConfig | None = None, verify: bool = True
) -> tuple[PalimpsaLM, RunConfig]:
    """Metaplastic version of ``model`` with every source weight kept and ``beta == 0`` at start.

    ``new_cfg`` (default: :func:`converted_config`) may change only what the conversion adds. With
    ``verify`` the logits of both models are compared on a random batch, a guard against silent drift.
    """
    new_cfg = converted_config(cfg) if new_cfg is None else new_cfg
    _check_compatible(cfg, new_cfg)
    param = next(model.parameters())
    new_model = PalimpsaLM(new_cfg.model, model.vocab_size).to(dtype=param.dtype, device=param.device)
    target = new_model.state_dict()
    source = model.state_dict()
    for key, value in source.items():
        if key not in target or target[key].shape != value.shape:
            raise ConfigError(
                "model", f"source weight {key} {tuple(value.shape)} has no place in the new model"
            )
        target[key] = value.clone()
    fresh = [key for key in target if key not in source]
    unexpected = [key for key in fresh if not key.endswith(FRESH_PARAMETERS)]
    if unexpected:
        raise ConfigError("model", f"the converted model would have uninitialised weights: {unexpected}")
    for key in fresh:
        if key.endswith("beta_gain"):
            target[key] = torch.zeros_like(target[key])
    new_model.load_state_dict(target)
    new_model.train(model.training)
    if verify:
        _verify(model, new_model)
    return new_model, new_cfg


@torch.no_grad()
def _verify(src: PalimpsaLM, new: PalimpsaLM) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, src.vocab_size, (2, 32), generator=gen).to(next(src.parameters()).device)
    a, b = src(ids), new(ids)
    err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    if not err <= VERIFY_RTOL:
        raise RuntimeError(f"conversion is not function-preserving: relative logit error {err:.2e}")


def convert_checkpoint(
    src: str | Path, dst: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read ``src``, convert, apply ``key=value`` overrides to the new config, write ``dst``; the new config.

    The written checkpoint holds only the model and config (fresh optimizer for fine-tuning) and records
    its origin under ``converted_from``. Raises ``CheckpointError`` (bad file) or ``ConfigError``.
    """
    payload = read_checkpoint(src)
    model, cfg = model_from_payload(payload, src)
    data = config_to_dict(converted_config(cfg))
    for assignment in overrides:
        set_dotted(data, assignment)
    new_cfg = config_from_dict(data, source="--set")
    try:
        new_model, new_cfg = convert_model(model, cfg, new_cfg)
    except ConfigError as err:
        raise ConfigError(err.key, err.message, err.source or src) from None
    save_model(dst, new_model, new_cfg, converted_from=str(src))
    return new_cfg
