"""
Helpers for the fault-injection tests (tests/integration/test_faults.py).

- `FaultProxy`: the freezing proxy, plus `refuse()` / `allow()`, which close and re-open its
  listening socket so that new connections get a real "connection refused" meanwhile (the
  server is down or unreachable), and `thaw()`, which resumes frozen connections (a network
  stall that ends), while `freeze()` and `sever()` still work.
- `LogWatch` (fixture ``listener_log``): the ``pgherald.listener`` log records, at INFO and up,
  with a way to wait for one from another thread.
- `wait_until` / `await_until`: timeout-bounded polling, the only waiting the tests do.
- `running`: ``listener.run()`` on a thread, stopped and joined (errors re-raised) at the end.
- `free_port`: a TCP port on 127.0.0.1 that nothing listens on (for a server to start on, or a
  DSN that nothing answers).
- `black_hole(port)`: every packet to or from a port dropped by the kernel (nftables): a path
  that died, where what a client sends is never acknowledged. A proxy cannot do that (its
  kernel acknowledges what it does not forward).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

from tests.fix_proxy import FreezingProxy, _target_of

# -- waiting --


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll *predicate* until true; return the seconds it took, or fail naming *what*."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


async def await_until(predicate: Callable[[], object], within: float, what: str) -> float:
    """`wait_until` for async tests (works on asyncio and trio)."""
    start = time.monotonic()
    deadline = start + within
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await anyio.sleep(0.005)
    return time.monotonic() - start


# -- running a sync listener on a thread --


class Background:
    """A daemon thread that keeps the exception of its target for the test to re-raise."""

    def __init__(self, target: Callable[[], Any], name: str = "listener-run") -> None:
        self.error: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # kept for the test: a thread must not raise
            self.error = exc

    def start(self) -> Background:
        self.thread.start()
        return self


@contextlib.contextmanager
def running(listener: Any, join_timeout: float = 5.0) -> Iterator[Background]:
    """
    Run ``listener.run()`` on a thread for the duration of the block.

    Waits until `run` has begun (a `stop` sent earlier would be forgotten by `run`), and at the
    end stops it, joins it and re-raises whatever it raised.
    """
    bg = Background(listener.run).start()
    try:
        wait_until(
            lambda: listener._mode == "run" or not bg.thread.is_alive(), 5.0, "run() to start"
        )
        yield bg
    finally:
        listener.stop()
        bg.thread.join(join_timeout)
    assert not bg.thread.is_alive(), (
        f"listener.run() did not return within {join_timeout}s of stop()"
    )
    if bg.error is not None:
        raise bg.error


# -- database helpers --


def queue_usage(conn: psycopg.Connection) -> float:
    row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
    assert row is not None
    return float(row[0])


def backend_alive(conn: psycopg.Connection, pid: int | None) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0])


def send_burst(
    conn: psycopg.Connection,
    channel: str,
    *,
    transactions: int,
    per_transaction: int,
    size: int = 0,
) -> int:
    """
    NOTIFY ``transactions * per_transaction`` times on *channel*, one transaction at a time.

    Payload *i* (1-based, in commit order) is ``"%08d" % i`` followed by *size* ``x``: unique, so
    PostgreSQL folds none of them, and easy to check for order and integrity.
    """
    total = 0
    for t in range(transactions):
        first = t * per_transaction + 1
        with conn.transaction():
            conn.execute(
                "SELECT pg_notify(%s, lpad(i::text, 8, '0') || repeat('x', %s))"
                " FROM generate_series(%s::int, %s::int) i",
                (channel, size, first, first + per_transaction - 1),
            )
        total += per_transaction
    return total


def rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- ports --


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a proxy that can also refuse --


NFT_HINT = (
    "this test drops packets with nftables: install it (`apt-get install -y nftables`; "
    "scripts/dev.py test does so when run as root) and run as root (CAP_NET_ADMIN)"
)
_NFT_PREFIX = "pgherald_hole_"
_holes = itertools.count()


def _nft(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("nft") or "/usr/sbin/nft"
    if not os.path.exists(binary):
        pytest.fail(NFT_HINT, pytrace=False)
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode:
        pytest.fail(f"nft {' '.join(args)}: {done.stderr.strip()} ({NFT_HINT})", pytrace=False)
    return done


def _remove_stale_holes() -> None:
    """Tables a killed test run left behind (its process is gone): their port may be reused."""
    listed = _nft("list", "tables", check=False).stdout.split()
    for name in listed:
        if name.startswith(_NFT_PREFIX):
            pid = name[len(_NFT_PREFIX) :].split("_")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _nft("delete", "table", "inet", name, check=False)


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[None]:
    """While inside: every TCP packet to or from *port* on this machine is dropped."""
    _remove_stale_holes()
    table = f"{_NFT_PREFIX}{os.getpid()}_{next(_holes)}"
    _nft("add", "table", "inet", table)
    try:
        _nft("add", "chain", "inet", table, "out", "{ type filter hook output priority 0 ; }")
        _nft("add", "rule", "inet", table, "out", "tcp", "dport", str(port), "drop")
        _nft("add", "rule", "inet", table, "out", "tcp", "sport", str(port), "drop")
        yield
    finally:
        _nft("delete", "table", "inet", table, check=False)


class FaultProxy(FreezingProxy):
    """
    A `FreezingProxy` that can also refuse new connections and thaw frozen ones.

    While refusing (its listening socket is closed, then re-opened on the same port by
    `allow`), a client's connect() fails at once with ECONNREFUSED, exactly as when the server
    is down; established connections are untouched (``sever()`` them to force a reconnection).
    """

    def __init__(self, target: str | tuple[str, int]) -> None:
        self.refusing = False
        super().__init__(target)

    def refuse(self) -> None:
        with self._lock:
            if self.refusing:
                return
            self.refusing = True
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()

    def allow(self) -> None:
        with self._lock:
            if not self.refusing:
                return
            sock = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port
            sock.setblocking(False)
            self._listener = sock
            self._sel.register(sock, selectors.EVENT_READ, None)
            self.refusing = False

    def thaw(self) -> None:
        """Resume forwarding on frozen connections; what was sent meanwhile goes through."""
        with self._lock:
            frozen, self._frozen = self._frozen, set()
            for s in frozen:
                if s in self._peers:
                    self._sel.register(s, selectors.EVENT_READ, None)

    def close(self) -> None:
        with self._lock:
            if self.refusing:
                # Already closed and unregistered: give close() a socket it can unregister from
                # nothing (KeyError, suppressed there) and close.
                self._listener = socket.socket()
        super().close()

    def _accept(self) -> None:
        # select() may report the old listening socket just as refuse() closes it.
        if self.refusing:
            return
        with contextlib.suppress(OSError):
            super()._accept()


class OneWayProxy(FaultProxy):
    """
    A `FaultProxy` that can also freeze one way only: what clients send (`freeze_requests`,
    undone by `thaw_requests`) or what the server sends (`freeze_answers`) - a link broken one
    way.
    """

    def _requests(self) -> list[socket.socket]:
        # The client side of a pair: accepted on the proxy's own port.
        return [s for s in self._peers if s.getsockname()[1] == self.port]

    def _freeze(self, socks: list[socket.socket]) -> int:
        self._frozen.update(socks)
        for s in socks:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
        return len(socks)

    def freeze_requests(self) -> int:
        """Stop forwarding what clients send; what the server sends still goes through."""
        with self._lock:
            return self._freeze(self._requests())

    def freeze_answers(self) -> int:
        """Stop forwarding what the server sends; what clients send still goes through."""
        with self._lock:
            return self._freeze([self._peers[s] for s in self._requests()])

    def thaw_requests(self) -> None:
        """Resume forwarding what clients send (held meanwhile: it goes through now)."""
        with self._lock:
            for s in self._requests():
                if s in self._frozen:
                    self._frozen.discard(s)
                    self._sel.register(s, selectors.EVENT_READ, None)

    def held(self) -> bytes:
        """What clients sent that a frozen connection holds (not forwarded yet)."""
        with self._lock:
            out = b""
            for s in self._requests():
                if s in self._frozen:
                    with contextlib.suppress(BlockingIOError, OSError):
                        out += s.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return out


@pytest.fixture
def fault_proxy(dsn: str) -> Iterator[FaultProxy]:
    """A `FaultProxy` to this test's server; ``fault_proxy.dsn_for(dsn)`` goes through it."""
    with FaultProxy(_target_of(dsn)) as p:
        yield p


