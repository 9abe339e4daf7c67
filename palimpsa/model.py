"""Causal LM of pre-norm blocks (mixer + SwiGLU MLP), tied embeddings; checkpoints, generation, diagnostics.

One class serves every member of the family: the mixer comes from ``cfg.mixer.kind``. Generation keeps a
per-layer cache (conv tails + recurrent state, or the KV history for attention), so decoding costs O(1)
per token for the fixed-memory mixers and equals the full forward.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from palimpsa.atomic import atomic_torch_save
from palimpsa.config import ConfigError, ModelConfig, RunConfig, config_from_dict, config_to_dict
from palimpsa.errors import CheckpointError
from palimpsa.layers import build_mixer
from palimpsa.layers.common import Cache, RMSNorm, ShortConv

# A synapse counts as consolidated once its precision is at least twice the prior: its effective learning
# rate 1/I has halved relative to a fresh synapse, i.e. the evidence it has seen outweighs the prior.
CONSOLIDATED_RATIO = 2.0
# 1/(1 - alpha) is infinite at alpha = 1 (no forgetting); the diagnostic horizon is capped here.
HORIZON_MAX = 1e6
DIAG_QUANTILES = (0.1, 0.5, 0.9)


def swiglu_hidden(d_model: int, mlp_ratio: float) -> int:
    """``2/3 * mlp_ratio * d_model`` rounded up to a multiple of 8: parameter-matched to a GELU MLP."""
    return max(8, 8 * math.ceil(2 * mlp_ratio * d_model / 3 / 8))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.w_down.is_residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm residual block: ``h + mixer(norm(h))``, then ``h + mlp(norm(h))`` (none if mlp_ratio is 0)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg.mixer, cfg.d_model, layer_idx, cfg.norm_eps)
        self.mlp: SwiGLU | None = None
        if cfg.mlp_ratio > 0:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(self, h: Tensor, cache: Cache | None = None, use_cache: bool = False):
        """``h`` may be carried in a wider dtype than the weights (``residual_in_fp32``): each branch reads
        it at the weights' dtype and its output is added back in ``h``'s."""
        dtype = self.mixer_norm.weight.dtype
        m, cache = self.mixer(self.mixer_norm(h.to(dtype)), cache, use_cache)
        h = h + m
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h.to(dtype)))
        return h, cache


class PalimpsaLM(nn.Module):
    """``forward(input_ids [B, T]) -> logits [B, T, vocab]``, or ``(logits, state)`` with ``return_state``."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.final_norm == "layer":
            self.final_norm: nn.Module = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        else:
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.init == "official":
            self._init_official()
        else:
            self._init_default()

    def _init_default(self) -> None:
        """N(0, init_std) for embeddings and projections (small embeddings speed up MQAR's jump).

        Residual output projections get ``1/sqrt(2 n_layers)`` of that; convs and gate parameters keep
        their own init.
        """
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = (
                    1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "is_residual_out", False) else 1
                )
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _init_official(self) -> None:
        """The published MQAR init: every Linear, conv and embedding N(0, init_std), biases 0, no residual
        scaling; the precision gate's up-projection ``U(-r^-1/2, r^-1/2)`` (PyTorch's default for a Linear of
        fan-in ``r``), re-drawn here after the normal init."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, ShortConv)):
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            up = getattr(block.mixer, "beta_up", None)
            if up is not None:
                bound = up.in_features**-0.5
                nn.init.uniform_(up.weight, -bound, bound)

    def forward(
        self,
        input_ids: Tensor,
        state: list[Cache] | None = None,
        return_state: bool = False,
        positions: Tensor | None = None,
    ):
        """Logits ``[B, T, vocab]``, or ``[B, S, vocab]`` at ``positions [B, S]`` only (the scored ones: the
        output head and the loss then cost S/T of the full read-out). ``input_ids`` may be any integer dtype
        (task data keeps tokens as int16 or int32)."""
        h = self.embed(input_ids.long())
        if self.cfg.residual_in_fp32:
            h = h.float()
        new_state = []
        for i, block in enumerate(self.blocks):
            h, cache = block(h, None if state is None else state[i], return_state)
            new_state.append(cache)
        if positions is not None:
            h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.final_norm(h.to(head.dtype)), head)
        return (logits, new_state) if return_state else logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        greedy: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefill the prompt once, then decode one token at a time from the cache; ``[B, T + new]``."""
        out = [input_ids]
        if max_new_tokens <= 0:
            return input_ids
        logits, state = self(input_ids, return_state=True)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if greedy:
                token = last.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(last.softmax(-1), 1, generator=generator)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits, state = self(token, state=state, return_state=True)
        return torch.cat(out, dim=1)

    def num_params(self) -> int:
        """Trainable parameters; the tied head is counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def backends(self) -> dict[str, str]:
        """Per layer, the implementation its mixer runs on this model's device (for the run's params)."""
        device = self.embed.weight.device
        return {f"layer{i}": block.mixer.backend_name(device) for i, block in enumerate(self.blocks)}

    @torch.no_grad()
    def importance_diagnostics(self, input_ids: Tensor) -> dict[str, float]:
        """Per layer and head: quantiles of I_T/Ip, consolidated fraction, mean 1/I and memory horizon.

        ``I_T`` is the importance state after the last token of ``input_ids``; statistics are taken per
        sequence over the head's ``V x K`` synapses, then averaged over the batch. The horizon
        ``1/(1 - alpha_t)`` is averaged over batch and tokens (capped at ``HORIZON_MAX``).
        """
        out: dict[str, float] = {}
        consolidated, horizons, lr_effs = [], [], []
        h = self.embed(input_ids.long())
        for layer, block in enumerate(self.blocks):
            x = block.mixer_norm(h)
            prefix = f"diag.l{layer}"
            log_alpha = block.mixer.log_alpha(x)
            if log_alpha is not None:
                one_minus = (-torch.expm1(log_alpha.double())).clamp_min(1 / HORIZON_MAX)
                per_head = (1 / one_minus).mean(dim=(0, 1))  # [H]
                for head, value in enumerate(per_head.tolist()):
                    out[f"{prefix}.h{head}.horizon"] = value
                out[f"{prefix}.horizon"] = per_head.mean().item()
                horizons.append(out[f"{prefix}.horizon"])
            importance = block.mixer.importance(x)
            if importance is not None:
                I, ip = importance
                B, H = I.shape[:2]
                ratio = (I.double() / ip.double()[None, :, None, None]).reshape(B, H, -1)
                levels = torch.tensor(DIAG_QUANTILES, dtype=ratio.dtype, device=ratio.device)
                qs = torch.quantile(ratio, levels, dim=-1).mean(1)
                frac = (ratio >= CONSOLIDATED_RATIO).double().mean(dim=(0, 2))  # [H]
                lr_eff = (1 / I.double()).reshape(B, H, -1).mean(dim=(0, 2))
                for head in range(H):
                    for qv, value in zip(DIAG_QUANTILES, qs[:, head].tolist(), strict=True):
                        out[f"{prefix}.h{head}.i_over_ip_q{round(qv * 100)}"] = value
                    out[f"{prefix}.h{head}.consolidated"] = frac[head].item()
                    out[f"{prefix}.h{head}.lr_eff"] = lr_eff[head].item()
                out[f"{prefix}.consolidated"] = frac.mean().item()
                consolidated.append(out[f"{prefix}.consolidated"])
                lr_effs.append(lr_eff.mean().item())
            h, _ = block(h)
        for key, values in (("consolidated", consolidated), ("horizon", horizons), ("lr_eff", lr_effs)):
            if values:
                out[f"diag.{key}"] = sum(values) / len(values)
        return out


def resolve_vocab_size(cfg: RunConfig, vocab_size: int | None = None) -> int:
    """``cfg.model.vocab_size`` if set, else the given one, else the task's."""
    for candidate in (cfg.model.vocab_size, vocab_size, getattr(cfg.task, "vocab_size", None)):
        if candidate is not None:
            return int(candidate)
    raise ValueError("no vocab size: set model.vocab_size or use a task that defines one")


