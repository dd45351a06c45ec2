"""
Liveness that proves delivery, and no notification left behind around the listener's own
statements (health checks, LISTEN/UNLISTEN), nor sent too early after `subscribe()`.

The "during a statement" tests make the overlap certain with the freezing proxy: the
listener's statement is sent into a frozen connection, the notification is sent and reaches
the proxy, then the proxy thaws, so libpq reads the notification together with the answer.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

import pgherald
from pgherald._protocol import liveness, pgwire
from pgherald._waiting import Waiter
from tests.fix_faults import FaultProxy, LogWatch, await_until, running, wait_until

QUIET = "quiet"


# -- the proxy's two sides: what the listener sent, what the server sent --


def _sides(proxy: FaultProxy) -> tuple[list[socket.socket], list[socket.socket]]:
    with proxy._lock:
        socks = list(proxy._peers)
    client: list[socket.socket] = []
    upstream: list[socket.socket] = []
    for s in socks:
        try:  # the proxy's thread may close a pair after the copy: a closed one is on no side
            name = s.getsockname()
        except OSError:
            continue
        (client if isinstance(name, tuple) and name[1] == proxy.port else upstream).append(s)
    return client, upstream


def _pending_both_ways(proxy: FaultProxy) -> bool:
    """The listener's statement and the server's notification both wait in the frozen proxy."""
    client, upstream = _sides(proxy)
    ready, _, _ = select.select([*client, *upstream], [], [], 0)
    return len(client) == len(upstream) == 1 and len(ready) == 2


def _only_the_listener(proxy: FaultProxy) -> bool:
    # The start-up delivery check's second connection is gone once the proxy saw it close.
    return len(_sides(proxy)[0]) == 1


def _notify(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.notify(c, channel, payload)


def _warm_up(conn: psycopg.Connection, got: list[str]) -> None:
    # One delivery first, so that the loop is idle in its wait, not just starting.
    pgherald.notify(conn, QUIET, "warm-up")
    wait_until(lambda: got == ["warm-up"], 5, "the warm-up notification")


async def _async_warm_up(dsn: str, got: list[str]) -> None:
    await anyio.to_thread.run_sync(_notify, dsn, QUIET, "warm-up")
    await await_until(lambda: got == ["warm-up"], 5, "the warm-up notification")


# -- a notification that arrives during the health check --


def test_notification_during_health_check_is_delivered_at_once(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    got: list[str] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=[QUIET],
        health_check_interval=0.3,
        health_check_timeout=10.0,
    ) as listener:
        listener.on(QUIET)(lambda n: got.append(n.payload))
        with running(listener):
            _warm_up(conn, got)
            wait_until(lambda: _only_the_listener(fault_proxy), 5, "the check's connection")
            checks = listener.stats.health_checks
            assert fault_proxy.freeze() == 1
            wait_until(lambda: listener.stats.health_checks > checks, 5, "a probe to start")
            pgherald.notify(conn, QUIET, "during the probe")
            wait_until(lambda: _pending_both_ways(fault_proxy), 5, "probe and notification")
            fault_proxy.thaw()
            took = wait_until(lambda: len(got) == 2, 3, "the notification on a quiet channel")
    assert took < 1.0, f"delivered {took:.2f}s after the probe's answer"
    assert got == ["warm-up", "during the probe"]
    assert listener.stats.reconnects == 0


@pytest.mark.anyio
async def test_async_notification_during_health_check_is_delivered_at_once(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    got: list[str] = []
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn),
        channels=[QUIET],
        health_check_interval=0.3,
        health_check_timeout=10.0,
    ) as listener:
        listener.on(QUIET)(lambda n: got.append(n.payload))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _async_warm_up(dsn, got)
            await await_until(lambda: _only_the_listener(fault_proxy), 5, "the check's conn")
            checks = listener.stats.health_checks
            assert fault_proxy.freeze() == 1
            await await_until(lambda: listener.stats.health_checks > checks, 5, "a probe")
            await anyio.to_thread.run_sync(_notify, dsn, QUIET, "during the probe")
            await await_until(lambda: _pending_both_ways(fault_proxy), 5, "probe and notify")
            fault_proxy.thaw()
            took = await await_until(
                lambda: len(got) == 2, 3, "the notification on a quiet channel"
            )
            listener.stop()
    assert took < 1.0, f"delivered {took:.2f}s after the probe's answer"
    assert got == ["warm-up", "during the probe"]
    assert listener.stats.reconnects == 0


# -- a notification that arrives during the LISTEN of another channel --


def test_notification_during_listen_of_another_channel_is_delivered_at_once(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    got: list[str] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn), channels=[QUIET], health_check_interval=60.0
    ) as listener:
        listener.on(QUIET)(lambda n: got.append(n.payload))
        with running(listener):
            _warm_up(conn, got)
            wait_until(lambda: _only_the_listener(fault_proxy), 5, "the check's connection")
            assert fault_proxy.freeze() == 1
            subscriber = threading.Thread(target=listener.subscribe, args=["other"])
            subscriber.start()
            pgherald.notify(conn, QUIET, "during the LISTEN")
            wait_until(lambda: _pending_both_ways(fault_proxy), 5, "LISTEN and notification")
            fault_proxy.thaw()
            took = wait_until(lambda: len(got) == 2, 3, "the notification on a quiet channel")
            subscriber.join(5)
            assert "other" in listener.listening
    assert took < 1.0, f"delivered {took:.2f}s after the LISTEN's answer"
    assert got == ["warm-up", "during the LISTEN"]


@pytest.mark.anyio
async def test_async_notification_during_listen_of_another_channel_is_delivered_at_once(
    dsn: str, fault_proxy: FaultProxy
) -> None:
    got: list[str] = []
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn), channels=[QUIET], health_check_interval=60.0
    ) as listener:
        listener.on(QUIET)(lambda n: got.append(n.payload))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _async_warm_up(dsn, got)
            await await_until(lambda: _only_the_listener(fault_proxy), 5, "the check's conn")
            assert fault_proxy.freeze() == 1
            tg.start_soon(listener.subscribe, "other")
            await anyio.to_thread.run_sync(_notify, dsn, QUIET, "during the LISTEN")
            await await_until(lambda: _pending_both_ways(fault_proxy), 5, "LISTEN and notify")
            fault_proxy.thaw()
            took = await await_until(
                lambda: len(got) == 2, 3, "the notification on a quiet channel"
            )
            await await_until(lambda: "other" in listener.listening, 5, "the LISTEN")
            listener.stop()
    assert took < 1.0, f"delivered {took:.2f}s after the LISTEN's answer"
    assert got == ["warm-up", "during the LISTEN"]


# -- subscribe() returns only once its own LISTEN is in effect --

WORKERS = 4
ROUNDS = 25


def test_send_right_after_subscribe_under_concurrent_subscribes_is_never_lost(
    dsn: str,
) -> None:
    arrived: dict[str, threading.Event] = {}
    errors: list[BaseException] = []
    with pgherald.Listener(dsn, channels=["base"]) as listener:

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            event = arrived.get(n.channel)
            if event is not None:
                event.set()

        def worker(i: int) -> None:
            try:
                with psycopg.connect(dsn, autocommit=True) as c:
                    for k in range(ROUNDS):
                        ch = f"w{i}-{k}"
                        arrived[ch] = threading.Event()
                        listener.subscribe(ch)
                        pgherald.notify(c, ch, "sent right after subscribe() returned")
                        assert arrived[ch].wait(3), f"{ch}: lost, subscribe() returned early"
                        listener.unsubscribe(ch)
            except BaseException as exc:
                errors.append(exc)

        with running(listener):
            threads = [threading.Thread(target=worker, args=[i]) for i in range(WORKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        listening = listener.listening
    if errors:
        raise errors[0]
    assert all(e.is_set() for e in arrived.values())
    assert len(arrived) == WORKERS * ROUNDS
    assert listening == {"base"}  # every unsubscribe() was applied too


@pytest.mark.anyio
async def test_async_send_right_after_subscribe_under_concurrent_subscribes_is_never_lost(
    dsn: str,
) -> None:
    arrived: dict[str, anyio.Event] = {}
    async with pgherald.AsyncListener(dsn, channels=["base"]) as listener:

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            event = arrived.get(n.channel)
            if event is not None:
                event.set()

        async def worker(i: int) -> None:
            c = await anyio.to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=True))
            try:
                for k in range(ROUNDS):
                    ch = f"w{i}-{k}"
                    arrived[ch] = anyio.Event()
                    await listener.subscribe(ch)
                    await anyio.to_thread.run_sync(pgherald.notify, c, ch, "right after")
                    with anyio.move_on_after(3):
                        await arrived[ch].wait()
                    assert arrived[ch].is_set(), f"{ch}: lost, subscribe() returned early"
                    await listener.unsubscribe(ch)
            finally:
                await anyio.to_thread.run_sync(c.close)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            async with anyio.create_task_group() as workers:
                for i in range(WORKERS):
                    workers.start_soon(worker, i)
            listening = listener.listening
            listener.stop()
    assert len(arrived) == WORKERS * ROUNDS
    assert listening == {"base"}  # every unsubscribe() was applied too


def test_subscribe_from_another_thread_raises_when_not_confirmed(dsn: str) -> None:
    # A loop that cannot get to the LISTEN (a handler blocks it): subscribe() must say so,
    # never return as if it had worked.
    release = threading.Event()
    with pgherald.Listener(dsn, channels=["block"], health_check_timeout=0.2) as listener:
        entered = threading.Event()

        @listener.on("block")
        def blocking(n: pgherald.Notification) -> None:
            entered.set()
            release.wait(30)

        with running(listener):
            _notify(dsn, "block", "x")
            assert entered.wait(5)
            t0 = time.monotonic()
            try:
                with pytest.raises(pgherald.ListenError, match=r"not confirmed within 10\.2s"):
                    listener.subscribe("late")
            finally:
                release.set()
            assert time.monotonic() - t0 < 12
            assert "late" in listener.channels  # still requested: applied when the loop resumes
            wait_until(lambda: "late" in listener.listening, 5, "the LISTEN to follow")


@pytest.mark.anyio
async def test_async_subscribe_from_another_task_raises_when_not_confirmed(dsn: str) -> None:
    # The loop awaits a slow async handler: another task's subscribe() waits for the loop (it
    # is not the handler), and says so when the loop does not get to it in time.
    release = anyio.Event()
    entered = anyio.Event()
    async with pgherald.AsyncListener(
        dsn, channels=["block"], health_check_timeout=0.05
    ) as listener:

        @listener.on("block")
        async def blocking(n: pgherald.Notification) -> None:
            entered.set()
            await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_notify, dsn, "block", "x")
            with anyio.fail_after(5):
                await entered.wait()
            try:
                with pytest.raises(pgherald.ListenError, match=r"not confirmed within 10\.05s"):
                    await listener.subscribe("late")
            finally:
                release.set()
            assert "late" in listener.channels
            await await_until(lambda: "late" in listener.listening, 5, "the LISTEN to follow")
            listener.stop()


# -- a frozen connection is found within health_check_interval + health_check_timeout --

INTERVAL = 0.5
TIMEOUT = 0.5
MARGIN = 0.6


def test_frozen_connection_detected_within_interval_plus_timeout(
    dsn: str, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    gaps: list[pgherald.Gap] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=[QUIET],
        on_gap=gaps.append,
        health_check_interval=INTERVAL,
        health_check_timeout=TIMEOUT,
    ) as listener:
        listener.on(QUIET)(lambda n: None)
        with running(listener):
            wait_until(lambda: _only_the_listener(fault_proxy), 5, "the check's connection")
            fault_proxy.freeze()
            t0 = time.monotonic()
            listener_log.wait_for("listener connection lost", 1, 5)
            detected = time.monotonic() - t0
            wait_until(lambda: gaps, 5, "the reconnection")
    assert detected <= INTERVAL + TIMEOUT + MARGIN, f"took {detected:.2f}s"
    assert gaps[0].error is not None
    assert "liveness probe" in gaps[0].error


@pytest.mark.anyio
async def test_async_frozen_connection_detected_within_interval_plus_timeout(
    dsn: str, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    gaps: list[pgherald.Gap] = []
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn),
        channels=[QUIET],
        on_gap=gaps.append,
        health_check_interval=INTERVAL,
        health_check_timeout=TIMEOUT,
    ) as listener:
        listener.on(QUIET)(lambda n: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await await_until(lambda: _only_the_listener(fault_proxy), 5, "the check's conn")
            fault_proxy.freeze()
            t0 = time.monotonic()
            await await_until(
                lambda: listener_log.matching("listener connection lost"), 5, "detection"
            )
            detected = time.monotonic() - t0
            await await_until(lambda: gaps, 5, "the reconnection")
            listener.stop()
    assert detected <= INTERVAL + TIMEOUT + MARGIN, f"took {detected:.2f}s"
    assert gaps[0].error is not None
    assert "liveness probe" in gaps[0].error


# -- the liveness API itself (used by the listener and the consumer engines) --


def _raw(dsn: str, waiter: Waiter, *channels: str) -> Any:
    pgconn = waiter.run(pgwire.connect(dsn, time.monotonic() + 5))
    for ch in channels:
        query = psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(ch)).as_bytes(None)
        waiter.run(pgwire.execute(pgconn, query, time.monotonic() + 5))
    return pgconn


def test_probe_comes_back_and_keeps_every_other_notification(dsn: str) -> None:
    waiter = Waiter()
    ping = liveness.new_ping_channel()
    assert ping.startswith("pgherald_ping_")
    assert len(ping) == len("pgherald_ping_") + 16
    pgconn = _raw(dsn, waiter, ping, "app")
    try:
        _notify(dsn, "app", "before")
        wait_until(lambda: select.select([pgconn.socket], [], [], 0)[0], 5, "the notification")
        kept: list[Any] = []
        waiter.run(liveness.probe(pgconn, ping, time.monotonic() + 5, kept.append))
        assert [(n.relname, n.extra) for n in kept] == [(b"app", b"before")]
        assert pgconn.notifies() is None  # the ping itself was consumed
        waiter.run(liveness.check_delivery(dsn, pgconn, ping, time.monotonic() + 5, kept.append))
        assert len(kept) == 1
    finally:
        pgconn.finish()
        waiter.close()


def test_probe_times_out_on_a_frozen_connection(dsn: str, fault_proxy: FaultProxy) -> None:
    waiter = Waiter()
    ping = liveness.new_ping_channel()
    pgconn = _raw(fault_proxy.dsn_for(dsn), waiter, ping)
    try:
        fault_proxy.freeze()
        t0 = time.monotonic()
        with pytest.raises(pgwire.QueryTimeout):
            waiter.run(liveness.probe(pgconn, ping, time.monotonic() + 0.3, lambda n: None))
        assert time.monotonic() - t0 < 1.0
    finally:
        pgconn.finish()
        waiter.close()


def test_check_delivery_raises_pooler_error_when_nothing_comes_back(dsn: str) -> None:
    # A connection that does not LISTEN on the channel stands in for a pooled one.
    waiter = Waiter()
    pgconn = _raw(dsn, waiter)
    try:
        with pytest.raises(pgherald.PoolerError, match="session-mode pool"):
            waiter.run(
                liveness.check_delivery(
                    dsn, pgconn, liveness.new_ping_channel(), time.monotonic() + 0.5, print
                )
            )
    finally:
        pgconn.finish()
        waiter.close()
