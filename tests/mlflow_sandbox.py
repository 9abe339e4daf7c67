"""A throwaway MLflow tracking server for tests, set up as the README's team recipe sets one up.

A free loopback port and a folder of its own; the backend store URI reaches the server through
``MLFLOW_BACKEND_STORE_URI`` (its command line shows in the process list). With ``admin_password`` it runs
MLflow's basic-auth app: users in ``<folder>/auth.db``, an owner-only auth config, the admin password and
the secret key from the environment, ``--allowed-hosts`` set. The whole process group is stopped on exit.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ADMIN = "admin"
Login = tuple[str, str]  # (username, password)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _auth_config(folder: Path) -> Path:
    """The basic-auth app's config, owner-only: every user reads the runs, only the owner changes them."""
    ini = folder / "auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # one password hash per user and minute, not per request
    )
    ini.chmod(0o600)
    return ini


def _server_env(backend_uri: str) -> dict[str, str]:
    """The caller's environment without its own tracking settings, plus the backend store URI."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MLFLOW_BACKEND_STORE_URI": backend_uri}


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while status(f"{url}/health") != 200:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(
                f"mlflow server did not come up (exit {proc.poll()}): {log.read_text()[-3000:]}"
            )
        time.sleep(0.3)


@contextmanager
def mlflow_server(
    folder: Path, backend_uri: str, *, admin_password: str | None = None, workers: int = 2
) -> Iterator[str]:
    """Yield the URL of a server on ``backend_uri`` with artifacts in ``folder/mlartifacts``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = _server_env(backend_uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", str(folder / "mlartifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if admin_password is not None:
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(_auth_config(folder)),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
        cmd += ["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    log = folder / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def call(url: str, login: Login | None = None, body: dict | None = None) -> tuple[int, Any]:
    """(HTTP status, JSON reply or None) of a GET or a POST of ``body``, with basic auth given a ``login``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if login is not None:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            text = reply.read().decode()
            return reply.status, json.loads(text) if text.startswith(("{", "[")) else None
    except urllib.error.HTTPError as err:
        return err.code, None
    except OSError:
        return 0, None


def status(url: str, login: Login | None = None, body: dict | None = None) -> int:
    return call(url, login, body)[0]


def create_user(url: str, admin: Login, username: str, password: str) -> None:
    """A team member's login, created by the admin (what the README's recipe does once per person)."""
    code = status(f"{url}/api/2.0/mlflow/users/create", admin, {"username": username, "password": password})
    if code != 200:
        raise RuntimeError(f"creating MLflow user {username!r} answered HTTP {code}")
