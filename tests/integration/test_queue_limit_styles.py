"""
The NOTIFY queue limit (``queue_max_usage``) in the styles test_faults.py does not cover: the
iterator (``for n in listener``, ``async for n in listener`` on asyncio and trio) and the
gateway, whose SSE and WebSocket clients are told with a ``gap`` event.

Why: the give-up is checked where the listener gets control back between two deliveries, and
each style hands control back its own way (the iterators between batches of the loop body,
the gateway between fan-outs). A style that never got there would let a consumer that stopped
reading hold the cluster's NOTIFY queue until every writer failed at COMMIT
(docs/reliability.md, "What pgherald does while behind").

Each test checks the whole promise: the old session ends (its backend exits, and the queue
usage falls although the backlog was never consumed), the gap is reported (``on_gap`` for the
iterators, which yield only notifications; a ``gap`` event with reason ``queue_limit`` for the
gateway's clients), and what arrives is the burst's beginning in order, then what was sent
after the gap: nothing replayed, nothing lost once listening again.

The NOTIFY queue is cluster-wide, so the module runs on a server of its own: another test's
listener cannot hold queue pages (and make the usage readings mean nothing).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_faults import (
    Background,
    await_until,
    backend_alive,
    queue_usage,
    send_burst,
    wait_until,
)
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)
from tests.integration.test_faults import (
    BURST,
    BURST_PER_TX,
    BURST_SIZE,
    BURST_TX,
    FAST,
    QUEUE_CHECK,
    BurstCheck,
    fall_behind,
    hold_on_start,
)
from tests.integration.test_gateway import hub_of, serve, sse

# Any backlog at all is too much: the give-up is tested, not the 8 GB queue's 80%.
GIVE_UP: dict[str, Any] = {
    "queue_check_interval": QUEUE_CHECK,
    "queue_max_usage": 1e-9,
    "queue_warn_usage": 1e-9,
}


def _sessions_gone(conn: psycopg.Connection, old_pid: int | None, usage_behind: float) -> None:
    """The old backend exits, and the queue usage falls although the backlog was not read."""
    wait_until(lambda: not backend_alive(conn, old_pid), 5.0, "the old backend to exit")
    # 0 here: the server is this module's own, so no other session holds a page.
    wait_until(
        lambda: queue_usage(conn) <= usage_behind * 0.1,
        5.0,
        f"pg_notification_queue_usage() to fall from {usage_behind:g}",
    )


async def _await_db(predicate: Callable[[], object], within: float, what: str) -> None:
    """`await_until` for a predicate that queries the server (run on a worker thread)."""
    deadline = time.monotonic() + within
    while not await anyio.to_thread.run_sync(predicate):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await anyio.sleep(0.02)


def _check_stream(seen: list[object], check: BurstCheck) -> pgherald.Gap:
    """
    What the loop body got, with the gap where ``on_gap`` was called: "start", the burst's
    beginning (in order, each once: `check`), the gap, maybe more of that beginning (what had
    been received before the give-up is still delivered), then "after-1", "after-2", last.
    Returns the gap.
    """
    gaps = [i for i, x in enumerate(seen) if isinstance(x, pgherald.Gap)]
    assert len(gaps) == 1, f"on_gap called {len(gaps)} times"
    notes = [x for x in seen if not isinstance(x, pgherald.Gap)]
    # The iteration yields notifications only: a gap reaches an iterator user through on_gap.
    assert all(isinstance(n, pgherald.Notification) for n in notes)
    payloads = [n.payload for n in notes]  # type: ignore[attr-defined]
    assert payloads[0] == "start"
    assert payloads[-2:] == ["after-1", "after-2"]
    assert len(payloads) == check.count + 3, "something arrived twice or out of the burst"
    assert gaps[0] < len(seen) - 2, "after-1 came before the gap was reported"
    check.check_prefix()
    assert check.count < BURST // 2, "the backlog was consumed, not given up"
    gap = seen[gaps[0]]
    assert isinstance(gap, pgherald.Gap)
    return gap


def _check_gap(listener: pgherald.Listener | pgherald.AsyncListener, gap: pgherald.Gap) -> None:
    assert gap.reason == "queue_limit"
    assert gap.error is not None
    assert "full" in gap.error
    assert gap.started <= gap.ended
    assert listener.stats.gaps == [gap]
    assert listener.stats.reconnects == 1
    assert listener.stats.queue_checks >= 1
    assert (listener.stats.last_queue_usage or 0) > 0


# -- iterator style --------------------------------------------------------------------------


def test_iterator_queue_limit_gives_up_queue_position(dsn: str, conn: psycopg.Connection) -> None:
    blocked = threading.Event()
    release = threading.Event()
    seen: list[object] = []  # notifications and the gap, in the order the consumer saw them
    check = BurstCheck()
    with pgherald.Listener(
        dsn, channels=["burst"], on_gap=seen.append, **GIVE_UP, **FAST
    ) as listener:

        def consume() -> None:
            for n in listener:  # until stop()
                seen.append(n)
                if n.payload == "start":
                    hold_on_start(blocked, release)  # the consumer stops reading
                elif not n.payload.startswith("after"):
                    check.take(n)

        bg = Background(consume, name="iterate").start()
        try:
            usage_behind = fall_behind(conn, blocked)
            old_pid = listener.backend_pid  # (it gives up only once released)
            release.set()
            wait_until(lambda: listener.stats.gaps, 5.0, "on_gap(queue_limit)")
            _sessions_gone(conn, old_pid, usage_behind)
            # The same iteration goes on, on a new session.
            pgherald.notify(conn, "burst", "after-1")
            pgherald.notify(conn, "burst", "after-2")
            wait_until(
                lambda: any(getattr(x, "payload", "") == "after-2" for x in seen),
                5.0,
                "notifications after the gap",
            )
            new_pid = listener.backend_pid
        finally:
            release.set()
            listener.stop()
            bg.thread.join(5)
        assert not bg.thread.is_alive(), "the iteration did not end on stop()"
        if bg.error is not None:
            raise bg.error
    gap = _check_stream(seen, check)
    _check_gap(listener, gap)
    assert listener.stats.received == check.count + 3  # every notification yielded, once
    assert new_pid not in (None, old_pid)


@pytest.mark.anyio
async def test_async_iterator_queue_limit_gives_up_queue_position(
    dsn: str, conn: psycopg.Connection
) -> None:
    blocked = anyio.Event()
    release = anyio.Event()
    seen: list[object] = []
    check = BurstCheck()

    def burst() -> None:
        send_burst(
            conn, "burst", transactions=BURST_TX, per_transaction=BURST_PER_TX, size=BURST_SIZE
        )

    async with pgherald.AsyncListener(
        dsn, channels=["burst"], on_gap=seen.append, **GIVE_UP, **FAST
    ) as listener:

        async def consume() -> None:
            async for n in listener:  # until stop()
                seen.append(n)
                if n.payload == "start":
                    t0 = time.monotonic()
                    blocked.set()
                    with anyio.fail_after(10):
                        await release.wait()
                    # Behind for longer than queue_check_interval (the iteration hands control
                    # back to the engine after 16 batches, before its 1 s delivery budget).
                    await anyio.sleep(max(0.0, t0 + QUEUE_CHECK * 1.5 - time.monotonic()))
                elif not n.payload.startswith("after"):
                    check.take(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", "start")
            with anyio.fail_after(5):
                await blocked.wait()
            old_pid = listener.backend_pid
            await anyio.to_thread.run_sync(burst)
            usage_behind = await anyio.to_thread.run_sync(queue_usage, conn)
            assert usage_behind > 0
            release.set()
            await await_until(lambda: listener.stats.gaps, 5.0, "on_gap(queue_limit)")
            await _await_db(
                lambda: not backend_alive(conn, old_pid), 5.0, "the old backend to exit"
            )
            await _await_db(
                lambda: queue_usage(conn) <= usage_behind * 0.1,
                5.0,
                f"pg_notification_queue_usage() to fall from {usage_behind:g}",
            )
            for payload in ("after-1", "after-2"):
                await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", payload)
            await await_until(
                lambda: any(getattr(x, "payload", "") == "after-2" for x in seen),
                5.0,
                "notifications after the gap",
            )
            new_pid = listener.backend_pid
            listener.stop()  # ends the `async for`, and with it the task group
    gap = _check_stream(seen, check)
    _check_gap(listener, gap)
    assert listener.stats.received == check.count + 3
    assert new_pid not in (None, old_pid)


# -- the gateway -----------------------------------------------------------------------------

# How long the gateway's listener may be behind before it reads the queue usage. The gateway
# gets behind for real here: a burst of BURST notifications committed at once is read and fanned
# out to two clients, which takes it several tenths of a second (0.5 s and more measured), far
# longer than this.
GATEWAY_QUEUE_CHECK = 0.05


def _number(payload: str) -> int:
    assert len(payload) == 8 + BURST_SIZE, payload[:20]
    return int(payload[:8])


def _check_gateway_stream(events: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    A client's stream as ``(kind, value)``: burst numbers, then the gap, maybe more burst
    numbers (received before the give-up, delivered after it), then the two live events.
    Returns the gap's fields.
    """
    kinds = [k for k, _ in events]
    assert kinds.count("gap") == 1, kinds[-5:]
    assert events[-2:] == [("news", "after-1"), ("burst", "after-2")], events[-3:]
    numbers = [v for k, v in events if k == "burst" and v != "after-2"]
    # The burst's beginning, in order, each once; and only a beginning: the rest was given up.
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) < BURST // 2, "the backlog was consumed, not given up"
    assert len(events) == len(numbers) + 3
    return next(v for k, v in events if k == "gap")


