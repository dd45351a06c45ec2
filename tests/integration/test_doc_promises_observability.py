"""
Promises of docs/observability.md, docs/reliability.md and docs/frameworks.md that no other
test held the code to, each checked against a real server (faults real too: a refusing server,
a server that accepts and never answers, a lock that holds a query back):

- metrics: ``pgherald_unhandled_total`` and ``pgherald_connect_failures_total`` of a listener;
  a consumer's ``pgherald_handler_errors_total`` counting every attempt and
  ``pgherald_consumer_redelivered_total``; `AsyncListener` and `AsyncConsumer` exported like
  the blocking ones; the lag read on one connection per database for every group registered;
  the lag left out, within its 2 s deadlines, when the database does not answer; ``port=``
  given twice serving one server;
- tracing: a consumer's ``process`` span per attempt (each retry too), a child of the
  publishing span, itself a child of the current span, with the event's partition and key;
  `apublish`, `apublish_many` and `anotify` spans;
- reliability: a handler's failure logged at ERROR on ``pgherald.listener`` with its traceback
  and the documented message, not retried; an exception in an iteration's body propagates and
  the listener stays connected (and listening) until its ``with`` block ends;
- frameworks: `running()`'s shutdown, itself cancelled, still lets the handler in progress
  finish.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

import pgherald
import pgherald.metrics
import pgherald.tracing
from pgherald.contrib.starlette import running as app_running
from pgherald.testing import DatabaseDropper
from tests.fix_db import fresh_database
from tests.fix_durable import publish_each
from tests.fix_faults import (
    FaultProxy,
    LogWatch,
    SilentServer,
    await_until,
    backend_alive,
    free_port,
    running,
    wait_until,
)
from tests.fix_proxy import FreezingProxy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


# -- observability.md: `pgherald_unhandled_total` "received on a channel with no handler";
# `pgherald_connect_failures_total` "failed attempts while reconnecting"; `handled` is
# "received, minus those with no handler and the failed ones". --


def test_listener_metrics_count_unhandled_and_failed_reconnect_attempts(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    registry = CollectorRegistry()
    got: list[str] = []
    L = {"kind": "listener", "name": "orders"}
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["orders", "audit"],  # "audit" has no handler
        health_check_interval=0.5,
        health_check_timeout=0.5,
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.2,
    ) as listener:
        pgherald.metrics.register(listener, registry=registry, name="orders")
        listener.on("orders")(lambda n: got.append(n.payload))
        with running(listener):
            pgherald.notify(conn, "audit", "nobody handles this")
            pgherald.notify(conn, "orders", "1")  # delivered after the one before it
            wait_until(lambda: got == ["1"], 5, "the handled notification")
            m = scrape(registry)
            assert sample(m, "pgherald_received_total", **L) == 2
            assert sample(m, "pgherald_unhandled_total", **L) == 1
            assert sample(m, "pgherald_handled_total", **L) == 1
            assert sample(m, "pgherald_connect_failures_total", **L) == 0

            # The server goes down: every attempt is refused until it is back.
            fault_proxy.refuse()
            fault_proxy.sever()
            listener_log.wait_for("reconnect attempt", 3, 5)
            assert sample(scrape(registry), "pgherald_connected", **L) == 0
            fault_proxy.allow()
            wait_until(lambda: listener.stats.gaps, 5, "the listener to listen again")
            m = scrape(registry)
    failed = len(listener_log.matching("reconnect attempt"))  # one line per failed attempt
    (gap,) = listener.stats.gaps
    assert failed >= 3
    assert sample(m, "pgherald_connect_failures_total", **L) == failed == gap.attempts - 1
    assert sample(m, "pgherald_reconnects_total", **L) == 1
    assert sample(m, "pgherald_gaps_total", **L) == 1
    assert sample(m, "pgherald_connected", **L) == 1
    assert sample(m, "pgherald_unhandled_total", **L) == 1


# -- observability.md: `pgherald_handler_errors_total` "(a consumer's retries count each
# time)"; `pgherald_consumer_redelivered_total` "dead letters redelivered and handled";
# `pgherald_unhandled_total` for a consumer. --


def test_consumer_metrics_count_every_attempt_and_redelivered_dead_letters(
    installed: str, conn: psycopg.Connection
) -> None:
    registry = CollectorRegistry()
    consumer = pgherald.Consumer(
        installed,
        group="billing",
        channels=["orders", "audit"],
        max_attempts=3,
        retry_delay=0.01,
        retry_max_delay=0.01,
        poll_interval=0.1,
        rebalance_interval=0.2,
    )
    pgherald.metrics.register(consumer, registry=registry, lag=False)
    C = {"kind": "consumer", "name": "billing"}
    fixed = threading.Event()  # the handler's bug, fixed before the redelivery
    calls: list[int] = []

    @consumer.on("orders")
    def charge(event: pgherald.Event) -> None:
        calls.append(event.payload["n"])
        if event.payload["n"] == 2 and not fixed.is_set():
            raise RuntimeError("card declined")

    ids = publish_each(installed, [{"n": 1}, {"n": 2}, {"n": 3}], channel="orders")
    publish_each(installed, [{"n": 4}], channel="audit")  # no handler for it
    with consumer:
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: consumer.stats.acknowledged >= 4, 10, "every event settled")
            m = scrape(registry)
            assert calls == [1, 2, 2, 2, 3]
            assert sample(m, "pgherald_handler_errors_total", **C) == 3  # each attempt
            assert sample(m, "pgherald_consumer_dead_lettered_total", name="billing") == 1
            assert sample(m, "pgherald_unhandled_total", **C) == 1
            assert sample(m, "pgherald_received_total", **C) == 4
            assert sample(m, "pgherald_handled_total", **C) == 2  # minus unhandled, given up
            assert sample(m, "pgherald_consumer_redelivered_total", name="billing") == 0

            fixed.set()
            assert pgherald.redeliver(conn, "billing", [ids[1]]) == [ids[1]]
            wait_until(lambda: consumer.stats.redelivered == 1, 10, "the redelivery")
            m = scrape(registry)
        finally:
            consumer.stop()
            thread.join(10)
        assert not thread.is_alive()
    assert calls[-1] == 2
    assert sample(m, "pgherald_consumer_redelivered_total", name="billing") == 1
    assert sample(m, "pgherald_handler_errors_total", **C) == 3
    assert pgherald.dead_letters(conn, "billing") == []


# -- observability.md: "*source* is a `Listener`, `AsyncListener`, `Consumer` or
# `AsyncConsumer`" --


@pytest.mark.anyio
async def test_async_listener_and_consumer_metrics(
    installed: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    registry = CollectorRegistry()
    listener = pgherald.AsyncListener(installed, channels=["live"])
    consumer = pgherald.AsyncConsumer(
        installed, group="ag", channels=["log"], poll_interval=0.1, rebalance_interval=0.2
    )
    pgherald.metrics.register(listener, registry=registry, name="live")
    pgherald.metrics.register(consumer, registry=registry)
    L = {"kind": "listener", "name": "live"}
    C = {"kind": "consumer", "name": "ag"}
    heard: list[str] = []
    consumed: list[int] = []
    listener.on("live")(lambda n: heard.append(n.payload))

    @consumer.on("log")
    async def handle(event: pgherald.Event) -> None:
        consumed.append(event.payload["n"])
        if event.payload["n"] == 2:
            raise RuntimeError("handler bug")

    async with listener, consumer, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.run)
        tasks.start_soon(consumer.run)
        pgherald.notify(conn, "live", "x")
        publish_each(installed, [{"n": 1}, {"n": 2}], channel="log")
        await await_until(lambda: heard and consumer.stats.acknowledged >= 2, 10, "both")
        m = await anyio.to_thread.run_sync(scrape, registry)  # as the HTTP server does
        listener.stop()
        consumer.stop()
    after = await anyio.to_thread.run_sync(scrape, registry)
    assert sample(m, "pgherald_connected", **L) == 1
    assert sample(m, "pgherald_received_total", **L) == 1
    assert sample(m, "pgherald_handled_total", **L) == 1
    assert sample(m, "pgherald_connected", **C) == 1
    assert sample(m, "pgherald_received_total", **C) == 2
    assert sample(m, "pgherald_handled_total", **C) == 1
    assert sample(m, "pgherald_consumer_dead_lettered_total", name="ag") == 1
    assert sample(m, "pgherald_consumer_lag_events", name="ag") == 0
    assert sample(after, "pgherald_connected", **L) == 0
    assert sample(after, "pgherald_connected", **C) == 0


# -- observability.md: the lag is read "on a short-lived connection to the consumer's database
# ..., one connection per database for all the groups registered" --


def _install(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)


def test_lag_is_read_on_one_connection_per_database_for_all_groups(
    dsn: str,
    server_dsn: str,
    database_dropper: DatabaseDropper,
    request: pytest.FixtureRequest,
    proxy: FreezingProxy,
) -> None:
    registry = CollectorRegistry()
    with fresh_database(server_dsn, database_dropper, request) as other:
        _install(dsn)
        _install(other)
        consumers = [
            pgherald.Consumer(proxy.dsn_for(dsn), group="a", channels=["x"]),
            pgherald.Consumer(proxy.dsn_for(dsn), group="b", channels=["x"]),
            pgherald.Consumer(proxy.dsn_for(dsn), group="c", channels=["x"]),
            pgherald.Consumer(proxy.dsn_for(other), group="d", channels=["x"]),
        ]
        for consumer in consumers:
            pgherald.metrics.register(consumer, registry=registry)
            consumer.connect()  # the groups exist, each with its lag
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                pgherald.publish(c, "x", {"n": 1})
            before = proxy.accepted
            m = scrape(registry)
            opened = proxy.accepted - before
        finally:
            for consumer in consumers:
                consumer.close()
    assert {g: sample(m, "pgherald_consumer_lag_events", name=g) for g in "abcd"} == {
        "a": 1,
        "b": 1,
        "c": 1,
        "d": 0,
    }
    assert opened == 2, f"{opened} connections for the lag of 4 groups in 2 databases"


# -- observability.md: the lag connection gets "2 s to connect and 2 s for the query, else it
# is left out of that scrape with a warning" --


def _scrape_within(registry: CollectorRegistry, seconds: float) -> tuple[Samples, float]:
    """A scrape on a thread (as the HTTP server's), failing if it is not over in *seconds*."""
    out: list[Samples] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(scrape(registry)), daemon=True)
    thread.start()
    thread.join(seconds)
    took = time.monotonic() - started
    assert out, f"the scrape was not over after {took:.1f}s"
    return out[0], took


