"""Credentials stay where the user put them: in the environment or in files the user controls.

Configs, grids, command lines and logs are readable by others (the MLflow UI, the process list of a shared
node, a results folder), so a URL with a password is refused there (:func:`reject_password`,
:func:`find_password`) and every URL the project writes has its password masked (:func:`mask_url`,
:func:`mask_text`): ``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db``. A secret
the project itself needs (the Optuna storage URL) is read from a named environment variable or an owner-only
file (:func:`read_secret`).

Standard library only: the run config checks itself with it.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from palimpsa.errors import ConfigError

MASK = "***"
# Query parameters that carry a secret in SQLAlchemy and HTTP URLs (``?password=...``).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "access_token", "api_key", "apikey")
WHERE_SECRETS_GO = (
    "put the URI in $MLFLOW_TRACKING_URI, a tracking server's credentials in MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD, or a PostgreSQL password in ~/.pgpass (the URL then names only the user)"
)

# scheme://user:password@host, the password up to the last '@' before the host (which has no '@' or '/').
_USERINFO = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'\"]*:)(?P<password>[^\s'\"]+)"
    r"(?P<tail>@[^\s@/?#'\"]*(?=[\s/?#'\"]|$))"
)
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:" + "|".join(SECRET_QUERY_KEYS) + r")=)(?P<secret>[^&;#\s'\"]*)", re.IGNORECASE
)


def mask_text(text: str) -> str:
    """``text`` with the password of every URL in it masked (error messages, log lines, tags)."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK + m["tail"], text)
    return _QUERY_SECRET.sub(lambda m: m["head"] + (MASK if m["secret"] else ""), text)


def mask_url(url: str | None) -> str | None:
    """One URL with its password (user info and secret query parameters) masked; the user name stays."""
    return None if url is None else mask_text(url)


def has_password(url: str | None) -> bool:
    """True when ``url`` carries a secret: a password in its user info or a secret query parameter."""
    if not url or "://" not in url:
        return False
    if mask_text(url) != url:
        return True
    try:
        return bool(urlsplit(url).password)
    except ValueError:  # a malformed port: judge by the text alone
        return False


def password_message(url: str) -> str:
    """Why a URL is refused and where its password goes instead; the URL itself shown masked."""
    return f"holds a password ({mask_url(url)}); {WHERE_SECRETS_GO}"


def reject_password(url: str | None, where: str) -> None:
    """Refuse a URL with a password where others can read it: ``where`` names the config key or option."""
    if url is not None and has_password(url):
        raise ConfigError(where, password_message(url))


def find_password(data: Any, key: str = "") -> tuple[str, str] | None:
    """(dotted key, value) of the first string in ``data`` (a config, a grid, a spec) holding a password."""
    if isinstance(data, dict):
        items: Iterable[tuple[str, Any]] = ((f"{key}.{k}" if key else str(k), v) for k, v in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(data))
    else:
        return (key, data) if isinstance(data, str) and has_password(data) else None
    return next((found for k, v in items if (found := find_password(v, k)) is not None), None)


def reject_passwords(data: Any, where: str | Path | None = None) -> None:
    """Refuse a mapping (a config, a grid, a study spec) with a password anywhere in it, naming the key."""
    found = find_password(data)
    if found is not None:
        raise ConfigError(found[0], password_message(found[1]), where)


def read_secret(env: str | None = None, file: str | Path | None = None) -> str:
    """The value of environment variable ``env`` or the first non-empty line of ``file`` (exactly one of
    them). The file must be readable by its owner only, as ``~/.pgpass`` and ssh keys must."""
    if (env is None) == (file is None):
        raise ValueError("read_secret needs exactly one of env and file")
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError(env, "environment variable is not set (or empty)")
        return value
    return _secret_file(Path(str(file)).expanduser())


def _secret_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError("", f"cannot read the secret file: {err.strerror}", path) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("", f"readable by others (mode {mode & 0o777:o}); chmod 600 it", path)
    value = next((line.strip() for line in lines if line.strip()), "")
    if not value:
        raise ConfigError("", "the secret file is empty", path)
    return value


def print_masked_traceback(file: TextIO | None = None) -> None:
    """The exception being handled, as Python prints it, with every URL's password masked: job logs keep
    no secret even when a library's error message quotes a connection URL."""
    text = "".join(traceback.format_exc())
    print(mask_text(text), end="", file=file or sys.stderr)
