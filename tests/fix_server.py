"""
A PostgreSQL server of the test's own, that it may stop, restart and kill.

Made with the machine's ``initdb`` / ``pg_ctl`` (Debian's ``postgresql`` package puts them in
``/usr/lib/postgresql/N/bin``) in a temporary directory, on a free port, with trust auth and
``wal_level=logical``. As root (CI), the server runs as the ``postgres`` user: PostgreSQL refuses
to run as root. Without the binaries the test FAILS and says what to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fix_faults import OneWayProxy, free_port, wait_until
from tests.fix_proxy import _target_of

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl) are needed to start a private server: "
    "install Debian's `postgresql` package"
)


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:  # the directory of every server tool (/usr/local/bin may hold only links)
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if not candidates:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return Path(candidates[0]).parent


class OwnServer:
    """A private PostgreSQL: `dsn`, `stop`, `start`, `restart`, `kill`."""

    def __init__(self, wal_level: str = "logical") -> None:
        self.bindir = _bindir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgherald-server-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nwal_level = {wal_level}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 50\nshared_buffers = 32MB\n"
            )
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir, check=False)
        if result.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stderr or result.stdout}\n{log[-2000:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def own_server(wal_level: str = "logical") -> Iterator[OwnServer]:
    server = OwnServer(wal_level)
    try:
        server.start()
        deadline = time.monotonic() + 30
        while not server.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the private server did not accept connections in 30 s")
            time.sleep(0.05)  # polling a server that is starting: no event to wait on
        yield server
    finally:
        server.remove()


@pytest.fixture
def server() -> Iterator[OwnServer]:
    """A private PostgreSQL for this test alone (it may be restarted)."""
    with own_server() as s:
        yield s


@pytest.fixture(scope="session")
def logical_server() -> Iterator[OwnServer]:
    """One private ``wal_level=logical`` server for the CDC tests of the whole session (each
    test uses its own database or slot; a test may restart it)."""
    with own_server() as s:
        yield s


@pytest.fixture(scope="session")
def replica_server() -> Iterator[OwnServer]:
    """One private server with ``wal_level=replica``: what CDC must refuse, saying why."""
    with own_server(wal_level="replica") as s:
        yield s


@pytest.fixture
def log_proxy(logical_server: OwnServer) -> Iterator[OneWayProxy]:
    """A proxy to the private logical server that can break a link one way (into_log's log)."""
    with OneWayProxy(_target_of(logical_server.dsn)) as p:
        yield p


@pytest.fixture
def cdc_dsn(logical_server: OwnServer) -> Iterator[str]:
    """A fresh database on the private server (slots are per database)."""
    name = f"cdc_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(logical_server.dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    dsn = logical_server.dsn.rsplit("/", 1)[0] + "/" + name
    yield dsn
    with psycopg.connect(logical_server.dsn, autocommit=True) as c:
        for (slot,) in c.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            c.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            wait_until(
                lambda s=slot: (
                    not c.execute(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (s,)
                    ).fetchone()[0]
                ),
                10,
                "the slot's reader to end",
            )
            c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def datadir() -> Iterator[Path]:
    """A data directory of its own for an embedded server (`pgherald.embedded`); its server
    shut down and the directory removed at the end."""
    pytest.importorskip("pgserver", reason="needs the 'embedded' extra")
    from pgherald.embedded import EmbeddedPostgres

    base = Path(tempfile.mkdtemp(prefix="pgherald-embedded-"))
    base.chmod(0o755)  # as root, pgserver opens the parents: keep them to this directory
    pgdata = base / "pgdata"
    try:
        yield pgdata
    finally:
        EmbeddedPostgres(pgdata).shut_down()
        shutil.rmtree(base, ignore_errors=True)
