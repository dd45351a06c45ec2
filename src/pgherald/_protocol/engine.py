"""
The listener state machine: connect, LISTEN, read, probe, fall back, reconnect.

`ListenerEngine.run` is a generator that never blocks: it yields requests (see `pgwire`) and
the runtime (threads, asyncio or trio) carries them out. Notifications are not copied into a
buffer of ours: they stay in libpq's queue, which holds at most one network read, and the
runtime pulls them a batch at a time (`ListenerEngine.take`, `ListenerEngine.dispatch`: at most
`_TAKE_MAX` converted notifications held besides libpq's). So a slow consumer stops the reading,
memory stays bounded, and the backlog waits in PostgreSQL, where `pg_notification_queue_usage()`
tells us when waiting longer would start to hurt other sessions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Any

from psycopg import pq

from .._models import Gap, GapReason, ListenerStats, Notification
from ..errors import ConnectError, ConnectionLost, ListenError, PoolerError
from . import liveness, pgwire
from .backoff import backoff_delay
from .channels import check_channel, listen_query, unlisten_query
from .pgwire import DELIVER, READ, REPORT, SLEEP, WAIT, PQGen

logger = logging.getLogger("pgherald.listener")


@dataclass(frozen=True)
class ListenerConfig:
    """Tuning knobs of a listener; every default is what a production service wants."""

    conninfo: str
    connect_timeout: float = 10.0
    """Seconds to establish a connection (each attempt)."""
    health_check_interval: float = 15.0
    """Idle seconds after which a liveness probe (a NOTIFY that must come back) is sent."""
    health_check_timeout: float = 5.0
    """Seconds the probe may take before the connection is declared dead."""
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    reconnect_max_attempts: int | None = None
    """Give up (raise `ConnectionLost`) after this many failed attempts; None: never."""
    queue_check_interval: float = 5.0
    """While behind for this long, read ``pg_notification_queue_usage()`` (then every interval)."""
    queue_warn_usage: float = 0.5
    """Log a warning when the cluster's NOTIFY queue is this full while we are behind."""
    queue_max_usage: float = 0.8
    """Give up our queue position (reconnect, report a gap) past this usage while behind."""
    delivery_budget: float = 1.0
    """Seconds a runtime may spend delivering before handing control back (for the checks)."""


_Stopped = pgwire.Abandoned  # a statement abandoned after stop() (see `run`)

# libpq reads at most what its input buffer has room for (16 KB at first: three 4 KB
# notifications per read) and grows the buffer only for a message that does not fit. One row
# of 32 KB, answered with a new connection's LISTEN, leaves it at 64 KB for the life of the
# connection: sixteen 4 KB notifications per read (with 4 KB payloads, 1.5 µs less CPU per
# notification on the benchmark machine, for 48 KB more memory per listening connection).
_GROW_INPUT_BUFFER = b"SELECT repeat('x', 32768)"

# At most this many notifications per `take`: a batch stays small (cache-friendly), and an
# iteration checkpoints after a bounded amount of work (see AsyncListener.notifications).
_TAKE_MAX = 128
_make = tuple.__new__  # a `Notification` from a tuple, without NamedTuple's Python __new__
# `dispatch` converts a batch of at least this many notifications in C loops (`_convert_batch`):
# 0.04 µs per ~100 B notification less than a bytecode loop per item. Fewer (a read of large
# payloads: sixteen 4 KB ones) cost more that way, all payloads decoded at once: item by item.
_CONVERT_MIN = 32


class _Lost(Exception):
    def __init__(self, reason: GapReason, message: str) -> None:
        super().__init__(message)
        self.reason: GapReason = reason


