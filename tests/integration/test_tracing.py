"""pgherald.tracing: OpenTelemetry spans across publish -> consume -> relay, on a real server."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pydantic
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import pgherald
import pgherald.tracing
from tests.fix_brokers import relay_thread
from tests.fix_durable import FAST, uncovered, wait_until
from tests.integration.test_relay_webhook import SECRET, Receiver


@contextlib.contextmanager
def instrumented(provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """pgherald instrumented with *provider*, its finished spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pgherald.tracing.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        pgherald.tracing.uninstrument()
        provider.shutdown()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with instrumented(TracerProvider()) as exporter:
        yield exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent of *span*, without its flags."""
    ctx = span.context
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}"


def parent_of(headers: dict[str, Any]) -> str:
    """The traceparent stored in *headers*, without its flags."""
    return str(headers["traceparent"]).rsplit("-", 1)[0]


def test_a_trace_crosses_publish_consume_and_relay(
    installed: str, conn: psycopg.Connection, spans: InMemorySpanExporter
) -> None:
    receiver = Receiver(lambda n, body: (200, {}))
    conn.autocommit = True
    try:
        first = pgherald.publish(conn, "orders", {"id": 1}, headers={"source": "web"})
        many = pgherald.publish_many(conn, "orders", [{"id": 2}, {"id": 3}])
        ids = [first, *many]

        publishes = named(spans, "publish orders")
        assert len(publishes) == 2  # one per statement
        publish_one = publishes[0]
        assert publish_one.kind == SpanKind.PRODUCER
        assert publish_one.attributes is not None
        assert publish_one.attributes["messaging.system"] == "postgresql"
        stored = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT id, headers FROM pgherald.events_v1 WHERE id = ANY(%s)", (ids,)
            )
        }
        assert set(stored[first]) == {"source", "traceparent"}
        assert stored[first]["source"] == "web"
        assert parent_of(stored[first]) == traceparent(publishes[0])
        assert parent_of(stored[many[0]]) == parent_of(stored[many[1]])
        assert parent_of(stored[many[0]]) == traceparent(publishes[1])

        # consume: each handler runs inside a span that is a child of its publishing span
        inside: list[str] = []
        consumer = pgherald.Consumer(installed, group="billing", **FAST)

        @consumer.on("orders")
        def handle(event: pgherald.Event) -> None:
            ctx = trace.get_current_span().get_span_context()
            inside.append(f"{ctx.trace_id:032x}")
            if event.id == ids[-1]:
                consumer.stop()

        with consumer:
            t = threading.Thread(target=consumer.run)
            t.start()
            t.join(10)
            assert not t.is_alive()
        processes = named(spans, "process orders")
        assert len(processes) == 3
        by_parent = {p.parent.span_id for p in processes if p.parent is not None}
        assert by_parent == {s.context.span_id for s in publishes if s.context is not None}
        for p in processes:
            assert p.kind == SpanKind.CONSUMER
            assert p.attributes is not None
            assert p.attributes["messaging.message.id"] in {str(i) for i in ids}
        assert inside == [
            f"{publishes[0].context.trace_id:032x}",  # type: ignore[union-attr]
            f"{publishes[1].context.trace_id:032x}",  # type: ignore[union-attr]
            f"{publishes[1].context.trace_id:032x}",  # type: ignore[union-attr]
        ]

        # relay: a batch span linked to the publishing spans; the headers travel on
        spans.clear()
        relay = pgherald.Relay(installed, to=receiver.url, channels=["orders"], secret=SECRET)
        with relay_thread(relay):
            wait_until(lambda: uncovered(conn, "relay") == 0, 10, "every event relayed")
        relayed = [s for s in named(spans, "process orders") if s.links]
        assert relayed, [s.name for s in spans.get_finished_spans()]
        linked = {link.context.span_id for s in relayed for link in s.links}
        assert linked == {s.context.span_id for s in publishes if s.context is not None}
        bodies = [
            b for body in receiver.accepted for b in (body if isinstance(body, list) else [body])
        ]
        sent = {b["id"]: b["headers"] for b in bodies}
        assert parent_of(sent[first]) == traceparent(publishes[0])
        assert parent_of(sent[many[1]]) == traceparent(publishes[1])
    finally:
        receiver.close()


class Order(pydantic.BaseModel):
    id: int


def test_listener_spans_and_errors(dsn: str, spans: InMemorySpanExporter) -> None:
    with pgherald.Listener(dsn, on_error=lambda exc, n: None) as listener:

        @listener.on("orders", model=Order)
        def handle(order: Order) -> None:
            if order.id == 2:
                raise RuntimeError("handler bug")

        @listener.on("stop")
        def stop(n: pgherald.Notification) -> None:
            listener.stop()

        with psycopg.connect(dsn, autocommit=True) as c:
            for payload in ({"id": 1}, {"id": 2}, {"id": "x"}):
                pgherald.notify(c, "orders", payload)
            pgherald.notify(c, "stop")
        t = threading.Thread(target=listener.run)
        t.start()
        t.join(10)
        assert not t.is_alive()
    assert len(named(spans, "notify orders")) == 3
    assert named(spans, "notify orders")[0].kind == SpanKind.PRODUCER
    processed = named(spans, "process orders")
    assert [s.status.status_code for s in processed] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.ERROR,
    ]
    exceptions = [
        e.attributes["exception.type"] for s in processed for e in s.events if e.attributes
    ]
    assert exceptions == ["RuntimeError", "pgherald.PayloadInvalid"]
    assert len(named(spans, "process stop")) == 1


@pytest.mark.anyio
async def test_async_consumer_and_listener_spans(
    installed: str, conn: psycopg.Connection, spans: InMemorySpanExporter
) -> None:
    conn.autocommit = True
    event_id = pgherald.publish(conn, "a", {"n": 1})
    (publish,) = named(spans, "publish a")
    seen: list[int] = []
    async with pgherald.AsyncConsumer(installed, group="ag", **FAST) as consumer:

        @consumer.on("a")
        async def handle(event: pgherald.Event) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(trace.get_current_span().get_span_context().trace_id)
            consumer.stop()

        with anyio.fail_after(10):
            await consumer.run()
    (process,) = named(spans, "process a")
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id  # type: ignore[union-attr]
    assert seen == [publish.context.trace_id]  # type: ignore[union-attr]
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == str(event_id)

    async with pgherald.AsyncListener(installed) as listener:

        @listener.on("b")
        async def on_b(n: pgherald.Notification) -> None:
            listener.stop()

        await listener.subscribe("b")
        await anyio.to_thread.run_sync(lambda: pgherald.notify(conn, "b", "x"))
        with anyio.fail_after(10):
            await listener.run()
    assert len(named(spans, "process b")) == 1


def test_nothing_traced_when_off(installed: str, conn: psycopg.Connection) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    conn.autocommit = True
    consumer = pgherald.Consumer(installed, group="g", **FAST)
    handler: Callable[[Any], None] = lambda e: None  # noqa: E731
    consumer.on("x")(handler)
    # registered before instrument(): the handler is the function itself, untraced
    assert consumer._lookup("x")[0][0] is handler
    pgherald.tracing.instrument(tracer_provider=provider)
    try:
        assert pgherald.tracing.instrumented()
        consumer.on("y")(handler)
        assert consumer._lookup("y")[0][0] is not handler  # wrapped: registered while on
    finally:
        pgherald.tracing.uninstrument()
    assert not pgherald.tracing.instrumented()
    event_id = pgherald.publish(conn, "x", {})
    pgherald.notify(conn, "x", "")
    row = conn.execute("SELECT headers FROM pgherald.events_v1 WHERE id = %s", (event_id,))
    assert row.fetchone() == (None,)
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_the_extras_cost_nothing_when_not_used(dsn: str) -> None:
    # import pgherald imports none of them...
    code = (
        "import sys, pgherald; "
        "print(sorted(m for m in ('opentelemetry', 'prometheus_client', 'pydantic', 'msgspec')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # ...and a handler without model=, tracing off, is the function itself on the fast path.
    listener = pgherald.Listener(dsn)

    def handler(n: pgherald.Notification) -> None: ...

    listener.add_handler("x", handler)
    assert listener._handlers.lookup("x") == ((handler, False),)
    assert listener._handlers.single["x"] is handler
