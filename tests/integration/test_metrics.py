"""pgherald.metrics: Prometheus metrics of listeners and consumers, scraped from a real setup."""

from __future__ import annotations

import gc
import threading
import urllib.request
from typing import Any

import psycopg
import pydantic
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgherald
import pgherald.metrics
from tests.fix_durable import FAST, wait_until


class Order(pydantic.BaseModel):
    id: int


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def test_listener_metrics_read_stats_on_scrape(dsn: str, conn: psycopg.Connection) -> None:
    registry = CollectorRegistry()
    listener = pgherald.Listener(dsn, on_error=lambda exc, n: None)
    pgherald.metrics.register(listener, registry=registry, name="orders")
    L = {"kind": "listener", "name": "orders"}
    assert sample(scrape(registry), "pgherald_connected", **L) == 0

    with listener:

        @listener.on("orders", model=Order)
        def handle(order: Order) -> None:
            if order.id == 3:
                raise RuntimeError("handler bug")

        @listener.on("stop")
        def stop(n: pgherald.Notification) -> None:
            listener.stop()

        conn.autocommit = True
        for payload in ({"id": 1}, {"id": 2}, {"id": "x"}, {"id": 3}):
            pgherald.notify(conn, "orders", payload)
        pgherald.notify(conn, "stop", "")
        thread = threading.Thread(target=listener.run)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()

        got = scrape(registry)
        assert sample(got, "pgherald_connected", **L) == 1
        assert sample(got, "pgherald_received_total", **L) == 5
        assert sample(got, "pgherald_invalid_payloads_total", **L) == 1
        assert sample(got, "pgherald_handler_errors_total", **L) == 2
        assert sample(got, "pgherald_handled_total", **L) == 3
        assert sample(got, "pgherald_reconnects_total", **L) == 0
        assert sample(got, "pgherald_listener_queue_usage", name="orders") == 0.0

        # A killed backend: the listener reconnects, and the next scrape says so.
        pid = listener.backend_pid
        thread = threading.Thread(target=listener.run)
        listener.on("other")(lambda n: None)
        thread.start()
        try:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: listener.stats.reconnects == 1, 10, "a reconnect")
        finally:
            listener.stop()
            thread.join(10)
        got = scrape(registry)
        assert sample(got, "pgherald_reconnects_total", **L) == 1
        assert sample(got, "pgherald_gaps_total", **L) == 1


def test_metrics_hold_their_objects_weakly(dsn: str) -> None:
    registry = CollectorRegistry()
    pgherald.metrics.register(pgherald.Listener(dsn), registry=registry, name="gone")
    gc.collect()
    assert sample(scrape(registry), "pgherald_received_total", kind="listener", name="gone") is None


def test_consumer_metrics_and_lag(installed: str, conn: psycopg.Connection) -> None:
    registry = CollectorRegistry()
    conn.autocommit = True
    for payload in ({"id": 1}, {"id": "bad"}, {"id": 2}):
        pgherald.publish(conn, "orders", payload)
    consumer = pgherald.Consumer(installed, group="billing", **FAST)
    pgherald.metrics.register(consumer, registry=registry)
    C = {"kind": "consumer", "name": "billing"}
    handled: list[int] = []

    @consumer.on("orders", model=Order)
    def handle(order: Order) -> None:
        handled.append(order.id)
        if order.id == 2:
            consumer.stop()

    with consumer:
        thread = threading.Thread(target=consumer.run)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        got = scrape(registry)
    assert handled == [1, 2]
    assert sample(got, "pgherald_received_total", **C) == 3
    assert sample(got, "pgherald_handled_total", **C) == 2
    assert sample(got, "pgherald_invalid_payloads_total", **C) == 1
    assert sample(got, "pgherald_consumer_dead_lettered_total", name="billing") == 1
    assert sample(got, "pgherald_consumer_acknowledged_total", name="billing") == 3
    assert sample(got, "pgherald_consumer_partitions", name="billing") == 16
    assert sample(got, "pgherald_consumer_lag_events", name="billing") == 0
    assert sample(got, "pgherald_consumer_lag_seconds", name="billing") == 0

    # Two events the (now stopped) group has not read: the next scrape sees the lag.
    pgherald.publish(conn, "orders", {"id": 4})
    pgherald.publish(conn, "orders", {"id": 5})
    got = scrape(registry)
    assert sample(got, "pgherald_consumer_lag_events", name="billing") == 2
    assert (sample(got, "pgherald_consumer_lag_seconds", name="billing") or 0) > 0
    assert sample(got, "pgherald_connected", **C) == 0

    pgherald.metrics.unregister(consumer, registry=registry)
    assert sample(scrape(registry), "pgherald_received_total", **C) is None


def test_lag_left_out_when_the_database_is_unreachable(
    installed: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    consumer = pgherald.Consumer(
        "postgresql://postgres@127.0.0.1:1/nowhere", group="g", channels=["x"]
    )
    pgherald.metrics.register(consumer, registry=registry)
    got = scrape(registry)
    assert sample(got, "pgherald_received_total", kind="consumer", name="g") == 0
    assert sample(got, "pgherald_consumer_lag_events", name="g") is None
    assert "consumer lag left out" in caplog.text


def test_register_rules_and_http_server(dsn: str) -> None:
    registry = CollectorRegistry()
    a, b = pgherald.Listener(dsn), pgherald.Listener(dsn)
    pgherald.metrics.register(a, registry=registry)
    with pytest.raises(pgherald.UsageError, match="registered already"):
        pgherald.metrics.register(a, registry=registry, name="again")
    with pytest.raises(pgherald.UsageError, match="own name="):
        pgherald.metrics.register(b, registry=registry)
    pgherald.metrics.register(b, registry=registry, name="second")
    with pytest.raises(pgherald.UsageError, match="not str"):
        pgherald.metrics.register("listener", registry=registry)

    server = pgherald.metrics.start_http_server(0, registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        assert 'pgherald_received_total{kind="listener",name="second"} 0.0' in body
        assert 'pgherald_received_total{kind="listener",name="listener"} 0.0' in body
    finally:
        server.shutdown()
        server.server_close()
