"""
pgherald's pytest plugin: a real PostgreSQL, a database per test, and assertions on events.

Loaded by pytest through the ``pytest11`` entry point ``pgherald`` (disable it with
``-p no:pgherald``). Fixtures, all named ``herald_*`` so that they never clash with a project's
own:

- ``herald_dsn`` (session): an admin DSN. ``--herald-dsn`` / ``$PGHERALD_TEST_DSN``, else the
  local server on 127.0.0.1:5432 (user postgres) when it answers, else an embedded PostgreSQL
  (``pgherald[embedded]``) started once for the session.
- ``herald_db``: a fresh database for this test (its DSN), dropped afterwards.
- ``herald_conn``: an autocommit psycopg connection to it.
- ``herald_installed``: ``herald_db`` with pgherald's schema installed.
- ``herald_capture``: ``with herald_capture("orders") as cap:`` records what the block
  notified on the channels named and what it published; ``cap.assert_notified(...)``,
  ``cap.assert_published(...)``.
- ``herald_wait`` / ``herald_await``: wait, with a timeout, for a notification on a listener,
  an event on a consumer, or a predicate.

pytest imports this module in every project where pgherald is installed, so it imports no
optional extra (pgserver, SQLAlchemy, trio ...) until a fixture needs one.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._models import Event, Notification
from ._protocol.channels import check_channel
from .errors import ConnectError, HeraldError

__all__ = [
    "ANY",
    "Capture",
    "CaptureFactory",
    "DatabaseDropper",
    "WaitTimeout",
    "await_for",
    "create_database",
    "drop_database",
    "find_server",
    "wait_for",
]

LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
"""The local server tried when no DSN is given."""

DEFAULT_TIMEOUT = 5.0
"""Seconds the waits and a capture's final read allow by default."""

_POLL = 0.01  # seconds between two polls of a predicate or of the events table


class _Any:
    """Matches any value (also usable inside expected payloads, like `unittest.mock.ANY`)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""Matches anything: the default of every ``payload`` / ``key`` / ``headers`` argument."""


class WaitTimeout(HeraldError, AssertionError):
    """
    A wait of the testing helpers ended without what it waited for.

    An `AssertionError` too, so that pytest reports it as a failed test with its message.
    """


# -- where the server comes from --


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def find_server(
    dsn: str | None, datadir: str | os.PathLike[str], *, embedded: bool = False
) -> Iterator[str]:
    """
    Yield an admin DSN: *dsn* if given (it must connect), else the local server on
    127.0.0.1:5432 when it answers (skipped when *embedded*), else an embedded PostgreSQL in
    *datadir*, stopped on exit. Raises `ConnectError` saying what to do when none can be had.
    """
    if dsn:
        if not _answers(dsn):
            raise ConnectError(
                f"the test DSN does not connect: {dsn!r}; fix --herald-dsn / $PGHERALD_TEST_DSN"
            )
        yield dsn
        return
    if not embedded and _answers(LOCAL_DSN):
        yield LOCAL_DSN
        return
    from .embedded import EmbeddedPostgres  # imports pgserver only when started

    server = EmbeddedPostgres(datadir)
    try:
        server.start()
    except ConnectError as exc:
        raise ConnectError(
            "no PostgreSQL for the herald_* fixtures: set $PGHERALD_TEST_DSN (or pass "
            "--herald-dsn), run a server on 127.0.0.1:5432 (user postgres), or install the "
            f"embedded one: pip install 'pgherald[embedded]' ({exc})"
        ) from exc
    try:
        yield server.dsn
    finally:
        server.stop()


