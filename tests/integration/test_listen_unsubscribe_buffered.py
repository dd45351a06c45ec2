"""
listen.md, *Subscribe and unsubscribe*: "Notifications already received on a channel you
unsubscribe from are still delivered."

What "already received" means in the engine: every notification the server sent before it
answered the ``UNLISTEN``. PostgreSQL sends a transaction's notifications to an idle listening
backend's client all at once, so once the first notification of a transaction reaches a
handler, the rest of that transaction is on its way ahead of anything the backend answers
later. Those notifications sit in one of three places when ``unsubscribe`` is called from that
handler: in libpq's queue (read from the socket, not taken yet), on the socket (read by libpq
along with the ``UNLISTEN``'s answer and moved to the engine's ``_pending`` by
``_collect``), or, during an iteration, in the batch handed back by ``unread``. The
delivery loop reads at most a few libpq buffers (64 KB each) before it goes back to the
engine, which then sends the ``UNLISTEN``: a transaction of several MB therefore leaves most
of its notifications to arrive with the answer, after the channel left ``listening``. The
tests check that this happened (some notifications are delivered while the channel is no
longer listened to), that every notification of the transaction is delivered, in order, and
that a notification sent once the ``UNLISTEN`` took effect is not. (An async handler is the
exception: its delivery reads on while data arrives, up to a time budget, so its test holds
the notifications that wait in the engine between handlers, not those read after.)

Each promise is tested on `Listener` (handlers and iteration) and on `AsyncListener`
(handlers and iteration), the latter on asyncio and on trio (the suite's ``anyio_backend``).
"""

from __future__ import annotations

import anyio
import anyio.to_thread
import psycopg
import pytest

import pgherald
from tests.fix_faults import await_until, running, send_burst, wait_until

CHANNEL = "unsub buffered"  # quoted in LISTEN/UNLISTEN: a space and lower case kept
MARKER = "still listened"
# One transaction of COUNT notifications of ~SIZE bytes: 3.3 MB, far more than the listener
# reads (a few 64 KB libpq buffers) between the handler's unsubscribe and the UNLISTEN.
COUNT = 8000
SIZE = 400
EXPECTED = [f"{i:08d}" + "x" * SIZE for i in range(1, COUNT + 1)]


