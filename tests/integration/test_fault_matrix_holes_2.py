"""
More holes of the class x fault x runtime matrix (after test_fault_matrix_holes.py): pairs
that had met a real fault only at random, in a storm, or not at all.

- ``pgherald relay`` and ``pgherald schedule run`` whose database sessions are ended under
  them (``pg_terminate_backend``, found by their ``application_name``): they go on, what is
  published or due afterwards goes out once, and SIGTERM still ends them with status 0 and no
  traceback (docs/cli.md, docs/relay.md, docs/durable.md).
- The relay's (`Relay`, `AsyncRelay`) database connection frozen (half-open: only its statement
  deadline finds it) and refused (the server unreachable), deterministically, on a thread,
  asyncio and trio: found within the documented bound, back once the fault ends, every event
  relayed once in order, and `stop()` within a second while the fault lasts.
- The gateway's Hub with its database connections frozen, on asyncio: the deterministic trio
  tests of tests/integration/test_gateway_faults.py run on asyncio (they are written on anyio:
  the same body, on the other event loop).

The module runs on a server of its own (tests/fix_quiet.py): another test's open transaction on
the shared server would hold the log's events back, and the bounded waits would measure it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import SECRET, Receiver
from tests.fix_durable import _OnAThread, uncovered
from tests.fix_faults import OneWayProxy, wait_until, watching
from tests.fix_proxy import _target_of
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)
from tests.integration.test_fault_matrix_holes import (
    _accept_all,
    _command,
    _consumer_of,
    _dead_letters,
    _publish,
    _relay,
    _relayed,
    _sessions,
)
from tests.integration.test_gateway_faults import (
    test_on_trio_durable_streams_through_a_severed_or_frozen_path_get_every_event_once as _durable,
)
from tests.integration.test_gateway_faults import (
    test_on_trio_live_clients_get_a_reconnect_gap_then_every_event as _live,
)

RUNTIMES = ["sync", "asyncio", "trio"]

# docs/durable.md, "Dead connections are found": "A half-open connection is found within
# poll_interval + health_check_timeout" - the consumer's defaults, which the relay's keeps.
POLL_INTERVAL = 0.5
HEALTH_CHECK_TIMEOUT = 5.0
FOUND_WITHIN = POLL_INTERVAL + HEALTH_CHECK_TIMEOUT
SLACK = 0.75  # the log record's own delay, a loaded machine


def _terminate_all(conn: psycopg.Connection, pids: list[int]) -> None:
    for pid in pids:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def _exactly_once(receiver: Receiver) -> list[int]:
    """Every arrival at the receiver, duplicates included, in arrival order."""
    with receiver.lock:
        return [int(body["id"]) for body in receiver.accepted]


def _acknowledged(conn: psycopg.Connection) -> bool:
    """The relay group's position covers every stored event (no read in hand)."""
    return uncovered(conn, "relay") == 0


# -- 1. the CLI's relay and scheduler x their sessions terminated --


def test_cli_relay_goes_on_after_its_sessions_are_terminated(
    installed: str, conn: psycopg.Connection, receiver_factory: Callable[..., Receiver]
) -> None:
    """
    docs/relay.md, Faults: "PostgreSQL restarted / connection lost: the consumer reconnects";
    docs/cli.md: ``pgherald relay`` runs "until Ctrl-C or SIGTERM", then prints how many events
    it relayed, exit status 0. Its sessions (``application_name`` ``pgherald-relay``) are
    ended while it waits with nothing in hand: the events published afterwards reach the
    webhook, in order, each once (no read was in hand to re-send), none dead-lettered.
    """
    receiver = receiver_factory(_accept_all)
    ids = _publish(installed, 0, 1)
    args = ("relay", "--to", receiver.url, "--secret", SECRET, "orders")
    with _command(installed, *args) as (proc, _, err):
        wait_until(
            lambda: _relayed(receiver) == ids or proc.poll() is not None, 15, "events 0, 1 relayed"
        )
        wait_until(lambda: _acknowledged(conn) or proc.poll() is not None, 5, "them acknowledged")
        old = _sessions(conn, "pgherald-relay")
        assert old, f"no relay session: {''.join(err)}"
        _terminate_all(conn, old)
        ids += _publish(installed, 2, 3)
        wait_until(
            lambda: set(ids) <= set(_relayed(receiver)) or proc.poll() is not None,
            15,
            "events 2, 3 relayed after the sessions were ended",
        )
        assert proc.poll() is None, "".join(err)
        new = _sessions(conn, "pgherald-relay")
        assert new, "no relay session after the reconnection"
        assert set(new).isdisjoint(old)
        wait_until(lambda: _acknowledged(conn), 5, "events 2, 3 acknowledged")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, "".join(err)
    assert _exactly_once(receiver) == ids
    assert receiver.bad_signatures == 0
    assert _dead_letters(installed) == 0
    assert not any("Traceback" in line for line in err), err
    assert any(line.startswith("relayed 4 events") for line in err), err


