"""Prometheus metrics of one gateway (a registry of its own: several apps may share a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _ReadCounter(Collector):
    """A counter kept as a plain int by its owner (hot paths), read at each scrape."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._doc, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, value=self._read())


class Metrics:
    def __init__(self, *, reconnects: Callable[[], int], frames_out: Callable[[], int]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.clients = Gauge(
            "pgherald_gateway_clients", "Connected clients.", ["kind"], registry=registry
        )
        for kind in ("sse", "ws"):
            self.clients.labels(kind)
        self.events_in = Counter(
            "pgherald_gateway_events_in",
            "Events received from PostgreSQL (notifications and durable log events).",
            registry=registry,
        )
        self.drops = Counter(
            "pgherald_gateway_drops",
            "Slow clients disconnected because their buffer overflowed.",
            registry=registry,
        )
        self.gaps = Counter(
            "pgherald_gateway_gaps",
            "Gap messages sent to clients of plain channels (once per gap, whatever the number "
            "of clients), by reason: reconnect, queue_limit, queue_guard.",
            ["reason"],
            registry=registry,
        )
        self.queue_usage = Gauge(
            "pgherald_gateway_notify_queue_usage",
            "pg_notification_queue_usage() (0 to 1), read at each scrape.",
            registry=registry,
        )
        registry.register(
            _ReadCounter(
                "pgherald_gateway_listener_reconnects",
                "Times the shared listening connection was re-established.",
                reconnects,
            )
        )
        registry.register(
            _ReadCounter(
                "pgherald_gateway_frames_out", "Event frames written to clients.", frames_out
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
