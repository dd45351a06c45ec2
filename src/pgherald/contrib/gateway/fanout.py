"""
The hub: one listening connection for every client, bounded per-client buffers, the log tail.

Plain channels: LISTEN when the first client wants a channel, UNLISTEN when the last one
leaves; each notification becomes one `Frame`, offered to every subscriber without waiting.

Durable channels: one task tails the event log in commit-safe order, (tx, id), woken by
``pgherald_wake_v1`` and by a short poll, with the reader of `pgherald.read_log` (per partition:
an idle poll costs the same however long the log). `Hub.position` is where the tail is; a
client that registers gets every later event live, and reads anything before that from the log
itself. Every statement runs on the event loop (`Db`): no worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Generator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from psycopg import pq

from ..._listener_async import AsyncListener
from ..._models import Gap, Notification
from ..._protocol import logread
from ..._protocol.channels import check_channel
from ..._protocol.payload import encode_payload
from ..._protocol.pgwire import Request, one_line
from ..._publish import _params as publish_params
from ..._schema import MISSING
from ...errors import ConnectionLost, HeraldError, SchemaMissing
from .client import Client
from .db import Db, Statement
from .frames import PING, Frame, Position
from .metrics import Metrics
from .wakeup import Signal, new_signal, on_asyncio

logger = logging.getLogger("pgherald.gateway")

WAKE_CHANNEL = "pgherald_wake_v1"


class UnknownEventId(HeraldError):
    """A client resumes after an event the log does not have (never stored, or pruned)."""


class Hub:
    def __init__(
        self,
        dsn: str,
        *,
        durable_channels: Iterable[str] = (),
        client_buffer: int = 1000,
        heartbeat: float = 15.0,
        poll_interval: float = 0.25,
        batch_size: int = 500,
        grace: float = 5.0,
        listen_timeout: float = 10.0,
        inline_writes: bool = True,
    ) -> None:
        self.dsn = dsn
        self.durable = frozenset(durable_channels)
        self.client_buffer = client_buffer
        self.heartbeat = heartbeat
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.grace = grace
        self.listen_timeout = listen_timeout
        self.listener = AsyncListener(dsn, application_name="pgherald-gateway", on_gap=self._gap)
        self.listener.add_handler(None, self._on_notification)
        self.db = Db(dsn, application_name="pgherald-gateway-db")
        self._tail_db = Db(dsn, application_name="pgherald-gateway-tail")
        self.frames_out = 0
        self.metrics = Metrics(
            reconnects=lambda: self.listener.stats.reconnects, frames_out=lambda: self.frames_out
        )
        self.clients: set[Client] = set()
        self._subs: dict[str, set[Client]] = {}
        self.position: Position = (0, 0)
        self.inline_writes = inline_writes
        self.inline = False
        """Clients' writes are started by hand in `flush` (asyncio; see `client`)."""
        self._dirty: list[Client] = []
        self._flush: Signal | None = None
        self._wake = anyio.Event()
        self._running = False

    # -- lifetime --

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Hub]:
        """Connect, start listening (and tailing), and on exit end every stream."""
        async with self.listener:
            if self.durable:
                await self._check_schema()
                await self.listener.subscribe(WAKE_CHANNEL)
                horizon = await self._tail_db.named("log_horizon", {}, doing="read the log")
                self.position = (int(horizon.get_value(0, 0) or b"0"), 0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.listener.run)
                tg.start_soon(self._housekeeping)
                self._flush = new_signal()
                self._dirty = []  # (a hub run again: what an earlier run left is gone)
                self.inline = self.inline_writes and on_asyncio()
                tg.start_soon(self._flusher)
                if self.durable:
                    tg.start_soon(self._tail)
                self._running = True
                try:
                    yield self
                finally:
                    self._running = False
                    self.close_all("server shutting down")
                    self.listener.stop()
                    tg.cancel_scope.cancel()
        self.db.close()
        self._tail_db.close()

    def close_all(self, reason: str) -> None:
        """End every client's stream with *reason* (at shutdown)."""
        for client in list(self.clients):
            client.end(reason, 1001)

    @property
    def healthy_listener(self) -> bool:
        return self._running and self.listener.connected

    @property
    def listening(self) -> set[str]:
        """The channels the shared connection is LISTENing to right now (server side)."""
        return set(self.listener.listening)

    # -- clients --

    def new_client(self, kind: str, expires: float | None = None) -> Client:
        """A client of *kind* (``sse``, ``ws``) whose token expires at *expires* (`time.time`)."""
        client = Client(self, kind, expires)
        self.clients.add(client)
        self.metrics.clients.labels(kind).inc()
        return client

    async def add(self, client: Client, channels: Iterable[str]) -> Position:
        """
        Subscribe *client* to *channels*; return the log position it gets live events after.

        Returns once the LISTENs are in effect, so nothing sent afterwards is missed.
        """
        channels = list(dict.fromkeys(channels))
        for ch in channels:
            subs = self._subs.setdefault(ch, set())
            subs.add(client)
            client.channels.add(ch)
        position = self.position  # with the registration above: no await in between
        plain = [ch for ch in channels if ch not in self.durable]
        if plain:
            # Returns once the server listens (also when another client's subscribe to the same
            # channel is still in flight): nothing sent afterwards is missed.
            await self.listener.subscribe(*plain)
        return position

    async def remove(self, client: Client, channels: Iterable[str] | None = None) -> None:
        """Unsubscribe *client* from *channels* (None: all, and forget it)."""
        gone: list[str] = []
        for ch in list(client.channels) if channels is None else list(channels):
            client.channels.discard(ch)
            subs = self._subs.get(ch)
            if subs is None:
                continue
            subs.discard(client)
            if not subs:
                del self._subs[ch]
                if ch not in self.durable:
                    gone.append(ch)
        if channels is None:
            client.end("gone")
            if client in self.clients:
                self.clients.discard(client)
                self.metrics.clients.labels(client.kind).dec()
        if gone:
            with anyio.CancelScope(shield=True) as scope:
                if channels is None:
                    # A client leaving does not wait for the UNLISTEN: requested now, applied
                    # by the listener's loop (after it reconnects while the database is down,
                    # when waiting would hold the stream's end and the server's shutdown).
                    scope.cancel()
                await self.listener.unsubscribe(*gone)

    def dirty(self, client: Client) -> None:
        """*client* gained pending frames: flush it once the current batch is dispatched."""
        dirty = self._dirty
        dirty.append(client)
        if len(dirty) == 1 and self._flush is not None:
            self._flush.set()  # once per batch (the flusher takes the whole list)

    async def _flusher(self) -> None:
        # Runs when the task that offered frames yields, i.e. after the whole batch: each
        # client then gets one write for all the frames the batch gave it.
        assert self._flush is not None
        while True:
            await self._flush.wait()
            dirty, self._dirty = self._dirty, []
            for client in dirty:
                client.flush()

    async def _housekeeping(self) -> None:
        """End clients whose token expired; send SSE heartbeats on streams idle too long."""
        tick = max(0.05, min(1.0, self.heartbeat / 2))
        while True:
            now = time.time()
            # A client ended already (it may take the grace to leave) is not waited for again.
            soonest = min(
                (c.expires for c in self.clients if c.expires is not None and c.reason is None),
                default=None,
            )
            await anyio.sleep(tick if soonest is None else max(0.0, min(tick, soonest - now)))
            now, idle_since = time.time(), time.monotonic() - self.heartbeat
            for client in list(self.clients):
                if client.reason is not None:
                    continue
                if client.expires is not None and client.expires <= now:
                    client.end("token expired", 1008)
                elif (
                    client.kind == "sse" and client.last_write <= idle_since and not client.pending
                ):
                    client.offer(PING)  # (frames waiting: the stream is blocked, not idle)

    # -- plain channels --

    def _on_notification(self, n: Notification) -> None:
        if n.channel == WAKE_CHANNEL and self.durable:
            self._wake.set()
            return
        self.metrics.events_in.inc()
        subs = self._subs.get(n.channel)
        if subs and n.channel not in self.durable:
            frame = Frame(n.channel, n.payload)
            for client in list(subs):
                client.offer(frame)

    def _gap(self, gap: Gap) -> None:
        logger.warning(
            "the listener was not listening for %.2fs (%s); plain-channel notifications sent "
            "meanwhile were missed",
            gap.ended - gap.started,
            gap.reason,
        )
        self._wake.set()

    # -- durable channels --

    async def _tail(self) -> None:
        channels = sorted(self.durable)
        limit = self.batch_size
        while True:
            self._wake = wake = anyio.Event()
            query = logread.LogQuery(after=self.position, limit=limit, channels=channels)
            try:
                read = await self._tail_db.run(_reader(query))
            except HeraldError as exc:
                logger.warning("reading the event log failed (%s); retrying", one_line(exc))
                await anyio.sleep(1.0)
                continue
            for tx, event_id, channel, payload in logread.frame_rows(read):
                frame = Frame(channel, payload, (tx, event_id))
                subs = self._subs.get(channel)
                if subs:
                    for client in list(subs):
                        client.offer(frame)
            # Past the last event, or, when caught up, to the horizon: events of other
            # channels that the read skipped are not scanned again.
            self.position = logread.next_position(read, limit, self.position)
            self.metrics.events_in.inc(read.n)
            if read.n >= limit:
                continue
            with anyio.move_on_after(self.poll_interval):
                await wake.wait()

    async def publish(self, channel: str, payload: Any) -> int | None:
        """Publish to the log (durable channel: returns the id) or NOTIFY (returns None)."""
        if channel in self.durable:
            res = await self.db.named(
                "publish", publish_params(channel, payload, None, None, None), doing="publish"
            )
            return int(res.get_value(0, 0) or b"0")
        params = {"channel": check_channel(channel), "payload": encode_payload(payload)}
        await self.db.named("notify", params, doing=f"NOTIFY on channel {channel!r}")
        return None

    async def queue_usage(self) -> float:
        res = await self.db.named("notify_queue_usage", {}, doing="read the NOTIFY queue usage")
        return float(res.get_value(0, 0) or b"0")

    async def database_ok(self) -> bool:
        with anyio.move_on_after(3.0):  # (waiting for the connection included)
            for attempt in (1, 2):
                try:
                    await self.db.named("ping", {}, doing="check the database", seconds=3.0)
                except ConnectionLost:
                    if attempt == 1:
                        continue  # a connection that broke while idle: try a new one
                    return False
                except HeraldError:
                    return False
                return True
        return False

    async def resume_from(self, event_id: int) -> Position:
        """The log position of *event_id* (`UnknownEventId` when the log lacks it)."""
        res = await self.db.named(
            "event_position", {"id": str(event_id)}, doing="find the resume position"
        )
        if not res.ntuples:
            raise UnknownEventId(f"event {event_id} is not in the log (never stored, or pruned)")
        return (int(res.get_value(0, 0) or b"0"), event_id)

    async def replay(
        self, channels: list[str], after: Position, upto: Position
    ) -> AsyncIterator[Frame]:
        """Events of *channels* in ``(after, upto]``, from the log, in order."""
        limit = self.batch_size
        while after < upto:
            query = logread.LogQuery(after=after, limit=limit, channels=channels, upto=upto)
            read = await self.db.run(_reader(query))
            rows = logread.frame_rows(read)
            for tx, event_id, channel, payload in rows:
                yield Frame(channel, payload, (tx, event_id))
            if read.n < limit:
                return
            after = rows[-1][:2]

    async def _check_schema(self) -> None:
        res = await self._tail_db.named("schema_installed", {}, doing="check the schema")
        if res.get_value(0, 0) != b"t":
            raise SchemaMissing(MISSING)


def _reader(query: logread.LogQuery) -> Statement[logread.LogRead]:
    """One read of the log, as a statement for `Db.run`."""

    def statement(
        pgconn: pq.abc.PGconn, deadline: float
    ) -> Generator[Request, bool, logread.LogRead]:
        return logread.read(pgconn, query, deadline)

    return statement
