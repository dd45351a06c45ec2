"""
Holes of the class x fault x runtime matrix: pairs that hold a connection and had never met
a given real fault on a runtime they support (the matrix, and why these, are in the report of
the change that added this file).

- `ChangeStream` / `AsyncChangeStream` whose walsender is ended (``pg_terminate_backend``),
  deterministically (only the into_log storm did, at random), on threads, asyncio and trio;
  the handler form of the sync class (the other sync fault tests iterate).
- The relay through a session-mode PgBouncer that is killed and started again (docs/reliability.md:
  the relay works behind a session pooler "as the consumer"; a pooler that dies is a lost server).
- The async relay across a PostgreSQL restart, on asyncio and trio (docs/relay.md, "PostgreSQL
  restarted": only the blocking relay into Redis was tested).
- `publish` / `publish_many` / `notify` (and `apublish`...) on a caller's connection that a
  network fault severs (a reset, no message from the server): `ConnectionLost` (docs/errors.md).
- ``pgherald consume`` and ``pgherald cdc run``, whose sessions are ended under them: they go
  on (docs/cli.md), and SIGTERM still ends them with status 0.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeEvent
from tests.fix_brokers import SECRET, Receiver
from tests.fix_cli import cli_env, pgherald_cmd
from tests.fix_durable import _OnAThread
from tests.fix_faults import FaultProxy, wait_until, watching
from tests.fix_pgbouncer import start_pgbouncer
from tests.fix_server import OwnServer
from tests.integration.test_cdc import FAST, confirmed, current_lsn, slot_ready, sql

RUNTIMES = ["sync", "asyncio", "trio"]


def _accept_all(n: int, body: Any) -> tuple[int, dict[str, str]]:
    return 200, {}


def _walsender(dsn: str, slot: str) -> int | None:
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,), f"backend {pid} was not terminated"


# -- ChangeStream x terminated walsender x every runtime --


class _Handled:
    """``stream.run(handler)`` for `_OnAThread`: every change it was handed, in order."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.events: list[ChangeEvent] = []

    def run(self) -> Any:
        return self.stream.run(self.events.append)

    def stop(self) -> None:
        self.stream.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_change_stream_whose_walsender_is_terminated_reconnects_and_loses_nothing(
    runtime: str, cdc_dsn: str
) -> None:
    """
    docs/cdc.md, Guarantees: "Reconnects after a dropped connection ... with backoff (a log line
    says so), and resumes from what it acknowledged": a change committed while the stream is
    cut off comes once, after the reconnection, and what was acknowledged does not come again;
    `stop()` then ends it within a second.
    """
    slot = f"s_term_{runtime}"
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    cls = pgherald.ChangeStream if runtime == "sync" else pgherald.AsyncChangeStream
    handled = _Handled(cls(cdc_dsn, slot=slot, tables=["t"], **FAST))

    def keys() -> list[str | None]:
        return [e.key for e in handled.events]

    def write(key: int) -> int:
        sql(cdc_dsn, f"INSERT INTO t VALUES ({key})")
        return current_lsn(cdc_dsn)

    with watching("pgherald.cdc") as log:
        running = _OnAThread(runtime, handled)
        try:
            wait_until(lambda: slot_ready(cdc_dsn, slot), 10, "the stream to start")
            end = write(1)
            wait_until(lambda: keys() == ["1"], 5, "change 1")
            wait_until(lambda: confirmed(cdc_dsn, slot) >= end, 5, "change 1 acknowledged")

            pid = _walsender(cdc_dsn, slot)
            assert pid is not None
            _terminate(cdc_dsn, pid)
            write(2)  # while the stream is cut off (or reconnecting)
            wait_until(lambda: log.matching("change stream lost"), 5, "the loss to be logged")
            wait_until(lambda: _walsender(cdc_dsn, slot) not in (None, pid), 5, "a new walsender")
            end = write(3)
            wait_until(lambda: len(handled.events) >= 3, 5, "changes 2 and 3")
            wait_until(lambda: confirmed(cdc_dsn, slot) >= end, 5, "change 3 acknowledged")
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            running.stop(within=1.0)
        finally:
            running.end()
    assert running.error is None, repr(running.error)
    assert keys() == ["1", "2", "3"]  # nothing lost, nothing acknowledged came again
    assert handled.stream._engine.reconnects >= 1


# -- the relay x a session pooler killed and started again x every runtime --


def _relay(runtime: str, dsn: str, receiver: Receiver) -> Any:
    cls = pgherald.Relay if runtime == "sync" else pgherald.AsyncRelay
    return cls(
        dsn,
        to=receiver.url,
        channels=["orders"],
        secret=SECRET,
        retry_delay=0.01,
        retry_max_delay=0.1,
        stats_interval=None,
    )


