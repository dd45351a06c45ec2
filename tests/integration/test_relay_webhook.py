"""`Relay` into webhooks: a real HTTP receiver on loopback that fails and throttles."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_brokers import SECRET, Receiver, publish_paced
from tests.fix_durable import _OnAThread, uncovered
from tests.fix_faults import FaultProxy, SilentServer, await_until, free_port, wait_until


def running(relay: pgherald.Relay) -> threading.Thread:
    t = threading.Thread(target=relay.run)
    t.start()
    return t


def test_a_receiver_failing_30_percent_and_throttling_gets_every_event_signed(
    installed: str, conn: psycopg.Connection, receiver_factory: Callable[..., Receiver]
) -> None:
    rng = random.Random(13)
    fails_in_a_row = [0]
    throttled_at = (20, 120)

    def decide(n: int, body: Any) -> tuple[int, dict[str, str]]:
        if n in throttled_at:
            return 429, {"Retry-After": "1"}
        if rng.random() < 0.3 and fails_in_a_row[0] < 3:  # never 8 in a row: none dead
            fails_in_a_row[0] += 1
            return 500, {}
        fails_in_a_row[0] = 0
        return 200, {}

    receiver = receiver_factory(decide)
    ids = publish_paced(installed, "orders", 200, 50, 0)
    relay = pgherald.Relay(
        installed,
        to=receiver.url,
        channels=["orders"],
        secret=SECRET,
        retry_delay=0.005,
        retry_max_delay=0.02,
    )
    t = running(relay)
    try:
        wait_until(lambda: uncovered(conn, "relay") == 0, 30, "every event delivered")
    finally:
        relay.stop()
        t.join(10)
    assert receiver.bad_signatures == 0
    got = [body["id"] for body in receiver.accepted]
    assert got == ids  # every event once (each was accepted once), in log order
    statuses = [s for _, _, s in receiver.requests]
    assert statuses.count(500) >= 0.2 * len(ids)  # the receiver did fail a lot
    for n in throttled_at:  # Retry-After: 1 was honoured
        assert receiver.requests[n + 1][0] - receiver.requests[n][0] >= 0.95
    assert receiver.accepted[0]["channel"] == "orders"
    assert receiver.accepted[0]["payload"] == {"i": 0}
    assert receiver.accepted[0]["key"] == "k0"
    assert relay.stats.dead_lettered == 0


def test_after_max_attempts_an_event_is_dead_lettered_and_the_rest_delivered_in_batches(
    installed: str, conn: psycopg.Connection, receiver_factory: Callable[..., Receiver]
) -> None:
    ids = publish_paced(installed, "orders", 30, 30, 0)
    poison = ids[12]

    def decide(n: int, body: Any) -> tuple[int, dict[str, str]]:
        events = body if isinstance(body, list) else [body]
        return (500, {}) if any(e["id"] == poison for e in events) else (200, {})

    receiver = receiver_factory(decide)
    relay = pgherald.Relay(
        installed,
        to=receiver.url,
        channels=["orders"],
        secret=SECRET,
        webhook_batch=5,
        max_attempts=3,
        retry_delay=0.005,
        retry_max_delay=0.02,
    )
    t = running(relay)
    try:
        wait_until(lambda: uncovered(conn, "relay") == 0, 30, "every event settled")
    finally:
        relay.stop()
        t.join(10)
    delivered = [
        e["id"] for body in receiver.accepted for e in (body if isinstance(body, list) else [body])
    ]
    assert delivered == [i for i in ids if i != poison]
    (dead,) = pgherald.dead_letters(conn, "relay")
    assert dead.event_id == poison
    assert "failed 3 times: HTTP 500" in dead.error
    assert relay.stats.dead_lettered == 1
    # The batch of ids[10:15] failed 3 times, then went one by one: 10 and 11 alone, 12 three
    # times, and the batches resumed after it.
    firsts = [first for _, first, status in receiver.requests if status == 200]
    assert firsts[:7] == [ids[0], ids[5], ids[10], ids[11], ids[13], ids[18], ids[23]]


def test_plain_http_to_another_host_is_refused(installed: str) -> None:
    with pytest.raises(pgherald.UsageError, match="use https"):
        pgherald.Relay(installed, to="http://example.com/hook", channels=["orders"])


# -- AsyncRelay into webhooks on asyncio and trio (httpx runs on both) --


@pytest.mark.anyio
async def test_async_relay_into_webhooks_retries_serves_metrics_and_stops(
    installed: str, anyio_backend: str, receiver_factory: Callable[..., Receiver]
) -> None:
    ids = publish_paced(installed, "orders", 20, 20, 0)
    receiver = receiver_factory(lambda n, body: (500, {}) if n < 2 else (200, {}))
    relay = pgherald.AsyncRelay(
        installed,
        to=receiver.url,
        channels=["orders"],
        secret=SECRET,
        retry_delay=0.005,
        retry_max_delay=0.02,
        metrics_port=0,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await await_until(lambda: len(receiver.accepted) == 20, 20, "every event delivered")
        await await_until(lambda: relay.metrics_address is not None, 5, "the metrics server")
        assert relay.metrics_address is not None
        host, port = relay.metrics_address
        text = await anyio.to_thread.run_sync(_get, f"http://{host}:{port}/metrics")
        assert 'pgherald_relay_retries_total{group="relay"' in text
        relay.stop()
    assert [body["id"] for body in receiver.accepted] == ids
    assert receiver.bad_signatures == 0
    assert relay.stats.retries == 2  # the two failures, each retried after a backoff
    assert relay.stats.relayed == 20


@pytest.mark.anyio
async def test_async_relay_into_webhooks_through_a_terminated_backend_and_a_severed_connection(
    installed: str,
    conn: psycopg.Connection,
    fault_proxy: FaultProxy,
    anyio_backend: str,
    receiver_factory: Callable[..., Receiver],
) -> None:
    # The relay's database side on each runtime: its consumer's session ends twice (killed on
    # the server, cut on the way); every event reaches the receiver, in order. Only this
    # database's relays are killed: a test on another xdist worker has its own.
    receiver = receiver_factory(lambda n, body: (200, {}))
    relay = pgherald.AsyncRelay(
        fault_proxy.dsn_for(installed), to=receiver.url, channels=["orders"], secret=SECRET
    )

    def kill_the_relays_session() -> None:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'pgherald-relay%%'"
        ).fetchall()
        assert killed == [(True,)]  # the relay's one session, and no other

    ids: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        for fault in (kill_the_relays_session, fault_proxy.sever, None):
            ids += publish_paced(installed, "orders", 10, 10, 0)
            wanted = len(ids)
            await await_until(lambda n=wanted: len(receiver.accepted) >= n, 20, "the events")
            # Acknowledged before the fault: a batch sent but not acknowledged comes again.
            await await_until(lambda: uncovered(conn, "relay") == 0, 10, "the acknowledgement")
            if fault is not None:
                before = fault_proxy.accepted
                fault()
                # A new session, not the events of the old one: the fault really ended it.
                await await_until(lambda b=before: fault_proxy.accepted > b, 10, "a new session")
        relay.stop()
    # Each fault came after the read in hand was acknowledged: the new session starts from
    # the group's position, so every event arrives exactly once, in log order (webhooks have
    # no de-duplication: a read sent but not acknowledged would come again).
    assert [body["id"] for body in receiver.accepted] == ids


@pytest.fixture
def hanging(
    installed: str, receiver_factory: Callable[..., Receiver]
) -> Iterator[tuple[Receiver, threading.Event]]:
    """One event to relay, and a receiver whose POSTs hang until the test ends (the event: the
    first POST arrived)."""
    publish_paced(installed, "orders", 1, 1, 0)
    release = threading.Event()
    arrived = threading.Event()

    def hang(n: int, body: Any) -> tuple[int, dict[str, str]]:
        arrived.set()
        release.wait(30)
        return 200, {}

    yield receiver_factory(hang), arrived
    release.set()


@pytest.mark.anyio
async def test_async_relay_stops_within_a_second_while_a_webhook_hangs(
    installed: str, anyio_backend: str, hanging: tuple[Receiver, threading.Event]
) -> None:
    receiver, arrived = hanging
    relay = pgherald.AsyncRelay(installed, to=receiver.url, channels=["orders"], secret=SECRET)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await await_until(arrived.is_set, 10, "the POST")
        started = time.monotonic()
        relay.stop()
    took = time.monotonic() - started
    assert took < 1.0, f"run() took {took:.2f}s after stop()"
    assert relay.stats.relayed == 0  # not acknowledged: it comes again


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_async_relay_stops_from_another_thread_while_a_webhook_hangs(
    runtime: str, installed: str, hanging: tuple[Receiver, threading.Event]
) -> None:
    # stop() from a thread other than the loop's (a watchdog, a signal handler's thread):
    # it cancels the POST in flight on the loop, and run() ends within a second, cleanly.
    receiver, arrived = hanging
    relay = pgherald.AsyncRelay(installed, to=receiver.url, channels=["orders"], secret=SECRET)
    running = _OnAThread(runtime, relay)
    wait_until(arrived.is_set, 10, "the POST")
    took = running.stop(within=1.0)
    assert running.error is None, repr(running.error)
    assert took < 1.0
    assert relay.stats.relayed == 0  # not acknowledged: it comes again


@pytest.mark.anyio
async def test_async_relay_with_its_metrics_port_in_use_raises_oserror(
    installed: str, anyio_backend: str
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = pgherald.AsyncRelay(
            installed, to="http://127.0.0.1:9/hook", channels=["orders"], metrics_port=port
        )
        with pytest.raises(OSError, match="in use"):  # as itself, not in an exception group
            await relay.run()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _dead_lettered_after_three_tries(
    installed: str, conn: psycopg.Connection, url: str, **options: Any
) -> pgherald.DeadLetter:
    """One event relayed to *url* with max_attempts=3 until it settles: its dead letter, after
    asserting what every such run shows (3 tries, then dead-lettered)."""
    event = pgherald.publish(conn, "orders", {"n": 1})
    relay = pgherald.Relay(
        installed,
        to=url,
        channels=["orders"],
        secret=SECRET,
        max_attempts=3,
        retry_delay=0.005,
        retry_max_delay=0.02,
        **options,
    )
    t = running(relay)
    try:
        wait_until(lambda: uncovered(conn, "relay") == 0, 10, "the event settled")
    finally:
        relay.stop()
        t.join(10)
    (dead,) = pgherald.dead_letters(conn, "relay")
    assert dead.event_id == event
    assert relay.stats.retries == 2  # 3 tries: a backoff between each
    assert relay.stats.dead_lettered == 1
    assert relay.stats.relayed == 0
    return dead


def test_a_webhook_nobody_listens_on_is_tried_max_attempts_times_then_dead_lettered(
    installed: str, conn: psycopg.Connection
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # connection refused
    dead = _dead_lettered_after_three_tries(installed, conn, url)
    assert "failed 3 times: ConnectError" in dead.error


def test_a_webhook_that_never_answers_times_out_max_attempts_times_then_is_dead_lettered(
    installed: str, conn: psycopg.Connection, silent_server: SilentServer
) -> None:
    url = f"http://127.0.0.1:{silent_server.port}/hook"
    dead = _dead_lettered_after_three_tries(installed, conn, url, timeout=0.2)
    assert "failed 3 times: ReadTimeout" in dead.error
    # A timed-out request's connection is not used again: one connection per try (accepted
    # by the server's thread, maybe just after the relay gave up).
    wait_until(lambda: len(silent_server.accepted) >= 3, 5, "three connections")
    assert len(silent_server.accepted) == 3
