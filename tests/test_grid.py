"""Grid files: composition, stable point ids, and rejection of malformed grids naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palimpsa.config import config_from_dict
from palimpsa.grid import GridError, load_grid, read_overrides
from palimpsa.tuning import load_tune_spec

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "seed": 0,
    "task": {
        "name": "mqar",
        "vocab_size": 16,
        "seq_len": 16,
        "num_kv_pairs": 2,
        "num_train": 64,
        "num_val": 16,
    },
    "model": {"d_model": 16, "n_layers": 1, "mixer": {"kind": "palimpsa", "head_k_dim": 8, "head_v_dim": 8}},
    "train": {"lr": 1.0e-2, "max_steps": 10},
}


def write_grid(tmp_path: Path, spec: dict, name: str = "g.yaml") -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / name
    path.write_text(
        yaml.safe_dump({"description": "test grid", "base": "base.yaml", **spec}, sort_keys=False)
    )
    return path


def reject(tmp_path: Path, spec: dict) -> GridError:
    path = write_grid(tmp_path, spec)
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert str(path) in str(info.value), "the message must name the grid file"
    return info.value


# --------------------------------------------------------------------------- composition


def test_product_zip_overrides_compose(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(
            tmp_path,
            {
                "overrides": {"train.lr": 3.0e-3},
                "zip": {"model.d_model": [16, 32], "model.n_layers": [1, 2]},
                "product": {"model.mixer.kind": ["palimpsa", "mamba2"], "seed": [0, 1]},
            },
        )
    )
    assert len(grid.points) == 2 * 2 * 2
    pairs = {(p.config["model"]["d_model"], p.config["model"]["n_layers"]) for p in grid.points}
    assert pairs == {(16, 1), (32, 2)}, "zip walks lists together, never crosses them"
    assert {p.config["train"]["lr"] for p in grid.points} == {3.0e-3}
    assert grid.experiment == "g" and grid.name == "g"
    for p in grid.points:  # every point is a valid run config
        config_from_dict(p.config)
        assert set(p.axes) == {"model.d_model", "model.n_layers", "model.mixer.kind", "seed"}


def test_union_variants_and_inherited_axes(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(
            tmp_path,
            {
                "product": {"seed": [0, 1]},
                "union": [
                    {"product": {"model.mixer.kind": ["mamba2", "gated_deltanet"]}},
                    {
                        "overrides": {"model.mixer.kind": "palimpsa"},
                        "variants": {"param-matched": {}, "state-matched": {"model.mixer.head_v_dim": 4}},
                    },
                ],
            },
        )
    )
    assert len(grid.points) == 2 * (2 + 2)
    variants = [p for p in grid.points if "variant" in p.axes]
    assert {p.axes["variant"] for p in variants} == {"param-matched", "state-matched"}
    state = [p for p in variants if p.axes["variant"] == "state-matched"]
    assert all(p.config["model"]["mixer"]["head_v_dim"] == 4 for p in state)
    assert all(p.config["model"]["mixer"]["kind"] == "palimpsa" for p in variants)
    assert all("state-matched" in p.point_id for p in state)


def test_variant_can_swap_the_task(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(
            tmp_path,
            {"variants": {"mqar": {}, "icr": {"task": {"name": "mad", "variant": "in_context_recall"}}}},
        )
    )
    tasks = {p.axes["variant"]: p.config["task"] for p in grid.points}
    assert tasks["icr"]["name"] == "mad" and "num_kv_pairs" not in tasks["icr"]
    assert tasks["mqar"]["name"] == "mqar"


def test_extends_merges_mappings(tmp_path: Path) -> None:
    parent = write_grid(
        tmp_path, {"overrides": {"train.lr": 1.0e-3}, "product": {"seed": [0, 1]}}, "parent.yaml"
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump({"extends": parent.name, "product": {"model.mixer.kind": ["mamba2", "palimpsa"]}})
    )
    grid = load_grid(child)
    assert len(grid.points) == 4 and grid.name == "child"
    assert {p.config["train"]["lr"] for p in grid.points} == {1.0e-3}


def test_overrides_from_sits_below_the_grid_keys(tmp_path: Path) -> None:
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"overrides": {"model.mixer.ip": 3.0, "seed": 99}}))
    grid = load_grid(write_grid(tmp_path, {"overrides_from": "best.yaml", "product": {"seed": [0, 1]}}))
    resolved = [p.resolve() for p in grid.points]
    assert {c["model"]["mixer"]["ip"] for c in resolved} == {3.0}
    assert {c["seed"] for c in resolved} == {0, 1}, "a key the grid sets wins over the file"
    assert read_overrides(best) == {"model.mixer.ip": 3.0, "seed": 99}


def test_overrides_from_may_not_exist_yet(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, {"overrides_from": "later/best.yaml", "product": {"seed": [0]}}))
    assert grid.overrides_from == (str(tmp_path / "later" / "best.yaml"),)


# --------------------------------------------------------------------------- stable ids


def test_ids_are_readable_stable_and_unique(tmp_path: Path) -> None:
    spec = {"product": {"model.mixer.kind": ["palimpsa", "mamba2"], "model.mixer.ip": [0.5, 4.0]}}
    first = [p.point_id for p in load_grid(write_grid(tmp_path, spec)).points]
    again = [p.point_id for p in load_grid(write_grid(tmp_path, spec)).points]
    assert first == again and len(set(first)) == 4
    assert first[0].startswith("palimpsa_ip0.5-")


def test_changing_one_point_renames_only_it(tmp_path: Path) -> None:
    spec = {"product": {"model.mixer.kind": ["palimpsa", "mamba2"], "seed": [0, 1]}}
    before = {p.point_id for p in load_grid(write_grid(tmp_path, spec)).points}
    spec["product"]["seed"] = [0, 2]
    after = {p.point_id for p in load_grid(write_grid(tmp_path, spec)).points}
    assert len(before & after) == 2 and len(after - before) == 2  # the seed-0 points keep their ids
    spec["product"]["seed"] = [0, 2, 3]
    grown = {p.point_id for p in load_grid(write_grid(tmp_path, spec)).points}
    assert after <= grown, "adding a value leaves the other points alone"


def test_execution_keys_do_not_rename_points(tmp_path: Path) -> None:
    path = write_grid(tmp_path, {"product": {"seed": [0, 1]}})
    plain = [p.point_id for p in load_grid(path).points]
    threaded = load_grid(path, extra={"train.num_threads": 1, "train.device": "cpu"})
    assert [p.point_id for p in threaded.points] == plain
    assert all(p.config["train"]["num_threads"] == 1 for p in threaded.points)


# --------------------------------------------------------------------------- rejections


def test_rejects_unknown_axis(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"model.d_modle": [16, 32]}})
    assert "product.model.d_modle" in str(err) and "d_model" in str(err)


def test_rejects_unknown_nested_override(tmp_path: Path) -> None:
    err = reject(tmp_path, {"overrides": {"model.mixer.foo": 1}})
    assert "overrides.model.mixer.foo" in str(err)


def test_rejects_wrong_type(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"model.d_model": [16, "wide"]}})
    assert "product.model.d_model" in str(err) and "integer" in str(err)


def test_rejects_invalid_value(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"model.mixer.kind": ["palimpsa", "mamba3"]}})
    assert "product.model.mixer.kind" in str(err) and "mamba3" in str(err)


def test_rejects_empty_axis(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"seed": []}})
    assert "product.seed" in str(err) and "empty" in str(err)


def test_rejects_empty_product(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {}})
    assert "product" in str(err) and "empty" in str(err)


def test_rejects_duplicate_value(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"seed": [0, 1, 0]}})
    assert "product.seed" in str(err) and "duplicate" in str(err)


def test_rejects_duplicate_point_across_union(tmp_path: Path) -> None:
    err = reject(
        tmp_path,
        {
            "union": [
                {"product": {"model.mixer.kind": ["mamba2"]}},
                {"product": {"model.mixer.kind": ["mamba2"]}},
            ]
        },
    )
    assert "duplicate point" in str(err) and "union[1].product.model.mixer.kind" in str(err)


def test_rejects_duplicate_point_from_variants(tmp_path: Path) -> None:
    err = reject(tmp_path, {"variants": {"a": {"seed": 1}, "b": {"seed": 1}}})
    assert "duplicate point" in str(err) and "variants.b" in str(err)


def test_rejects_unequal_zip(tmp_path: Path) -> None:
    err = reject(tmp_path, {"zip": {"model.d_model": [16, 32], "model.n_layers": [1]}})
    assert "zip.model" in str(err) and "equal lengths" in str(err)


def test_rejects_unknown_grid_key(tmp_path: Path) -> None:
    err = reject(tmp_path, {"prodcut": {"seed": [0]}})
    assert "prodcut" in str(err) and "product" in str(err)


def test_rejects_axis_that_is_not_a_list(tmp_path: Path) -> None:
    err = reject(tmp_path, {"product": {"seed": 3}})
    assert "product.seed" in str(err) and "array" in str(err)


def test_rejects_bad_base_value_naming_the_base(tmp_path: Path) -> None:
    path = write_grid(tmp_path, {"product": {"seed": [0]}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "model": {"d_model": "x"}}))
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert "base.yaml" in str(info.value) and "model.d_model" in str(info.value)


def test_cli_prints_one_error_line(tmp_path: Path) -> None:
    path = write_grid(tmp_path, {"product": {"model.d_model": ["wide"]}})
    proc = subprocess.run(
        [sys.executable, "-m", "palimpsa.grid", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "product.model.d_model" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the shipped grids


def shipped() -> list[Path]:
    return sorted((ROOT / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.name)
def test_every_shipped_grid_and_study_is_valid(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if "task" in data:  # a plain run config, e.g. mqar-tiny.yaml
        config_from_dict(data, source=path)
    elif path.name.startswith("tune-"):
        spec = load_tune_spec(path)
        assert spec.n_trials >= 1 and spec.space
    else:
        grid = load_grid(path)
        assert grid.points and grid.description


def test_smoke_grid_covers_the_acceptance_axes() -> None:
    grid = load_grid(ROOT / "ablations" / "smoke.yaml")
    kinds = {p.config["model"]["mixer"]["kind"] for p in grid.points}
    states = {p.config["model"]["mixer"]["head_k_dim"] for p in grid.points}
    priors = {p.config["model"]["mixer"]["ip"] for p in grid.points if "model.mixer.ip" in p.axes}
    assert len(grid.points) >= 12 and len(kinds) >= 3 and len(states) >= 2 and len(priors) >= 2
