"""
A real PgBouncer (Debian's ``pgbouncer`` binary) in front of the test server.

``start_pgbouncer(dsn, pool_mode)`` runs one on a free port with a temporary configuration
(``auth_type = trust``, every database forwarded to the test's server) and returns it; its
``dsn`` is the test's DSN pointed at the pooler. A missing binary FAILS the test, saying how to
install it: ``scripts/dev.py test`` installs it with apt-get when it runs as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.fix_faults import free_port

INSTALL_HINT = (
    "Debian's pgbouncer is needed for this test: install it with "
    "`apt-get install -y pgbouncer` (scripts/dev.py test does so when run as root)"
)


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


class PgBouncer:
    def __init__(self, dsn: str, pool_mode: str) -> None:
        binary = pgbouncer_binary()
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "127.0.0.1")
        port = str(params.get("port") or "5432")
        user = str(params.get("user") or "postgres")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgherald-pgbouncer-"))
        (self.dir / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        cmd = [binary, "-q", str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: drop to the postgres user (Debian's package
            # creates it) and let it write its log and pid file.
            account = pwd.getpwnam("postgres")
            os.chmod(self.dir, 0o755)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
            cmd[1:1] = ["-u", "postgres"]
        self._cmd = cmd
        self.process = self._spawn()
        self.dsn = make_conninfo(dsn, host="127.0.0.1", hostaddr="127.0.0.1", port=str(self.port))
        self._wait_ready(10.0)

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def kill(self) -> None:
        """SIGKILL the pooler: every client connection through it breaks; new ones are refused."""
        self.process.kill()
        self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        (self.dir / "pgbouncer.pid").unlink(missing_ok=True)

    def start(self) -> None:
        """Start it again after `kill`, on the same port, with the same configuration."""
        self.process = self._spawn()
        self._wait_ready(10.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else ""
                log = self.log()
                self.close()
                raise AssertionError(f"pgbouncer exited at start: {err}\n{log}")
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", self.port))
                return
            if time.monotonic() >= deadline:
                self.close()
                raise AssertionError(f"pgbouncer did not accept connections within {timeout}s")
            time.sleep(0.02)  # bounded polling for the port to open

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "pgbouncer.log").read_text()
        return ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def start_pgbouncer(dsn: str, pool_mode: str) -> Iterator[PgBouncer]:
    """A PgBouncer in *pool_mode* forwarding to *dsn*'s server, stopped at the end."""
    bouncer = PgBouncer(dsn, pool_mode)
    try:
        yield bouncer
    finally:
        bouncer.close()
