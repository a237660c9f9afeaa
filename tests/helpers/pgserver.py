"""A real PostgreSQL server for tests: Debian's binaries, initdb + pg_ctl on a temporary
folder, 127.0.0.1 only, a free port. It refuses to run as root, so as root it runs as the
``postgres`` user (``runuser -u postgres --``). Tests skip, saying why, where the binaries
(or psycopg) are absent.

The server has password authentication over TCP: user ``tilesweep`` owns database
``tilesweep``; its password is put in ``PGPASSWORD`` for the test session (so the CLI's
subprocesses find it the way users' do), never in a URL.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

PASSWORD = "pg-secret-7f3a9c"  # tests check it is written nowhere
USER = DATABASE = "tilesweep"


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="tilesweep-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str) -> None:
        # the server outlives pg_ctl: its output goes to the log, never to a pipe we wait on
        with open(self.root / "ctl.log", "a") as log:
            res = subprocess.run([*self.as_user, *args], stdout=log, stderr=subprocess.STDOUT, timeout=120)
        if res.returncode:
            raise RuntimeError(f"{args[0]} failed: {(self.root / 'ctl.log').read_text()[-800:]}")

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c full_page_writes=off -c max_connections=60")
        self._run(self.pg_ctl, "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts)

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile), "--no-sync",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8")
        pwfile.unlink()
        self.start()
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as db:
            db.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            db.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def stop(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "stop", "-m", "immediate", "-D", str(self.data)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def restart(self) -> None:
        """A clean restart (``pg_ctl restart -m fast``): every session is cut."""
        self._run(self.pg_ctl, "restart", "-w", "-t", "60", "-m", "fast", "-D", str(self.data), "-l", str(self.root / "log"))

    @property
    def admin_dsn(self) -> str:
        return f"host={self.root} port={self.port} user=postgres dbname=postgres"

    def url(self, schema: str | None = None) -> str:
        """The queue URL for user ``tilesweep`` (no password: it is in ``PGPASSWORD``)."""
        base = f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"
        return base if schema is None else f"{base}?schema={schema}"

    def terminate(self, user: str = USER) -> int:
        """``pg_terminate_backend`` every session of ``user``; returns how many."""
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as db:
            rows = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (user,)).fetchall()
        return len(rows)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (skips where absent)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'tilesweep[postgres]')")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root and runuser is missing: PostgreSQL refuses to run as root")
    server = PgServer(initdb, pg_ctl)
    old = os.environ.get("PGPASSWORD")
    started = time.monotonic()
    try:
        server.init()
        os.environ["PGPASSWORD"] = PASSWORD
        server.started_s = time.monotonic() - started  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = old
        shutil.rmtree(server.root, ignore_errors=True)