def _consumer_of(relay: Any) -> Any:
    """The relay's `AsyncConsumer` (a blocking `Relay` runs an `AsyncRelay`)."""
    inner = relay._relay if isinstance(relay, pgherald.Relay) else relay
    return inner._consumer


def _publish(dsn: str, *numbers: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [pgherald.publish(c, "orders", {"n": n}, key=f"k{n % 2}") for n in numbers]


def _relayed(receiver: Receiver) -> list[int]:
    """Each event's first arrival at the receiver, in arrival order."""
    with receiver.lock:
        return list(dict.fromkeys(int(body["id"]) for body in receiver.accepted))


def _dead_letters(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT count(*) FROM pgherald.dead_letters_v1").fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_relay_through_a_session_pooler_killed_and_started_again_relays_everything(
    runtime: str, installed: str, receiver_factory: Callable[..., Receiver]
) -> None:
    """
    docs/reliability.md, Poolers: the relay works behind a session-mode pool "as the consumer",
    and "a pooler that dies (killed, restarted) is a lost server": the relay retries until it is
    back and relays what was published meanwhile, in order, none dead-lettered.
    """
    receiver = receiver_factory(_accept_all)
    with start_pgbouncer(installed, "session") as bouncer:
        relay = _relay(runtime, bouncer.dsn, receiver)
        running = _OnAThread(runtime, relay)
        try:
            ids = _publish(installed, 0, 1)
            wait_until(lambda: _relayed(receiver) == ids, 10, "the first events relayed")
            consumer = _consumer_of(relay)
            bouncer.kill()
            ids += _publish(installed, 2, 3)  # while the pooler is down
            wait_until(
                lambda: consumer.stats.connect_failures >= 2 or not running.thread.is_alive(),
                10,
                "refused reconnections",
            )
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            bouncer.start()
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 15, "the events meanwhile")
            ids += _publish(installed, 4)
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 10, "the event after")
            assert consumer.stats.reconnects >= 1
            running.stop(within=1.0)
        finally:
            running.end()
    assert running.error is None, repr(running.error)
    assert _relayed(receiver) == ids  # in order (each event's first arrival)
    assert receiver.bad_signatures == 0
    assert _dead_letters(installed) == 0


# -- the async relay x a PostgreSQL restart x asyncio and trio --


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_the_async_relay_goes_on_across_a_postgresql_restart(
    runtime: str, server: OwnServer, receiver_factory: Callable[..., Receiver]
) -> None:
    """
    docs/relay.md, Faults: "PostgreSQL restarted / connection lost: the consumer reconnects ...
    at most one read re-sent": every event reaches the webhook, in order, and `stop()` still
    ends the relay within a second.
    """
    with psycopg.connect(server.dsn, autocommit=True) as c:
        pgherald.install(c)
    receiver = receiver_factory(_accept_all)
    relay = _relay(runtime, server.dsn, receiver)
    running = _OnAThread(runtime, relay)
    try:
        ids = _publish(server.dsn, 0, 1)
        wait_until(lambda: _relayed(receiver) == ids, 10, "the first events relayed")
        server.restart()
        ids += _publish(server.dsn, 2, 3)
        wait_until(lambda: set(ids) <= set(_relayed(receiver)), 15, "the events after")
        assert running.thread.is_alive(), f"run() ended: {running.error!r}"
        assert relay._consumer.stats.reconnects >= 1
        running.stop(within=1.0)
    finally:
        running.end()
    assert running.error is None, repr(running.error)
    assert _relayed(receiver) == ids
    assert _dead_letters(server.dsn) == 0


# -- publish / publish_many / notify on a caller's connection x severed --


def _severed_calls(c: Any) -> dict[str, Callable[[], Any]]:
    return {
        "publish": lambda: pgherald.publish(c, "orders", {"n": 2}),
        "publish_many": lambda: pgherald.publish_many(c, "orders", [{"n": 3}, {"n": 4}]),
        "notify": lambda: pgherald.notify(c, "orders", "x"),
    }


