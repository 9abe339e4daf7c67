"""Ablation grids: declarative YAML that expands into validated, stably named run configs.

A grid file (``ablations/*.yaml``) composes a run config from layers, lowest precedence first::

    base            a run config file (or an inline mapping)
    overrides_from  YAML files of dotted overrides, e.g. a tuning study's best.yaml (may not exist yet)
    overrides       dotted key -> value, applied to every point
    variants        name -> dotted overrides; named alternatives crossed with the axes below
    zip             dotted key -> list, all lists of one length, walked together (a list of such
                    mappings gives several zip groups, each crossed with the rest)
    product         dotted key -> list, the Cartesian product
    union           a list of sub-grids (same keys, minus base/description); each inherits everything
                    above and adds its own axes; the grid's points are the union of theirs

``extends: other.yaml`` inherits another grid's keys (mappings merge key by key, this file wins).
Every point is validated as a :class:`~palimpsa.config.RunConfig`, so a typo or a wrong type fails
before anything runs, with one message naming the grid file and the key, e.g.
``ablations/scale.yaml: product.model.d_modle: unknown key (did you mean 'd_model'?)``.

Point ids are a readable label of the point's axis values plus a hash of its resolved config, e.g.
``palimpsa_K16_ip0.25_s0-3fa2c1d0``: editing one point's values changes only that point's id, so the
workflow reruns only it; adding a value to an axis leaves the ids of the other points alone.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from palimpsa.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from palimpsa.credentials import find_password, has_password, password_message
from palimpsa.io import DottedKeyError, YamlFileError, flatten, read_yaml, set_key

GRID_KEYS = (
    "description",
    "base",
    "extends",
    "experiment",
    "overrides_from",
    "overrides",
    "variants",
    "zip",
    "product",
    "union",
    "tags",
)
MEMBER_KEYS = ("overrides", "variants", "zip", "product", "union")

# Keys that change how a run executes, not what it computes: left out of the point hash, so moving
# a grid from a laptop to a GPU box (device, threads) does not rename and rerun every point.
EXECUTION_KEYS = (
    "name",
    "tracking",
    "train.device",
    "train.num_threads",
    "train.checkpoint_every",
)

# Short labels for the axes that ablations vary most; any other key is labelled by its last part.
AXIS_LABELS = {
    "model.mixer.kind": "",
    "model.mixer.gates": "",
    "task.name": "",
    "model.mixer.head_k_dim": "K",
    "model.mixer.head_v_dim": "V",
    "model.mixer.num_heads": "H",
    "model.d_model": "d",
    "model.n_layers": "nl",
    "task.seq_len": "T",
    "task.num_kv_pairs": "kv",
    "task.variant": "",
    "model.mixer.ip": "ip",
    "model.mixer.ip_trainable": "iptrain",
    "model.mixer.n_init": "N",
    "model.mixer.metaplastic": "meta",
    "model.mixer.beta_rank": "rank",
    "model.mixer.b_scale_init": "bscale",
    "train.lr": "lr",
    "train.batch_size": "b",
    "seed": "s",
}


class GridError(ConfigError):
    """A user error in a grid file: names the file and the key (``product.model.d_model``)."""


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid.

    ``config`` is the resolved run config without ``overrides_from`` (those files may be produced by
    the workflow itself); :meth:`resolve` applies them below every key in ``locked``.
    """

    grid: str
    point_id: str
    label: str
    axes: dict[str, Any]
    config: dict[str, Any]
    locked: frozenset[str]
    overrides_from: tuple[str, ...] = ()

    def resolve(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full run config mapping, with ``overrides_from`` files read now; validated."""
        cfg = copy.deepcopy(self.config)
        for path in self.overrides_from:
            for key, value in read_overrides(path).items():
                if key not in self.locked:
                    set_key(cfg, key, value, origin=f"{path}: {key}")
        for key, value in (extra or {}).items():
            set_key(cfg, key, value, origin=key)
        return config_to_dict(config_from_dict(cfg, source=f"grid {self.grid}, point {self.point_id}"))


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    experiment: str
    points: list[GridPoint]
    overrides_from: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)

    def point(self, point_id: str) -> GridPoint:
        for p in self.points:
            if p.point_id == point_id:
                return p
        raise KeyError(f"grid {self.name} has no point {point_id!r}")


# --------------------------------------------------------------------------- dotted keys


def read_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of dotted overrides (a study's best.yaml); nested mappings are flattened."""
    path = Path(path)
    try:
        data = read_yaml(path, "overrides file")
    except YamlFileError as err:
        raise GridError("", err.message, path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GridError("", "expected a mapping of dotted keys to values", path)
    if "overrides" in data and isinstance(data["overrides"], dict):  # best.yaml carries metadata too
        data = data["overrides"]
    return flatten(data, whole=("tracking.tags",))


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path, what: str = "grid") -> dict[str, Any]:
    try:
        data = read_yaml(path, f"{what} file")
    except YamlFileError as err:
        raise GridError("", err.message, path) from None
    if not isinstance(data, dict):
        raise GridError("", f"a {what} must be a YAML mapping", path)
    return data


def resolve_path(ref: str, relative_to: Path) -> Path:
    """A path in a grid: relative to the grid's folder if it exists there, else to the working dir."""
    candidate = relative_to.parent / ref
    return candidate if candidate.exists() or not Path(ref).exists() else Path(ref)


SCHEMAS = Path(__file__).resolve().parent / "schemas"  # shipped with the package: grids and tuning specs


def schema_errors(data: Any, schema: str | Path) -> list[tuple[str, str]]:
    """JSON-schema check; (dotted key, message) pairs, empty if valid. ``schema`` is a file name under
    :data:`SCHEMAS` (``grid.schema.yaml``, ``tune.schema.yaml``) or the path of another schema file."""
    schema_path = SCHEMAS / schema if isinstance(schema, str) else Path(schema)
    import jsonschema  # the lab's dependency, not the model's: a bare GPU box trains without it

    schema = read_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(data), key=lambda e: (len(e.absolute_path), str(list(e.absolute_path)))
    )
    out = []
    for err in errors:
        if err.validator in ("oneOf", "anyOf") and err.context:  # name the branch that came closest
            err = jsonschema.exceptions.best_match(err.context)
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err.absolute_path)
        key = key.replace(".[", "[")
        message = err.message
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            allowed = list(err.schema.get("properties", {}))
            if extra:
                close = difflib.get_close_matches(extra[0], allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                key = f"{key}.{extra[0]}" if key else extra[0]
                message = f"unknown key{hint}; allowed: {allowed}"
        elif err.validator == "minItems" and err.validator_value == 1:
            message = "empty list: an axis needs at least one value"
        elif err.validator == "minProperties":
            message = "empty mapping: give at least one key"
        out.append((key, message))
    return out


def _load_spec(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The grid's raw keys with ``extends`` resolved and file references made absolute."""
    if path.resolve() in chain:
        raise GridError("extends", "circular extends: " + " -> ".join(str(p) for p in (*chain, path)), path)
    data = _read_yaml(path)
    errors = schema_errors(data, "grid.schema.yaml")
    if errors:
        key, message = errors[0]
        raise GridError(key, message, path)
    secret = find_password(data)  # grids end up in job params, run.yaml and MLflow tags
    if secret is not None:
        raise GridError(secret[0], password_message(secret[1]), path)
    spec = {k: v for k, v in data.items() if k != "extends"}
    for key in ("base",):
        if isinstance(spec.get(key), str):
            ref = resolve_path(spec[key], path)
            spec[key] = ref
    if "overrides_from" in spec:
        refs = spec["overrides_from"]
        refs = [refs] if isinstance(refs, str) else refs
        spec["overrides_from"] = [os.path.normpath(resolve_path(r, path)) for r in refs]
    spec["_origin"] = {k: path for k in spec}
    if "extends" not in data:
        return spec
    parent = _load_spec(resolve_path(data["extends"], path), (*chain, path.resolve()))
    merged = dict(parent)
    origin = dict(parent["_origin"])
    for key, value in spec.items():
        if key == "_origin":
            continue
        if key in ("overrides", "product", "variants", "tags") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "overrides_from":
            merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
        else:
            merged[key] = value
        origin[key] = path
    merged["_origin"] = origin
    return merged


# --------------------------------------------------------------------------- expansion


@dataclass
class _Assignment:
    key: str  # dotted config key
    value: Any
    origin: str  # where it is written in the grid, e.g. "product.seed" or "union[1].zip.model.d_model"
    axis: bool  # part of the point label (axes), not a plain override
    label: str | None = None  # a variant's name


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]
    return str(value)


def _label_part(a: _Assignment) -> str:
    if a.label is not None:
        return a.label
    alias = AXIS_LABELS.get(a.key, a.key.rsplit(".", 1)[-1])
    value = _fmt_value(a.value)
    if isinstance(a.value, bool) and alias:
        return f"{alias}-{value}"
    return f"{alias}{value}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.")[:80]


