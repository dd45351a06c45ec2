"""
Promises of docs/listen.md and docs/reliability.md that no other test held, each against a
real server with real faults (a terminated backend, a proxy that refuses new connections).

- Notifications that reached the client before its connection broke are delivered, not
  dropped with the connection (reliability.md, *Connection failure is normal*).
- The listener listens again before ``on_gap`` runs: what is sent during the hook's re-read
  arrives after it (listen.md, *The on_gap hook*).
- ``reconnect_max_attempts`` ends an iteration with ``ConnectionLost`` too, not only ``run()``.
- A queue reading that fails is a warning, the listener goes on; the reading's connection
  (``pgherald-monitor``) is closed once the listener has caught up (reliability.md,
  *What pgherald does while behind*). It stayed open until the next notification came,
  however long the listener was quiet: the engine now closes it when a wait times out.
- A second run or iteration, and a handler added while iterating, are refused with
  ``UsageError`` (listen.md, *Methods and properties*).
- One handler that raises does not keep the other handlers of its notification from running;
  the log line names the handler and the channel (reliability.md, *Handler errors*).

Each promise is tested on `Listener` and on `AsyncListener`, the latter on asyncio and on trio
(the suite's ``anyio_backend``).
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg
import pytest

import pgherald
from tests.fix_faults import (
    Background,
    FaultProxy,
    LogWatch,
    await_until,
    backend_alive,
    running,
    wait_until,
)
from tests.integration.test_faults import FAST as FAULTS_FAST

# Small values so that every loss is found and repaired within a second or two. The queue
# thresholds are out of reach: the NOTIFY queue is the whole cluster's, and no test here must
# give up its position because another test filled it.
FAST: dict[str, Any] = {**FAULTS_FAST, "queue_warn_usage": 2.0, "queue_max_usage": 2.0}

PAYLOADS = [str(i) for i in range(1, 6)]


def _send(dsn: str, channel: str, *payloads: str) -> None:
    """NOTIFY *payloads* on *channel*, all in one transaction (so they travel together)."""
    with psycopg.connect(dsn) as c:
        for p in payloads:
            pgherald.notify(c, channel, p)


def _unread_bytes(sock_fd: int) -> int:
    """Bytes waiting in the kernel's receive buffer of a socket (read by nobody yet)."""
    buf = fcntl.ioctl(sock_fd, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def _terminate_with_unread_notifications(
    listener: pgherald.Listener | pgherald.AsyncListener, conn: psycopg.Connection, dsn: str
) -> None:
    """
    Leave *listener* (connected, not running) with PAYLOADS on its socket, unread, and its
    session ended behind them: the notifications reached the client before the connection
    broke, and the break is found by the same read that brings them in.
    """
    engine = listener._engine
    assert engine.pgconn is not None
    fd = engine.pgconn.socket
    pid = listener.backend_pid
    _send(dsn, "kept", *PAYLOADS)
    # Sent by the listening backend before it is told to exit: they are ours, not the gap's.
    wait_until(lambda: _unread_bytes(fd) > 0, 5.0, "the notifications on the listener's socket")
    before = _unread_bytes(fd)
    assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    wait_until(lambda: not backend_alive(conn, pid), 5.0, "the listening backend to exit")
    # Its last word (the FATAL message) follows the notifications on the socket.
    wait_until(lambda: _unread_bytes(fd) > before, 5.0, "the session's end on the socket")


def _check_kept(got: list[str], gaps: list[pgherald.Gap]) -> None:
    assert got == [*PAYLOADS, "after"], "notifications received before the loss were dropped"
    (gap,) = gaps
    assert gap.reason == "reconnect"


def test_notifications_received_before_a_loss_are_delivered(
    dsn: str, conn: psycopg.Connection
) -> None:
    # reliability.md: "Notifications that had already arrived before the connection broke are
    # kept and delivered."
    gaps: list[pgherald.Gap] = []
    got: list[str] = []
    with pgherald.Listener(dsn, channels=["kept"], on_gap=gaps.append, **FAST) as listener:
        listener.on("kept")(lambda n: got.append(n.payload))
        _terminate_with_unread_notifications(listener, conn, dsn)
        with running(listener):
            wait_until(lambda: gaps, 5.0, "the reconnection")
            _send(dsn, "kept", "after")
            wait_until(lambda: len(got) >= len(PAYLOADS) + 1, 5.0, "every notification")
    _check_kept(got, gaps)


@pytest.mark.anyio
async def test_async_notifications_received_before_a_loss_are_delivered(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[str] = []
    async with pgherald.AsyncListener(
        dsn, channels=["kept"], on_gap=gaps.append, **FAST
    ) as listener:
        listener.on("kept")(lambda n: got.append(n.payload))
        await anyio.to_thread.run_sync(_terminate_with_unread_notifications, listener, conn, dsn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await await_until(lambda: gaps, 5.0, "the reconnection")
            await anyio.to_thread.run_sync(_send, dsn, "kept", "after")
            await await_until(lambda: len(got) >= len(PAYLOADS) + 1, 5.0, "every notification")
            listener.stop()
    _check_kept(got, gaps)


def test_iteration_keeps_notifications_received_before_a_loss(
    dsn: str, conn: psycopg.Connection
) -> None:
    # The same in the iterator style (its reads go through `take`, not the handlers' loop).
    gaps: list[pgherald.Gap] = []
    got: list[str] = []
    with pgherald.Listener(dsn, channels=["kept"], on_gap=gaps.append, **FAST) as listener:
        _terminate_with_unread_notifications(listener, conn, dsn)
        for n in listener.notifications(timeout=5.0):
            got.append(n.payload)
            if len(got) == len(PAYLOADS):
                _send(dsn, "kept", "after")  # listening again: the gap was reported
                assert gaps, "the notifications came before the gap was found"
            if n.payload == "after":
                break
    _check_kept(got, gaps)


# -- on_gap runs once the listener listens again --


def test_notifications_sent_during_on_gap_are_delivered_after_it(
    dsn: str, conn: psycopg.Connection
) -> None:
    # listen.md: "The listener is already listening when on_gap is called, so notifications
    # sent during your re-read are not lost; they wait until the hook returns."
    got: list[str] = []
    gaps: list[pgherald.Gap] = []

    def on_gap(gap: pgherald.Gap) -> None:
        gaps.append(gap)
        # Committed while the hook runs; numbered, so that a hook called twice shows.
        _send(dsn, "orders", f"during re-read {len(gaps)}")

    with pgherald.Listener(dsn, channels=["orders"], on_gap=on_gap, **FAST) as listener:
        listener.on("orders")(lambda n: got.append(n.payload))
        with running(listener):
            _send(dsn, "orders", "before")
            wait_until(lambda: got, 5.0, "the first notification")
            conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            wait_until(lambda: gaps, 5.0, "on_gap")
            wait_until(lambda: len(got) >= 2, 5.0, "the notification sent during on_gap")
    assert got == ["before", "during re-read 1"]
    assert len(gaps) == 1


@pytest.mark.anyio
async def test_async_notifications_sent_during_on_gap_are_delivered_after_it(
    dsn: str, conn: psycopg.Connection
) -> None:
    got: list[str] = []
    gaps: list[pgherald.Gap] = []

    async def on_gap(gap: pgherald.Gap) -> None:  # a coroutine: awaited by the listener
        gaps.append(gap)
        await anyio.to_thread.run_sync(_send, dsn, "orders", f"during re-read {len(gaps)}")

    async with pgherald.AsyncListener(dsn, channels=["orders"], on_gap=on_gap, **FAST) as listener:
        listener.on("orders")(lambda n: got.append(n.payload))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_send, dsn, "orders", "before")
            await await_until(lambda: got, 5.0, "the first notification")
            pid = listener.backend_pid
            await anyio.to_thread.run_sync(
                lambda: conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            )
            await await_until(lambda: gaps, 5.0, "on_gap")
            await await_until(lambda: len(got) >= 2, 5.0, "the notification sent during on_gap")
            listener.stop()
    assert got == ["before", "during re-read 1"]
    assert len(gaps) == 1


# -- reliability.md: "The first attempt is made at once." Its backoff (2.5-5 s here) comes
# only after a failed attempt: a reconnect within 2 s is the first attempt, made at once. --

SLOW_BACKOFF: dict[str, Any] = {**FAST, "reconnect_initial_delay": 5.0, "reconnect_max_delay": 5.0}


def test_the_first_reconnect_attempt_is_made_at_once(dsn: str, conn: psycopg.Connection) -> None:
    gaps: list[pgherald.Gap] = []
    with pgherald.Listener(
        dsn, channels=["orders"], on_gap=gaps.append, **SLOW_BACKOFF
    ) as listener:
        listener.on("orders")(lambda n: None)
        with running(listener):
            conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            wait_until(lambda: gaps, 2.0, "the reconnect (after a backoff it would come later)")
    (gap,) = gaps
    assert gap.attempts == 1


@pytest.mark.anyio
async def test_async_the_first_reconnect_attempt_is_made_at_once(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    async with pgherald.AsyncListener(
        dsn, channels=["orders"], on_gap=gaps.append, **SLOW_BACKOFF
    ) as listener:
        listener.on("orders")(lambda n: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            pid = listener.backend_pid
            await anyio.to_thread.run_sync(
                lambda: conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            )
            await await_until(lambda: gaps, 2.0, "the reconnect (after a backoff, later)")
            listener.stop()
    (gap,) = gaps
    assert gap.attempts == 1


# -- reconnect_max_attempts ends an iteration too --


def test_iteration_raises_connection_lost_after_max_attempts(
    dsn: str, fault_proxy: FaultProxy
) -> None:
    # listen.md: "reconnect_max_attempts: give up after this many failed attempts in a row,
    # and raise ConnectionLost from run() or the iteration."
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["up"],
        on_gap=gaps.append,
        reconnect_max_attempts=2,
        **FAST,
    ) as listener:
        fault_proxy.refuse()
        fault_proxy.sever()
        bg = Background(lambda: got.extend(listener.notifications())).start()
        bg.thread.join(5.0)
        if bg.thread.is_alive():
            listener.stop()
            bg.thread.join(5.0)
            pytest.fail("the iteration kept retrying past reconnect_max_attempts=2")
    assert isinstance(bg.error, pgherald.ConnectionLost), repr(bg.error)
    assert "after 2 attempts" in str(bg.error)
    assert "refused" in str(bg.error).lower()
    assert got == []
    assert gaps == []
    assert listener._mode is None  # the iteration is over: the listener can be used again


@pytest.mark.anyio
async def test_async_iteration_raises_connection_lost_after_max_attempts(
    dsn: str, fault_proxy: FaultProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn),
        channels=["up"],
        on_gap=gaps.append,
        reconnect_max_attempts=2,
        **FAST,
    ) as listener:
        fault_proxy.refuse()
        fault_proxy.sever()
        with anyio.fail_after(5), pytest.raises(pgherald.ConnectionLost, match="after 2 attempts"):
            async for _ in listener.notifications():
                pass
    assert gaps == []
    assert listener._mode is None


# -- the queue reading: its failure is a warning, its connection goes once caught up --

QUEUE_CHECK = 0.2


def _monitors(conn: psycopg.Connection) -> int:
    """Sessions of this test's database named pgherald-monitor (a queue reading's)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'pgherald-monitor'"
    ).fetchone()
    assert row is not None
    return int(row[0])


class SlowStart:
    """
    A handler that blocks on "start" until released, and for at least 1.5 queue-check
    intervals in all: the listener is behind meanwhile, and its queue reading is due when the
    handler returns. (The sleep is the fault: a slow handler, not a wait for a condition.)
    """

    def __init__(self) -> None:
        self.got: list[str] = []
        self.blocked = threading.Event()
        self.release = threading.Event()

    def __call__(self, n: pgherald.Notification) -> None:
        self.got.append(n.payload)
        if n.payload == "start":
            t0 = time.monotonic()
            self.blocked.set()
            self.release.wait(10)
            time.sleep(max(0.0, t0 + QUEUE_CHECK * 1.5 - time.monotonic()))


def test_a_failed_queue_reading_is_a_warning_and_the_listener_goes_on(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    # reliability.md: "If the reading itself fails, a warning is logged and the listener
    # continues." The reading opens a connection of its own: the proxy refuses it.
    gaps: list[pgherald.Gap] = []
    slow = SlowStart()
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["q"],
        on_gap=gaps.append,
        queue_check_interval=QUEUE_CHECK,
        **FAST,
    ) as listener:
        listener.on("q")(slow)
        pid = listener.backend_pid
        with running(listener):
            _send(dsn, "q", "start")
            wait_until(slow.blocked.is_set, 5.0, "the handler to block")
            fault_proxy.refuse()  # the listening connection stays; new ones are refused
            slow.release.set()
            (warning,) = listener_log.wait_for("could not read pg_notification_queue_usage", 1, 5)
            fault_proxy.allow()
            _send(dsn, "q", "after")
            wait_until(lambda: "after" in slow.got, 5.0, "a notification after the failure")
            assert listener.backend_pid == pid, "the listener reconnected"
    assert warning.levelno == logging.WARNING
    assert "refused" in warning.getMessage().lower()
    assert slow.got == ["start", "after"]
    assert gaps == []
    assert listener.stats.queue_checks == 0  # no reading was taken
    assert listener.stats.last_queue_usage is None


def test_the_queue_reading_connection_is_closed_once_caught_up(
    dsn: str, conn: psycopg.Connection
) -> None:
    # reliability.md: it reads the usage "on a second, short-lived connection
    # (application_name=pgherald-monitor) ... and closes that connection once it has caught up".
    slow = SlowStart()
    with pgherald.Listener(
        dsn, channels=["q"], queue_check_interval=QUEUE_CHECK, **FAST
    ) as listener:
        listener.on("q")(slow)
        with running(listener):
            _send(dsn, "q", "start")
            wait_until(slow.blocked.is_set, 5.0, "the handler to block")
            slow.release.set()
            wait_until(lambda: listener.stats.queue_checks >= 1, 5.0, "a queue reading")
            # Caught up, and quiet: nothing more is sent. The reading's session must not stay.
            wait_until(lambda: _monitors(conn) == 0, 5.0, "the pgherald-monitor session to end")
            assert listener.connected
    assert slow.got == ["start"]


class AsyncSlowStart:
    """`SlowStart` for AsyncListener: a coroutine handler that waits to be released."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.blocked = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, n: pgherald.Notification) -> None:
        self.got.append(n.payload)
        if n.payload == "start":
            t0 = time.monotonic()
            self.blocked.set()
            with anyio.fail_after(10):
                await self.release.wait()
            await anyio.sleep(max(0.0, t0 + QUEUE_CHECK * 1.5 - time.monotonic()))


@pytest.mark.anyio
async def test_async_a_failed_queue_reading_is_a_warning_and_the_listener_goes_on(
    dsn: str, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    gaps: list[pgherald.Gap] = []
    slow = AsyncSlowStart()
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn),
        channels=["q"],
        on_gap=gaps.append,
        queue_check_interval=QUEUE_CHECK,
        **FAST,
    ) as listener:
        listener.on("q")(slow)
        pid = listener.backend_pid
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_send, dsn, "q", "start")
            with anyio.fail_after(5):
                await slow.blocked.wait()
            fault_proxy.refuse()
            slow.release.set()
            fragment = "could not read pg_notification_queue_usage"
            await await_until(lambda: listener_log.matching(fragment), 5.0, "the warning")
            fault_proxy.allow()
            await anyio.to_thread.run_sync(_send, dsn, "q", "after")
            await await_until(lambda: "after" in slow.got, 5.0, "a notification after it")
            assert listener.backend_pid == pid, "the listener reconnected"
            listener.stop()
    (warning,) = listener_log.matching(fragment)
    assert warning.levelno == logging.WARNING
    assert "refused" in warning.getMessage().lower()
    assert slow.got == ["start", "after"]
    assert gaps == []
    assert listener.stats.queue_checks == 0