def test_publishing_on_a_severed_connection_is_connection_lost(
    installed: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    """
    docs/errors.md: "the connection broke ... or the driver finds it closed: ConnectionLost" -
    here a network fault that resets the caller's connection under it (no word from the
    server, unlike a terminated backend): each call raises `ConnectionLost` at once, never a
    driver's exception, and stores nothing.
    """
    for name in ("publish", "publish_many", "notify"):
        with psycopg.connect(fault_proxy.dsn_for(installed), autocommit=True) as c:
            pgherald.publish(c, "orders", {"n": 1})  # the connection works
            fault_proxy.sever()
            with pytest.raises(pgherald.ConnectionLost, match="open a new one"):
                _severed_calls(c)[name]()
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (3,)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's AsyncConnection: not trio
@pytest.mark.anyio
async def test_async_publishing_on_a_severed_connection_is_connection_lost(
    installed: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    """`test_publishing_on_a_severed_connection_is_connection_lost` for `apublish`,
    `apublish_many` and `anotify` on psycopg's `AsyncConnection`."""
    calls: dict[str, Callable[[Any], Any]] = {
        "apublish": lambda c: pgherald.apublish(c, "orders", {"n": 2}),
        "apublish_many": lambda c: pgherald.apublish_many(c, "orders", [{"n": 3}, {"n": 4}]),
        "anotify": lambda c: pgherald.anotify(c, "orders", "x"),
    }
    for call in calls.values():
        async with await psycopg.AsyncConnection.connect(
            fault_proxy.dsn_for(installed), autocommit=True
        ) as c:
            await pgherald.apublish(c, "orders", {"n": 1})
            fault_proxy.sever()
            with anyio.fail_after(10), pytest.raises(pgherald.ConnectionLost, match="open a new"):
                await call(c)
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (3,)


# -- the CLI's long-running commands x their sessions ended under them --


@contextmanager
def _command(dsn: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], list[str], list[str]]]:
    """``pgherald ARGS`` running, with its stdout and stderr lines collected by threads; at the
    end SIGTERM (status 0 expected by the test) or, if it hangs, killed."""
    proc = subprocess.Popen(
        pgherald_cmd(*args),
        env=cli_env(dsn),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
        for s, into in ((proc.stdout, out), (proc.stderr, err))
    ]
    for r in readers:
        r.start()
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()  # only the process this test started
                proc.wait(5)
        for r in readers:
            r.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _sessions(conn: psycopg.Connection, application_name: str) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s",
        (application_name,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def test_cli_consume_goes_on_after_its_sessions_are_terminated(
    installed: str, conn: psycopg.Connection
) -> None:
    """
    docs/cli.md / docs/durable.md: ``pgherald consume`` runs a consumer, which reconnects by
    itself and continues from the stored position: events published while its sessions were
    ended are printed after, each once; SIGTERM still ends it with status 0, no traceback.
    """
    first = pgherald.publish(conn, "orders", {"n": 1})
    with _command(installed, "consume", "--group", "g", "--json", "orders") as (proc, out, err):
        wait_until(lambda: out or proc.poll() is not None, 15, "the first event printed")
        old = _sessions(conn, "pgherald-consumer")
        assert old, "no consumer session"
        for pid in old:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        later = [pgherald.publish(conn, "orders", {"n": n}) for n in (2, 3)]
        wait_until(lambda: len(out) >= 3 or proc.poll() is not None, 15, "events 2 and 3 printed")
        assert proc.poll() is None, "".join(err)
        assert set(_sessions(conn, "pgherald-consumer")).isdisjoint(old)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, "".join(err)
    printed = [json.loads(line)["id"] for line in out]
    assert list(dict.fromkeys(printed)) == [first, *later], printed  # at least once, in order
    assert not any("Traceback" in line for line in err), err


def test_cli_cdc_run_goes_on_after_its_walsender_is_terminated(cdc_dsn: str) -> None:
    """
    docs/cdc.md: the change stream behind ``pgherald cdc run`` reconnects after a dropped
    connection and resumes from what it acknowledged: a change committed meanwhile is printed
    once, after the reconnection; SIGTERM ends the command with status 0.
    """
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    args = ("cdc", "run", "--slot", "s_cli", "--read-coalesce", "0", "t")
    with _command(cdc_dsn, *args) as (proc, out, err):
        wait_until(lambda: slot_ready(cdc_dsn, "s_cli") or proc.poll() is not None, 15, "reading")
        sql(cdc_dsn, "INSERT INTO t VALUES (1)")
        end = current_lsn(cdc_dsn)
        wait_until(lambda: out or proc.poll() is not None, 10, "change 1 printed")
        wait_until(lambda: confirmed(cdc_dsn, "s_cli") >= end, 10, "change 1 acknowledged")
        pid = _walsender(cdc_dsn, "s_cli")
        assert pid is not None
        _terminate(cdc_dsn, pid)
        sql(cdc_dsn, "INSERT INTO t VALUES (2)")
        wait_until(lambda: len(out) >= 2 or proc.poll() is not None, 15, "change 2 printed")
        assert proc.poll() is None, "".join(err)
        assert _walsender(cdc_dsn, "s_cli") not in (None, pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, "".join(err)
    assert [json.loads(line)["key"] for line in out] == ["1", "2"], out
    assert not any("Traceback" in line for line in err), err