def _block_choices(block: dict[str, Any], where: str, source: Path) -> list[list[_Assignment]]:
    """The axis choices of one grid or union member: a list of alternatives, each a list of assignments."""
    factors: list[list[list[_Assignment]]] = []
    variants = block.get("variants") or {}
    if variants:
        factors.append(
            [
                [_Assignment("", None, f"{where}variants.{name}", True, label=str(name))]
                + [_Assignment(k, v, f"{where}variants.{name}.{k}", False) for k, v in (sets or {}).items()]
                for name, sets in variants.items()
            ]
        )
    zips = block.get("zip") or []
    for gi, group in enumerate([zips] if isinstance(zips, dict) else zips):
        gwhere = f"{where}zip." if isinstance(zips, dict) else f"{where}zip[{gi}]."
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            key = next(iter(k for k in lengths if lengths[k] != next(iter(lengths.values()))))
            raise GridError(f"{gwhere}{key}", f"zipped lists must have equal lengths, got {lengths}", source)
        n = next(iter(lengths.values()))
        factors.append(
            [[_Assignment(k, v[i], f"{gwhere}{k}", True) for k, v in group.items()] for i in range(n)]
        )
    for key, values in (block.get("product") or {}).items():
        factors.append([[_Assignment(key, v, f"{where}product.{key}", True)] for v in values])
    for factor_where, seq in _axis_lists(block, where):
        _reject_duplicate_values(seq, factor_where, source)
    return [sum(combo, []) for combo in itertools.product(*factors)] if factors else [[]]


