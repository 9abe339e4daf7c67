"""A throwaway PostgreSQL server for tests: its own data folder, a free loopback port, trust auth except for
:data:`PASSWORD_ROLE`, which must give its password (:func:`password_database` creates it and its databases).

``$PALIMPSA_TEST_POSTGRES_URL`` (a server URL without a database) is used as is when set. Otherwise the
server binaries are looked up on PATH and under /usr/lib/postgresql; as root, the server runs as the
``postgres`` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

PASSWORD_ROLE = "palimpsa_pw"  # the one role that logs in with a password (scram-sha-256) over TCP
HBA = f"""local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all {PASSWORD_ROLE} ::1/128 scram-sha-256
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
"""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available() -> str | None:
    """None when a server can be had, else the reason it cannot."""
    if os.environ.get("PALIMPSA_TEST_POSTGRES_URL"):
        return None
    if not (_binary("initdb") and _binary("pg_ctl")):
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser to drop to the postgres user"
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield ``postgresql://user@127.0.0.1:PORT`` for a server that lives as long as the context."""
    url = os.environ.get("PALIMPSA_TEST_POSTGRES_URL")
    if url:
        yield url.rstrip("/")
        return
    # Its own folder directly under the system temp dir: the postgres user must be able to reach it.
    workdir = Path(tempfile.mkdtemp(prefix="palimpsa-pg-"))
    workdir.chmod(0o755)
    data, log = workdir / "pgdata", workdir / "postgres.log"
    as_user: list[str] = []
    user = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        as_user, user = ["runuser", "-u", "postgres", "--"], "postgres"
        shutil.chown(workdir, "postgres")
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(_binary("initdb"), "-D", str(data), "-A", "trust", "-U", user, "--no-sync")
    (data / "pg_hba.conf").write_text(HBA)
    opts = f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off -c max_connections=200"
    run(_binary("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "start")
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"postgresql://{user}@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_user, _binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` (dropping an old one) and return its URL."""
    import psycopg2

    conn = psycopg2.connect(f"{server_url}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"{server_url}/{name}"


def password_database(server_url: str, name: str, password: str) -> str:
    """Create database ``name`` owned by :data:`PASSWORD_ROLE` (whose password becomes ``password``) and
    return its URL with the password in it, as a user would keep it in an environment variable."""
    import psycopg2

    conn = psycopg2.connect(f"{server_url}/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_ROLE,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(f"{verb} ROLE {PASSWORD_ROLE} LOGIN PASSWORD %s", (password,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}" OWNER {PASSWORD_ROLE}')
    conn.close()
    host = urlsplit(server_url).netloc.rpartition("@")[2]
    return f"postgresql://{PASSWORD_ROLE}:{quote(password, safe='')}@{host}/{name}"