class ListenerEngine:
    """The state of one listening connection, independent of any runtime."""

    def __init__(self, config: ListenerConfig, stats: ListenerStats) -> None:
        self.config = config
        self.stats = stats
        self.pgconn: pq.abc.PGconn | None = None
        self.stopping = False
        self._monitor: pq.abc.PGconn | None = None
        self._wanted: dict[str, None] = {}  # an ordered set
        self._active: set[str] = set()
        self._dirty = False
        self._broken = False
        self._pending: deque[Notification] = deque()
        self._input = False  # libpq may hold unread notifications
        # (ticket, callback): fired by the first sync whose ticket is larger, i.e. a sync that
        # read `_wanted` after the callback's request was recorded (see `after_sync`).
        self._synced_callbacks: deque[tuple[int, Callable[[], object]]] = deque()
        self._tickets = itertools.count(1)  # next() is atomic: safe from any thread
        self._ping = ""  # this connection's private liveness channel
        self._ping_listening = False
        self._delivery_checked = False  # the start-up check ran once: not on every reconnect
        self._probing = False  # a probe was under way (its answer may still be on its way)
        self._lost: _Lost | None = None  # found by `dispatch`, raised by the state machine
        self._names: dict[bytes, str] = {}
        self._next_queue_check = 0.0
        self._alive_at = time.time()  # last sign of life from the server: where a gap begins
        self._outage: tuple[GapReason, float, str] | None = None  # lost, not yet reported
        # A connection the application lent us (see `adopt`): used first, never closed by us.
        self._adopted: pq.abc.PGconn | None = None
        # Its client_encoding when not UTF8: set to UTF8 while we use it, restored by `release`.
        self._adopted_encoding: bytes | None = None
        self._fatal: str | None = None  # the FATAL error the server ended the session with
        # The lent connection's own notice handler, while ours stands in front of it.
        self._adopted_notices: tuple[Callable[[pq.abc.PGresult], None] | None] | None = None
        self._in_run = False  # `_guard` abandons statements after stop() only inside run()
        # The bound pgconn.notifies, looked up once per connection rather than per notification.
        self._notifies: Any = _no_notifies

    # -- channel bookkeeping (safe to call from any thread: it only records intent) --

    @property
    def channels(self) -> list[str]:
        return list(self._wanted)

    def want(self, channels: Iterable[str]) -> None:
        for ch in channels:
            self._wanted[check_channel(ch)] = None
        self._dirty = True

    def unwant(self, channels: Iterable[str]) -> None:
        for ch in channels:
            self._wanted.pop(check_channel(ch), None)
        self._dirty = True

    @property
    def connected(self) -> bool:
        return self.pgconn is not None

    @property
    def sync_wanted(self) -> bool:
        """A LISTEN or UNLISTEN is requested and not yet sent."""
        return self._dirty

    # -- the hot path --

    def pop(self) -> Notification | None:
        """The next notification already received, or None: never touches the network."""
        if self._pending:
            return self._pending.popleft()
        return self._take()

    def _take(self) -> Notification | None:
        """The next notification libpq holds, as a `Notification` (None: libpq has none)."""
        n = self._notifies()
        if n is None:
            self._input = False
            return None
        return self._convert(n)

    def take(self) -> list[Notification]:
        """
        Notifications already received, converted: what libpq holds (up to `_TAKE_MAX`), or,
        when it holds none, what one more non-blocking read of the socket brings. Empty:
        nothing has arrived (`_input` is cleared, the runtime waits on the socket).

        The iterators' batch `pop`: no call per notification, and while a burst streams in,
        the next read happens here rather than after a trip through the runtime's wait.
        The conversion runs in C loops (`map`, `zip`) rather than a bytecode loop per item.
        """
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        notifies = self._notifies
        raw = list(islice(iter(notifies, None), _TAKE_MAX))
        if not raw:
            if self.pgconn is not None:
                try:
                    self._consume(self.pgconn)
                except _Lost as lost:
                    self._lost = lost
                    return []
                raw = list(islice(iter(notifies, None), _TAKE_MAX))
            if not raw:
                self._input = False
                return []
        # `_input` stays set: the next call reads the socket again.
        return self._convert_batch(raw)[0]

    def _convert_batch(self, raw: list[pq.PGnotify]) -> tuple[list[Notification], str | None]:
        """
        *raw* (not empty) as `Notification`s, converted in C loops (`map`, `zip`) rather than
        a bytecode loop per item; and their channel when they all have the same one (a burst
        on one channel, the usual case), else None.
        """
        relnames, pids, extras = zip(*raw, strict=True)  # psycopg.pq.PGnotify tuples
        try:
            payloads: Iterable[str] = list(map(bytes.decode, extras))
        except UnicodeDecodeError:
            payloads = [e.decode("utf-8", "replace") for e in extras]
        names = self._names
        first = relnames[0]
        try:
            name = names[first]
        except KeyError:
            name = names[first] = first.decode("utf-8", "replace")
        channels: Iterable[str]
        if relnames.count(first) == len(relnames):
            channels = repeat(name)
        else:
            channels = [self._name(r) for r in relnames]
        rows = zip(channels, payloads, pids, strict=False)  # `channels` may be endless (repeat)
        out = list(map(_make, repeat(Notification), rows))
        return out, (name if isinstance(channels, repeat) else None)

    def _name(self, relname: bytes) -> str:
        try:
            return self._names[relname]
        except KeyError:
            name = self._names[relname] = relname.decode("utf-8", "replace")
            return name

    @property
    def streaming(self) -> bool:
        """A delivery ended with data still coming in: the next one needs no wait."""
        return self._input

    def unread(self, notifications: list[Notification]) -> None:
        """Put back notifications taken but not delivered (an iteration ended): next in line."""
        self._pending.extendleft(reversed(notifications))

    def _convert(self, n: pq.PGnotify) -> Notification:
        """One libpq notification as a `Notification` (the hot paths inline this)."""
        try:
            name = self._names[n.relname]
        except KeyError:
            name = self._names[n.relname] = n.relname.decode("utf-8", "replace")
        try:
            payload = n.extra.decode()  # as in dispatch: the no-argument decode is the fast one
        except UnicodeDecodeError:
            payload = n.extra.decode("utf-8", "replace")
        return tuple.__new__(Notification, (name, payload, n.be_pid))

    def dispatch(
        self,
        single: dict[str, Any],
        slow_path: Any,
        on_error: Any,
        budget: float,
        rereads: int = 1,
    ) -> Any:
        """
        Pull notifications and hand each to its handler until none is left, the budget (a
        `time.monotonic` deadline) is spent, or `stopping`.

        When libpq runs dry, the socket is read again (non-blocking) up to *rereads* times,
        as long as each read brings notifications: a burst is then served without a trip
        through the runtime's wait per libpq read (up to 64 KB: see `_GROW_INPUT_BUFFER`).

        This is `take` and the dispatch fused into one loop with everything in locals: it is
        the listener's hot path. Notifications are taken from libpq a batch at a time
        (`_TAKE_MAX`) and converted in C loops (`_convert_batch`); what a delivery that stops
        does not hand out goes to `_pending`, first in line for the next one. Channels whose
        only handler is a plain function are called here; anything else (several handlers,
        none, async ones) goes to *slow_path*. When *slow_path* returns an awaitable, the loop
        stops and returns it: the async runtime awaits it and calls again. Otherwise returns
        None.
        """
        pending = self._pending
        count = 0
        while pending:  # rare: left by a delivery that stopped, or salvaged from a lost connection
            n = pending.popleft()
            count += 1
            result = self._dispatch_one(n, single, slow_path, on_error)
            if result is not None or self.stopping or time.monotonic() > budget:
                self.stats.received += count
                return result
        notifies = self._notifies
        convert = self._convert_batch
        names = self._names
        make = tuple.__new__
        cls = Notification
        get = single.get
        clock = time.monotonic
        result = None
        last_relname: bytes | None = None  # for the item-by-item loop: see `_CONVERT_MIN`
        name = ""
        handler: Any = None
        reread = rereads if self.pgconn is not None else 0
        fresh = True  # the last read (if any) brought notifications
        while True:
            # iter() calls notifies() from C until it returns None; islice bounds the batch.
            raw = list(islice(iter(notifies, None), _TAKE_MAX))
            if not raw:  # libpq holds no more
                if not fresh or self.pgconn is None:  # the last read brought nothing
                    self._input = False
                    break
                if not reread:
                    # Out of reads while data still comes: `_input` stays set, so the engine
                    # delivers again without a wait; the async runtime checkpoints between
                    # (see `streaming`), the sync one needs none.
                    break
                # Still streaming? Read what has arrived meanwhile right here (a non-blocking
                # recv, cheap when empty) rather than going round through the waiter.
                reread -= 1
                fresh = False
                try:
                    self._consume(self.pgconn)
                except _Lost as lost:
                    self._lost = lost
                    break
                continue
            fresh = True
            k = 0
            if len(raw) < _CONVERT_MIN:
                # A few (large) notifications: converted one at a time as they are handed
                # out, each payload decoded while the previous one is freed (cache-warm).
                for relname, pid, extra in raw:
                    if relname != last_relname:  # look the handler up once per run of a channel
                        name = names[relname] if relname in names else self._name(relname)
                        handler = get(name)
                        last_relname = relname
                    try:
                        payload = extra.decode()  # the fast path of decode takes no arguments
                    except UnicodeDecodeError:
                        payload = extra.decode("utf-8", "replace")
                    n = make(cls, (name, payload, pid))
                    k += 1
                    if handler is not None:
                        try:
                            handler(n)
                        except Exception:
                            on_error(handler, n)
                    else:
                        result = slow_path(n)
                        if result is not None:
                            break
                    if self.stopping or (not k & 7 and clock() > budget):
                        break
                else:
                    count += k
                    continue
                count += k
                if k < len(raw):
                    pending.extend(map(self._convert, raw[k:]))
                break
            batch, channel = convert(raw)
            only = None if channel is None else get(channel)
            if only is not None:  # a burst on one channel with one plain handler
                for n in batch:
                    k += 1
                    try:
                        only(n)
                    except Exception:
                        on_error(only, n)
                    # A handler may have called stop(): honour it before the next
                    # notification. The clock is read every 8th time only.
                    if self.stopping or (not k & 7 and clock() > budget):
                        break
                else:
                    count += k
                    continue
            else:
                for n in batch:
                    k += 1
                    h = get(n[0])
                    if h is not None:
                        try:
                            h(n)
                        except Exception:
                            on_error(h, n)
                    else:
                        result = slow_path(n)
                        if result is not None:
                            break
                    if self.stopping or (not k & 7 and clock() > budget):
                        break
                else:
                    count += k
                    continue
            # Stopped, out of budget, or an awaitable to hand back: the rest waits its turn.
            count += k
            if k < len(batch):
                pending.extend(batch[k:])
            break
        self.stats.received += count
        return result

    @staticmethod
    def _dispatch_one(
        n: Notification, single: dict[str, Any], slow_path: Any, on_error: Any
    ) -> Any:
        handler = single.get(n.channel)
        if handler is None:
            return slow_path(n)
        try:
            handler(n)
        except Exception:
            on_error(handler, n)
        return None

    # -- lifecycle --

    def adopt(self, pgconn: pq.abc.PGconn) -> None:
        """
        Listen on the application's own (idle, autocommit) connection until it is lost.

        After a loss the engine opens connections of its own, from `config.conninfo`; the
        application's connection is never closed here (see `release`).
        """
        self._adopted = pgconn

    @property
    def adopted_in_use(self) -> bool:
        return self._adopted is not None and self.pgconn is self._adopted

    def release(self) -> PQGen:
        """Hand the adopted connection back clean: ``UNLISTEN *``, blocking mode, no leftovers."""
        pgconn = self._adopted
        if pgconn is None or self.pgconn is not pgconn:
            return
        query = b"UNLISTEN *"
        if self._adopted_encoding is not None:  # the application's own, back
            query += b"; SET client_encoding TO " + _quoted(self._adopted_encoding)
        try:
            if pgconn.status == pq.ConnStatus.OK:
                deadline = time.monotonic() + self.config.health_check_timeout
                if pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
                    # A statement abandoned by stop() (the SET or LISTEN of the first open):
                    # its answer first, then the connection is the application's again.
                    with contextlib.suppress(pgwire.QueryFailed):
                        yield from pgwire.finish(pgconn, deadline)
                yield from pgwire.execute(pgconn, query, deadline)
                while pgconn.notifies() is not None:
                    pass  # heard before UNLISTEN, after the application stopped listening
        except Exception as exc:  # the application will find its connection broken
            logger.warning("could not UNLISTEN on the adopted connection: %s", pgwire.one_line(exc))
        finally:
            pgconn.nonblocking = 0
            self._give_back_notices(pgconn)
            self._adopted = None
            self._adopted_encoding = None
            self.pgconn = None
            self._notifies = _no_notifies
            self._active = set()

    def open(self) -> PQGen:
        """Connect and LISTEN; the first connection fails fast with `ConnectError`."""
        self._reset_connection()
        adopted = self._adopted
        if adopted is not None and adopted.status == pq.ConnStatus.OK:
            adopted.nonblocking = 1
            self.pgconn = adopted
            if self._adopted_notices is None:  # the application's handler still gets them
                self._adopted_notices = (adopted.notice_handler,)
                adopted.notice_handler = self._on_adopted_notice
        else:
            self._adopted = None
            deadline = time.monotonic() + self.config.connect_timeout
            self.pgconn = yield from self._guard(pgwire.connect(self.config.conninfo, deadline))
            self.pgconn.notice_handler = self._on_notice
        self._fatal = None
        self._notifies = self.pgconn.notifies
        self._broken = False
        self._alive_at = time.time()
        self._active = set()
        self._dirty = True
        self._ping = liveness.new_ping_channel()
        self._ping_listening = False
        try:
            if self.pgconn is adopted:
                yield from self._adopt_utf8(adopted)
            yield from self.sync_channels()
        except (_Lost, ListenError, pgwire.QueryFailed) as exc:
            self._reset_connection()
            raise ConnectError(f"connected, but LISTEN failed: {exc}") from None
        if not self._delivery_checked:
            try:
                yield from self._check_delivery()
            except BaseException:
                # Failed or abandoned: a late answer must not reach the application, and an
                # unchecked connection must not be served. The next open() checks again.
                self._reset_connection()
                raise

    def _adopt_utf8(self, pgconn: pq.abc.PGconn) -> PQGen:
        """
        Switch a lent connection to UTF8 (`release` switches it back): channel names are sent,
        and notifications decoded, as UTF-8. In its own statement: the server converts a whole
        query string with the encoding in force when it arrives.
        """
        encoding = pgconn.parameter_status(b"client_encoding")
        if encoding is None or encoding.upper() == b"UTF8" or self._adopted_encoding is not None:
            return
        # Noted first: a SET abandoned by stop() may still take effect, and release() puts the
        # application's encoding back whatever became of it.
        self._adopted_encoding = encoding
        yield from self._execute(
            b"SET client_encoding TO 'UTF8'", self.config.health_check_timeout + 5.0
        )

    def _check_delivery(self) -> PQGen:
        """Prove once, at the first connection, that notifications reach us (no pooler)."""
        assert self.pgconn is not None
        cfg = self.config
        deadline = time.monotonic() + min(5.0, cfg.connect_timeout)
        try:
            yield from self._guard(
                liveness.check_delivery(cfg.conninfo, self.pgconn, self._ping, deadline, self._keep)
            )
        except PoolerError:
            raise
        except ConnectError as exc:
            raise ConnectError(f"connected, but the delivery check failed: {exc}") from None
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise ConnectError(
                    f"connected, but the connection failed during the delivery check: "
                    f"{pgwire.one_line(exc)}"
                ) from None
            raise
        finally:
            self._collect()  # notifications may have come with the check's traffic
        self._delivery_checked = True

    def _collect(self) -> None:
        """
        Move the notifications libpq read along with a statement's answer to `_pending`.

        Nothing else would make us look at libpq's queue (no data left on the socket), so on a
        quiet channel they would wait for unrelated traffic. Only statements of ours pass
        here, never the hot path.
        """
        pgconn = self.pgconn
        if pgconn is None:
            return
        notifies = pgconn.notifies
        ping = self._ping.encode()
        while (n := notifies()) is not None:
            if n.relname != ping:  # a stale answer to one of our probes
                self._pending.append(self._convert(n))

    def _keep(self, n: pq.PGnotify) -> None:
        """A notification read while we waited for our own: deliver it next, in order."""
        self._pending.append(self._convert(n))

    def close(self) -> None:
        """Drop both connections (idempotent)."""
        self._reset_connection()
        self._pending.clear()
        self._outage = None

    @property
    def listening(self) -> frozenset[str]:
        """The channels the server is LISTENing to for us right now."""
        return frozenset(self._active) if self.pgconn is not None else frozenset()

    def after_sync(self, callback: Callable[[], object]) -> None:
        """
        Call *callback* (no I/O: setting an event) once the server matches `channels` as
        they are now, from any thread.

        Only a sync that starts after this call fires it: one already under way may have read
        the channels before the caller's `want`/`unwant`, and firing then would be too early.
        """
        self._synced_callbacks.append((next(self._tickets), callback))
        self._dirty = True  # after the ticket: makes sure such a sync follows

    def sync_channels(self) -> PQGen:
        """Issue the LISTEN/UNLISTEN statements that make the server match `channels`."""
        assert self.pgconn is not None
        self._dirty = False
        ticket = next(self._tickets)  # taken before reading `_wanted` (see `after_sync`)
        wanted = set(self._wanted)
        add = [ch for ch in self._wanted if ch not in self._active]
        drop = [ch for ch in self._active if ch not in wanted]
        statements = [*(listen_query(c) for c in add), *(unlisten_query(c) for c in drop)]
        if not self._ping_listening:  # a new connection
            statements.append(listen_query(self._ping))
            statements.append(_GROW_INPUT_BUFFER)
        if not statements:
            self._synced(ticket)
            return
        try:
            yield from self._execute(b";".join(statements), self.config.health_check_timeout + 5.0)
        except pgwire.QueryFailed as exc:
            # e.g. LISTEN on a hot standby: not something a reconnect would fix.
            refused = ListenError(
                f"the server refused LISTEN/UNLISTEN ({exc}); listeners need a primary "
                "server, not a read-only standby"
            )
            refused.sqlstate = exc.sqlstate
            raise refused from None
        self._active = wanted
        self._ping_listening = True
        self._synced(ticket)

    def _synced(self, ticket: int) -> None:
        callbacks = self._synced_callbacks
        # Look at the entries present now only; others may append meanwhile (deque ops are
        # atomic), and entries from requests newer than this sync wait for the next one.
        for _ in range(len(callbacks)):
            entry = callbacks.popleft()
            if entry[0] < ticket:
                entry[1]()
            else:
                callbacks.append(entry)

    def run(self, connect: bool = False) -> PQGen:
        """
        Serve notifications until `stopping`, reconnecting whenever the connection is lost.

        With *connect*, a run that starts without a connection first opens one as `open` does
        (a failure raises `ConnectError` at once, no retry), but under the same guard as the
        rest: a run begun after `stop()` connects to nothing, and one stopped while connecting
        returns. Once `stopping` is set, a statement of ours (LISTEN, a probe, a connection
        attempt) gets `pgwire.STOP_GRACE` seconds more; still unanswered then (a frozen
        connection, a server that never answers), it is abandoned with its connection (see
        `_guard`): so `stop()` ends `run()` within a second in every state. The idle wait needs
        no guard: `stop()` wakes it, and the loop looks at `stopping` first.
        """
        self._in_run = True
        try:
            if connect and self.pgconn is None:
                if self.stopping:
                    return
                yield from self.open()
            yield from self._run()
        except _Stopped:
            return
        finally:
            self._in_run = False

    def _guard(self, gen: PQGen) -> PQGen:
        """Drive statement *gen*; after `stop()` in `run`, abandon it past the grace time."""
        try:
            return (yield from pgwire.until_stopped(gen, self._stop_requested))
        except pgwire.Abandoned:
            self._broken = True  # abandoned mid-statement: its state is unknown
            raise

    def _stop_requested(self) -> bool:
        return self.stopping and self._in_run

    def _run(self) -> PQGen:
        while not self.stopping:
            try:
                if self.pgconn is not None and self._broken:
                    yield from self._salvage()
                if self.pgconn is None or self._broken:
                    raise _Lost("reconnect", "not connected")
                if self._outage is not None:
                    # Reconnected by connect() after a recovery that was interrupted.
                    yield from self._report_outage(1)
                yield from self._serve()
                return
            except _Lost as lost:
                if self.stopping:
                    return
                yield from self._recover(lost)

    # -- internals --

    def _serve(self) -> PQGen:
        cfg = self.config
        pgconn = self.pgconn
        assert pgconn is not None
        fd = pgconn.socket
        clock = time.monotonic
        idle_deadline = clock() + cfg.health_check_interval
        busy_since: float | None = None
        stats = self.stats
        self._input = True  # libpq may hold notifications read during a statement
        while not self.stopping:
            if self._dirty:
                yield from self.sync_channels()
                # Look at every flag again: a request that came during the statement set
                # `_dirty` and its wake-up was spent on the statement's wait.
                continue
            if self._input or self._pending:
                # The runtime pulls until libpq is empty (`pop` / `dispatch` clear `_input`)
                # or its budget is spent (then `_input` stays set and we come back here).
                received = stats.received
                if busy_since is None:
                    busy_since = clock()
                yield (DELIVER,)
                if self._lost is not None:
                    lost, self._lost = self._lost, None
                    raise lost
                if stats.received != received:
                    now = clock()
                    idle_deadline = now + cfg.health_check_interval
                    if (
                        now - busy_since >= cfg.queue_check_interval
                        and now >= self._next_queue_check
                    ):
                        yield from self._check_queue()
                continue
            started = clock()
            ready = yield (WAIT, fd, READ, idle_deadline)
            now = clock()
            if ready:
                self._consume(pgconn)
                self._input = True
                self._alive_at = time.time()
                idle_deadline = now + cfg.health_check_interval
                if now - started > 0.005:
                    # We had to wait for this data: we were keeping up, not behind.
                    busy_since = None
                    self._close_monitor()
            elif now >= idle_deadline:
                # Quiet for a whole interval: caught up (the reading's connection can go).
                busy_since = None
                self._close_monitor()
                yield from self._health_check()
                idle_deadline = clock() + cfg.health_check_interval

    def _consume(self, pgconn: pq.abc.PGconn) -> None:
        try:
            pgconn.consume_input()
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost("reconnect", pgwire.one_line(exc)) from None
            raise
        if pgconn.status == pq.ConnStatus.BAD:
            raise _Lost("reconnect", pgwire.error_text(pgconn))
        # consume_input() only reads: parsing (notices among it) waits for the next libpq
        # call that looks, is_busy() the cheapest.
        pgconn.is_busy()
        if self._fatal is not None:
            # The server ends the session (pg_terminate_backend, a shutdown): its last word is
            # no sign of life, and a gap starts before it (what was sent since is lost).
            raise _Lost("reconnect", self._fatal)

    def _on_adopted_notice(self, res: pq.abc.PGresult) -> None:
        self._on_notice(res)
        handler = self._adopted_notices[0] if self._adopted_notices else None
        if handler is not None:
            handler(res)

    def _give_back_notices(self, pgconn: pq.abc.PGconn) -> None:
        """The application's notice handler, back on its lent connection."""
        if self._adopted_notices is not None:
            pgconn.notice_handler = self._adopted_notices[0]
            self._adopted_notices = None

    def _on_notice(self, res: pq.abc.PGresult) -> None:
        # An idle session's FATAL error (terminated, shut down) reaches libpq as a notice: the
        # connection still looks OK until the server's end of it is read.
        if res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED) in (b"FATAL", b"PANIC"):
            self._fatal = pgwire.one_line(pgwire.result_error(res))

    def _execute(self, query: bytes, timeout: float) -> PQGen:
        """Run a statement on the listening connection; any failure means the connection is lost."""
        assert self.pgconn is not None
        try:
            return (
                yield from self._guard(
                    pgwire.execute(self.pgconn, query, time.monotonic() + timeout)
                )
            )
        except pgwire.QueryTimeout:
            raise _Lost(
                "reconnect",
                f"no answer from the server within {timeout:g}s (half-open connection?)",
            ) from None
        except pgwire.QueryFailed:
            raise
        except GeneratorExit:
            # Abandoned mid-statement (cancelled): the connection's state is unknown now.
            self._broken = True
            raise
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost("reconnect", pgwire.one_line(exc)) from None
            raise
        finally:
            # libpq may have read notifications with the answer: have them delivered now,
            # not when unrelated traffic next wakes us.
            self._collect()

    def _health_check(self) -> PQGen:
        """Prove delivery: a NOTIFY to our ping channel must come back within the timeout."""
        assert self.pgconn is not None
        self.stats.health_checks += 1
        timeout = self.config.health_check_timeout
        self._probing = True
        try:
            yield from self._guard(
                liveness.probe(self.pgconn, self._ping, time.monotonic() + timeout, self._keep)
            )
        except pgwire.QueryTimeout:
            raise _Lost(
                "reconnect",
                f"a liveness probe got no answer within {timeout:g}s (half-open connection?)",
            ) from None
        except pgwire.QueryFailed as exc:
            # The server answered (say, a full NOTIFY queue): the connection itself is alive.
            logger.warning("liveness probe refused by the server: %s", exc)
        except GeneratorExit:
            # Abandoned (cancelled): `_salvage` finishes the statement and the probe.
            self._broken = True
            raise
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost("reconnect", pgwire.one_line(exc)) from None
            raise
        finally:
            self._collect()  # notifications that followed our ping
        self._probing = False
        self._alive_at = time.time()

    def _check_queue(self) -> PQGen:
        """While behind, ask how full the cluster's NOTIFY queue is, and give way if too full."""
        cfg = self.config
        self._next_queue_check = time.monotonic() + cfg.queue_check_interval
        try:
            if self._monitor is None:
                deadline = time.monotonic() + cfg.connect_timeout
                conninfo = cfg.conninfo + " application_name=pgherald-monitor"
                self._monitor = yield from self._guard(pgwire.connect(conninfo, deadline))
            deadline = time.monotonic() + cfg.health_check_timeout
            (res,) = yield from self._guard(
                pgwire.execute(self._monitor, b"SELECT pg_notification_queue_usage()", deadline)
            )
            raw = res.get_value(0, 0)
            usage = float(raw) if raw is not None else 0.0
        except Exception as exc:
            # The monitor is a safety net; failing to read it must not stop the listener.
            logger.warning("could not read pg_notification_queue_usage(): %s", exc)
            self._close_monitor()
            return
        self.stats.queue_checks += 1
        self.stats.last_queue_usage = usage
        if usage >= cfg.queue_max_usage:
            logger.error(
                "PostgreSQL's NOTIFY queue is %.1f%% full while this listener is behind; "
                "giving up its queue position so writers do not fail (notifications will be missed)",
                usage * 100,
            )
            raise _Lost("queue_limit", f"NOTIFY queue {usage:.1%} full while behind")
        if usage >= cfg.queue_warn_usage:
            logger.warning(
                "PostgreSQL's NOTIFY queue is %.1f%% full and this listener is behind: "
                "speed up its handlers or hand work to a queue",
                usage * 100,
            )

    def _report_outage(self, attempts: int, error: str | None = None) -> PQGen:
        assert self._outage is not None
        reason, started, first_error = self._outage
        error = error or first_error
        self._outage = None
        gap = Gap(reason, started, time.time(), error, attempts)
        self.stats.reconnects += 1
        self.stats.gaps.append(gap)
        logger.info("listener is listening again after %.2fs", gap.ended - gap.started)
        yield (REPORT, gap)

    def _salvage(self) -> PQGen:
        # A statement was abandoned when the generator was closed (an iteration timed
        # out, a task was cancelled): finish it now rather than throw the connection away.
        pgconn = self.pgconn
        assert pgconn is not None
        deadline = time.monotonic() + self.config.health_check_timeout
        try:
            yield from self._guard(pgwire.finish(pgconn, deadline))
        except pgwire.QueryTimeout:
            raise _Lost("reconnect", "no answer to an abandoned statement") from None
        except pgwire.QueryFailed:
            pass  # the statement's own error: the connection itself is fine
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost("reconnect", pgwire.one_line(exc)) from None
            raise
        finally:
            self._collect()
        self._broken = False
        self._alive_at = time.time()
        if self._probing:
            # The abandoned probe's ping may still be on its way: a new probe collects it
            # (as a stale answer), so it never reaches the application.
            yield from self._health_check()

    def _recover(self, lost: _Lost) -> PQGen:
        cfg = self.config
        if self._outage is None:
            self._outage = (lost.reason, self._alive_at, str(lost))
        logger.warning("listener connection lost (%s); reconnecting", lost)
        self._reset_connection()
        error = str(lost)
        attempt = 0
        permanent = pgwire.PermanentFailures()
        while True:
            attempt += 1
            if self.stopping:
                return
            try:
                yield from self.open()
                break
            except PoolerError:
                raise  # not something a retry fixes
            except ConnectError as exc:
                error = str(exc)
                self.stats.connect_failures += 1
                if permanent.give_up(error) or (
                    cfg.reconnect_max_attempts is not None and attempt >= cfg.reconnect_max_attempts
                ):
                    raise ConnectionLost(
                        f"could not reconnect after {attempt} attempts: {error}"
                    ) from None
                delay = backoff_delay(
                    attempt, initial=cfg.reconnect_initial_delay, cap=cfg.reconnect_max_delay
                )
                logger.info(
                    "reconnect attempt %d failed (%s); next in %.2fs", attempt, error, delay
                )
                yield (SLEEP, time.monotonic() + delay)
        yield from self._report_outage(attempt, error)

    def _reset_connection(self) -> None:
        pgconn, self.pgconn = self.pgconn, None
        if pgconn is not None:
            # Notifications libpq already parsed are good: keep them for delivery (all but
            # this connection's own pings: an application's channel may share their prefix).
            while (n := self._take()) is not None:
                if n.channel != self._ping:
                    self._pending.append(n)
            if pgconn is self._adopted:
                self._give_back_notices(pgconn)
                self._adopted = None  # lost: it is the application's to close, not ours
                self._adopted_encoding = None
            else:
                pgconn.finish()
        self._notifies = _no_notifies
        self._active = set()
        self._ping_listening = False
        self._probing = False
        self._close_monitor()

    def _close_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()


def _no_notifies() -> None:
    return None


def _quoted(value: bytes) -> bytes:
    """*value* (an encoding name, ASCII) as a string literal."""
    return b"'" + value.replace(b"'", b"''") + b"'"