def _axis_lists(block: dict[str, Any], where: str) -> list[tuple[str, list[Any]]]:
    out = [(f"{where}product.{k}", v) for k, v in (block.get("product") or {}).items()]
    zips = block.get("zip") or []
    groups = [zips] if isinstance(zips, dict) else zips
    for gi, group in enumerate(groups):
        gwhere = f"{where}zip." if isinstance(zips, dict) else f"{where}zip[{gi}]."
        rows = list(zip(*group.values(), strict=False))
        out.append((gwhere + ",".join(group), rows))
    return out


def _reject_duplicate_values(values: list[Any], where: str, source: Path) -> None:
    seen: list[str] = []
    for value in values:
        text = json.dumps(value, sort_keys=True, default=str)
        if text in seen:
            raise GridError(
                where, f"duplicate value {value!r}: the grid would run the same point twice", source
            )
        seen.append(text)


def _members(spec: dict[str, Any], where: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    """Flatten nested unions into (where, [blocks from outermost to innermost]) per leaf member."""
    unions = spec.get("union")
    if not unions:
        return [(where, [spec])]
    out = []
    for i, member in enumerate(unions):
        for mwhere, blocks in _members(member, f"{where}union[{i}]."):
            out.append((mwhere, [spec, *blocks]))
    return out


def _hash_view(cfg: dict[str, Any]) -> dict[str, Any]:
    view = copy.deepcopy(cfg)
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        node = view
        for part in parents:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(leaf, None)
    return view


def config_hash(cfg: dict[str, Any]) -> str:
    """Short stable hash of what a run computes: its values that differ from the defaults (execution-only
    keys left out). Relative to the defaults, so that a new option added at its default renames no point."""
    defaults = flatten(config_to_dict(config_from_dict({"task": {"name": cfg["task"]["name"]}})))
    view = {k: v for k, v in flatten(_hash_view(cfg)).items() if k not in defaults or defaults[k] != v}
    text = json.dumps(view, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _locate(key: str, assignments: list[_Assignment]) -> _Assignment | None:
    """The assignment that set config key ``key`` (or a parent or child of it), latest first."""
    for a in reversed(assignments):
        if a.key and (a.key == key or key.startswith(a.key + ".") or a.key.startswith(key + ".")):
            return a
    return None


def load_grid(path: str | Path, extra: dict[str, Any] | None = None, name: str | None = None) -> Grid:
    """Read, validate and expand a grid file.

    ``extra``: dotted overrides applied on top of every point (the workflow's run_overrides, e.g.
    ``train.num_threads``); ``name``: the grid's name, by default the file's stem.
    """
    path = Path(path)
    spec = _load_spec(path)
    origin: dict[str, Path] = spec.pop("_origin")
    name = name or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise GridError("", f"grid name {name!r} must be a slug (letters, digits, _ . + -)", path)
    if "base" not in spec:
        raise GridError("base", "missing: a grid needs a base run config (a file or an inline mapping)", path)
    base_ref = spec["base"]
    if isinstance(base_ref, Path):
        base = _read_yaml(base_ref, what="base config")
        base_source: str | Path = base_ref
    else:
        base = copy.deepcopy(base_ref)
        base_source = origin["base"]
    from_files = tuple(spec.get("overrides_from", []))
    from_values: dict[str, Any] = {}
    for ref in from_files:
        if Path(ref).is_file():  # absent until the workflow produces it; resolved again at run time
            from_values.update(read_overrides(ref))

    points: list[GridPoint] = []
    seen: dict[str, str] = {}
    extra = extra or {}
    for member_where, blocks in _members(spec):
        fixed: list[_Assignment] = []
        per_block: list[list[list[_Assignment]]] = []
        for depth, block in enumerate(blocks):
            bwhere = "" if depth == 0 else _nth_where(member_where, depth)
            src = origin.get("union", path) if depth else origin.get("product", path)
            fixed += [
                _Assignment(k, v, f"{bwhere}overrides.{k}", False)
                for k, v in (block.get("overrides") or {}).items()
            ]
            per_block.append(_block_choices(block, bwhere, src))
        for combo in itertools.product(*per_block):
            assignments = fixed + sum(combo, [])
            points.append(
                _make_point(name, path, base, base_source, assignments, from_files, from_values, extra, seen)
            )
    if not points:
        raise GridError("product", "the grid expands to no points", path)
    return Grid(
        name=name,
        path=path,
        description=str(spec.get("description", "")),
        experiment=str(spec.get("experiment") or name),
        points=points,
        overrides_from=from_files,
        tags={str(k): str(v) for k, v in (spec.get("tags") or {}).items()},
    )


def _nth_where(member_where: str, depth: int) -> str:
    parts = re.findall(r"union\[\d+\]\.", member_where)
    return "".join(parts[:depth])


def _make_point(
    grid: str,
    path: Path,
    base: dict[str, Any],
    base_source: str | Path,
    assignments: list[_Assignment],
    from_files: tuple[str, ...],
    from_values: dict[str, Any],
    extra: dict[str, Any],
    seen: dict[str, str],
) -> GridPoint:
    cfg = copy.deepcopy(base)
    applied: list[_Assignment] = []
    locked = frozenset(a.key for a in assignments if a.key) | frozenset(extra)
    try:
        for a in assignments:
            if a.key:
                set_key(cfg, a.key, a.value, a.origin)
                applied.append(a)
        for key, value in extra.items():
            set_key(cfg, key, value, f"run_overrides.{key}")
    except DottedKeyError as err:
        raise GridError(err.origin, err.message, path) from None
    probe = copy.deepcopy(cfg)
    from_applied = []
    for key, value in from_values.items():
        if key not in locked:
            set_key(probe, key, value, key)
            from_applied.append(key)
    try:
        run_cfg: RunConfig = config_from_dict(probe)
        config_from_dict(cfg)
    except ConfigError as err:
        culprit = _locate(err.key, applied)
        if culprit is not None:
            raise GridError(culprit.origin, err.message, path) from None
        if err.key in extra:
            raise GridError(f"run_overrides.{err.key}", err.message, "workflow config") from None
        if any(err.key == k or err.key.startswith(k + ".") for k in from_applied):
            raise GridError(err.key, err.message, " / ".join(from_files)) from None
        raise GridError(err.key, f"{err.message} (grid {path})", base_source) from None
    del run_cfg
    canonical = config_to_dict(config_from_dict(cfg))
    axes_list = [a for a in assignments if a.axis]
    label = "_".join(filter(None, (_slug(_label_part(a)) for a in axes_list))) or "point"
    digest = config_hash(canonical)
    point_id = f"{label}-{digest}"
    where = ", ".join(a.origin for a in axes_list) or "base"
    if digest in seen:
        raise GridError(
            where.split(", ")[-1],
            f"duplicate point: {where} gives the same run config as {seen[digest]}",
            path,
        )
    seen[digest] = where
    axes = {}
    for a in axes_list:
        if a.label is not None:
            axes["variant"] = a.label
        else:
            axes[a.key] = a.value
    return GridPoint(
        grid=grid,
        point_id=point_id,
        label=label,
        axes=axes,
        config=canonical,
        locked=locked,
        overrides_from=from_files,
    )


def point_tags(grid: Grid, point: GridPoint) -> dict[str, str]:
    """The MLflow tags that tie a run to its grid point; the results tables read them back."""
    tags = {"grid": grid.name, "grid.point": point.point_id, "palimpsa.role": "point"}
    tags.update({f"axis.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in point.axes.items()})
    return tags


def write_point(
    point: GridPoint,
    grid: Grid,
    sweep_file: str | Path | None,
    config_out: str | Path,
    point_out: str | Path,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Materialize a point for the workflow: its full run config (tracking included) and its metadata.

    ``sweep_file`` is the grid's sweep.json (the parent MLflow run); ``overrides_from`` files are
    read now, so a new best.yaml from a tuning study reaches the points that reference it.
    ``tracking_uri`` goes into run.yaml unless it holds a password: then the job reads it from
    ``$MLFLOW_TRACKING_URI``, as every job of the workflow can.
    """
    cfg = point.resolve()
    sweep = json.loads(Path(sweep_file).read_text()) if sweep_file else {}
    tags = {**cfg["tracking"].get("tags", {}), **grid.tags, **point_tags(grid, point)}
    cfg["name"] = f"{grid.name}/{point.point_id}"
    cfg["tracking"].update(
        experiment=grid.experiment,
        run_name=point.point_id,
        parent_run_id=sweep.get("run_id"),
        tags={k: str(v) for k, v in tags.items()},
    )
    if tracking_uri and not has_password(tracking_uri):
        cfg["tracking"]["tracking_uri"] = tracking_uri
    cfg = config_to_dict(config_from_dict(cfg, source=f"grid {grid.name}, point {point.point_id}"))
    meta = {
        "grid": grid.name,
        "grid_file": str(grid.path),
        "experiment": grid.experiment,
        "point": point.point_id,
        "label": point.label,
        "axes": point.axes,
        "config_hash": config_hash(cfg),
        "overrides_from": list(point.overrides_from),
    }
    for path, text in (
        (
            Path(config_out),
            f"# {grid.name}/{point.point_id}: {grid.description}\n" + yaml.safe_dump(cfg, sort_keys=False),
        ),
        (Path(point_out), json.dumps(meta, indent=1, default=str) + "\n"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return cfg


def add_arguments(parser: Any) -> None:
    parser.add_argument("grids", nargs="+", help="grid YAML files")
    parser.add_argument("--json", action="store_true", help="print the points as JSON")


def run_cli(args: Any) -> int:
    """Validate grids and list their points; a malformed grid prints one line and returns 2."""
    import sys

    out = []
    try:
        for ref in args.grids:
            grid = load_grid(ref)
            if args.json:
                points = [{"id": p.point_id, "axes": p.axes} for p in grid.points]
                out.append({"grid": grid.name, "points": points})
            else:
                print(f"{grid.name}: {len(grid.points)} points ({grid.description})")
                for p in grid.points:
                    print(f"  {p.point_id}  {json.dumps(p.axes, default=str)}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `palimpsa grid ... | head`
        return 0
    if args.json:
        print(json.dumps(out, indent=1, default=str))
    return 0


def cli_command(parser: Any) -> Any:
    """``palimpsa grid``: the CLI's subcommand hook (adds the arguments, returns the runner)."""
    add_arguments(parser)
    return run_cli


def main(argv: list[str] | None = None) -> int:
    """``palimpsa grid FILE...``: validate grids and list their points (id and axis values)."""
    import argparse

    parser = argparse.ArgumentParser(prog="palimpsa grid", description=main.__doc__)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