def test_lag_left_out_within_its_deadlines_when_the_database_does_not_answer(
    installed: str,
    conn: psycopg.Connection,
    silent_server: SilentServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pgherald.metrics")
    # A server that accepts the connection and never answers (hung at start-up).
    registry = CollectorRegistry()
    hung = pgherald.Consumer(
        make_conninfo(installed, host="127.0.0.1", hostaddr="127.0.0.1", port=silent_server.port),
        group="hung",
        channels=["x"],
    )
    pgherald.metrics.register(hung, registry=registry)
    m, took = _scrape_within(registry, 8)
    assert silent_server.accepted, "the scrape did not try the server"
    assert 1.5 <= took < 4, f"the scrape took {took:.2f}s (2 s to connect)"
    assert sample(m, "pgherald_received_total", kind="consumer", name="hung") == 0
    assert sample(m, "pgherald_consumer_lag_events", name="hung") is None
    assert "consumer lag left out of this scrape" in caplog.text
    caplog.clear()

    # A database that answers, but whose query waits on a lock (a migration, a VACUUM FULL).
    registry = CollectorRegistry()
    blocked = pgherald.Consumer(installed, group="blocked", channels=["x"])
    with blocked:
        pass  # the group exists
    pgherald.metrics.register(blocked, registry=registry)
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = 'pgherald'"
        )
    ]
    with conn.transaction():
        conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        m, took = _scrape_within(registry, 8)
    assert 1.5 <= took < 4, f"the scrape took {took:.2f}s (2 s for the query)"
    assert sample(m, "pgherald_received_total", kind="consumer", name="blocked") == 0
    assert sample(m, "pgherald_consumer_lag_events", name="blocked") is None
    assert "consumer lag left out of this scrape" in caplog.text
    # Unlocked: the next scrape has the lag again.
    assert sample(scrape(registry), "pgherald_consumer_lag_events", name="blocked") == 0


