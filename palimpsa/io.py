"""Reading and writing the project's files: one YAML dialect, dotted keys, flat views and atomic writes.

Every config, grid, tuning spec, override file and MLflow param is read through :func:`yaml_load`, so
``lr: 1e-3`` is the number 0.001 wherever it is written (plain YAML 1.1 reads it as a string).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """A SafeLoader that also reads ``1e-3`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class YamlFileError(ValueError):
    """A YAML file that is missing or malformed; the message names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path, self.message = str(path), message
        super().__init__(f"{path}: {message}")


def yaml_load(text: str) -> Any:
    """Parse YAML the way every file of the project is read (``1e-3`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """:func:`yaml_load` of a file; a missing or malformed file raises :class:`YamlFileError`."""
    path = Path(path)
    try:
        return yaml_load(path.read_text())
    except FileNotFoundError:
        raise YamlFileError(path, f"{what} not found") from None
    except yaml.YAMLError as err:
        raise YamlFileError(path, f"malformed YAML: {err}".replace("\n", " ")) from None


def dump_yaml(data: Any) -> str:
    """Block-style YAML in insertion order, readable back by :func:`yaml_load`."""
    return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------- dotted keys


class DottedKeyError(ValueError):
    """A dotted key runs through something that is not a mapping; ``origin`` says where it was written."""

    def __init__(self, origin: str, message: str):
        super().__init__(message)
        self.origin, self.message = origin, message


def set_key(data: dict[str, Any], dotted: str, value: Any, origin: str | None = None) -> None:
    """Set ``a.b.c`` in a nested mapping, creating parents. A mapping merges into a mapping key by key,
    except a different named choice (``task: {name: mad}`` over ``task: {name: mqar, ...}``), which
    replaces it so that no key of the old choice lingers."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DottedKeyError(origin or dotted, f"{part!r} is not a mapping in the config")
        node = child
    current = node.get(leaf)
    merge = isinstance(value, dict) and isinstance(current, dict)
    if merge and "name" in value and "name" in current and value["name"] != current["name"]:
        merge = False
    if merge:
        for key, sub in value.items():
            set_key(node, f"{leaf}.{key}", sub, origin)
    else:
        node[leaf] = copy.deepcopy(value)


def flatten(data: dict[str, Any], prefix: str = "", whole: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"model": {"d_model": 64}}`` -> ``{"model.d_model": 64}`` (MLflow params, table columns, override
    files). Keys listed in ``whole`` (dotted) keep their mapping as one value; empty mappings stay too."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in whole:
            out.update(flatten(value, f"{dotted}.", whole))
        else:
            out[dotted] = value
    return out
