"""
An embedded PostgreSQL for demos and tests, from the ``pgserver`` wheel (``pgherald[embedded]``).

Why pgserver: it ships PostgreSQL 16 binaries inside a wheel, so a machine with only Python gets
a real server with ``pip install``; no system packages, no Docker. It also copes with running as
root (it creates an unprivileged system user for the server, as ``initdb`` requires).

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ConnectError

log = logging.getLogger(__name__)

ROOT_DIR = Path("/var/lib/pgherald/pgdata")
"""The default data directory as root: pgserver opens every parent of it to everyone (see
`opened_by_pgserver`), so as root it lives outside the home directory."""


def _is_root() -> bool:
    return sys.platform != "win32" and os.geteuid() == 0


def default_dir() -> Path:
    """``$PGHERALD_EMBEDDED_DIR``, else `ROOT_DIR` as root, else ``~/.cache/pgherald/pgdata``."""
    if os.environ.get("PGHERALD_EMBEDDED_DIR"):
        return Path(os.environ["PGHERALD_EMBEDDED_DIR"]).expanduser()
    return ROOT_DIR if _is_root() else Path("~/.cache/pgherald/pgdata").expanduser()


DEFAULT_DIR = default_dir()

_OTHERS_RX = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def opened_by_pgserver(paths: Iterable[Path]) -> list[Path]:
    """The existing parents of *paths* that pgserver, as root, will make readable by everyone
    (it adds ``g+rx,o+rx`` so that its unprivileged ``pgserver`` user can reach them)."""
    opened: list[Path] = []
    for path in paths:
        for parent in path.absolute().parents:
            try:
                mode = parent.stat().st_mode
            except OSError:
                continue
            if mode & _OTHERS_RX != _OTHERS_RX and parent not in opened:
                opened.append(parent)
    return opened


def running_dsn(datadir: str | os.PathLike[str] | None = None) -> str | None:
    """The DSN of a server that runs in *datadir* (default: `default_dir`), else None.

    Reads ``postmaster.pid`` only: starts nothing and does not import pgserver, so that every
    CLI command can afford to ask (``pgherald dev start`` leaves such a server running).
    """
    pidfile = Path(datadir if datadir is not None else default_dir()) / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid = int(lines[0])
        os.kill(pid, 0)
    except PermissionError:
        pass  # it runs, as another user (pgserver's, when we are root)
    except (OSError, ValueError, IndexError):
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    socket_dir, host, port = lines[4].strip(), lines[5].strip(), lines[3].strip()
    if socket_dir:
        return f"postgresql://postgres:@/postgres?host={socket_dir}"
    return f"postgresql://postgres:@{host or 'localhost'}:{port}/postgres"


def _import_pgserver() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI): noise.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver

    return pgserver


class EmbeddedPostgres:
    """
    Start (or reuse) a local server in *datadir*; stop it on exit.

    ``dsn`` is ready to use once entered::

        with EmbeddedPostgres() as pg:
            pgherald.Listener(pg.dsn)
    """

    def __init__(
        self, datadir: str | os.PathLike[str] | None = None, *, keep_running: bool = False
    ) -> None:
        self.datadir = Path(datadir) if datadir is not None else default_dir()
        self.keep_running = keep_running
        """Leave the server running when this process lets go of it (``pgherald dev start``)."""
        self._server: Any = None
        self.dsn = ""

    def start(self) -> str:
        try:
            pgserver = _import_pgserver()
        except ImportError:
            raise ConnectError(
                "no DSN was given and the embedded PostgreSQL is not installed: pass --dsn "
                "(or set PGHERALD_DSN), or install it with: pip install 'pgherald[embedded]'"
            ) from None
        self.datadir.mkdir(parents=True, exist_ok=True)
        if _is_root():
            self._warn_about_permissions(pgserver)
        try:
            get_server = pgserver.get_server
            mode = None if self.keep_running else "stop"
            self._server = get_server(self.datadir, cleanup_mode=mode)
        except Exception as exc:
            raise ConnectError(f"the embedded PostgreSQL did not start: {exc}") from exc
        self.dsn = self._server.get_uri()
        return self.dsn

    def _warn_about_permissions(self, pgserver: Any) -> None:
        """As root, pgserver chmods directories: never without saying which (docs/embedded.md)."""
        binaries = Path(pgserver.__file__).parent / "pginstall" / "bin"
        opened = opened_by_pgserver([self.datadir, binaries])
        if opened:
            log.warning(
                "running as root: the embedded PostgreSQL runs as user 'pgserver' and makes "
                "these directories readable by everyone (adds g+rx,o+rx): %s. To avoid it, "
                "keep $PGHERALD_EMBEDDED_DIR and the Python environment outside your home "
                "(see docs/embedded.md)",
                ", ".join(map(str, opened)),
            )

    def shut_down(self) -> bool:
        """Stop a server running in `datadir` even if other processes use it; False if none ran."""
        if running_dsn(self.datadir) is None:
            return False
        import subprocess

        pg_ctl = Path(_import_pgserver().__file__).parent / "pginstall" / "bin" / "pg_ctl"
        user = "pgserver" if _is_root() else None  # as root, pgserver runs it as this user
        try:
            subprocess.run(
                [str(pg_ctl), "-D", str(self.datadir), "-w", "stop"],
                user=user,
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise ConnectError(
                f"the embedded PostgreSQL in {self.datadir} did not stop ({str(detail).strip()}): "
                f"see its log, {self.datadir / 'log'}"
            ) from exc
        return True

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