def _due_now(conn: psycopg.Connection) -> None:
    """Every schedule due now, and the scheduler woken (it polls every 0.5 s anyway)."""
    conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now()")
    conn.execute("SELECT pg_notify('pgherald_wake_v1', 'scheduled')")


def _count(conn: psycopg.Connection, channel: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pgherald.events_v1 WHERE channel = %s", (channel,)
    ).fetchone()
    return int(row[0]) if row else -1


def test_cli_schedule_run_goes_on_after_its_session_is_terminated(
    installed: str, conn: psycopg.Connection
) -> None:
    """
    docs/durable.md, periodic events, Faults: "a lost [connection is replaced] at once ...
    Ticks and delayed events due meanwhile go out once it is back, each once"; docs/cli.md:
    ``pgherald schedule run`` runs "until Ctrl-C or SIGTERM". Its session
    (``pgherald-schedule``) is ended; a tick and a delayed event become due while it is cut off:
    both are published after it reconnects, each once; SIGTERM ends it with status 0.
    """
    # Due once a year: only `_due_now` makes it due during the test.
    pgherald.add_schedule(conn, "yearly", "0 0 1 1 *", "ticks", {"n": 1})
    with _command(installed, "schedule", "run") as (proc, _, err):
        wait_until(
            lambda: _sessions(conn, "pgherald-schedule") or proc.poll() is not None,
            15,
            "the scheduler to connect",
        )
        _due_now(conn)
        wait_until(lambda: _count(conn, "ticks") == 1 or proc.poll() is not None, 10, "tick 1")
        old = _sessions(conn, "pgherald-schedule")
        assert old, "".join(err)
        _terminate_all(conn, old)
        _due_now(conn)  # while it is cut off (or reconnecting)
        pgherald.publish(conn, "later", {"n": 1}, deliver_after=timedelta(0))
        wait_until(
            lambda: (
                (_count(conn, "ticks"), _count(conn, "later")) == (2, 1) or proc.poll() is not None
            ),
            10,
            "tick 2 and the delayed event after the session was ended",
        )
        assert proc.poll() is None, "".join(err)
        new = _sessions(conn, "pgherald-schedule")
        assert new, "no scheduler session after the reconnection"
        assert set(new).isdisjoint(old)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, "".join(err)
    ticks = conn.execute(
        "SELECT headers->>'pgherald_schedule', headers->>'pgherald_tick'"
        " FROM pgherald.events_v1 WHERE channel = 'ticks'"
    ).fetchall()
    per_tick = Counter(ticks)
    assert len(per_tick) == 2, ticks  # two distinct ticks ...
    assert set(per_tick.values()) == {1}, ticks  # ... each published once
    assert (_count(conn, "ticks"), _count(conn, "later")) == (2, 1)  # nothing more, late
    assert conn.execute("SELECT count(*) FROM pgherald.scheduled_v1").fetchone() == (0,)
    assert not any("Traceback" in line for line in err), err


