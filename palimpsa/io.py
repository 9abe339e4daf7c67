"""Reading and writing the project's files: one YAML dialect, dotted keys, flat views and atomic writes.

Every config, grid, tuning spec, override file and MLflow param is read through :func:`yaml_load`, so
``lr: 1e-3`` is the number 0.001 wherever it is written (plain YAML 1.1 reads it as a string).
"""

from __future__ import annotations

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