def build_model(cfg: RunConfig, vocab_size: int | None = None) -> PalimpsaLM:
    """The model a run config describes; ``cfg.model.vocab_size`` (if set) wins over the task's vocab."""
    return PalimpsaLM(cfg.model, resolve_vocab_size(cfg, vocab_size))


# --------------------------------------------------------------------------- checkpoints


def save_model(path: str | Path, model: PalimpsaLM, cfg: RunConfig, **extra: Any) -> None:
    """Checkpoint ``{"config", "model", "vocab_size", **extra}`` (the trainer adds its optimizer state)."""
    payload = {"config": config_to_dict(cfg), "model": model.state_dict(), "vocab_size": model.vocab_size}
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint mapping, checked for the keys every checkpoint has."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle, zip and unpickler errors all mean "not a checkpoint"
        raise CheckpointError(path, f"not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or not {"config", "model"} <= set(payload):
        raise CheckpointError(path, "not a model checkpoint (expected a mapping with 'config' and 'model')")
    return payload


def model_from_payload(payload: dict[str, Any], path: str | Path) -> tuple[PalimpsaLM, RunConfig]:
    try:
        cfg = config_from_dict(payload["config"], source=path)
    except ConfigError as err:
        raise CheckpointError(path, f"invalid config: {err.key}: {err.message}") from None
    state = payload["model"]
    if not isinstance(state, dict) or "embed.weight" not in state:
        raise CheckpointError(path, "'model' is not a state dict of this model")
    model = PalimpsaLM(cfg.model, int(state["embed.weight"].shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(path, f"weights do not match the config: {err}".replace("\n", " ")) from None
    return model, cfg


def load_model(path: str | Path, map_location: Any = "cpu") -> tuple[PalimpsaLM, RunConfig]:
    """Rebuild the model and its validated run config from a checkpoint; raises :class:`CheckpointError`."""
    return model_from_payload(read_checkpoint(path, map_location), path)