# -- observability.md: `register(consumer)  # the same server: port once`; "`/metrics` is also
# served on `addr:port`" (`start_http_server`: "once per address") --


def test_register_with_the_same_port_twice_serves_one_server(dsn: str) -> None:
    registry = CollectorRegistry()
    port = free_port()
    first, second = pgherald.Listener(dsn), pgherald.Listener(dsn)
    try:
        pgherald.metrics.register(first, registry=registry, name="first", port=port)
        pgherald.metrics.register(second, registry=registry, name="second", port=port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server = pgherald.metrics._servers.pop(("127.0.0.1", port), None)
        if server is not None:
            server.shutdown()
            server.server_close()
    assert 'pgherald_received_total{kind="listener",name="first"} 0.0' in body
    assert 'pgherald_received_total{kind="listener",name="second"} 0.0' in body


# -- tracing --


@pytest.fixture
def traced() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pgherald.tracing.instrument(tracer_provider=provider)
    try:
        yield exporter, provider
    finally:
        pgherald.tracing.uninstrument()
        provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


# observability.md: publish's span is "a child of the current span"; a consumer's handler:
# "`CONSUMER` `process <channel>`, one per call (each retry too)", "a child of the publishing
# span"; attributes "`messaging.message.id` (the event id), `messaging.destination.partition.id`
# and, with a key, `messaging.message.conversation_id`"; "A handler that raises ... ends the
# span with an error status and the exception recorded".


def test_a_consumer_span_per_attempt_with_the_events_partition_and_key(
    installed: str,
    conn: psycopg.Connection,
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = traced
    app = provider.get_tracer("the-app")
    with app.start_as_current_span("POST /orders") as request_span:
        event_id = pgherald.publish(conn, "orders", {"n": 1}, key="customer-7")
    (publish,) = named(exporter, "publish orders")
    assert publish.kind == SpanKind.PRODUCER
    assert parent_id(publish) == request_span.get_span_context().span_id
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == "orders"
    assert publish.attributes["messaging.operation.type"] == "publish"

    consumer = pgherald.Consumer(
        installed,
        group="g",
        max_attempts=3,
        retry_delay=0.01,
        retry_max_delay=0.01,
        poll_interval=0.1,
        rebalance_interval=0.2,
    )
    seen: list[pgherald.Event] = []

    @consumer.on("orders")
    def handle(event: pgherald.Event) -> None:
        seen.append(event)
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")
        consumer.stop()

    with consumer:
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
    assert len(seen) == 2
    spans = named(exporter, "process orders")
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [e.attributes["exception.type"] for e in spans[0].events if e.attributes] == [
        "RuntimeError"
    ]
    for span in spans:
        assert span.kind == SpanKind.CONSUMER
        assert parent_id(span) == span_id(publish)
        assert span.attributes is not None
        assert dict(span.attributes) == {
            "messaging.system": "postgresql",
            "messaging.operation.type": "process",
            "messaging.destination.name": "orders",
            "messaging.message.id": str(event_id),
            "messaging.destination.partition.id": str(seen[0].partition),
            "messaging.message.conversation_id": "customer-7",
        }


# observability.md: "`publish`, `apublish`: `PRODUCER` `publish <channel>` ... its context is
# written into the event's headers"; "`publish_many`, `apublish_many`: ... one per call, its
# context in every event's headers"; "`notify`, `anotify`: `PRODUCER` `notify <channel>` ...
# the payload is sent as it is".


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's AsyncConnection: asyncio
async def test_apublish_apublish_many_and_anotify_spans(
    installed: str,
    conn: psycopg.Connection,
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, _ = traced
    conn.execute("LISTEN live")
    async with await psycopg.AsyncConnection.connect(installed, autocommit=True) as ac:
        one = await pgherald.apublish(ac, "orders", {"n": 1})
        many = await pgherald.apublish_many(ac, "orders", [{"n": 2}, {"n": 3}])
        await pgherald.anotify(ac, "live", {"n": 4})
    publishes = named(exporter, "publish orders")
    assert [s.kind for s in publishes] == [SpanKind.PRODUCER, SpanKind.PRODUCER]
    headers: dict[int, Any] = dict(
        conn.execute(
            "SELECT id, headers FROM pgherald.events_v1 WHERE id = ANY(%s)", ([one, *many],)
        ).fetchall()
    )

    def parent(event: int) -> str:
        return str(headers[event]["traceparent"]).split("-")[2]

    assert parent(one) == f"{span_id(publishes[0]):016x}"
    assert parent(many[0]) == parent(many[1]) == f"{span_id(publishes[1]):016x}"
    (notify,) = named(exporter, "notify live")
    assert notify.kind == SpanKind.PRODUCER
    assert notify.attributes is not None
    assert notify.attributes["messaging.destination.name"] == "live"
    (n,) = [n for n in conn.notifies(timeout=5, stop_after=1)]
    assert n.payload == '{"n":4}'  # as it is: no trace context added


# -- reliability.md "Handler errors": "An exception in a handler is logged at `ERROR` with its
# traceback: `handler <name> failed on a notification from channel '<channel>' (the listener
# goes on)` ... The failed notification is not retried."; "Everything is logged on the
# `pgherald.listener` logger." --


def test_a_handler_error_is_logged_at_error_with_its_traceback_and_not_retried(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald")
    calls: list[str] = []
    with pgherald.Listener(dsn, channels=["payments"]) as listener:

        @listener.on("payments")
        def charge_card(n: pgherald.Notification) -> None:
            calls.append(n.payload)
            if n.payload == "boom":
                raise RuntimeError("card service down")
            if n.payload == "last":
                listener.stop()

        for payload in ("boom", "last"):
            pgherald.notify(conn, "payments", payload)
        with running(listener):
            wait_until(lambda: "last" in calls, 5, "the notification after the failure")
    assert calls == ["boom", "last"]  # not retried
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    (record,) = errors
    assert record.name == "pgherald.listener"
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert message.startswith("handler ")
    assert message.endswith(
        "charge_card failed on a notification from channel 'payments' (the listener goes on)"
    )
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError  # the traceback is logged with it
    assert "card service down" in caplog.text


# -- reliability.md: "In the iterator style, the loop body is your own code. An exception there
# propagates out of the `for` loop as usual, and the listener stays connected until you leave
# its `with` block." --


def test_an_exception_in_the_loop_body_propagates_and_the_listener_stays_connected(
    dsn: str, conn: psycopg.Connection
) -> None:
    with pgherald.Listener(dsn, channels=["jobs"]) as listener:
        pid = listener.backend_pid
        pgherald.notify(conn, "jobs", "first")
        pgherald.notify(conn, "jobs", "second")

        def loop() -> None:
            for n in listener.notifications(timeout=5):
                raise ValueError(f"bad job {n.payload}")

        with pytest.raises(ValueError, match="bad job first"):
            loop()
        assert listener.connected
        assert listener.backend_pid == pid
        assert backend_alive(conn, pid)
        # Still listening: what is sent now comes on the next iteration, with nothing lost.
        pgherald.notify(conn, "jobs", "third")
        got: list[str] = []
        for n in listener.notifications(timeout=5):
            got.append(n.payload)
            if n.payload == "third":
                break
        assert got == ["second", "third"]
        assert listener.backend_pid == pid
    wait_until(lambda: not backend_alive(conn, pid), 5, "the session to end with the block")


# -- frameworks.md: "Shutdown calls `stop()` on every runner, which lets the handler in
# progress finish ... The wait is shielded, so a shutdown that is itself cancelled still stops
# the runners in order." --


@pytest.mark.anyio
async def test_a_cancelled_shutdown_still_lets_the_handler_in_progress_finish(
    dsn: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    listener = pgherald.AsyncListener(dsn, channels=["c"])
    in_handler = anyio.Event()
    finished: list[str] = []

    @listener.on("c")
    async def slow(n: pgherald.Notification) -> None:
        in_handler.set()
        await anyio.sleep(0.5)  # the handler's own work, under way when shutdown starts
        finished.append(n.payload)

    with anyio.fail_after(10):
        with anyio.CancelScope() as shutdown:
            async with app_running(listener, stop_timeout=5):
                pgherald.notify(conn, "c", "x")
                await in_handler.wait()
                shutdown.cancel()  # the server cancels the lifespan while it shuts down
                await anyio.sleep_forever()
        assert shutdown.cancelled_caught
    assert finished == ["x"], "the handler in progress was cancelled, not let finish"
    assert not listener.connected


@pytest.mark.anyio
async def test_a_cancelled_shutdown_still_says_which_runner_did_not_stop(
    dsn: str, conn: psycopg.Connection, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The HeraldError naming a late runner cannot reach a shutdown that is itself cancelled:
    # the log says it instead.
    listener = pgherald.AsyncListener(dsn, channels=["c"])
    in_handler = anyio.Event()

    @listener.on("c")
    async def stuck(n: pgherald.Notification) -> None:
        in_handler.set()
        await anyio.sleep_forever()

    caplog.set_level(logging.ERROR, logger="pgherald.contrib.starlette")
    with anyio.fail_after(10):
        with anyio.CancelScope() as shutdown:
            async with app_running(listener, stop_timeout=0.3):
                pgherald.notify(conn, "c", "x")
                await in_handler.wait()
                shutdown.cancel()
                await anyio.sleep_forever()
        assert shutdown.cancelled_caught
    said = [r.getMessage() for r in caplog.records if r.name == "pgherald.contrib.starlette"]
    assert any("did not stop within 0.3 s of stop(): cancelled" in m for m in said), said
    assert not listener.connected
