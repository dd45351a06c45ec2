"""
An embedded PostgreSQL for demos and tests, from the ``pgserver`` wheel (``pgherald[embedded]``).

Why pgserver: it ships PostgreSQL 16 binaries inside a wheel, so a machine with only Python gets
a real server with ``pip install``; no system packages, no Docker. It also copes with running as
root (it creates an unprivileged system user for the server, as ``initdb`` requires).

.. versionadded:: 0.1
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator
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


KEEP_FILE = ".pgherald-keep-running"
"""In the data directory while ``pgherald dev start`` (or ``keep_running=True``) holds the server:
no process stops it on exit. It names the server it holds (its pid and start time), so a server
started later (after a reboot, or a ``pg_ctl stop``) is not held by a stale file."""

PIDS_FILE = ".handle_pids.json"
"""pgserver's list of the processes that use the server in a data directory."""


def _postmaster_id(datadir: Path) -> str | None:
    """``"<pid> <start time>"`` of the server in *datadir* from ``postmaster.pid``, else None."""
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 3:
        return None
    return f"{lines[0].strip()} {lines[2].strip()}"


def _kept(datadir: Path) -> bool:
    """Whether ``pgherald dev start`` holds the server running in *datadir* now."""
    try:
        held = (datadir / KEEP_FILE).read_text().strip()
    except OSError:
        return False
    return bool(held) and held == _postmaster_id(datadir)


def _pid_is_alive(pid: int) -> bool:
    import importlib

    psutil: Any = importlib.import_module("psutil")  # a dependency of pgserver (no stubs)

    if pid == os.getpid():
        return True
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # it exists, but we may not look at it: still a user


def _server_lock(pgserver: Any) -> Any:
    """pgserver's inter-process lock around its list of users, when it has one."""
    cls = getattr(getattr(pgserver, "postgres_server", None), "PostgresServer", None)
    lock = getattr(cls, "_lock", None)
    return lock if lock is not None else contextlib.nullcontext()


LOCK_TIMEOUT = 30.0
"""How long `shut_down` waits for pgserver's lock, which a process starting the server holds
until the server is ready (a crash recovery can take a while)."""


@contextlib.contextmanager
def _server_lock_within(pgserver: Any, datadir: Path, timeout: float) -> Iterator[None]:
    """`_server_lock`, waited for *timeout* seconds at most (then `ConnectError`)."""
    lock = _server_lock(pgserver)
    acquire = getattr(lock, "acquire", None)
    if acquire is None:  # no lock to take
        yield
        return
    if not acquire(timeout=timeout):
        raise ConnectError(
            f"another process has been starting or stopping the embedded PostgreSQL in "
            f"{datadir} for {timeout:g} s (it holds pgserver's lock): try again once it is "
            "done, or stop that process"
        )
    try:
        yield
    finally:
        lock.release()


def _forget_dead_users(pgserver: Any, datadir: Path) -> None:
    """Drop from pgserver's list of users the processes that no longer exist (killed ones).

    pgserver stops the server when the last process in ``<datadir>/.handle_pids.json`` lets
    go; a process killed while using it never removes itself, so without this the server
    would run on forever. A missing file is left alone; a malformed one is emptied (pgserver
    could not read it either).
    """
    path = datadir / PIDS_FILE
    try:
        with _server_lock(pgserver):
            try:
                text = path.read_text()
            except FileNotFoundError:
                return
            try:
                pids = json.loads(text)
                if not isinstance(pids, list) or not all(type(p) is int for p in pids):
                    raise ValueError(pids)
            except ValueError:
                log.debug("%s is malformed (%r): emptied", path, text[:100])
                path.write_text("[]")
                return
            alive = [pid for pid in pids if _pid_is_alive(pid)]
            if alive != pids:
                log.debug("forgetting dead users of %s: %s", datadir, set(pids) - set(alive))
                path.write_text(json.dumps(alive))
    except OSError as exc:
        log.debug("could not clean up %s: %s", path, exc)


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
        """Leave the server running when this process lets go of it, and hold it (`keep`) so
        that no other process stops it either, until `shut_down` (``pgherald dev start``)."""
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
        try:
            self.datadir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "it is not a directory" if self.datadir.exists() else exc.strerror or str(exc)
            raise ConnectError(
                f"cannot create the embedded PostgreSQL's data directory {self.datadir} "
                f"({why}): set PGHERALD_EMBEDDED_DIR to a writable directory"
            ) from None
        if _is_root():
            self._warn_about_permissions(pgserver)
        _forget_dead_users(pgserver, self.datadir)
        try:
            get_server = pgserver.get_server
            mode = None if self.keep_running else "stop"
            self._server = get_server(self.datadir, cleanup_mode=mode)
        except Exception as exc:
            raise ConnectError(f"the embedded PostgreSQL did not start: {exc}") from exc
        self.dsn = self._server.get_uri()
        if self.keep_running:
            try:
                self.keep()
            except ConnectError:
                self.stop()
                raise
        # pgserver stops the server at exit too (atexit): this hook, registered later, runs first.
        atexit.register(self._before_release)
        return self.dsn

    def keep(self) -> bool:
        """Keep the server running in `datadir` after every process lets go of it, until
        `shut_down`: what ``pgherald dev start`` does. False if no server runs there."""
        held = _postmaster_id(self.datadir)
        if held is None or running_dsn(self.datadir) is None:
            return False
        path = self.datadir / KEEP_FILE
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        try:
            tmp.write_text(held + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise ConnectError(
                f"cannot write {path} to keep the embedded PostgreSQL running ({exc.strerror or exc})"
            ) from exc
        return True

    def _before_release(self) -> None:
        """Before pgserver lets go of the server: forget killed users, and never stop a server
        that ``pgherald dev start`` holds (docs/embedded.md)."""
        server = self._server
        if server is None:
            return
        with contextlib.suppress(Exception):
            _forget_dead_users(_import_pgserver(), self.datadir)
        if self.keep_running or _kept(self.datadir):
            server.cleanup_mode = None

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
        """Stop a server running in `datadir` even if other processes use it, and end the hold
        of ``pgherald dev start`` (`keep`) and theirs: a server started afterwards stops when
        its own users let go. False if none ran."""
        with contextlib.suppress(OSError):  # a file left behind names a server that is gone
            (self.datadir / KEEP_FILE).unlink()
        if running_dsn(self.datadir) is None:
            return False
        import subprocess

        pgserver = _import_pgserver()
        pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"
        user = "pgserver" if _is_root() else None  # as root, pgserver runs it as this user
        # Under pgserver's lock: no process starts the server (and adds itself to the list of
        # users) between the stop and the emptying of that list.
        with _server_lock_within(pgserver, self.datadir, LOCK_TIMEOUT):
            if running_dsn(self.datadir) is None:  # its last user stopped it meanwhile
                return False
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
                    f"the embedded PostgreSQL in {self.datadir} did not stop "
                    f"({str(detail).strip()}): see its log, {self.datadir / 'log'}"
                ) from exc
            # The processes listed used the server just stopped: they hold none started
            # afterwards. Left in the list, one that is still alive would keep the next
            # server running when its own users let go, and itself never stop it (it stops
            # only the server it started with).
            with contextlib.suppress(OSError):
                if (self.datadir / PIDS_FILE).exists():
                    (self.datadir / PIDS_FILE).write_text("[]")
        return True

    def stop(self) -> None:
        atexit.unregister(self._before_release)
        self._before_release()
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