def _with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def create_database(admin_dsn: str, prefix: str = "herald_test_") -> str:
    """Create an empty database with a unique name on the server of *admin_dsn*; its DSN."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_dbname(admin_dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop the database of *dsn*, ending its sessions (sessions a test left open included)."""
    name = str(conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


class DatabaseDropper:
    """
    Drops test databases several at a time: one checkpoint wait for a batch, not each (the
    ``herald_db`` fixture's, and pgherald's own suite's).

    DROP DATABASE ends with an immediate checkpoint and waits for it (PostgreSQL 15 logs
    ``checkpoint starting: immediate force wait``): the cluster's dirty buffers are written and
    its files fsynced. With the suite on three workers (and other users of the server) the
    checkpointer runs back to back, and every teardown waited in its queue: 0.5 s on average,
    up to 5 s. Drops issued together share one checkpoint (eight: 0.1 s, not 0.6 s), so
    `retire` does at once only what a test must not leak past its end (no new session can
    connect; every session of the database has ended, waited for) and keeps the name; every
    `BATCH` databases, that test's teardown drops them all at once.

    The drops stay in teardowns on purpose: a DROP DATABASE holds a transaction id while it
    waits, which holds back the durable log's read horizon; dropped in the background during
    the next tests, it made their delayed events seconds late. A drop that fails (a replication
    slot in use, a prepared transaction left behind) fails that teardown, naming the test whose
    database it was; the rest are dropped at the session's end.
    """

    BATCH = 8
    """Databases dropped together (each is a few MB on disk until then)."""
    TIMEOUT = 60.0
    """Seconds a batch of drops may take."""

    def __init__(self, admin_dsn: str) -> None:
        self._admin_dsn = admin_dsn
        self._retired: list[tuple[str, str]] = []  # (database, test)

    def retire(self, admin: psycopg.Connection, name: str, test: str) -> list[str]:
        """
        Close *name* to new sessions and end its sessions (waiting up to 5 s each); drop the
        retired databases when there are `BATCH` of them. The drops that failed, if any.
        """
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return []  # the test dropped it itself
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
        # The pids first, then one call each: in one statement the planner may call
        # pg_terminate_backend on rows before the datname filter (every session of the server).
        pids = [
            pid
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        ]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for the exit
        left = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
        assert not left, f"sessions of {name} did not end within 5 s: {left}"
        self._retired.append((name, test))
        return self.drop_retired() if len(self._retired) >= self.BATCH else []

    @classmethod
    @contextlib.contextmanager
    def session(cls, admin_dsn: str) -> Iterator[DatabaseDropper]:
        """A dropper for a test session: what it still holds is dropped at the end, and a drop
        that failed fails the session's teardown."""
        dropper = cls(admin_dsn)
        yield dropper
        failed = dropper.drop_retired()
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)

    def drop_retired(self) -> list[str]:
        """Drop every retired database, all at once; the drops that failed."""
        batch, self._retired = self._retired, []
        failed: list[str] = []
        threads = [
            threading.Thread(target=self._drop, args=(name, test, failed), daemon=True)
            for name, test in batch
        ]
        deadline = time.monotonic() + self.TIMEOUT
        for t in threads:
            t.start()
        for t, (name, test) in zip(threads, batch, strict=True):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                failed.append(f"{test}: DROP DATABASE {name} took over {self.TIMEOUT:.0f} s")
        return failed

    def _drop(self, name: str, test: str, failed: list[str]) -> None:
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        try:
            with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
                admin.execute(query)
        except psycopg.Error as exc:
            failed.append(f"{test}: DROP DATABASE {name} failed: {exc}")  # list.append: atomic


# -- matching and describing --


def _payload_matches(notification: Notification, payload: Any) -> bool:
    if payload is ANY:
        return True
    if isinstance(payload, str):
        return notification.payload == payload  # text is compared as sent
    try:
        return bool(json.loads(notification.payload) == payload)
    except ValueError:
        return False


def _event_matches(event: Event, channel: str | None, payload: Any, key: Any, headers: Any) -> bool:
    return (
        (channel is None or event.channel == channel)
        and (payload is ANY or event.payload == payload)
        and (key is ANY or event.key == key)
        and (headers is ANY or event.headers == headers)
    )


def _describe(channel: str | None, payload: Any, key: Any = ANY, headers: Any = ANY) -> str:
    parts = [f"on {channel!r}" if channel is not None else "on any channel"]
    if payload is not ANY:
        parts.append(f"with payload {payload!r}")
    if key is not ANY:
        parts.append(f"key {key!r}")
    if headers is not ANY:
        parts.append(f"headers {headers!r}")
    return " ".join(parts)


