"""
Prometheus metrics of listeners and consumers (the ``metrics`` extra: ``prometheus-client``).

::

    pgherald.metrics.register(listener, port=9108)      # /metrics on http://127.0.0.1:9108

`register` adds the object to a collector that reads its ``stats`` when Prometheus scrapes:
nothing is counted twice and nothing runs per notification or per event. A consumer's lag
(events behind, age of the oldest event not consumed) is read from the database at each scrape
(`pgherald.list_groups` on a short-lived connection; ``lag=False`` turns it off).

Metrics, labelled ``kind`` (``listener`` / ``consumer``) and ``name`` (the ``name=`` given,
else ``listener`` / the consumer's group): ``pgherald_received_total``,
``pgherald_handled_total``, ``pgherald_handler_errors_total``,
``pgherald_invalid_payloads_total``, ``pgherald_unhandled_total``,
``pgherald_reconnects_total``, ``pgherald_connect_failures_total``, ``pgherald_gaps_total``,
``pgherald_connected``; for listeners ``pgherald_listener_queue_usage`` (their lag); for
consumers ``pgherald_consumer_acknowledged_total``, ``..._dead_lettered_total``,
``..._redelivered_total``, ``pgherald_consumer_partitions``, ``pgherald_consumer_lag_events``
and ``pgherald_consumer_lag_seconds``. docs/observability.md describes each one.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._consumer import _ConsumerBase
from ._listener_base import ListenerBase
from .errors import UsageError

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ImportError(
        "pgherald.metrics needs prometheus-client: pip install 'pgherald[metrics]'"
    ) from exc

__all__ = ["register", "start_http_server", "unregister"]

logger = logging.getLogger("pgherald.metrics")

LAG_TIMEOUT = 2.0
"""Seconds a scrape waits for a consumer's lag (connecting, then the query) before leaving it out."""

_COMMON = (
    ("received", "Notifications or events handed to handlers or an iteration."),
    ("handled", "Notifications or events handled (received minus unhandled and failed)."),
    ("handler_errors", "Handler calls that raised (a consumer's retries count each time)."),
    ("invalid_payloads", "Payloads that did not validate as their handler's model=."),
    ("unhandled", "Notifications or events on a channel with no handler."),
    ("reconnects", "Times the connection was re-established."),
    ("connect_failures", "Connection attempts that failed while reconnecting."),
    ("gaps", "Outages (for a listener, notifications may have been missed)."),
)
_CONSUMER = (
    ("acknowledged", "Events whose position was stored (handled, skipped or not wanted)."),
    ("dead_lettered", "Dead letters written."),
    ("redelivered", "Dead letters redelivered and handled."),
)


@dataclass
class _Entry:
    ref: weakref.ref[Any]
    kind: str
    name: str
    lag: bool