@pytest.mark.anyio
async def test_async_the_queue_reading_connection_is_closed_once_caught_up(
    dsn: str, conn: psycopg.Connection
) -> None:
    slow = AsyncSlowStart()
    async with pgherald.AsyncListener(
        dsn, channels=["q"], queue_check_interval=QUEUE_CHECK, **FAST
    ) as listener:
        listener.on("q")(slow)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_send, dsn, "q", "start")
            with anyio.fail_after(5):
                await slow.blocked.wait()
            slow.release.set()
            await await_until(lambda: listener.stats.queue_checks >= 1, 5.0, "a queue reading")
            with anyio.fail_after(5):  # polling the server: there is no event to wait on
                while await anyio.to_thread.run_sync(_monitors, conn):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert listener.connected
            listener.stop()
    assert slow.got == ["start"]


# -- one run or iteration at a time, and no handler added to an iteration --


def test_a_second_run_or_iteration_is_refused_and_the_first_goes_on(
    dsn: str, conn: psycopg.Connection
) -> None:
    # listen.md: "UsageError is also raised when a second run() or iteration starts while one
    # is active". The refusal must not disturb the run that is going on.
    got: list[str] = []
    with pgherald.Listener(dsn, channels=["r"], **FAST) as listener:
        listener.on("r")(lambda n: got.append(n.payload))
        with running(listener):
            # On a thread of its own: a second run() that is not refused waits for the first.
            second = Background(listener.run, name="second-run").start()
            second.thread.join(5.0)
            assert not second.thread.is_alive(), "a second run() was not refused"
            assert isinstance(second.error, pgherald.UsageError), repr(second.error)
            assert "already in use (run)" in str(second.error)
            with pytest.raises(pgherald.UsageError, match="one run or one iteration at a time"):
                next(iter(listener.notifications(timeout=2.0)))
            assert listener._mode == "run"  # still the first run's
            _send(dsn, "r", "still running")
            wait_until(lambda: got, 5.0, "the first run to go on")
    assert got == ["still running"]


