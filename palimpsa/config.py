"""One typed config describes a run; the same YAML drives the CLI, the workflow, Optuna and the reports.

Loading is strict: an unknown key, a wrong type or an impossible value raises one
:class:`ConfigError` whose message names the file and the dotted key, e.g.
``ablations/x.yaml: model.mixer.kind: must be one of [...], got 'mamba3'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from palimpsa.credentials import find_password, password_message
from palimpsa.errors import ConfigError, FieldError
from palimpsa.io import DottedKeyError, YamlFileError, dump_yaml, read_yaml, set_key, yaml_load
from palimpsa.tasks import TASK_CONFIGS

MIXER_KINDS = (
    "palimpsa",
    "metamamba2",
    "mamba2",
    "gated_deltanet",
    "deltanet",
    "longhorn",
    "mesa",
    "linear_attention",
    "attention",
)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise FieldError(key, message)


@dataclass
class MixerConfig:
    """The sequence mixer of every block; ``kind`` picks the member of the family."""

    kind: str = "palimpsa"
    num_heads: int = 2
    head_k_dim: int = 32
    head_v_dim: int = 32
    # Palimpsa / MetaMamba2 only --------------------------------------------------
    gates: Literal["paper", "official"] = "official"
    metaplastic: bool = True  # off: beta == 0, the Mamba2 limit (I_t == Ip)
    numerator: Literal["auto", "beta_v", "bs_v"] = "auto"  # auto: paper -> beta_v, official -> bs_v
    ip: float = 1.0  # prior precision Ip
    ip_trainable: bool = False
    n_init: float = 32.0  # paper gates: N_h = n_init * exp(logN_h)
    beta_rank: int = 16  # low-rank precision gate W_up W_down
    b_scale_init: float = 1.0  # official gates: softplus(b_scale) at init
    a_init_min: float = 1.0  # official / Mamba2 gates: A_h ~ U(a_init_min, a_init_max)
    a_init_max: float = 16.0
    dt_min: float = 1e-3  # official / Mamba2 gates: dt at init ~ logU(dt_min, dt_max)
    dt_max: float = 1e-1
    output_variance: bool = False
    # Forgetting init of the A / dt gates: "random" draws A_h ~ U(a_init_min, a_init_max) and
    # dt ~ logU(dt_min, dt_max) per head; the ramps are deterministic per head h = 0..H-1:
    # dt_h = exp((1 - h/(H-1)) * (ln dt_max - ln dt_min) + ln dt_min) and A_h = linspace(a, b, H) with
    # (a, b) = (0.01, 0.16) "small", (0.001, 0.016) "very_small", (1, 16) "normal".
    forgetting: Literal["random", "small", "very_small", "normal"] = "random"
    # Set by metaplastic conversion: beta carries a per-head gain |g_h| initialised to 0, so a converted
    # model starts exactly equal to its source (beta == 0, I_t == Ip) while d loss / d g_h != 0.
    plasticity_gain: bool = False
    # All kinds -------------------------------------------------------------------
    conv_size: int = 4  # short causal conv on q, k, v; 0 disables it
    # L2 norm on q and k after the conv: "auto" is "none" for mamba2 / metamamba2 (Mamba2's C and B are not
    # normalized; with unit keys its un-normalized read-out starts ~100x below the D skip and MQAR stalls)
    # and "l2" for every other kind
    qk_norm: Literal["auto", "l2", "none"] = "auto"
    scale: float | None = None  # read-out scale; None: head_k_dim ** -0.5 (Mamba2 reads out with 1)
    # Output normalisation: "head" = RMSNorm over each head's V channels times SiLU(gate) (fla's gated norm);
    # "full" = RMSNorm over all H * V channels of o * SiLU(gate) (Mamba2's norm, gate applied first).
    output_norm: Literal["head", "full"] = "head"
    bias: bool = False  # biases on the shell's projections (q, k, v, gate, dt and output): Mamba2's use_bias
    d_skip: bool = True  # the o + D_h * v skip (Gated DeltaNet has none)
    # which implementation runs the recurrence (kernels.backends): auto | reference | torch | triton | fla
    backend: Literal["auto", "reference", "torch", "triton", "fla"] = "auto"

    def __post_init__(self) -> None:
        _check(self.kind in MIXER_KINDS, "kind", f"must be one of {list(MIXER_KINDS)}, got {self.kind!r}")
        for name in ("num_heads", "head_k_dim", "head_v_dim", "beta_rank"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.head_k_dim <= 256 and self.head_v_dim <= 256, "head_k_dim", "head dims must be <= 256")
        _check(self.ip > 0, "ip", f"prior precision must be > 0, got {self.ip}")
        _check(self.n_init > 1, "n_init", f"must be > 1 so that alpha stays in (0, 1], got {self.n_init}")
        _check(self.b_scale_init > 0, "b_scale_init", f"must be > 0, got {self.b_scale_init}")
        _check(0 < self.a_init_min <= self.a_init_max, "a_init_min", "need 0 < a_init_min <= a_init_max")
        _check(0 < self.dt_min <= self.dt_max, "dt_min", "need 0 < dt_min <= dt_max")
        _check(self.conv_size >= 0, "conv_size", f"must be >= 0, got {self.conv_size}")
        _check(self.scale is None or self.scale > 0, "scale", f"must be > 0, got {self.scale}")
        if self.kind == "attention":
            _check(self.head_k_dim % 2 == 0, "head_k_dim", "must be even for rotary embeddings (attention)")
        if self.kind in ("palimpsa", "metamamba2"):
            _check(
                self.backend != "fla",
                "backend",
                f"fla has no kernel for {self.kind}; use auto/reference/triton",
            )

    @property
    def resolved_qk_norm(self) -> str:
        if self.qk_norm != "auto":
            return self.qk_norm
        return "none" if self.kind in ("mamba2", "metamamba2") else "l2"

    @property
    def resolved_numerator(self) -> str:
        if self.numerator != "auto":
            return self.numerator
        return "beta_v" if self.gates == "paper" else "bs_v"


@dataclass
class ModelConfig:
    """Causal LM of pre-norm blocks (mixer + SwiGLU MLP, or the mixer alone) with tied embeddings."""

    d_model: int = 64
    n_layers: int = 2
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * d_model; 0: blocks without an MLP
    init_std: float = 0.02
    # "default": embeddings and projections N(0, init_std), residual output projections scaled by
    # 1/sqrt(2 n_layers), convs and gates keep their own init. "official": every Linear, conv and embedding
    # N(0, init_std), biases 0, no residual scaling, the precision gate's up-projection U(-r^-1/2, r^-1/2).
    init: Literal["default", "official"] = "default"
    norm_eps: float = 1e-5
    final_norm: Literal["rms", "layer"] = "rms"  # the norm before the output head
    tie_embeddings: bool = True  # output head = embedding matrix
    # carry the residual stream in fp32 when the weights are bf16 (train.precision: pure_bf16), as the
    # published MQAR blocks do; a no-op for fp32 weights
    residual_in_fp32: bool = False
    vocab_size: int | None = None  # None: taken from the task
    mixer: MixerConfig = field(default_factory=MixerConfig)

    def __post_init__(self) -> None:
        _check(self.d_model >= 1, "d_model", f"must be >= 1, got {self.d_model}")
        _check(self.n_layers >= 1, "n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.mlp_ratio >= 0, "mlp_ratio", f"must be >= 0 (0: no MLP), got {self.mlp_ratio}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")


@dataclass
class TrainConfig:
    """Optimization and run control. One epoch is one pass over the task's training set."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # "warmup_cosine": linear warmup, then a cosine per step over the run; "epoch_cosine": a cosine over the
    # epochs, held constant within an epoch and stepped once per epoch (PyTorch's CosineAnnealingLR per epoch)
    schedule: Literal["warmup_cosine", "epoch_cosine"] = "warmup_cosine"
    weight_decay: float = 0.1
    # "matrices": decay only projection matrices, never 1-D params, gates, norms or embeddings; "all": every
    # parameter (what a plain AdamW(model.parameters()) does)
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    batch_size: int = 32
    epochs: int = 10
    max_steps: int | None = None  # caps epochs * steps_per_epoch
    eval_every: int | None = None  # steps between evals; None: once per epoch
    patience: int | None = None  # evals without improvement before stopping
    target: float | None = None  # stop once the validation metric reaches this
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping (the norm is still logged)
    checkpoint_every: int = 200  # steps; the last checkpoint always lands at the end
    log_every: int = 10  # steps between logged train metrics (loss, lr, grad norm, throughput)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU; bf16: autocast with fp32 weights; pure_bf16: the whole model
    # (weights, gradients, optimizer state) in bf16, recurrent states still fp32 inside the ops
    precision: Literal["auto", "fp32", "bf16", "pure_bf16"] = "auto"
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    # torch.compile the model's torch parts for training steps (the recurrence ops run as they are); if
    # compilation fails on the first step the run warns once and trains eagerly (metrics.json says which)
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "eval_every", "must be >= 1")
        _check(self.patience is None or self.patience >= 1, "patience", "must be >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.log_every >= 1, "log_every", "must be >= 1")


@dataclass
class TrackingConfig:
    """MLflow tracking. The URI falls back to $MLFLOW_TRACKING_URI, then ``sqlite:///results/mlflow.db``."""

    enabled: bool = True
    experiment: str | None = None  # None: the run's name
    tracking_uri: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None  # nest under a sweep run
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything one run needs. ``task`` is the task's own typed config (see ``palimpsa.tasks``)."""

    name: str = "run"
    seed: int = 0
    task: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats. Raises FieldError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except FieldError as err:
                errors.append(err.message)
        raise FieldError(key, errors[0] if len(errors) == 1 else f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return parse_dataclass(tp, value, prefix=f"{key}.")
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}"
        )
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def parse_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from a plain mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FieldError(f"{prefix}{key}", f"unknown key{hint}; allowed: {names}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except FieldError as err:
        if err.key.startswith(prefix):  # raised by a nested parse: already a full path
            raise
        raise FieldError(f"{prefix}{err.key}", err.message) from None


def parse_task(data: Any, prefix: str = "task.") -> Any:
    """Build the typed config of the task named by ``data['name']``."""
    _check(isinstance(data, dict), prefix.rstrip("."), "expected a mapping with a 'name'")
    name = data.get("name")
    known = isinstance(name, str) and name in TASK_CONFIGS
    _check(known, f"{prefix}name", f"must be one of {sorted(TASK_CONFIGS)}, got {name!r}")
    return parse_dataclass(TASK_CONFIGS[name], data, prefix=prefix)


def config_from_dict(data: Any, source: str | Path | None = None) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; errors become :class:`ConfigError`."""
    try:
        _check(isinstance(data, dict), "", "the config must be a YAML mapping")
        _check("task" in data, "task", "missing; every run needs a task")
        secret = find_password(data)  # the config is copied into run folders, MLflow artifacts, job logs
        if secret is not None:
            raise FieldError(secret[0], password_message(secret[1]))
        raw = dict(data)
        task = parse_task(raw.pop("task"))
        cfg = parse_dataclass(RunConfig, raw)
        cfg.task = task
        _check_cross_fields(cfg)
    except FieldError as err:
        raise ConfigError(err.key, err.message, source) from None
    return cfg


def _check_cross_fields(cfg: RunConfig) -> None:
    vocab = getattr(cfg.task, "vocab_size", None)
    if cfg.model.vocab_size is not None and vocab is not None:
        _check(cfg.model.vocab_size >= vocab, "model.vocab_size", f"smaller than the task's vocab ({vocab})")


def set_dotted(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError("", f"override {assignment!r} is not of the form key=value", "--set")
    try:
        set_key(data, key.strip(), yaml_load(text))
    except DottedKeyError as err:
        raise ConfigError(key, err.message, "--set") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from YAML, apply ``--set`` overrides, validate."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except YamlFileError as err:
        raise ConfigError("", err.message, path) from None
    data = {} if data is None else data
    if isinstance(data, dict):
        for assignment in overrides:
            set_dotted(data, assignment)
    return config_from_dict(data, source=path)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested mapping (YAML- and JSON-safe) that :func:`config_from_dict` reads back."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config_to_dict(cfg)))