class _Collector(Collector):
    """The collector of one registry: every listener and consumer registered there."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names vary with what is registered: no clash check at registration

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            self.entries = [e for e in self.entries if e.ref() is not None]
            live: list[tuple[_Entry, Any]] = [(e, e.ref()) for e in self.entries]
        labels = ["kind", "name"]
        counters = {
            key: CounterMetricFamily(f"pgherald_{key}", doc, labels=labels) for key, doc in _COMMON
        }
        connected = GaugeMetricFamily("pgherald_connected", "1 while connected.", labels=labels)
        queue = GaugeMetricFamily(
            "pgherald_listener_queue_usage",
            "Last pg_notification_queue_usage() read while the listener was behind (0 to 1).",
            labels=["name"],
        )
        consumer_counters = {
            key: CounterMetricFamily(f"pgherald_consumer_{key}", doc, labels=["name"])
            for key, doc in _CONSUMER
        }
        partitions = GaugeMetricFamily(
            "pgherald_consumer_partitions", "Partitions held now.", labels=["name"]
        )
        lag_events = GaugeMetricFamily(
            "pgherald_consumer_lag_events",
            "Events after the group's position (estimated when far behind).",
            labels=["name"],
        )
        lag_seconds = GaugeMetricFamily(
            "pgherald_consumer_lag_seconds",
            "Age of the oldest event the group has not consumed (0 when caught up).",
            labels=["name"],
        )
        lag_wanted: dict[str, dict[str, list[str]]] = {}  # conninfo -> group -> names
        for entry, obj in live:
            s = obj.stats
            values = [entry.kind, entry.name]
            failed = s.handler_errors if entry.kind == "listener" else s.skipped
            numbers = {
                "received": s.received,
                "handled": max(0, s.received - s.unhandled - failed),
                "handler_errors": s.handler_errors,
                "invalid_payloads": s.invalid_payloads,
                "unhandled": s.unhandled,
                "reconnects": s.reconnects,
                "connect_failures": s.connect_failures,
                "gaps": len(s.gaps),
            }
            for key, family in counters.items():
                family.add_metric(values, numbers[key])
            connected.add_metric(values, 1 if obj.connected else 0)
            if entry.kind == "listener":
                queue.add_metric([entry.name], s.last_queue_usage or 0.0)
                continue
            for key, family in consumer_counters.items():
                family.add_metric([entry.name], getattr(s, key))
            partitions.add_metric([entry.name], len(obj.partitions))
            if entry.lag:
                groups = lag_wanted.setdefault(obj._config.conninfo, {})
                groups.setdefault(obj.group, []).append(entry.name)
        for conninfo, groups in lag_wanted.items():
            for info in _lag(conninfo, list(groups)):
                for name in groups.get(info.name, ()):
                    lag_events.add_metric([name], info.lag_events)
                    lag_seconds.add_metric([name], info.lag_seconds)
        yield from counters.values()
        yield connected
        yield queue
        yield from consumer_counters.values()
        yield partitions
        yield lag_events
        yield lag_seconds


def _lag(conninfo: str, groups: list[str]) -> list[Any]:
    """`list_groups` for *groups*, or nothing (logged) when the database does not answer soon."""
    import psycopg

    from ._groups import list_groups

    timeout = max(1, round(LAG_TIMEOUT))
    try:
        with psycopg.connect(conninfo, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {int(LAG_TIMEOUT * 1000)}")
            return list_groups(conn, groups=groups)
    except Exception as exc:
        logger.warning("consumer lag left out of this scrape: %s", exc)
        return []


_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_servers: dict[tuple[str, int], Any] = {}


def register(
    source: Any,
    *,
    name: str | None = None,
    registry: CollectorRegistry | None = None,
    lag: bool = True,
    port: int | None = None,
    addr: str = "127.0.0.1",
) -> None:
    """
    Export *source*'s metrics (a `Listener`, `AsyncListener`, `Consumer` or `AsyncConsumer`)
    in *registry* (default: prometheus_client's global ``REGISTRY``), labelled *name* (default:
    ``listener``, or the consumer's group). With *port*, also serve ``/metrics`` on
    ``addr:port`` (`start_http_server`, once per address). *lag* (consumers): read the group's
    lag from the database at each scrape. The object is held weakly: once it is gone, its
    metrics go too.

    .. versionadded:: 0.1
    """
    if isinstance(source, ListenerBase):
        kind = "listener"
        default = "listener"
    elif isinstance(source, _ConsumerBase):
        kind = "consumer"
        default = source.group
    else:
        raise UsageError(
            f"pgherald.metrics.register takes a Listener, AsyncListener, Consumer or "
            f"AsyncConsumer, not {type(source).__name__}"
        )
    reg = REGISTRY if registry is None else registry
    label = default if name is None else name
    with _lock:
        collector = _collectors.get(reg)
        if collector is None:
            collector = _collectors[reg] = _Collector()
            reg.register(collector)
        with collector.lock:
            for e in collector.entries:
                if e.ref() is source:
                    raise UsageError("this object's metrics are registered already")
                if e.ref() is not None and (e.kind, e.name) == (kind, label):
                    raise UsageError(
                        f"a {kind} named {label!r} is registered already: give each one its "
                        "own name= (the metrics' name label)"
                    )
            collector.entries.append(_Entry(weakref.ref(source), kind, label, lag))
    if port is not None:
        start_http_server(port, addr=addr, registry=reg)


def unregister(source: Any, *, registry: CollectorRegistry | None = None) -> None:
    """Stop exporting *source*'s metrics (its series disappear from the next scrape)."""
    reg = REGISTRY if registry is None else registry
    collector = _collectors.get(reg)
    if collector is None:
        return
    with collector.lock:
        collector.entries = [e for e in collector.entries if e.ref() not in (source, None)]


def start_http_server(
    port: int, *, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """
    Serve *registry* (default: the global one) on ``http://addr:port/metrics`` from a daemon
    thread (prometheus_client's server); once per address: a second call returns the first
    server. Port 0 picks a free port: read it from the returned server's ``server_port``.
    Scrapes run in that thread, not in your event loop.

    .. versionadded:: 0.1
    """
    reg = REGISTRY if registry is None else registry
    with _lock:
        server = _servers.get((addr, port)) if port else None
        if server is None:
            server, _ = _start_http_server(port, addr=addr, registry=reg)
            _servers[(addr, port or server.server_port)] = server
    return server