def test_a_handler_added_while_iterating_is_refused(dsn: str) -> None:
    # listen.md: "... and when you add a handler while iterating."
    with pgherald.Listener(dsn, channels=["i"], **FAST) as listener:
        _send(dsn, "i", "one", "two")
        it = listener.notifications(timeout=5.0)
        assert next(it).payload == "one"
        with pytest.raises(pgherald.UsageError, match="handlers and iteration do not mix"):
            listener.on("i")(lambda n: None)
        assert next(it).payload == "two"  # the iteration goes on
        it.close()  # type: ignore[attr-defined]  # a generator
        assert not listener._handlers  # nothing was registered


@pytest.mark.anyio
async def test_async_a_second_run_or_iteration_is_refused_and_the_first_goes_on(
    dsn: str,
) -> None:
    got: list[str] = []
    async with pgherald.AsyncListener(dsn, channels=["r"], **FAST) as listener:
        listener.on("r")(lambda n: got.append(n.payload))
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await await_until(lambda: listener._mode == "run", 5.0, "run() to start")
            with (
                anyio.fail_after(5),
                pytest.raises(pgherald.UsageError, match=r"already in use \(run\)"),
            ):
                await listener.run()
            with (
                anyio.fail_after(5),
                pytest.raises(pgherald.UsageError, match="one run or one iteration at a time"),
            ):
                await listener.notifications(timeout=2.0).__anext__()
            assert listener._mode == "run"
            await anyio.to_thread.run_sync(_send, dsn, "r", "still running")
            await await_until(lambda: got, 5.0, "the first run to go on")
            listener.stop()
    assert got == ["still running"]