# -- 2. the relay's database connection frozen, or refused, on every runtime --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_relay_whose_database_connection_freezes_finds_it_and_relays_everything_once(
    runtime: str,
    installed: str,
    conn: psycopg.Connection,
    receiver_factory: Callable[..., Receiver],
) -> None:
    """
    docs/durable.md: "A half-open connection is found within poll_interval +
    health_check_timeout" (0.5 + 5 s); docs/relay.md, "connection lost: the consumer
    reconnects". The relay's connection stops forwarding (no FIN, no RST: a stalled path), and
    new connections are refused until the fault ends: the relay finds the loss within the
    bound, retries, and once connections go through again relays the events published during
    the fault, then the later ones: every event at the webhook once, in order. The frozen
    session, still on the server with the group's partitions, is ended by the reconnection
    (else the new one would hold no partition and relay nothing).
    """
    receiver = receiver_factory(_accept_all)
    with OneWayProxy(_target_of(installed)) as proxy, watching("pgherald.consumer") as log:
        relay = _relay(runtime, proxy.dsn_for(installed), receiver)
        running = _OnAThread(runtime, relay)
        try:
            ids = _publish(installed, 0, 1)
            wait_until(lambda: _relayed(receiver) == ids, 10, "events 0, 1 relayed")
            wait_until(lambda: _acknowledged(conn), 5, "events 0, 1 acknowledged")
            consumer = _consumer_of(relay)
            assert (consumer.stats.reconnects, consumer.stats.connect_failures) == (0, 0)

            proxy.refuse()
            frozen_at = time.time()
            assert proxy.freeze() >= 1
            ids += _publish(installed, 2, 3)  # during the fault
            wait_until(
                lambda: log.matching("consumer connection lost") or not running.thread.is_alive(),
                FOUND_WITHIN + SLACK + 1,
                "the frozen connection to be found",
            )
            (lost,) = log.matching("consumer connection lost", logging.WARNING)
            found_after = lost.created - frozen_at
            assert found_after <= FOUND_WITHIN + SLACK, f"found after {found_after:.2f}s"
            wait_until(
                lambda: consumer.stats.connect_failures >= 2 or not running.thread.is_alive(),
                5,
                "refused reconnections",
            )
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            assert not set(ids[2:]) & set(_relayed(receiver))  # nothing read meanwhile

            proxy.allow()  # the fault ends (the frozen connection stays frozen)
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 10, "events 2, 3 relayed")
            ids += _publish(installed, 4)
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 5, "event 4 relayed")
            wait_until(lambda: _acknowledged(conn), 5, "every event acknowledged")
            assert consumer.stats.reconnects == 1
            running.stop(within=1.0)
        finally:
            running.end()
    assert running.error is None, repr(running.error)
    assert _exactly_once(receiver) == ids  # in order, none lost, none twice
    assert receiver.bad_signatures == 0
    assert _dead_letters(installed) == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_relay_stops_within_a_second_inside_a_statement_on_a_frozen_connection(
    runtime: str,
    installed: str,
    conn: psycopg.Connection,
    receiver_factory: Callable[..., Receiver],
) -> None:
    """
    docs/durable.md, Stopping: `stop()` ends `run()` "within a second in every state: ...
    reading (even on a frozen connection)"; docs/relay.md: a relay stopped "finishes or
    abandons the read in hand". The relay's connection freezes (new ones refused) with its
    next statement held in it, unanswered: `stop()` returns within a second, no error. The events
    published during the fault are not lost: once it ends, the next relay of the group relays
    them, once each, after the first ones.
    """
    receiver = receiver_factory(_accept_all)
    with OneWayProxy(_target_of(installed)) as proxy, watching("pgherald.consumer") as log:
        relay = _relay(runtime, proxy.dsn_for(installed), receiver)
        running = _OnAThread(runtime, relay)
        try:
            ids = _publish(installed, 0, 1)
            wait_until(lambda: _relayed(receiver) == ids, 10, "events 0, 1 relayed")
            wait_until(lambda: _acknowledged(conn), 5, "events 0, 1 acknowledged")
            proxy.refuse()
            # What the relay sends stops first, so that a statement in flight is answered and
            # the next one is held (never sent to the server), then its answers too.
            assert proxy.freeze_requests() >= 1
            wait_until(lambda: proxy.held(), 5, "a statement of the relay's held in the freeze")
            proxy.freeze_answers()
            ids += _publish(installed, 2, 3)
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            running.stop(within=1.0)
        finally:
            running.end()
        assert running.error is None, repr(running.error)
        assert not log.matching("consumer connection lost")  # stopped inside the statement
        assert _relayed(receiver) == ids[:2]
        # The fault ends: the frozen session sees its client gone and ends (its locks too).
        proxy.thaw()
        proxy.allow()
    again = _OnAThread(runtime, _relay(runtime, installed, receiver))
    try:
        wait_until(lambda: set(ids) <= set(_relayed(receiver)), 10, "events 2, 3 relayed")
        again.stop(within=1.0)
    finally:
        again.end()
    assert again.error is None, repr(again.error)
    assert _exactly_once(receiver) == ids
    assert _dead_letters(installed) == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_relay_whose_database_refuses_connections_retries_then_relays_everything_once(
    runtime: str,
    installed: str,
    conn: psycopg.Connection,
    receiver_factory: Callable[..., Receiver],
) -> None:
    """
    docs/durable.md, Connection loss: the consumer "reconnects with exponential backoff ...
    for ever by default, and continues from the stored position: nothing is lost"; docs/relay.md:
    "connection lost: the consumer reconnects". The relay's connection is reset and new ones
    refused (the server unreachable): `run()` goes on retrying; once connections go through,
    the events published meanwhile are relayed, then later ones, each once, in order. Refused
    again, `stop()` ends it within a second while it retries.
    """
    receiver = receiver_factory(_accept_all)
    with OneWayProxy(_target_of(installed)) as proxy:
        relay = _relay(runtime, proxy.dsn_for(installed), receiver)
        running = _OnAThread(runtime, relay)
        try:
            ids = _publish(installed, 0, 1)
            wait_until(lambda: _relayed(receiver) == ids, 10, "events 0, 1 relayed")
            wait_until(lambda: _acknowledged(conn), 5, "events 0, 1 acknowledged")
            consumer = _consumer_of(relay)

            proxy.refuse()
            proxy.sever()
            ids += _publish(installed, 2, 3)  # while it cannot connect
            wait_until(
                lambda: consumer.stats.connect_failures >= 3 or not running.thread.is_alive(),
                5,
                "refused reconnections",
            )
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            assert not set(ids[2:]) & set(_relayed(receiver))

            proxy.allow()
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 10, "events 2, 3 relayed")
            ids += _publish(installed, 4)
            wait_until(lambda: set(ids) <= set(_relayed(receiver)), 5, "event 4 relayed")
            wait_until(lambda: _acknowledged(conn), 5, "every event acknowledged")
            assert consumer.stats.reconnects == 1

            # Refused again: stopped while it retries.
            failures = consumer.stats.connect_failures
            proxy.refuse()
            proxy.sever()
            wait_until(
                lambda: consumer.stats.connect_failures > failures, 5, "a refused reconnection"
            )
            assert running.thread.is_alive(), f"run() ended: {running.error!r}"
            running.stop(within=1.0)
        finally:
            running.end()
    assert running.error is None, repr(running.error)
    assert _exactly_once(receiver) == ids
    assert receiver.bad_signatures == 0
    assert _dead_letters(installed) == 0


# -- 3. the gateway's Hub x its database connections frozen x asyncio --


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_asyncio_live_clients_of_a_frozen_gateway_get_a_reconnect_gap_then_every_event(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """
    test_gateway_faults.py's trio test of a plain channel's live clients, on asyncio, with the
    gateway's connections frozen (half-open): SSE and WebSocket clients get a ``reconnect``
    gap once the listener (its health check finds the freeze) listens again, then every event
    sent after it; /healthz gives up on its frozen connection within its 3 s bound (a 503),
    then answers 200 from a new one.
    """
    await _live(dsn, conn, "freeze")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_asyncio_durable_streams_through_a_frozen_path_get_every_event_once(
    installed: str, conn: psycopg.Connection[Any]
) -> None:
    """
    test_gateway_faults.py's trio test of durable streams, on asyncio, with the gateway's
    three connections frozen (the listener, ``pgherald-gateway-db``,
    ``pgherald-gateway-tail``) while a publish through the gateway is held in them, then
    thawed: streaming clients and a resume get every event once, in log order, and the publish
    stores its event once.
    """
    await _durable(installed, conn, "freeze")
