"""
The hub: one listening connection for every client, bounded per-client buffers, the log tail.

Plain channels: LISTEN when the first client wants a channel, UNLISTEN when the last one
leaves; each notification becomes one `Frame`, offered to every subscriber without waiting.

Wildcard subscriptions (``public.*``, fnmatch patterns as in tokens' claims): PostgreSQL has no
wildcard LISTEN, so a pattern matches the channels the gateway knows (`Hub.known`): declared ones,
durable ones, those of pgherald's change triggers in the database, and those subscribed to by
name or published to through the gateway; a channel that becomes known later joins every
pattern that matches it. Filters (filters.py) are kept apart from the plain subscribers, so an
event to unfiltered clients costs what it did.

Gaps: whenever subscribers of plain channels may have missed notifications (the listener
reconnected or gave up its queue position, or the change triggers' queue guard skipped
notifications), each of them gets a ``gap`` message in its stream, to resync.

Durable channels: one task tails the event log in commit-safe order, (tx, id), woken by
``pgherald_wake_v1`` and by a short poll, with the reader of `pgherald.read_log` (per partition:
an idle poll costs the same however long the log). `Hub.position` is where the tail is; a
client that registers gets every later event live, and reads anything before that from the log
itself. Every statement runs on the event loop (`Db`): no worker threads.

With a ``source`` (``nats://...``), durable channels' live events come from the JetStream
stream `pgherald relay` fills instead (`_tail_nats`): no log tail, no wake-ups, so gateway
replicas add no polling to the database. The relay's ``Pgherald-Tx`` and ``Pgherald-Event-Id``
headers give each event its log position, so resuming (Last-Event-ID, read from the log) and
the live stream meet as with the log tail.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
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
from ...errors import (
    ConnectionLost,
    DatabaseConnectionError,
    HeraldError,
    SchemaMissing,
    UsageError,
)
from .client import Client
from .db import Db, Statement
from .filters import Filter, decode
from .frames import PING, Frame, Position, control
from .metrics import Metrics
from .wakeup import Signal, new_signal, on_asyncio

logger = logging.getLogger("pgherald.gateway")

RESTART_AFTER = 1.0
"""Seconds before a hub task that failed unexpectedly is started again."""


async def _supervised(task: Callable[[], Awaitable[None]]) -> None:
    """
    Run one of the hub's background tasks, and again after `RESTART_AFTER` seconds when it
    fails unexpectedly (a bug): logged with its traceback, while the gateway goes on serving.
    Left to the task group, one such failure ended the hub under a server that kept accepting
    clients (uvicorn logs a lifespan error and serves on): every durable stream ended, and
    none could start again. A usage error (a missing extra) still ends it.
    """
    while True:
        try:
            await task()
            return
        except (UsageError, SchemaMissing):
            raise
        except Exception:
            logger.exception(
                "the gateway's %s task failed (a bug: please report it); it starts again in %gs",
                getattr(task, "__name__", "background").strip("_"),
                RESTART_AFTER,
            )
            await anyio.sleep(RESTART_AFTER)


WAKE_CHANNEL = "pgherald_wake_v1"
MAX_LEARNED = 10_000
"""Channels remembered from subscriptions and publishes for patterns to match, at most."""


def is_pattern(channel: str) -> bool:
    """Whether a subscription names a pattern (``*``, ``?``, ``[...]``) rather than a channel."""
    return "*" in channel or "?" in channel or "[" in channel


MAX_EVENT_ID = 2**63 - 1
"""Event ids are PostgreSQL bigints: a larger resume id is no event id at all."""

REPLAY_ATTEMPTS = 3
"""Tries of each read of a client's replay, a new connection each, before the client is ended
with `REPLAY_FAILED`."""
REPLAY_FAILED = "the database is not available; resume later"
"""Why a client whose replay could not read the log is ended (its events are still there)."""


class UnknownEventId(HeraldError):
    """A client resumes after an event the log does not have (never stored, or pruned), or
    after an id that cannot be one (beyond a bigint)."""


_LISTENER_OWN = frozenset({"dsn", "channels", "application_name", "on_gap"})
"""What the gateway sets on its listener itself (not in ``listener_options``)."""


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
        channels: Iterable[str] = (),
        queue_check_interval: float = 1.0,
        discover_interval: float = 30.0,
        source: str | None = None,
        source_stream: str = "PGHERALD",
        source_subject: str = "pgherald.{channel}",
        listener_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.dsn = dsn
        options = dict(listener_options or {})
        taken = sorted(options.keys() & _LISTENER_OWN)
        if taken:
            raise UsageError(
                f"listener_options may not set {', '.join(taken)}: the gateway sets those itself"
            )
        unknown = sorted(options.keys() - inspect.signature(AsyncListener).parameters.keys())
        if unknown:
            raise UsageError(
                f"listener_options: AsyncListener takes no {', '.join(unknown)} (see listen.md)"
            )
        self.durable = frozenset(durable_channels)
        if source is not None and not source.lower().startswith(("nats://", "tls://")):
            raise UsageError(
                f"gateway source {source!r} is not supported: use nats://HOST:PORT (the "
                "JetStream stream of pgherald relay), or none (the database)"
            )
        self.source = source
        """Where durable channels' live events come from: None (the log) or a NATS URL."""
        self.source_stream = source_stream
        self.source_subject = source_subject
        self.source_ok = False
        """With a source: connected to NATS, the stream's consumers made (see /healthz)."""
        self._source_seq: dict[str, int] = {}
        """With a source: the last stream sequence each durable channel delivered."""
        self._source_back = anyio.Event()
        """With a source: set when nats-py has reconnected (the consumers are made again)."""
        self.declared = frozenset(channels)
        """Plain channels given to the gateway for patterns to match (``--channel``)."""
        self.queue_check_interval = queue_check_interval
        self.discover_interval = discover_interval
        self.client_buffer = client_buffer
        self.heartbeat = heartbeat
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.grace = grace
        self.listen_timeout = listen_timeout
        self.listener = AsyncListener(
            dsn, application_name="pgherald-gateway", on_gap=self._gap, **options
        )
        self.listener.add_handler(None, self._on_notification)
        self.db = Db(dsn, application_name="pgherald-gateway-db")
        # The tail waits for wake-ups: publishers send them only while a session holds the
        # waiting lock (see publish_v1), which this connection holds for as long as it lives.
        self._tail_db = Db(
            dsn,
            application_name="pgherald-gateway-tail",
            on_connect="hold_wakeups" if self.durable and source is None else None,
        )
        self.frames_out = 0
        self.metrics = Metrics(
            reconnects=lambda: self.listener.stats.reconnects, frames_out=lambda: self.frames_out
        )
        self.clients: set[Client] = set()
        self._subs: dict[str, set[Client]] = {}
        self._filtered: dict[str, dict[Client, Filter]] = {}  # subscribers with a filter
        self._pattern_clients: set[Client] = set()
        self._learned: dict[str, None] = {}  # an ordered set, used longest ago first
        self._discovered: frozenset[str] = frozenset()
        self._discovered_at = -1e9
        self._guard_since: float | None = None  # the queue guard skips notifications
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
        if self.durable and self.source is not None and not on_asyncio():
            raise UsageError("the gateway's NATS source runs on asyncio only (nats-py does)")
        async with contextlib.AsyncExitStack() as stack:
            # Closed last, also when the hub fails to start (no schema): no session left behind.
            stack.callback(self._tail_db.close)
            stack.callback(self.db.close)
            await stack.enter_async_context(self.listener)
            if self.durable and self.source is not None:
                await self._check_schema(self.db)  # (resuming still reads the log)
            elif self.durable:
                await self._check_schema(self._tail_db)
                await self.listener.subscribe(WAKE_CHANNEL)
                horizon = await self._tail_db.named("log_horizon", {}, doing="read the log")
                self.position = (int(horizon.get_value(0, 0) or b"0"), 0)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.listener.run)
                tg.start_soon(_supervised, self._housekeeping)
                self._flush = new_signal()
                self._dirty = []  # (a hub run again: what an earlier run left is gone)
                self.inline = self.inline_writes and on_asyncio()
                tg.start_soon(_supervised, self._flusher)
                tg.start_soon(_supervised, self._watch_queue_guard)
                tg.start_soon(_supervised, self._rediscover)
                if self.durable and self.source is not None:
                    tg.start_soon(_supervised, self._tail_nats)
                elif self.durable:
                    tg.start_soon(_supervised, self._tail)
                self._running = True
                try:
                    yield self
                finally:
                    self._running = False
                    self.close_all("server shutting down")
                    self.listener.stop()
                    tg.cancel_scope.cancel()

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

    @property
    def known(self) -> set[str]:
        """The channels patterns match: declared, durable, change triggers', learned."""
        return set(self.declared) | self.durable | self._discovered | set(self._learned)

    def _is_known(self, channel: str) -> bool:
        return (
            channel in self._learned
            or channel in self.declared
            or channel in self.durable
            or channel in self._discovered
        )

    def durable_matching(self, channels: Iterable[str], can_read: Any = None) -> list[str]:
        """The durable channels among *channels*, patterns expanded (those *can_read* allows)."""
        found: dict[str, None] = {}
        for ch in channels:
            if not is_pattern(ch):
                if ch in self.durable:
                    found[ch] = None
                continue
            for d in sorted(self.durable):
                if fnmatch.fnmatchcase(d, ch) and (can_read is None or can_read(d)):
                    found[d] = None
        return list(found)

    async def add(
        self, client: Client, channels: Iterable[str], filter: Filter | None = None
    ) -> Position:
        """
        Subscribe *client* to *channels* (names or patterns), each with *filter* (None: every
        event); return the log position it gets live events after.

        Returns once the LISTENs are in effect, so nothing sent afterwards is missed.
        """
        channels = list(dict.fromkeys(channels))
        names = [ch for ch in channels if not is_pattern(ch)]
        patterns = [ch for ch in channels if is_pattern(ch)]
        # Channels new to the gateway join other clients' patterns that match them (listen).
        listen = await self.discover(at_most_every=1.0) if patterns else []
        for p in patterns:
            client.patterns[p] = filter
        if client.patterns:
            self._pattern_clients.add(client)
        client.named.update(names)
        listen += self._learn(names)
        matched = (
            [
                ch
                for ch in sorted(self.known)
                if any(fnmatch.fnmatchcase(ch, p) for p in patterns) and client.can_read(ch)
            ]
            if patterns
            else []
        )
        for ch in names:
            self._register(client, ch, filter)
        for ch in matched:
            if ch not in names:
                self._register(client, ch, filter)
        position = self.position  # with the registration above: no await in between
        plain = [ch for ch in dict.fromkeys(names + matched + listen) if ch not in self.durable]
        if plain:
            # Returns once the server listens (also when another client's subscribe to the same
            # channel is still in flight): nothing sent afterwards is missed.
            await self.listener.subscribe(*plain)
        return position

    def _register(self, client: Client, channel: str, filter: Filter | None) -> None:
        """*client* gets *channel*'s events (those *filter* passes); replaces an earlier filter."""
        if filter is None:
            self._subs.setdefault(channel, set()).add(client)
            self._unfilter(client, channel)
        else:
            self._filtered.setdefault(channel, {})[client] = filter
            subs = self._subs.get(channel)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._subs[channel]
        client.channels.add(channel)

    def _unfilter(self, client: Client, channel: str) -> None:
        filtered = self._filtered.get(channel)
        if filtered is not None:
            filtered.pop(client, None)
            if not filtered:
                del self._filtered[channel]

    def _subscribed(self, channel: str) -> bool:
        return channel in self._subs or channel in self._filtered

    def _learn(self, channels: Iterable[str]) -> list[str]:
        """
        Remember *channels* for patterns to match, and subscribe the clients whose patterns
        match those that are new; returns those that gained subscribers (to LISTEN to).
        """
        # The last MAX_LEARNED channels used are kept (gateway.md): a channel used again moves
        # to the end, so a busy channel is not forgotten for being the first one learned.
        learned = self._learned
        new: list[str] = []
        for ch in channels:
            if ch in learned:
                del learned[ch]
                learned[ch] = None
                continue
            # (Never the wake-up channel: a pattern leaving would UNLISTEN the tail's wake-ups.)
            if self._is_known(ch) or ch == WAKE_CHANNEL:
                continue
            new.append(ch)
            learned[ch] = None
            if len(learned) > MAX_LEARNED:
                del learned[next(iter(learned))]
        return self._join_patterns(new)

    def _join_patterns(self, channels: list[str]) -> list[str]:
        """Subscribe the clients whose patterns match *channels*; those that gained any."""
        gained: list[str] = []
        if not self._pattern_clients:
            return gained
        for ch in channels:
            for client in list(self._pattern_clients):
                if ch in client.channels or client.reason is not None or not client.can_read(ch):
                    continue
                for p, filter in client.patterns.items():
                    if fnmatch.fnmatchcase(ch, p):
                        if client.kind == "sse":  # (before any event: the LISTEN comes after)
                            client.offer(control("subscribed", {"channels": [ch], "pattern": p}))
                        self._register(client, ch, filter)
                        gained.append(ch)
                        break
        return gained

    async def discover(self, *, at_most_every: float) -> list[str]:
        """Read the change triggers' channels again; `_learn` the new ones (returned)."""
        now = time.monotonic()
        if now - self._discovered_at < at_most_every:
            return []
        self._discovered_at = now
        try:
            res = await self.db.named(
                "change_trigger_channels", {}, doing="list the change triggers' channels"
            )
        except HeraldError as exc:
            logger.warning("listing the change triggers' channels failed (%s)", one_line(exc))
            return []
        found = frozenset((res.get_value(i, 0) or b"").decode() for i in range(res.ntuples)) - {""}
        new = [ch for ch in sorted(found) if not self._is_known(ch)]
        self._discovered = found
        return self._join_patterns(new)

    async def remove(self, client: Client, channels: Iterable[str] | None = None) -> None:
        """Unsubscribe *client* from *channels*, names or patterns (None: all, and forget it)."""
        if channels is None:
            dropped = list(client.channels)
            client.patterns.clear()
            client.named.clear()
        else:
            given = list(channels)
            for ch in given:
                if is_pattern(ch):
                    client.patterns.pop(ch, None)
                else:
                    client.named.discard(ch)
            dropped = [
                ch
                for ch in client.channels
                if (ch in given or any(fnmatch.fnmatchcase(ch, p) for p in given if is_pattern(p)))
                and ch not in client.named
                and not any(fnmatch.fnmatchcase(ch, p) for p in client.patterns)
            ]
        if not client.patterns:
            self._pattern_clients.discard(client)
        gone: list[str] = []
        for ch in dropped:
            client.channels.discard(ch)
            self._unfilter(client, ch)
            subs = self._subs.get(ch)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._subs[ch]
            if not self._subscribed(ch) and ch not in self.durable:
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

    async def _rediscover(self) -> None:
        """While patterns are subscribed, pick up change triggers added since."""
        while True:
            await anyio.sleep(self.discover_interval)
            if self._pattern_clients:
                gained = await self.discover(at_most_every=0.0)
                plain = [ch for ch in gained if ch not in self.durable]
                if plain:
                    with anyio.move_on_after(self.listen_timeout):
                        await self.listener.subscribe(*plain)

    async def _watch_queue_guard(self) -> None:
        """
        Send a gap while the change triggers skip their notifications (the NOTIFY queue is
        past ``pgherald.change_max_queue_usage``), and another, with its end, once they send
        again. Read every `queue_check_interval` while plain channels are subscribed.
        """
        if self.queue_check_interval <= 0:
            return
        below_at = time.time()
        while True:
            await anyio.sleep(self.queue_check_interval)
            subscribed = self._subs.keys() | self._filtered.keys()
            if not self._pattern_clients and subscribed <= self.durable:
                continue  # no plain channel: nothing to miss
            try:
                res = await self.db.named("change_guard", {}, doing="read the NOTIFY queue usage")
                usage = float(res.get_value(0, 0) or b"0")
                limit = float(res.get_value(0, 1) or b"0.9")
            except (HeraldError, ValueError):
                continue  # the database is away: the listener reports that gap
            now = time.time()
            if usage < limit:
                if self._guard_since is not None:
                    logger.warning(
                        "the NOTIFY queue is below pgherald.change_max_queue_usage again: "
                        "change triggers notify again"
                    )
                    self.send_gap("queue_guard", self._guard_since, now)
                    self._guard_since = None
                below_at = now
            elif self._guard_since is None:
                logger.warning(
                    "the NOTIFY queue is %.0f%% full, past pgherald.change_max_queue_usage "
                    "(%.2f): change triggers skip their notifications; clients are told (gap)",
                    usage * 100,
                    limit,
                )
                self._guard_since = below_at
                self.send_gap("queue_guard", below_at, None)

    # -- plain channels --

    def _on_notification(self, n: Notification) -> None:
        if n.channel == WAKE_CHANNEL and self.durable and self.source is None:
            self._wake.set()
            return
        self.metrics.events_in.inc()
        subs = self._subs.get(n.channel)
        if subs and n.channel not in self.durable:
            frame = Frame(n.channel, n.payload)
            for client in list(subs):
                client.offer(frame)
        if self._filtered:
            filtered = self._filtered.get(n.channel)
            if filtered and n.channel not in self.durable:
                _offer_filtered(filtered, Frame(n.channel, n.payload))

    def _gap(self, gap: Gap) -> None:
        logger.warning(
            "the listener was not listening for %.2fs (%s); plain-channel notifications sent "
            "meanwhile were missed",
            gap.ended - gap.started,
            gap.reason,
        )
        self._wake.set()
        self.send_gap(gap.reason, gap.started, gap.ended)

    def send_gap(self, reason: str, started: float, ended: float | None) -> int:
        """
        Tell every client of a plain channel (or a pattern) that it may have missed events
        between *started* and *ended* (`time.time`; None: still going on). Returns how many.
        """
        told = 0
        for client in list(self.clients):
            if client.reason is not None:
                continue
            plain = sorted(ch for ch in client.channels if ch not in self.durable)
            if not plain and not client.patterns:
                continue
            fields: dict[str, object] = {
                "reason": reason,
                "channels": plain + sorted(client.patterns),
                "started": round(started, 3),
                "ended": None if ended is None else round(ended, 3),
            }
            client.offer(control("gap", fields))
            told += 1
        self.metrics.gaps.labels(reason).inc()
        return told

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
                self._fan_out(Frame(channel, payload, (tx, event_id)))
            # Past the last event, or, when caught up, to the horizon: events of other
            # channels that the read skipped are not scanned again.
            self.position = logread.next_position(read, limit, self.position)
            self.metrics.events_in.inc(read.n)
            if read.n >= limit:
                continue
            with anyio.move_on_after(self.poll_interval):
                await wake.wait()

    async def _tail_nats(self) -> None:
        """Durable channels' live events from the relay's JetStream stream (``source``)."""
        try:
            import nats
            from nats.js.api import ConsumerConfig, DeliverPolicy
            from nats.js.errors import NotFoundError
        except ImportError:
            raise UsageError(
                "serve --source nats:// needs nats-py: pip install 'pgherald[relay]'"
            ) from None
        source = self.source
        assert source is not None
        self._source_seq = {}
        attempt = 0
        while True:  # until cancelled (the hub stops)
            attempt += 1
            nc: Any = None
            self._source_back = anyio.Event()
            try:
                nc = await nats.connect(
                    source,
                    name="pgherald-gateway",
                    connect_timeout=self.listen_timeout,
                    max_reconnect_attempts=-1,  # once connected, nats-py reconnects for ever
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=_nats_error,
                    disconnected_cb=self._source_down,
                    reconnected_cb=self._source_up,
                )
                js = nc.jetstream(timeout=self.listen_timeout)
                if not self._source_seq:
                    # The live events from here on: what DeliverPolicy.NEW gives, but as a
                    # sequence to start again after (see below).
                    info = await js.stream_info(self.source_stream)
                    last = info.state.last_seq
                    if last:
                        # Clients resume from the log up to `position`: up to the last event
                        # relayed before the consumers' start (else a resume reads nothing
                        # until a first live event arrives, and what followed the client's
                        # id would come neither from the log nor live).
                        with contextlib.suppress(NotFoundError):
                            stored = await js.get_msg(self.source_stream, last)
                            pos = _relayed_position(stored.headers)
                            if pos is not None and pos > self.position:
                                self.position = pos
                    self._source_seq = dict.fromkeys(self.durable, last)
                while True:
                    subs = []
                    for channel in sorted(self.durable):
                        # An ordered consumer: in stream order, no acknowledgements.
                        subs.append(
                            await js.subscribe(
                                self.source_subject.replace("{channel}", channel),
                                stream=self.source_stream,
                                cb=self._relayed_to(channel),
                                ordered_consumer=True,
                                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                config=ConsumerConfig(opt_start_seq=self._source_seq[channel] + 1),
                            )
                        )
                    logger.info(
                        "durable channels from JetStream stream %s at %s",
                        self.source_stream,
                        self.source,
                    )
                    attempt = 0
                    self.source_ok = True
                    await self._source_back.wait()
                    # Reconnected: a restarted server has forgotten the (ephemeral) consumers,
                    # and nats-py's ordered consumer would notice only after two missed
                    # heartbeats (10 to 20 s of silence, /healthz saying all is well). Make them
                    # again at once, after the last event delivered.
                    self._source_back = anyio.Event()
                    self.source_ok = False
                    for sub in subs:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    logger.info("the gateway's NATS source %s is connected again", self.source)
            except Exception as exc:
                self.source_ok = False
                delay = min(0.5 * 2 ** min(attempt - 1, 5), 10.0)
                logger.warning(
                    "the gateway's NATS source %s failed (%s: %s); retrying in %.1fs",
                    self.source,
                    type(exc).__name__,
                    one_line(exc),
                    delay,
                )
                await anyio.sleep(delay)
            finally:
                self.source_ok = False
                if nc is not None:
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(2.0),
                        contextlib.suppress(Exception),
                    ):
                        await nc.close()

    async def _source_down(self) -> None:
        self.source_ok = False
        if self._running:  # (nats-py calls this when the hub closes it too)
            logger.warning(
                "the gateway's NATS source %s disconnected; durable channels' live events "
                "wait until it is back (reconnecting)",
                self.source,
            )

    async def _source_up(self) -> None:
        self._source_back.set()

    def _relayed_to(self, channel: str) -> Any:
        """The message callback of *channel*'s consumer."""

        async def on_message(msg: Any) -> None:
            # nats-py's ordered consumer starts again after the last message it delivered,
            # or from the stream's first when it delivered none yet (a consumer made with
            # a start sequence included): what this channel had already is dropped here.
            seq = msg.metadata.sequence.stream
            if seq <= self._source_seq.get(channel, 0):
                return
            self._source_seq[channel] = seq
            self._on_relayed(msg)

        return on_message

    def _on_relayed(self, msg: Any) -> None:
        """One relayed event (see `_relay_nats`): a frame for its channel's clients."""
        headers = msg.headers or {}
        channel = headers.get("Pgherald-Channel")
        pos = _relayed_position(headers)
        if channel not in self.durable or pos is None:
            logger.warning(
                "a message on %s is not an event relayed by pgherald relay (headers "
                "Pgherald-Channel, -Tx, -Event-Id): skipped",
                msg.subject,
            )
            return
        frame = Frame(channel, msg.data.decode(errors="replace"), pos)
        if pos > self.position:
            self.position = pos
        self.metrics.events_in.inc()
        self._fan_out(frame)

    def _fan_out(self, frame: Frame) -> None:
        """A durable event to its channel's subscribers, and to those whose filter it passes."""
        subs = self._subs.get(frame.channel)
        if subs:
            for client in list(subs):
                client.offer(frame)
        filtered = self._filtered.get(frame.channel)
        if filtered:
            _offer_filtered(filtered, frame)

    async def publish(self, channel: str, payload: Any) -> int | None:
        """Publish to the log (durable channel: returns the id) or NOTIFY (returns None)."""
        if channel in self.durable:
            res = await self.db.named(
                "publish", publish_params(channel, payload, None, None, None), doing="publish"
            )
            return int(res.get_value(0, 0) or b"0")
        params = {"channel": check_channel(channel), "payload": encode_payload(payload)}
        gained = self._learn([channel])  # clients whose patterns match a channel new to us
        if gained:
            with anyio.move_on_after(self.listen_timeout):
                await self.listener.subscribe(*gained)  # listening before it is sent
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
        if not -MAX_EVENT_ID - 1 <= event_id <= MAX_EVENT_ID:
            # Checked here: PostgreSQL would refuse the query, which is no database failure.
            shown = str(event_id) if event_id.bit_length() <= 100 else "the id"
            raise UnknownEventId(
                f"{shown} is not an event id: event ids are integers up to {MAX_EVENT_ID} "
                "(PostgreSQL bigint); resume after an id the gateway sent"
            )
        res = await self.db.named(
            "event_position", {"id": str(event_id)}, doing="find the resume position"
        )
        if not res.ntuples:
            raise UnknownEventId(f"event {event_id} is not in the log (never stored, or pruned)")
        return (int(res.get_value(0, 0) or b"0"), event_id)

    async def replay(
        self, channels: list[str], after: Position, upto: Position, filter: Filter | None = None
    ) -> AsyncIterator[Frame]:
        """
        Events of *channels* in ``(after, upto]``, from the log, in order (*filter* passes).
        Raises the last read's `HeraldError` when the log cannot be read (see `_replay_read`):
        the caller ends the client with `REPLAY_FAILED`, for it to resume later.
        """
        limit = self.batch_size
        while after < upto:
            query = logread.LogQuery(after=after, limit=limit, channels=channels, upto=upto)
            read = await self._replay_read(query)
            rows = logread.frame_rows(read)
            for tx, event_id, channel, payload in rows:
                if filter is None or filter(decode(payload)):
                    yield Frame(channel, payload, (tx, event_id))
            if read.n < limit:
                return
            after = rows[-1][:2]

    async def _replay_read(self, query: logread.LogQuery) -> logread.LogRead:
        """
        One read of a replay. A connection that broke under it (a terminated session, a
        restarted server, a severed link) is replaced and the read tried again (it changes
        nothing, so that is safe), `REPLAY_ATTEMPTS` times in all.
        """
        for attempt in range(1, REPLAY_ATTEMPTS + 1):
            try:
                return await self.db.run(_reader(query))
            except DatabaseConnectionError as exc:
                if attempt == REPLAY_ATTEMPTS:
                    raise
                logger.info("a replay's read of the log failed (%s); trying again", one_line(exc))
                await anyio.sleep(0.1 * attempt)  # a pause before the next connection
        raise AssertionError("unreachable")

    def replay_failed(self, client: Client, exc: HeraldError) -> None:
        """A client's replay could not read the log: end it, with a reason, to resume later."""
        logger.warning(
            "a client's replay could not read the log (%s): it is told to resume later",
            one_line(exc),
        )
        client.end(REPLAY_FAILED, 1013)  # WebSocket "try again later"

    async def _check_schema(self, db: Db) -> None:
        res = await db.named("schema_installed", {}, doing="check the schema")
        if res.get_value(0, 0) != b"t":
            raise SchemaMissing(MISSING)


def _relayed_position(headers: Any) -> Position | None:
    """The log position a relayed message's headers give (None: not the relay's)."""
    headers = headers or {}
    try:
        return (int(headers.get("Pgherald-Tx", "")), int(headers.get("Pgherald-Event-Id", "")))
    except ValueError:
        return None


async def _nats_error(exc: Exception) -> None:
    logger.debug("the gateway's NATS connection: %r", exc)


def _offer_filtered(filtered: dict[Client, Filter], frame: Frame) -> None:
    """*frame* to the clients whose filter its payload passes (decoded once for all)."""
    value = decode(frame.payload)
    for client, filter in list(filtered.items()):
        if filter(value):
            client.offer(frame)


def _reader(query: logread.LogQuery) -> Statement[logread.LogRead]:
    """One read of the log, as a statement for `Db.run`."""

    def statement(
        pgconn: pq.abc.PGconn, deadline: float
    ) -> Generator[Request, bool, logread.LogRead]:
        return logread.read(pgconn, query, deadline)

    return statement