@pytest.mark.anyio
async def test_async_a_handler_added_while_iterating_is_refused(dsn: str) -> None:
    async with pgherald.AsyncListener(dsn, channels=["i"], **FAST) as listener:
        await anyio.to_thread.run_sync(_send, dsn, "i", "one", "two")
        it = listener.notifications(timeout=5.0)
        assert (await it.__anext__()).payload == "one"
        with pytest.raises(pgherald.UsageError, match="handlers and iteration do not mix"):
            listener.on("i")(lambda n: None)
        assert (await it.__anext__()).payload == "two"
        await it.aclose()  # type: ignore[attr-defined]
        assert not listener._handlers


# -- a handler that raises: the others still run, and the log says which one and where --


def _failure_logged(caplog: pytest.LogCaptureFixture, qualname: str) -> None:
    (record,) = [r for r in caplog.records if "failed on a notification" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f"handler {qualname} failed on a notification from channel 'h' (the listener goes on)"
    )
    assert record.exc_info is not None, "logged without the traceback"
    assert str(record.exc_info[1]) == "handler bug"


def test_a_raising_handler_does_not_keep_the_others_from_running(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # reliability.md: "Other handlers for the same notification still run." listen.md: the
    # channel's handlers in registration order, then the catch-all ones.
    seen: list[tuple[str, str]] = []
    caplog.set_level(logging.ERROR, logger="pgherald")
    with pgherald.Listener(dsn, **FAST) as listener:

        @listener.on("h")
        def first(n: pgherald.Notification) -> None:
            seen.append(("first", n.payload))
            if n.payload == "boom":
                raise RuntimeError("handler bug")

        @listener.on("h")
        def second(n: pgherald.Notification) -> None:
            seen.append(("second", n.payload))

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            seen.append(("every", n.payload))
            if n.payload == "end":
                listener.stop()

        _send(dsn, "h", "boom")
        _send(dsn, "h", "end")
        listener.run()
    assert seen == [(h, p) for p in ("boom", "end") for h in ("first", "second", "every")]
    assert listener.stats.handler_errors == 1
    _failure_logged(caplog, first.__qualname__)


@pytest.mark.anyio
async def test_async_a_raising_handler_does_not_keep_the_others_from_running(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str]] = []
    caplog.set_level(logging.ERROR, logger="pgherald")
    async with pgherald.AsyncListener(dsn, channels=["h"], **FAST) as listener:

        @listener.on("h")
        async def first(n: pgherald.Notification) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("first", n.payload))
            if n.payload == "boom":
                raise RuntimeError("handler bug")

        @listener.on("h")
        async def second(n: pgherald.Notification) -> None:
            seen.append(("second", n.payload))

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            seen.append(("every", n.payload))
            if n.payload == "end":
                listener.stop()

        await anyio.to_thread.run_sync(_send, dsn, "h", "boom")
        await anyio.to_thread.run_sync(_send, dsn, "h", "end")
        with anyio.fail_after(10):
            await listener.run()
    assert seen == [(h, p) for p in ("boom", "end") for h in ("first", "second", "every")]
    assert listener.stats.handler_errors == 1
    _failure_logged(caplog, first.__qualname__)
