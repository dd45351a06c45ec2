"""
`Relay` and `AsyncRelay`: move a consumer group's events from the durable log into a broker.

A relay is a consumer group of the log (`AsyncConsumer` with a batch handler): each read is
handed to a *sink* (NATS JetStream, Redis Streams, webhooks), which publishes the whole read
pipelined and returns once the broker acknowledged all of it; only then does the consumer move
the group's position. A crash (even SIGKILL) therefore redelivers at most one read, which the
broker's de-duplication (JetStream's ``Nats-Msg-Id``, the Redis script's per-partition
positions) turns into effectively once. See docs/relay.md.

The relay itself runs on anyio; the broker clients (nats-py, redis-py's asyncio client) on
asyncio only: `AsyncRelay.run` into NATS or Redis refuses trio with a `UsageError`, into
webhooks (httpx) it runs on trio too. `Relay` runs its own asyncio loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import sniffio
from anyio.streams.buffered import BufferedByteReceiveStream

from ._conninfo import Source
from ._consumer import Start, relay_consumer
from ._models import Event
from ._protocol.channels import check_channel
from ._protocol.consumer import StatusRow
from ._relay_nats import NatsSink
from ._relay_redis import RedisSink
from ._relay_sink import Refused, RelayStats, Sink, _RelayState, safe_url
from ._relay_webhook import WebhookSink
from ._waiting_async import LoopCaller
from .errors import UsageError

logger = logging.getLogger("pgherald.relay")

__all__ = ["AsyncRelay", "Relay", "RelayStats"]

DEFAULT_NATS_STREAM = "PGHERALD"
DEFAULT_SUBJECT = "pgherald.{channel}"
DEFAULT_REDIS_STREAM = "pgherald:{channel}"
CAUGHT_UP_AFTER = 2.0
"""A relay that acknowledged nothing for this long has caught up: rate and lag read 0."""

_instances = itertools.count(1)  # relays made in this process: part of each one's status row


class _SinkRefusals(logging.Filter):
    """Drops the consumer's "handler failed on event ... dead-lettered" record, and its
    traceback, for an event a relay's sink gave up (`Refused`): the relay logs that event in one
    line of its own. A handler's other failures (bugs) keep their records and tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Refused))


logging.getLogger("pgherald.consumer").addFilter(_SinkRefusals())


def _sink_for(
    to: str,
    *,
    channels: frozenset[str],
    group: str,
    stream: str | None,
    subject: str,
    stream_config: Mapping[str, Any] | None,
    maxlen: int | None,
    secret: str | None,
    webhook_batch: int,
    max_attempts: int,
    timeout: float,
) -> Sink:
    try:
        scheme = urlsplit(to).scheme.lower()
    except ValueError as exc:  # an unbalanced "[" (an IPv6 address)
        raise UsageError(f"invalid relay target {safe_url(to)}: {exc}") from None
    if scheme in ("nats", "tls"):
        return NatsSink(
            to,
            channels=channels,
            stream=stream or DEFAULT_NATS_STREAM,
            subject=subject,
            stream_config=dict(stream_config or {}),
            max_attempts=max_attempts,
            timeout=timeout,
        )
    if scheme in ("redis", "rediss", "unix"):
        return RedisSink(
            to,
            group=group,
            stream=stream or DEFAULT_REDIS_STREAM,
            maxlen=maxlen,
            max_attempts=max_attempts,
            timeout=timeout,
        )
    if scheme in ("http", "https"):
        return WebhookSink(
            to,
            secret=secret,
            batch=webhook_batch,
            max_attempts=max_attempts,
            timeout=timeout,
        )
    raise UsageError(
        f"relay target {to!r} is not supported: use nats://HOST:PORT (JetStream), "
        "redis://HOST:PORT/DB (Redis Streams) or https://... (webhooks); Kafka is not "
        "supported yet"
    )