def test_gateway_clients_get_a_queue_limit_gap_then_live_events(
    dsn: str, conn: psycopg.Connection
) -> None:
    # Each client may hold the whole burst: a client cut off as too slow would get no gap.
    app = create_app(
        dsn,
        allow_anonymous=["burst", "news"],
        client_buffer=BURST + 100,
        listener_options={"queue_check_interval": GATEWAY_QUEUE_CHECK, "queue_max_usage": 1e-9},
    )
    hub = hub_of(app)
    with serve(app) as base, sse(base, "burst", "news") as s:
        s.ready()
        with ws_connect(base.replace("http", "ws") + "/ws") as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["burst", "news"]}))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["burst", "news"]}
            old_pid = hub.listener.backend_pid
            assert old_pid is not None
            # One transaction: the whole backlog is there at once, faster than the gateway reads.
            send_burst(conn, "burst", transactions=1, per_transaction=BURST, size=BURST_SIZE)

            sse_events: list[tuple[str, Any]] = []
            while not sse_events or sse_events[-1][0] != "gap":
                e = s.next(within=10.0)
                assert e is not None, "the stream ended"
                if e["event"] == "gap":
                    sse_events.append(("gap", json.loads(e["data"])))
                else:
                    assert e["event"] == "burst", e
                    sse_events.append(("burst", _number(e["data"])))
            reading = hub.listener.stats.last_queue_usage or 0.0
            assert reading > 0  # the reading that made it give up
            _sessions_gone(conn, old_pid, reading)
            # Listening again on a new session: live events on both channels reach both clients.
            pgherald.notify(conn, "news", "after-1")
            pgherald.notify(conn, "burst", "after-2")
            while sse_events[-1] != ("burst", "after-2"):
                e = s.next(within=10.0)
                assert e is not None, "the stream ended"
                data = e["data"]
                if e["event"] == "gap":
                    sse_events.append(("gap", json.loads(data)))
                elif data.startswith("after"):
                    sse_events.append((e["event"], data))
                else:
                    sse_events.append((e["event"], _number(data)))

            ws_events: list[tuple[str, Any]] = []
            while ws_events[-1:] != [("burst", "after-2")]:
                m = json.loads(ws.recv(10))
                if m["type"] == "gap":
                    ws_events.append(("gap", {k: v for k, v in m.items() if k != "type"}))
                else:
                    assert m["type"] == "event", m
                    payload = m["payload"]
                    if not payload.startswith("after"):
                        payload = _number(payload)
                    ws_events.append((m["channel"], payload))
            new_pid = hub.listener.backend_pid
    for events in (sse_events, ws_events):
        gap = _check_gateway_stream(events)
        assert gap["reason"] == "queue_limit"
        assert gap["channels"] == ["burst", "news"]
        assert gap["started"] <= gap["ended"]
    stats = hub.listener.stats
    assert [g.reason for g in stats.gaps] == ["queue_limit"]
    assert stats.reconnects == 1
    assert new_pid not in (None, old_pid)
    # Counted once per gap, whatever the number of clients told.
    assert 'pgherald_gateway_gaps_total{reason="queue_limit"} 1.0' in hub.metrics.render().decode()