def _list_notifications(items: list[Notification], limit: int = 20) -> str:
    if not items:
        return "none"
    lines = [f"  {n.channel!r}: {n.payload!r}" for n in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return f"{len(items)}:\n" + "\n".join(lines)


def _list_events(items: list[Event], limit: int = 20) -> str:
    if not items:
        return "none"
    lines = [
        f"  id={e.id} {e.channel!r} key={e.key!r} payload={e.payload!r}"
        + (f" headers={e.headers!r}" if e.headers else "")
        for e in items[:limit]
    ]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return f"{len(items)}:\n" + "\n".join(lines)


# -- capture --

_EVENTS_EXIST = "SELECT to_regclass('pgherald.events_v1') IS NOT NULL"
_LAST_ID = "SELECT coalesce(max(id), 0) FROM pgherald.events_v1"
_EVENTS_AFTER = (
    "SELECT id, channel, payload, key, headers, created_at, partition, tx::text"
    " FROM pgherald.events_v1 WHERE id > %s ORDER BY id"
)


class Capture:
    """
    What a block of code notified and published, for assertions::

        with Capture(dsn, "orders") as cap:
            place_order(...)
        cap.assert_notified("orders", {"id": 1})
        cap.assert_published("orders", {"id": 1}, key="1")

    Notifications: a connection of its own LISTENs on the *channels* named before the block
    (PostgreSQL has no "listen to everything", so a channel not named is not captured; asking
    about it fails and says so). At the end of the block it sends a NOTIFY to itself and reads
    until that one comes back: everything committed before the block ended is in, without
    sleeping. Published events: the rows of ``pgherald.events_v1`` committed during the block
    (read after it, by id), on any channel. Both cover every connection of the database, so
    code under test can use its own connections, threads or triggers.
    """

    def __init__(self, dsn: str, *channels: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if len(channels) == 1 and not isinstance(channels[0], str):
            raise TypeError("pass channels as separate arguments: Capture(dsn, 'a', 'b')")
        self.dsn = dsn
        self.channels: tuple[str, ...] = tuple(check_channel(c) for c in channels)
        self.timeout = timeout
        self.notifications: list[Notification] = []
        """Notifications received on `channels`, in arrival order."""
        self.events: list[Event] = []
        """Events published (committed) during the block, in id order."""
        self._conn: psycopg.Connection[Any] | None = None
        self._ping = f"herald_capture_{uuid.uuid4().hex[:16]}"
        self._start_id: int | None = None  # None: no events table when the block began

    # -- lifecycle --

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if t is None:
                self.stop()
        finally:
            self.close()

    def start(self) -> None:
        """LISTEN and note where the log ends (done by ``with``)."""
        if self._conn is not None:
            raise HeraldError("this capture has already started: use a new one per block")
        conn = psycopg.connect(self.dsn, autocommit=True)
        self._conn = conn
        for channel in (*self.channels, self._ping):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._start_id = self._last_event_id(conn)

    def stop(self) -> None:
        """Read what the block sent (done at the end of the ``with`` block)."""
        conn = self._require()
        token = uuid.uuid4().hex
        conn.execute("SELECT pg_notify(%s, %s)", (self._ping, token))
        if not self._read_notifications(until=lambda n: n.payload == token, timeout=self.timeout):
            raise WaitTimeout(
                f"the capture's own NOTIFY did not come back within {self.timeout:g}s: the "
                "server's notification queue is stuck (a session idle in a transaction that "
                "LISTENs?); raise the timeout or end that session"
            )
        self._read_events(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _require(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise HeraldError("this capture is not running: use it as `with capture: ...`")
        return self._conn

    # -- reading --

    @staticmethod
    def _last_event_id(conn: psycopg.Connection[Any]) -> int | None:
        row = conn.execute(_EVENTS_EXIST).fetchone()
        if not (row and row[0]):
            return None
        row = conn.execute(_LAST_ID).fetchone()
        return int(row[0]) if row else 0

    def _read_notifications(self, until: Callable[[Notification], bool], timeout: float) -> bool:
        """Read notifications until one satisfies *until* (True), or *timeout* (False)."""
        conn = self._require()
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for pn in conn.notifies(timeout=remaining):
                n = Notification(pn.channel, pn.payload, pn.pid)
                if n.channel != self._ping:
                    self.notifications.append(n)
                if until(n):
                    return True
        return False

    def _read_events(self, conn: psycopg.Connection[Any]) -> None:
        # Everything after the start, every time: an event with a smaller id can commit after
        # one with a larger id (ids follow insertion, not commit).
        start = self._start_id
        if start is None:
            row = conn.execute(_EVENTS_EXIST).fetchone()
            if not (row and row[0]):
                self.events = []
                return
            start = 0  # installed during the block: everything in it is new
        cur = conn.execute(_EVENTS_AFTER, (start,))
        self.events = [Event(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in cur]

    # -- queries --

    def notified(self, channel: str | None = None) -> list[Notification]:
        """Notifications captured on *channel* (all of them by default)."""
        return [n for n in self.notifications if channel is None or n.channel == channel]

    def published(self, channel: str | None = None) -> list[Event]:
        """Events published on *channel* (all of them by default)."""
        return [e for e in self.events if channel is None or e.channel == channel]

    def _check_listened(self, channel: str) -> None:
        if channel not in self.channels:
            raise HeraldError(
                f"this capture did not LISTEN on {channel!r} (only on {list(self.channels)!r}): "
                f"name it, as in herald_capture({channel!r}), to capture its notifications"
            )

    # -- assertions --

    def assert_notified(
        self, channel: str, payload: Any = ANY, *, times: int | None = None
    ) -> Notification:
        """
        Assert that *channel* got a notification with *payload* (a str is compared with the
        text as sent, anything else with the text decoded as JSON); *times*: exactly that many.
        Returns the first one that matched.
        """
        self._check_listened(channel)
        found = [n for n in self.notified(channel) if _payload_matches(n, payload)]
        what = _describe(channel, payload)
        if times is not None and len(found) != times:
            raise AssertionError(
                f"expected {times} notification(s) {what}, got {len(found)}; captured "
                f"{_list_notifications(self.notifications)}"
            )
        if not found:
            raise AssertionError(
                f"no notification {what}; captured {_list_notifications(self.notifications)}"
            )
        return found[0]

    def assert_not_notified(self, channel: str | None = None, payload: Any = ANY) -> None:
        """Assert that no notification (on *channel*, with *payload*) was captured."""
        if channel is not None:
            self._check_listened(channel)
        found = [n for n in self.notified(channel) if _payload_matches(n, payload)]
        if found:
            raise AssertionError(
                f"expected no notification {_describe(channel, payload)}; captured "
                f"{_list_notifications(found)}"
            )

    def assert_published(
        self,
        channel: str,
        payload: Any = ANY,
        *,
        key: Any = ANY,
        headers: Any = ANY,
        times: int | None = None,
    ) -> Event:
        """
        Assert that an event was published on *channel* with *payload* (the decoded JSON),
        *key* and *headers* (each only checked when given); *times*: exactly that many.
        Returns the first one that matched.
        """
        self._check_log()
        found = [e for e in self.events if _event_matches(e, channel, payload, key, headers)]
        what = _describe(channel, payload, key, headers)
        if times is not None and len(found) != times:
            raise AssertionError(
                f"expected {times} event(s) published {what}, got {len(found)}; published "
                f"{_list_events(self.events)}"
            )
        if not found:
            raise AssertionError(
                f"no event published {what}; published {_list_events(self.events)}"
            )
        return found[0]

    def assert_not_published(
        self, channel: str | None = None, payload: Any = ANY, *, key: Any = ANY
    ) -> None:
        """Assert that no event (on *channel*, with *payload* and *key*) was published."""
        found = [e for e in self.events if _event_matches(e, channel, payload, key, ANY)]
        if found:
            raise AssertionError(
                f"expected no event published {_describe(channel, payload, key)}; published "
                f"{_list_events(found)}"
            )

    def _check_log(self) -> None:
        if self._start_id is None and not self.events:
            dbname = conninfo_to_dict(self.dsn).get("dbname")
            raise AssertionError(
                f"no event published: pgherald's schema is not installed in database "
                f"{dbname!r} (pgherald.events_v1 does not exist when the block began); install "
                "it first (pgherald.install(conn)) or use the herald_installed fixture"
            )

    # -- waiting, inside the block --

    def wait_notified(
        self, channel: str, payload: Any = ANY, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Notification:
        """
        Inside the block: wait until *channel* gets a notification with *payload* (one
        captured already counts); return it, or raise `WaitTimeout`. For code that notifies
        from another thread or process.
        """
        self._check_listened(channel)
        for n in self.notified(channel):
            if _payload_matches(n, payload):
                return n
        hit: list[Notification] = []

        def match(n: Notification) -> bool:
            if n.channel == channel and _payload_matches(n, payload):
                hit.append(n)
                return True
            return False

        if self._read_notifications(until=match, timeout=timeout):
            return hit[0]
        raise WaitTimeout(
            f"timed out after {timeout:g}s waiting for a notification "
            f"{_describe(channel, payload)}; captured {_list_notifications(self.notifications)}"
        )

    def wait_published(
        self,
        channel: str,
        payload: Any = ANY,
        *,
        key: Any = ANY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Event:
        """Inside the block: wait until a matching event is published (polling the log)."""
        conn = self._require()
        deadline = time.monotonic() + timeout
        while True:
            self._read_events(conn)
            for e in self.events:
                if _event_matches(e, channel, payload, key, ANY):
                    return e
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"timed out after {timeout:g}s waiting for an event published "
                    f"{_describe(channel, payload, key)}; published {_list_events(self.events)}"
                )
            time.sleep(_POLL)  # bounded polling: the log has no event to wait on here

    def __repr__(self) -> str:
        return (
            f"<Capture channels={list(self.channels)!r} notifications={len(self.notifications)} "
            f"events={len(self.events)}>"
        )


class CaptureFactory(Protocol):
    """The type of the ``herald_capture`` fixture, to annotate tests with."""

    def __call__(
        self, *channels: str, dsn: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Capture: ...


# -- waiting --


def _is_listener(obj: Any, *, is_async: bool) -> bool:
    from ._listener import Listener
    from ._listener_async import AsyncListener

    return _kind(obj, Listener, AsyncListener, is_async)


def _is_consumer(obj: Any, *, is_async: bool) -> bool:
    from ._consumer import AsyncConsumer, Consumer

    return _kind(obj, Consumer, AsyncConsumer, is_async)


def _kind(obj: Any, sync_cls: type, async_cls: type, is_async: bool) -> bool:
    """Whether *obj* is the class wanted; the other one of the pair is a usage error."""
    wanted, other = (async_cls, sync_cls) if is_async else (sync_cls, async_cls)
    if isinstance(obj, other):
        use = "herald_wait (wait_for)" if is_async else "await herald_await (await_for)"
        raise HeraldError(f"a {type(obj).__name__} is waited on with {use}")
    return isinstance(obj, wanted)


def _item_matches(item: Any, channel: str | None, payload: Any, key: Any) -> bool:
    if channel is not None and item.channel != channel:
        return False
    if isinstance(item, Event):
        return _event_matches(item, None, payload, key, ANY)
    return _payload_matches(item, payload)


def _timed_out(timeout: float, what: str, seen: list[Any]) -> WaitTimeout:
    shown = ", ".join(f"{x.channel!r}: {x.payload!r}" for x in seen[:10])
    more = f" and {len(seen) - 10} more" if len(seen) > 10 else ""
    return WaitTimeout(
        f"timed out after {timeout:g}s waiting for {what}; "
        + (f"received meanwhile ({len(seen)}): {shown}{more}" if seen else "nothing arrived")
    )


def wait_for(
    target: Any,
    *,
    channel: str | None = None,
    payload: Any = ANY,
    key: Any = ANY,
    timeout: float = DEFAULT_TIMEOUT,
    what: str | None = None,
) -> Any:
    """
    Wait at most *timeout* seconds, then raise `WaitTimeout` (an `AssertionError`) with a
    message that says what was awaited and what came instead.

    - a `Listener` (not running: it is iterated here): return the next notification on
      *channel* with *payload*; others are passed over.
    - a `Consumer` (without handlers): return the next matching event; it and the ones
      passed over are acknowledged, and the consumer is left stopped.
    - a `Capture` inside its block: `Capture.wait_notified` when *channel* is among its
      channels, else `Capture.wait_published`.
    - a callable: poll it until it returns something truthy, and return that.

    *what* names the awaited thing in the timeout message (for a callable).
    """
    if isinstance(target, Capture):
        if channel is not None and channel in target.channels:
            return target.wait_notified(channel, payload, timeout=timeout)
        if channel is None:
            raise HeraldError("waiting on a capture needs channel=")
        return target.wait_published(channel, payload, key=key, timeout=timeout)
    if _is_listener(target, is_async=False):
        return _wait_listener(target, channel, payload, timeout)
    if _is_consumer(target, is_async=False):
        return _wait_consumer(target, channel, payload, key, timeout)
    if callable(target):
        return _poll(target, timeout, what)
    raise TypeError(
        f"cannot wait on {type(target).__name__}: pass a Listener, a Consumer, a Capture or a "
        "callable"
    )


def _poll(predicate: Callable[[], Any], timeout: float, what: str | None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            raise HeraldError("the predicate is async: use herald_await (await_for) instead")
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {name} to be true")
        time.sleep(_POLL)  # bounded polling


def _wait_listener(listener: Any, channel: str | None, payload: Any, timeout: float) -> Any:
    what = f"a notification {_describe(channel, payload)} on {listener!r}"
    deadline = time.monotonic() + timeout
    seen: list[Notification] = []
    remaining = timeout
    while remaining > 0:
        with contextlib.closing(listener.notifications(timeout=remaining)) as it:
            for n in it:
                if _item_matches(n, channel, payload, ANY):
                    return n
                seen.append(n)
                if time.monotonic() >= deadline:
                    break
        remaining = deadline - time.monotonic()
    raise _timed_out(timeout, what, seen)


def _wait_consumer(
    consumer: Any, channel: str | None, payload: Any, key: Any, timeout: float
) -> Any:
    what = f"an event {_describe(channel, payload, key)} on {consumer!r}"
    seen: list[Event] = []
    timer = threading.Timer(timeout, consumer.stop)  # ends the iteration at the deadline
    timer.daemon = True
    timer.start()
    try:
        with contextlib.closing(consumer.events()) as it:
            for event in it:
                if _item_matches(event, channel, payload, key):
                    # stop, then ask for the next one: that acknowledges this one (see
                    # Consumer.events) and ends the iteration.
                    consumer.stop()
                    for _ in it:
                        pass
                    return event
                seen.append(event)
    finally:
        timer.cancel()
    raise _timed_out(timeout, what, seen)


async def await_for(
    target: Any,
    *,
    channel: str | None = None,
    payload: Any = ANY,
    key: Any = ANY,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the same call as wait_for's
    what: str | None = None,
) -> Any:
    """
    `wait_for` for async tests, on asyncio and trio: an `AsyncListener`, an `AsyncConsumer`,
    or a predicate (a function or a coroutine function), polled without blocking the loop.
    """
    if _is_listener(target, is_async=True):
        return await _await_listener(target, channel, payload, timeout)
    if _is_consumer(target, is_async=True):
        return await _await_consumer(target, channel, payload, key, timeout)
    if callable(target):
        return await _apoll(target, timeout, what)
    raise TypeError(
        f"cannot wait on {type(target).__name__}: pass an AsyncListener, an AsyncConsumer or a "
        "callable"
    )


async def _apoll(predicate: Callable[[], Any], within: float, what: str | None) -> Any:
    timeout = within
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {name} to be true")
        await anyio.sleep(_POLL)  # bounded polling


async def _await_listener(listener: Any, channel: str | None, payload: Any, within: float) -> Any:
    timeout = within
    what = f"a notification {_describe(channel, payload)} on {listener!r}"
    deadline = time.monotonic() + timeout
    seen: list[Notification] = []
    remaining = timeout
    while remaining > 0:
        agen: AsyncGenerator[Notification, None] = listener.notifications(timeout=remaining)
        async with contextlib.aclosing(agen) as it:
            async for n in it:
                if _item_matches(n, channel, payload, ANY):
                    return n
                seen.append(n)
                if time.monotonic() >= deadline:
                    break
        remaining = deadline - time.monotonic()
    raise _timed_out(timeout, what, seen)


async def _await_consumer(
    consumer: Any, channel: str | None, payload: Any, key: Any, within: float
) -> Any:
    timeout = within
    what = f"an event {_describe(channel, payload, key)} on {consumer!r}"
    seen: list[Event] = []
    found: list[Event] = []

    async def stop_at_deadline() -> None:
        await anyio.sleep(timeout)
        consumer.stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_at_deadline)
        agen: AsyncGenerator[Event, None] = consumer.events()
        async with contextlib.aclosing(agen) as it:
            async for event in it:
                if _item_matches(event, channel, payload, key):
                    found.append(event)
                    consumer.stop()  # the next step acknowledges it and ends the iteration
                    continue
                if not found:
                    seen.append(event)
        tg.cancel_scope.cancel()
    if found:
        return found[0]
    raise _timed_out(timeout, what, seen)


# -- the pytest plugin --


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgherald", "pgherald's fixtures (herald_*)")
    group.addoption(
        "--herald-dsn",
        default=os.environ.get("PGHERALD_TEST_DSN"),
        help="admin DSN of the PostgreSQL server for the herald_* fixtures (default: "
        "$PGHERALD_TEST_DSN, else 127.0.0.1:5432 when it answers, else an embedded server)",
    )
    group.addoption(
        "--herald-embedded",
        action="store_true",
        default=False,
        help="use an embedded PostgreSQL (pgherald[embedded]) even when 127.0.0.1:5432 answers",
    )


@pytest.fixture(scope="session")
def herald_dsn(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An admin DSN of the server the herald_* fixtures use, for the whole session."""
    dsn = request.config.getoption("--herald-dsn")
    embedded = bool(request.config.getoption("--herald-embedded"))
    try:
        with find_server(dsn, tmp_path_factory.mktemp("herald_pgdata"), embedded=embedded) as d:
            yield d
    except ConnectError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def herald_dropper(herald_dsn: str) -> Iterator[DatabaseDropper]:
    """Drops the ``herald_db`` databases in batches; what is left, at the session's end."""
    with DatabaseDropper.session(herald_dsn) as dropper:
        yield dropper


@pytest.fixture
def herald_db(
    herald_dsn: str, herald_dropper: DatabaseDropper, request: pytest.FixtureRequest
) -> Iterator[str]:
    """
    The DSN of a fresh, empty database for this test. At the test's end its sessions are
    ended (no new one can connect); it is dropped with the next few (`DatabaseDropper`).
    """
    dsn = create_database(herald_dsn)
    try:
        yield dsn
    finally:
        name = str(conninfo_to_dict(dsn)["dbname"])
        with psycopg.connect(herald_dsn, autocommit=True) as admin:
            failed = herald_dropper.retire(admin, name, request.node.nodeid)
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture
def herald_conn(herald_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection to the test's database."""
    with psycopg.connect(herald_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def herald_installed(herald_db: str) -> str:
    """The test's database with pgherald's schema installed (its DSN)."""
    from ._schema import install

    with psycopg.connect(herald_db) as conn:
        install(conn)
    return herald_db


@pytest.fixture
def herald_capture(request: pytest.FixtureRequest) -> Iterator[CaptureFactory]:
    """
    ``herald_capture(*channels, dsn=None, timeout=5.0)``: a `Capture` of the test's database
    (``herald_db``, or *dsn*), to use as ``with herald_capture("orders") as cap: ...``.
    """
    made: list[Capture] = []

    def capture(
        *channels: str, dsn: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Capture:
        if dsn is None:
            dsn = str(request.getfixturevalue("herald_db"))
        cap = Capture(dsn, *channels, timeout=timeout)
        made.append(cap)
        return cap

    yield capture
    for cap in made:
        cap.close()


@pytest.fixture
def herald_wait() -> Callable[..., Any]:
    """`wait_for`: wait for a notification, an event or a predicate, with a timeout."""
    return wait_for


@pytest.fixture
def herald_await() -> Callable[..., Awaitable[Any]]:
    """`await_for`: the async `herald_wait` (asyncio and trio)."""
    return await_for