class AsyncRelay:
    """
    Relay a consumer group's events into NATS JetStream, Redis Streams or webhooks (asyncio;
    webhooks also on trio).

    ``AsyncRelay(dsn, to="nats://127.0.0.1:4222", channels=["orders"])``; ``await
    relay.run()`` until `stop` (or cancellation). Each read of the log is published as a whole,
    pipelined, and the group's position moves only after the broker acknowledged every event
    of it: a crash delivers at most one read again, which the broker's de-duplication absorbs.
    Several relays with the same ``group`` share the log's 16 partitions; events with one key
    stay in order.

    Args:
        dsn: the PostgreSQL source, as for `Consumer`.
        to: ``nats://`` (JetStream), ``redis://`` (Redis Streams), ``https://`` or loopback
            ``http://`` (webhooks).
        channels: the channels to relay.
        group: the consumer group (its position is the relay's progress).
        stream: JetStream stream name (default ``PGHERALD``, created if missing) or Redis
            stream key (default ``pgherald:{channel}``; without ``{channel}``: one stream).
        subject: JetStream subject per channel (``{channel}`` is replaced).
        stream_config: JetStream stream settings for a stream created by the relay
            (``nats.js.api.StreamConfig`` fields: ``max_age``, ``duplicate_window``, ...).
        maxlen: Redis ``XADD MAXLEN ~`` (None: unbounded).
        secret: webhooks: the HMAC-SHA256 key of the ``Pgherald-Signature`` header.
        webhook_batch: webhooks: events per POST (1: one JSON object per request; more: a
            JSON array).
        max_attempts: an event the broker refuses (or a webhook that keeps failing) is tried
            this many times, then dead-lettered; an unreachable broker is retried for ever.
        metrics_port: serve Prometheus metrics on ``http://metrics_host:metrics_port/metrics``
            while `run` runs (0: a free port, see `metrics_address`).
        stats_interval: every this many seconds (and at once after each connection) the relay
            writes its rate, lag and totals to the database, for ``pgherald status`` and
            `list_groups` (`GroupInfo.relays`); removed when it stops. None: never.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: Source | None = None,
        *,
        to: str,
        channels: Iterable[str],
        group: str = "relay",
        start: Start = "beginning",
        stream: str | None = None,
        subject: str = DEFAULT_SUBJECT,
        stream_config: Mapping[str, Any] | None = None,
        maxlen: int | None = None,
        secret: str | None = None,
        webhook_batch: int = 1,
        max_attempts: int = 8,
        retry_delay: float = 0.2,
        retry_max_delay: float = 30.0,
        timeout: float = 10.0,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        stats_interval: float | None = 10.0,
        application_name: str = "pgherald-relay",
    ) -> None:
        names = [channels] if isinstance(channels, str) else list(channels)
        if not names:
            raise UsageError("a relay needs at least one channel to relay")
        chans = frozenset(check_channel(c) for c in names)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise UsageError(f"max_attempts must be an int >= 1, not {max_attempts!r}")
        if maxlen is not None and (
            isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1
        ):
            raise UsageError(f"maxlen must be an int >= 1 or None, not {maxlen!r}")
        if (
            isinstance(webhook_batch, bool)
            or not isinstance(webhook_batch, int)
            or (webhook_batch < 1)
        ):
            raise UsageError(f"webhook_batch must be an int >= 1, not {webhook_batch!r}")
        if stats_interval is not None and (
            isinstance(stats_interval, bool)
            or not isinstance(stats_interval, (int, float))
            or not 0 < stats_interval < math.inf
        ):
            raise UsageError(
                f"stats_interval must be a number of seconds > 0 or None, not {stats_interval!r}"
            )
        self.stats = RelayStats()
        """Counters: relayed, batches, retries, dead-lettered, rate."""
        self._sink = _sink_for(
            to,
            channels=chans,
            group=group,
            stream=stream,
            subject=subject,
            stream_config=stream_config,
            maxlen=maxlen,
            secret=secret,
            webhook_batch=webhook_batch,
            max_attempts=max_attempts,
            timeout=timeout,
        )
        # The relay's row for `pgherald status`, written by the consumer between reads.
        self._reported = (0.0, 0)  # (time.time(), relayed) at the last status row
        self._status_row: StatusRow | None = None
        if stats_interval is not None:
            name = (
                f"relay:{group}:{self._sink.target}:{socket.gethostname()}:{os.getpid()}"
                f":{next(_instances)}"
            )
            self._status_row = StatusRow(name, float(stats_interval), self._status_value)
        # The sink retries and dead-letters by itself (it knows transient from permanent):
        # the consumer dead-letters at the first failure a sink reports. NATS and Redis
        # forward the payload's JSON text as the log holds it (raw_payloads): no json.loads
        # and json.dumps per event.
        self._consumer = relay_consumer(
            dsn,
            raw_payloads=self._sink.raw,
            status_row=self._status_row,
            group=group,
            channels=chans,
            start=start,
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            max_attempts=1,
            application_name=application_name,
        )
        self._consumer.add_batch_handler(self._send)
        self._retry = (retry_delay, retry_max_delay)
        self._metrics = (metrics_host, metrics_port)
        self._state: _RelayState | None = None
        self._caller = LoopCaller()  # run()'s event loop, for a stop() from another thread
        self._stop_requested = False
        self._fatal: UsageError | None = None
        self._metrics_address: tuple[str, int] | None = None

    @property
    def group(self) -> str:
        return self._consumer.group

    @property
    def channels(self) -> frozenset[str]:
        return self._consumer.channels

    @property
    def target(self) -> str:
        """Where events go (the URL given as ``to``, without a password)."""
        return self._sink.target

    @property
    def partitions(self) -> list[int]:
        """The log partitions this relay holds now (out of 16)."""
        return self._consumer.partitions

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens, once `run` started it (host, port)."""
        return self._metrics_address

    def stop(self) -> None:
        """Make `run` return: the batch in hand is finished or left for the next run. Any
        thread or a signal handler may call it (it waits for nothing)."""
        self._stop_requested = True
        self._consumer.stop()
        self._caller.call(self._stop_sinks)

    def _stop_sinks(self) -> None:
        # On the event loop's thread: anyio's events and cancel scopes are not thread-safe.
        state = self._state
        if state is not None:
            state.stop()

    async def run(self) -> None:
        """Relay events until `stop` (or cancellation)."""
        if not self._sink.anyio and sniffio.current_async_library() != "asyncio":
            raise UsageError(
                f"relaying to {self._sink.target} runs on asyncio only (its client does: "
                "nats-py, redis-py): run this AsyncRelay under asyncio, or pgherald.Relay from "
                "a thread (webhook relays run on trio too)"
            )
        self._caller.bind()
        self._state = _RelayState(
            self.stats, retry_delay=self._retry[0], retry_max_delay=self._retry[1]
        )
        if self._stop_requested:
            self._state.stop()
        self.stats.started_at = time.time()
        self._reported = (self.stats.started_at, self.stats.relayed)
        error: Exception | None = None
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        try:
            if self._metrics[1] is not None:  # a port in use fails here, as itself
                listener = await anyio.create_tcp_listener(
                    local_host=self._metrics[0], local_port=self._metrics[1]
                )
                address = listener.extra(anyio.abc.SocketAttribute.local_address)
                self._metrics_address = (str(address[0]), int(address[1]))
            async with anyio.create_task_group() as tg:
                if listener is not None:
                    tg.start_soon(self._metrics_server, listener)
                try:
                    async with self._consumer:
                        if not self._stop_requested:
                            await self._sink.open(self._state)
                        if not self._stop_requested:
                            await self._consumer.run()
                except Exception as exc:  # raised below, as itself (not in an exception group)
                    error = exc
                tg.cancel_scope.cancel()  # the metrics server
        finally:
            self._stop_requested = False
            self._state = None
            await self._sink.aclose()
        fatal, self._fatal = self._fatal, None
        if error is None and fatal is not None:
            raise fatal
        if error is not None:
            raise error

    def metrics(self) -> str:
        """The relay's counters in Prometheus' text format (what ``/metrics`` serves)."""
        s = self.stats
        caught_up = _caught_up(s)
        labels = f'group="{_label(self.group)}",target="{_label(self.target)}"'
        rows = [
            ("events_total", "counter", "Events the broker acknowledged.", s.relayed),
            ("batches_total", "counter", "Reads published and acknowledged.", s.batches),
            (
                "duplicates_total",
                "counter",
                "Re-sends the broker dropped as duplicates.",
                s.duplicates,
            ),
            ("retries_total", "counter", "Sends retried (broker down or refusing).", s.retries),
            ("dead_lettered_total", "counter", "Events dead-lettered.", s.dead_lettered),
            ("connects_total", "counter", "Connections made to the broker.", s.connects),
            ("rate", "gauge", "Events/s over about the last 10 s.", 0.0 if caught_up else s.rate),
            (
                "lag_seconds",
                "gauge",
                "Age of the last event relayed (0: caught up).",
                0.0 if caught_up else s.lag_seconds,
            ),
            ("partitions", "gauge", "Log partitions held.", len(self.partitions)),
        ]
        out = []
        for name, kind, doc, value in rows:
            out += [
                f"# HELP pgherald_relay_{name} {doc}",
                f"# TYPE pgherald_relay_{name} {kind}",
                f"pgherald_relay_{name}{{{labels}}} {value}",
            ]
        return "\n".join(out) + "\n"

    async def _metrics_server(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Serve ``/metrics`` until cancelled; its failures are logged, never the relay's."""
        # Not listener.serve(): its accept() failures (out of file descriptors...) would end
        # the relay, in an exception group.
        sockets = getattr(listener, "listeners", [listener])  # a MultiListener's, or itself
        async with listener, anyio.create_task_group() as tg:  # closed when run ends
            for one in sockets:
                tg.start_soon(self._accept, one, tg)

    async def _accept(self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                logger.warning("metrics server: %s; accepting again in 1s", exc)
                await anyio.sleep(1)
            else:
                tg.start_soon(self._serve_metrics, stream)

    async def _serve_metrics(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    request = await BufferedByteReceiveStream(stream).receive_until(
                        b"\r\n\r\n", 65536
                    )
                    path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
                    if path.split(b"?")[0] == b"/metrics":
                        body, status = self.metrics().encode(), b"200 OK"
                    else:
                        body, status = b"not found: try /metrics\n", b"404 Not Found"
                    await stream.send(
                        b"HTTP/1.1 %s\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (status, len(body), body)
                    )
            except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, anyio.DelimiterNotFound, anyio.IncompleteRead):  # fmt: skip
                pass  # the client went away, or sent no request in time
            except Exception:  # a bug of ours: logged, and the relay goes on
                logger.exception("metrics server: a request failed")

    def _status_value(self, backend_pid: int) -> str:
        """The status row's JSON (see `RelayInfo`): the rate is over the time since the last."""
        s = self.stats
        now = time.time()
        then, relayed = self._reported
        self._reported = (now, s.relayed)
        rate = (s.relayed - relayed) / (now - then) if now > then else 0.0
        assert self._status_row is not None
        return json.dumps(
            {
                "group": self.group,
                "target": self.target,
                "channels": sorted(self.channels),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "backend_pid": backend_pid,
                "rate": round(rate, 3),
                "relayed": s.relayed,
                "lag_seconds": 0.0 if _caught_up(s) else round(s.lag_seconds, 3),
                "dead_lettered": s.dead_lettered,
                "retries": s.retries,
                "partitions": len(self.partitions),
                "started_at": s.started_at,
                "interval": self._status_row.interval,
            }
        )

    async def _send(self, events: list[Event]) -> int | None:
        state = self._state
        assert state is not None
        # Dead letters redelivered (`pgherald.redeliver`) lie behind what the broker has: the
        # sink must not drop them as re-sends. The consumer's engine knows which batch is one.
        redelivery = self._consumer._engine.redelivering
        try:
            done = await self._sink.send(events, state, redelivery=redelivery)
        except UsageError as exc:
            # A configuration the relay cannot work with (a stream that cannot be created,
            # events stored in another stream than ``stream``): not the event's fault, so not a
            # dead letter. Nothing of the read counts as done; `run` stops and raises it.
            self._fatal = exc
            self.stop()
            return 0
        except Refused as exc:
            # One line per event given up; the consumer's own record of it (with a traceback)
            # is dropped by _SinkRefusals: a refusal is no bug to trace.
            failed = events[min(exc.done, len(events) - 1)]
            logger.error("event %d (%s) dead-lettered: %s", failed.id, failed.channel, exc)
            self.stats.dead_lettered += 1
            if exc.done:
                self.stats._count(exc.done)
            raise
        if done is None:
            self.stats._count(len(events))
        elif done:
            self.stats._count(done)
        if done is None or done:
            last = events[-1 if done is None else done - 1]
            self.stats.lag_seconds = max(0.0, time.time() - last.created_at.timestamp())
        return done

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={self.group!r} to={self.target!r}>"


class Relay:
    """
    The blocking `AsyncRelay`: same options; `run` blocks (on an asyncio loop of its own) until
    `stop`, which any thread or a signal handler may call.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: Source | None = None,
        *,
        to: str,
        channels: Iterable[str],
        group: str = "relay",
        start: Start = "beginning",
        stream: str | None = None,
        subject: str = DEFAULT_SUBJECT,
        stream_config: Mapping[str, Any] | None = None,
        maxlen: int | None = None,
        secret: str | None = None,
        webhook_batch: int = 1,
        max_attempts: int = 8,
        retry_delay: float = 0.2,
        retry_max_delay: float = 30.0,
        timeout: float = 10.0,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        stats_interval: float | None = 10.0,
        application_name: str = "pgherald-relay",
    ) -> None:
        self._relay = AsyncRelay(
            dsn,
            to=to,
            channels=channels,
            group=group,
            start=start,
            stream=stream,
            subject=subject,
            stream_config=stream_config,
            maxlen=maxlen,
            secret=secret,
            webhook_batch=webhook_batch,
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            retry_max_delay=retry_max_delay,
            timeout=timeout,
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            stats_interval=stats_interval,
            application_name=application_name,
        )
        self.stats = self._relay.stats
        """Counters: relayed, batches, retries, dead-lettered, rate."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def group(self) -> str:
        return self._relay.group

    @property
    def channels(self) -> frozenset[str]:
        return self._relay.channels

    @property
    def target(self) -> str:
        """Where events go (the URL given as ``to``, without a password)."""
        return self._relay.target

    @property
    def partitions(self) -> list[int]:
        """The log partitions this relay holds now (out of 16)."""
        return self._relay.partitions

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens, once `run` started it (host, port)."""
        return self._relay.metrics_address

    def metrics(self) -> str:
        """The relay's counters in Prometheus' text format (what ``/metrics`` serves)."""
        return self._relay.metrics()

    def stop(self) -> None:
        """Make `run` return; any thread, a signal handler too (as a callback of its loop: a
        signal handler runs between two steps of the loop's own code)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._relay.stop)
            except RuntimeError:  # closed meanwhile: run() has returned
                pass
            else:
                return
        self._relay.stop()

    def run(self) -> None:
        """Relay events until `stop`."""
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._relay.run()
        finally:
            self._loop = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group={self.group!r} to={self.target!r}>"


def _caught_up(s: RelayStats) -> bool:
    return s.last_relayed_at is None or time.time() - s.last_relayed_at > CAUGHT_UP_AFTER


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
