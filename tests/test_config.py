"""The run config: strict parsing, dotted-key errors, overrides, and a fuzzed validator."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palimpsa.config import (
    MIXER_KINDS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from palimpsa.io import flatten, read_yaml

ROOT = Path(__file__).resolve().parents[1]
VALID = {
    "name": "t",
    "task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4},
    "model": {"d_model": 32, "n_layers": 1, "mixer": {"kind": "palimpsa", "head_k_dim": 8}},
    "train": {"lr": 0.01, "max_steps": 10},
}


def test_valid_config_round_trips(tmp_path: Path) -> None:
    cfg = config_from_dict(copy.deepcopy(VALID))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.mixer.head_k_dim == 8 and cfg.task.num_kv_pairs == 4
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert flatten(config_to_dict(cfg))["model.mixer.kind"] == "palimpsa"


def test_ints_are_accepted_for_floats_but_not_bools_for_ints() -> None:
    data = copy.deepcopy(VALID)
    data["train"]["lr"] = 1
    assert config_from_dict(data).train.lr == 1.0
    data["model"]["d_model"] = True
    with pytest.raises(ConfigError, match=r"model\.d_model: expected an integer"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("model", "mixer", "kind"), "mamba3", "model.mixer.kind"),
        (("model", "mixer", "ip"), -1.0, "model.mixer.ip"),
        (("model", "mixer", "gates"), "other", "model.mixer.gates"),
        (("model", "n_layers"), 0, "model.n_layers"),
        (("train", "lr"), "fast", "train.lr"),
        (("train", "batch_size"), 2.5, "train.batch_size"),
        (("task", "num_kv_pairs"), 9, "task.num_kv_pairs"),
        (("model", "mixer", "hedas"), 2, "model.mixer.hedas"),
        (("tracking", "tags"), [1], "tracking.tags"),
    ],
)
def test_bad_values_name_the_dotted_key(path: tuple[str, ...], value: object, key: str) -> None:
    data = copy.deepcopy(VALID)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="grid.yaml")
    assert err.value.key == key
    assert str(err.value).startswith(f"grid.yaml: {key}: ")


def test_unknown_key_suggests_the_close_one() -> None:
    data = copy.deepcopy(VALID)
    data["train"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key \(did you mean 'lr'\?\)"):
        config_from_dict(data)


def test_qk_norm_takes_only_its_choices() -> None:
    data = copy.deepcopy(VALID)
    data["model"]["mixer"]["qk_norm"] = "rms"
    with pytest.raises(ConfigError, match=r"model\.mixer\.qk_norm: .*'rms'"):
        config_from_dict(data)


def test_overrides_and_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(VALID))
    cfg = load_config(path, ["model.mixer.kind=mamba2", "train.lr=3e-3", "model.mixer.ip=10"])
    assert (cfg.model.mixer.kind, cfg.train.lr, cfg.model.mixer.ip) == ("mamba2", 3e-3, 10.0)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["model.mixer.kind"])
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML"):
        load_config(bad)


def test_shipped_run_configs_are_valid() -> None:
    """Every run config the project ships (grids are checked by the grid tests) loads cleanly."""
    ablations = ROOT / "ablations"
    candidates = sorted(ablations.glob("mqar-*.yaml")) + sorted((ablations / "base").glob("*.yaml"))
    paths = [p for p in candidates if not {"base", "extends"} & set(read_yaml(p))]  # the rest are grids
    assert len(paths) >= 4, paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.task.name in ("mqar", "lm") and cfg.model.mixer.kind in MIXER_KINDS, path


# --------------------------------------------------------------------------- fuzzing the validator

_KEYS = sorted(flatten(config_to_dict(config_from_dict(copy.deepcopy(VALID)))))
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def malformed_configs(draw: st.DrawFn) -> tuple[dict, str]:
    """A valid config with one to three keys replaced by junk or added under a made-up name."""
    data = copy.deepcopy(VALID)
    touched = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if draw(st.booleans()):
            key = draw(st.sampled_from(_KEYS))
        else:
            parent = draw(st.sampled_from(["", "model.", "model.mixer.", "train.", "task.", "tracking."]))
            key = parent + draw(st.from_regex(r"[a-z]{3,8}_x", fullmatch=True))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[leaf] = draw(_JUNK)
            touched.append(key)
    return data, ",".join(touched)


@settings(
    max_examples=int(os.environ.get("PALIMPSA_FUZZ_EXAMPLES", "250")),
    deadline=None,
    derandomize=os.environ.get("PALIMPSA_FUZZ_RANDOM") != "1",  # CI is reproducible; set it to explore
    suppress_health_check=[HealthCheck.too_slow],
)
@given(malformed_configs())
def test_validator_never_crashes_on_malformed_configs(case: tuple[dict, str]) -> None:
    """Either the config is still valid, or one ConfigError names a dotted key that exists in the input."""
    data, _ = case
    try:
        cfg = config_from_dict(data, source="fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml: ")
        assert "\n" not in str(err)
        assert re.fullmatch(r"[A-Za-z0-9_.\[\]]*", err.key), err.key
        head = err.key.split(".")[0].split("[")[0]
        assert head == "" or head in data, (err.key, data)
    else:
        assert isinstance(cfg, RunConfig)
