"""
Brokers for the relay tests: the machine's NATS (JetStream) and Redis, private ones, and a
webhook receiver (`receiver_factory`).

``nats_url`` / ``redis_url`` are the machine's servers on 127.0.0.1 (4222 / 6379); each test
uses names of its own (streams, keys), so tests never see each other's messages. Where they do
not answer, the test skips and says why, except on CI (``CI=true``), where it fails: CI has them.

``own_nats`` / ``own_redis`` start a private ``nats-server -js`` / ``redis-server`` on a free
port in a temporary directory, which the test may kill and restart (the machine's servers are
never touched). Without the binaries the test skips (fails on CI) naming the Debian package.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_faults import free_port


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why} (CI must run the relay tests)", pytrace=False)
    pytest.skip(why)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if _answers(port):
            return
        time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


@pytest.fixture
def nats_url() -> str:
    """The machine's NATS server (JetStream enabled) on 127.0.0.1:4222."""
    if not _answers(4222):
        _unavailable("no NATS server on 127.0.0.1:4222 (Debian: apt-get install nats-server)")
    return "nats://127.0.0.1:4222"


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis on 127.0.0.1:6379, database 0."""
    if not _answers(6379):
        _unavailable("no Redis server on 127.0.0.1:6379 (Debian: apt-get install redis-server)")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def unique() -> str:
    """A name of this test's own (stream, subject, key prefix)."""
    return f"t{uuid.uuid4().hex[:10]}"


class OwnBroker:
    """A private broker process: `url`, `start`, `stop`, `kill`, `restart`."""

    scheme = ""
    binary = ""
    package = ""

    def __init__(self) -> None:
        path = shutil.which(self.binary)
        if path is None:
            _unavailable(f"{self.binary} is not installed (Debian: apt-get install {self.package})")
        self.path = str(path)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"pgherald-{self.binary}-"))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        _wait_port(self.port, self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class OwnNats(OwnBroker):
    scheme = "nats"
    binary = "nats-server"
    package = "nats-server"

    def command(self) -> list[str]:
        return [
            self.path,
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.dir / "jetstream"),
        ]


class OwnRedis(OwnBroker):
    scheme = "redis"
    binary = "redis-server"
    package = "redis-server"

    def command(self) -> list[str]:
        # appendonly + fsync always: an entry Redis acknowledged survives a kill, as the
        # relay's guarantee assumes (docs/relay.md).
        return [
            self.path,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]


@pytest.fixture
def own_nats() -> Iterator[OwnNats]:
    """A private ``nats-server -js`` the test may kill and restart."""
    server = OwnNats()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.close()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A private ``redis-server`` (append-only file, fsync always) the test may restart."""
    server = OwnRedis()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.close()


# -- the relay in a subprocess, and a paced publisher --


def publish_paced(
    dsn: str, channel: str, total: int, chunk: int, pause: float, keys: int = 50
) -> list[int]:
    """Publish *total* events in transactions of *chunk*, *pause* s apart; their ids.

    Event ``i`` has key ``k{i % keys}`` and payload ``{"i": i}``: per key, ids ascend.
    """
    import psycopg

    ids: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            with conn.transaction():
                ids += pgherald.publish_many(
                    conn,
                    channel,
                    [{"i": i} for i in range(start, start + n)],
                    key=[f"k{i % keys}" for i in range(start, start + n)],
                )
            if pause:
                time.sleep(pause)  # pacing the load, not synchronisation
    return ids


class RelayProcess:
    """``pgherald relay ARGS`` in a subprocess, which the test may SIGKILL and start again."""

    def __init__(self, dsn: str, *args: str) -> None:
        from tests.fix_cli import cli_env, pgherald_cmd

        self.cmd = pgherald_cmd("relay", *args)
        self.env = cli_env(dsn)
        self.proc: subprocess.Popen[str] | None = None
        self.log = Path(tempfile.mkdtemp(prefix="pgherald-relay-")) / "relay.log"

    def start(self) -> RelayProcess:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def relay_thread(relay: pgherald.Relay, join: float = 10.0) -> Iterator[threading.Thread]:
    """*relay* running on a thread of its own while the block runs; then stopped and joined
    (up to *join* seconds: the caller asserts the thread ended where that is the point)."""
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        yield t
    finally:
        relay.stop()
        t.join(join)


def dead_again(conn: psycopg.Connection, event_id: int) -> None:
    """The relay group's dead letter of *event_id* back, asked to be redelivered: what the log
    holds when a relay died after its redelivery reached the broker, before the dead letter
    was deleted."""
    conn.execute(
        "INSERT INTO pgherald.dead_letters_v1 (group_name, event_id, tx, channel, partition,"
        " error, attempts, first_failed_at, last_failed_at, redeliver_at)"
        " SELECT 'relay', id, tx, channel, partition, 'test', 1, now(), now(), now()"
        " FROM pgherald.events_v1 WHERE id = %s",
        (event_id,),
    )


# -- a webhook receiver --

SECRET = "s3cret"
"""The webhook secret of the relay tests: `Receiver` checks every signature with it."""


class Receiver:
    """An HTTP endpoint: `decide(request number, body)` gives (status, headers) per POST."""

    def __init__(self, decide: Callable[[int, Any], tuple[int, dict[str, str]]]) -> None:
        self.decide = decide
        self.lock = threading.Lock()
        self.accepted: list[Any] = []  # bodies answered 2xx, in arrival order
        self.requests: list[tuple[float, int, int]] = []  # (time, first id, status)
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp = self.headers["Pgherald-Timestamp"]
                mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
                good = self.headers["Pgherald-Signature"] == f"t={stamp},v1={mac.hexdigest()}"
                value = json.loads(body)
                with receiver.lock:
                    n = len(receiver.requests)
                    if not good:
                        receiver.bad_signatures += 1
                        status, headers = 401, {}
                    else:
                        status, headers = receiver.decide(n, value)
                    first = int(self.headers["Pgherald-Event-Id"])
                    receiver.requests.append((time.monotonic(), first, status))
                    if 200 <= status < 300:
                        receiver.accepted.append(value)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(decide: Callable[[int, Any], tuple[int, dict[str, str]]]) -> Receiver:
        made.append(Receiver(decide))
        return made[-1]

    yield make
    for r in made:
        r.close()


def relay_pid(conn: psycopg.Connection) -> int | None:
    """The server process of this database's newest relay session (None: none now)."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'pgherald-relay' ORDER BY backend_start DESC LIMIT 1"
    ).fetchone()
    return None if row is None else int(row[0])


def stop_while_frozen(
    conn: psycopg.Connection[Any],
    broker: OwnBroker,
    relay: pgherald.Relay,
    in_hand: Callable[[], bool],
) -> float:
    """Relay one event, stop *broker*'s process (SIGSTOP), publish 99 more and wait until
    *in_hand* says the relay is sending them; then `stop()` it. Returns how long `stop()`
    took (the broker is thawed on the way out)."""
    from tests.fix_faults import wait_until

    assert broker.proc is not None
    pgherald.publish(conn, "orders", {"n": 0})
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(lambda: relay.stats.relayed == 1, 10, "the first event relayed")
        broker.proc.send_signal(signal.SIGSTOP)
        pgherald.publish_many(conn, "orders", [{"n": n} for n in range(1, 100)])
        wait_until(in_hand, 10, "the relay sending to the frozen broker")
        started = time.monotonic()
        relay.stop()
        t.join(5)
        took = time.monotonic() - started
        assert not t.is_alive()
        return took
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        relay.stop()
        t.join(10)