def _send_burst(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        send_burst(c, CHANNEL, transactions=1, per_transaction=COUNT, size=SIZE)


def _send_late(dsn: str) -> None:
    """Once the UNLISTEN took effect: a notification on the channel, then a marker on one
    still listened to (in one transaction: the marker's arrival proves the other's fate)."""
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        pgherald.notify(c, CHANNEL, "late")
        pgherald.notify(c, MARKER, "marker")


class Seen:
    """What the listener delivered on CHANNEL, and whether the server still listened to it."""

    def __init__(self, listener: pgherald.Listener | pgherald.AsyncListener) -> None:
        self.listener = listener
        self.payloads: list[str] = []
        self.after_unlisten = 0  # delivered once CHANNEL had left listener.listening
        self.markers: list[str] = []

    def record(self, n: pgherald.Notification) -> bool:
        """Note *n*; True for the first one (the caller unsubscribes then)."""
        if n.channel == MARKER:
            self.markers.append(n.payload)
            return False
        assert n.channel == CHANNEL
        self.payloads.append(n.payload)
        if CHANNEL not in self.listener.listening:
            self.after_unlisten += 1
        return len(self.payloads) == 1

    def check(self) -> None:
        assert self.markers == ["marker"]
        assert "late" not in self.payloads, "delivered after the UNLISTEN took effect"
        assert len(self.payloads) == COUNT, (
            f"{COUNT - len(self.payloads)} notifications received before the unsubscribe "
            "were not delivered"
        )
        assert self.payloads == EXPECTED  # every one, once, in order
        # The case the promise is about: notifications read after the UNLISTEN (with its
        # answer) were delivered, not only those the loop still held when it was sent.
        assert self.after_unlisten > 0, "the test did not reach past the UNLISTEN"
        assert self.listener.channels == [MARKER]


# -- Listener --


def test_notifications_received_before_unsubscribe_are_delivered(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=[CHANNEL, MARKER]) as listener:
        seen = Seen(listener)

        def handler(n: pgherald.Notification) -> None:
            if seen.record(n):
                listener.unsubscribe(CHANNEL)  # in a handler: applied right after it

        listener.on(CHANNEL, MARKER)(handler)
        with running(listener):
            _send_burst(dsn)
            wait_until(lambda: CHANNEL not in listener.listening, 10, "the UNLISTEN")
            _send_late(dsn)
            wait_until(lambda: seen.markers, 10, "the marker")
    seen.check()


def test_iteration_delivers_notifications_received_before_unsubscribe(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=[CHANNEL, MARKER]) as listener:
        seen = Seen(listener)
        sent_late = False
        _send_burst(dsn)  # listened to already: waits for the iteration on the socket
        for n in listener.notifications(timeout=10):
            if seen.record(n):
                listener.unsubscribe(CHANNEL)  # from the loop body: applied right after it
            if not sent_late and CHANNEL not in listener.listening:
                _send_late(dsn)  # (a blocking send in the body: nothing else waits on it)
                sent_late = True
            if n.channel == MARKER:
                break
        assert sent_late, "the UNLISTEN never took effect"
    seen.check()


# -- AsyncListener, on asyncio and trio --


@pytest.mark.anyio
async def test_async_notifications_received_before_unsubscribe_are_delivered(dsn: str) -> None:
    # unsubscribe() from another task, started by the first notification's handler: the run
    # applies it once its delivery goes back to the engine (a few libpq reads at most).
    async with pgherald.AsyncListener(dsn, channels=[CHANNEL, MARKER]) as listener:
        seen = Seen(listener)
        async with anyio.create_task_group() as tg:

            def handler(n: pgherald.Notification) -> None:
                if seen.record(n):
                    tg.start_soon(listener.unsubscribe, CHANNEL)

            listener.on(CHANNEL, MARKER)(handler)
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_send_burst, dsn)
            await await_until(lambda: CHANNEL not in listener.listening, 10, "the UNLISTEN")
            await anyio.to_thread.run_sync(_send_late, dsn)
            await await_until(lambda: seen.markers, 10, "the marker")
            listener.stop()
    seen.check()


@pytest.mark.anyio
async def test_async_handler_unsubscribing_gets_what_was_received_before(dsn: str) -> None:
    # An async handler awaits unsubscribe(): it returns at once, and the UNLISTEN follows
    # right after the handler (listen.md), before the rest of the burst is read; the rest of
    # the batch waits in the engine's `_pending` meanwhile, and none of it may be dropped for
    # the channel being unwanted.
    async with pgherald.AsyncListener(dsn, channels=[CHANNEL, MARKER]) as listener:
        seen = Seen(listener)

        async def handler(n: pgherald.Notification) -> None:
            if seen.record(n):
                await listener.unsubscribe(CHANNEL)  # in a handler: applied after it

        listener.on(CHANNEL, MARKER)(handler)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(_send_burst, dsn)
            await await_until(lambda: CHANNEL not in listener.listening, 10, "the UNLISTEN")
            await anyio.to_thread.run_sync(_send_late, dsn)
            await await_until(lambda: seen.markers, 10, "the marker")
            listener.stop()
    seen.check()


@pytest.mark.anyio
async def test_async_iteration_delivers_notifications_received_before_unsubscribe(
    dsn: str,
) -> None:
    async with pgherald.AsyncListener(dsn, channels=[CHANNEL, MARKER]) as listener:
        seen = Seen(listener)
        sent_late = False
        await anyio.to_thread.run_sync(_send_burst, dsn)  # waits for the iteration
        async with anyio.create_task_group() as tg:
            # Left by `break`: dropping the iteration ends it (listen.md).
            async for n in listener.notifications(timeout=10):
                if seen.record(n):
                    await listener.unsubscribe(CHANNEL)  # from the loop body: right after it
                if not sent_late and CHANNEL not in listener.listening:
                    # In a thread of its own: the loop body must not block the event loop.
                    tg.start_soon(anyio.to_thread.run_sync, _send_late, dsn)
                    sent_late = True
                if n.channel == MARKER:
                    break
    assert sent_late, "the UNLISTEN never took effect"
    seen.check()