@pytest.fixture
def fault_proxies(dsn: str) -> Iterator[list[FaultProxy]]:
    """Two `FaultProxy`s to this test's server: two members of a storm, each behind its own."""
    made = [FaultProxy(_target_of(dsn)) for _ in range(2)]
    try:
        yield made
    finally:
        for p in made:
            p.close()


# -- log records --


class LogWatch(logging.Handler):
    """Collects log records (from any thread) and lets a test wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def matching(self, fragment: str, level: int | None = None) -> list[logging.LogRecord]:
        with self._cond:
            records = list(self.records)
        return [r for r in records if fragment in r.msg and (level is None or r.levelno == level)]

    def wait_for(self, fragment: str, count: int, timeout: float) -> list[logging.LogRecord]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self.records if fragment in r.msg]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {count} log records "
                        f"containing {fragment!r} (got {len(found)})"
                    )
                self._cond.wait(left)


@contextlib.contextmanager
def watching(name: str) -> Iterator[LogWatch]:
    """Every record of logger *name* at INFO and above, while the block runs."""
    logger = logging.getLogger(name)
    watch = LogWatch()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old_level)


@pytest.fixture
def listener_log() -> Iterator[LogWatch]:
    """Every ``pgherald.listener`` record at INFO and above, during this test."""
    with watching("pgherald.listener") as watch:
        yield watch


class SilentServer:
    """A TCP port that accepts connections and never answers (a server hung at start-up)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self.accepted: list[socket.socket] = []  # a client is inside its connection attempt
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                self.accepted.append(self._server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        for s in self.accepted:
            s.close()
        self._server.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()
