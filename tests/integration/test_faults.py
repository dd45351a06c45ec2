"""
Fault injection against a real server: killed backends, half-open and severed connections,
an unreachable server, bursts behind slow or failing handlers, and the NOTIFY queue limit.

Nothing here waits by sleeping: every wait is a timeout-bounded poll on a condition (see
tests/fix_faults.py), and each test bounds how long recovery may take. (The one sleep is the
fault itself: a handler made deliberately slow.)
"""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc
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
    queue_usage,
    rss_bytes,
    running,
    send_burst,
    wait_until,
)
from tests.fix_proxy import FreezingProxy

# Small values so that every failure is detected and repaired within a second or two.
FAST: dict[str, Any] = {
    "health_check_interval": 0.5,
    "health_check_timeout": 0.5,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.5,
}

# A mixed-case name and one with a space: re-LISTEN after a reconnection must quote them too.
CHANNELS = ["orders", "MixedCase", "with space"]

MB = 1024 * 1024


def _notify_all(conn: psycopg.Connection, channels: list[str], payload: str) -> None:
    for ch in channels:
        pgherald.notify(conn, ch, payload)


def _sent(got: list[pgherald.Notification], start: int = 0) -> list[tuple[str, str]]:
    return [(n.channel, n.payload) for n in got[start:]]


def _round_trip(
    conn: psycopg.Connection,
    got: list[pgherald.Notification],
    channels: list[str],
    payload: str,
    timeout: float = 5.0,
) -> float:
    """NOTIFY every channel and wait until the listener has them all; returns the seconds taken."""
    start = len(got)
    t0 = time.monotonic()
    _notify_all(conn, channels, payload)
    wait_until(lambda: len(got) >= start + len(channels), timeout, f"{payload!r} on {channels}")
    assert _sent(got, start) == [(ch, payload) for ch in channels]
    return time.monotonic() - t0


async def _around_trip(
    conn: psycopg.Connection,
    got: list[pgherald.Notification],
    channels: list[str],
    payload: str,
    within: float = 5.0,
) -> float:
    start = len(got)
    t0 = time.monotonic()
    await anyio.to_thread.run_sync(_notify_all, conn, channels, payload)
    await await_until(
        lambda: len(got) >= start + len(channels), within, f"{payload!r} on {channels}"
    )
    assert _sent(got, start) == [(ch, payload) for ch in channels]
    return time.monotonic() - t0


def _sql(conn: psycopg.Connection, query: str, *params: object) -> Any:
    row = conn.execute(query, params or None).fetchone()
    return row[0] if row else None


async def _asql(conn: psycopg.Connection, query: str, *params: object) -> Any:
    return await anyio.to_thread.run_sync(lambda: _sql(conn, query, *params))


# --------------------------------------------------------------------------------------------
# 1. pg_terminate_backend on the listening connection
# --------------------------------------------------------------------------------------------


def _check_terminate_outcome(
    listener: pgherald.Listener | pgherald.AsyncListener,
    gaps: list[pgherald.Gap],
    old_pid: int | None,
    new_pid: int | None,
    elapsed: float,
) -> None:
    assert elapsed < 5.0, f"took {elapsed:.2f}s to hear again after pg_terminate_backend"
    assert len(gaps) == 1, gaps
    gap = gaps[0]
    assert gap.reason == "reconnect"
    assert gap.attempts == 1
    assert gap.error
    assert gap.started <= gap.ended
    assert listener.stats.reconnects == 1
    assert listener.stats.gaps == [gap]
    assert new_pid is not None
    assert new_pid != old_pid


def test_terminated_backend_reconnects_relistens_and_reports_gap(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    with pgherald.Listener(dsn, channels=CHANNELS, on_gap=gaps.append, **FAST) as listener:
        listener.on()(got.append)
        with running(listener):
            _round_trip(conn, got, CHANNELS, "before")
            old_pid = listener.backend_pid
            assert old_pid is not None
            assert _sql(conn, "SELECT pg_terminate_backend(%s)", old_pid) is True
            t0 = time.monotonic()
            wait_until(lambda: gaps, 5.0, "on_gap after pg_terminate_backend")
            start = len(got)
            # Case-folded twin first: a LISTEN re-issued unquoted would hear it (and miss the rest).
            pgherald.notify(conn, "mixedcase", "folded")
            _round_trip(conn, got, CHANNELS, "after")
            elapsed = time.monotonic() - t0
            new_pid = listener.backend_pid
            assert not backend_alive(conn, old_pid)
            assert backend_alive(conn, new_pid)
    assert _sent(got, start) == [(ch, "after") for ch in CHANNELS]
    _check_terminate_outcome(listener, gaps, old_pid, new_pid, elapsed)


@pytest.mark.anyio
async def test_async_terminated_backend_reconnects_relistens_and_reports_gap(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []

    async def on_gap(gap: pgherald.Gap) -> None:  # an async hook is awaited
        await anyio.lowlevel.checkpoint()
        gaps.append(gap)

    async with pgherald.AsyncListener(dsn, channels=CHANNELS, on_gap=on_gap, **FAST) as listener:
        listener.on()(got.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _around_trip(conn, got, CHANNELS, "before")
            old_pid = listener.backend_pid
            assert old_pid is not None
            assert await _asql(conn, "SELECT pg_terminate_backend(%s)", old_pid) is True
            t0 = time.monotonic()
            await await_until(lambda: gaps, 5.0, "on_gap after pg_terminate_backend")
            start = len(got)
            await anyio.to_thread.run_sync(pgherald.notify, conn, "mixedcase", "folded")
            await _around_trip(conn, got, CHANNELS, "after")
            elapsed = time.monotonic() - t0
            new_pid = listener.backend_pid
            listener.stop()
    assert _sent(got, start) == [(ch, "after") for ch in CHANNELS]
    assert not backend_alive(conn, old_pid)
    _check_terminate_outcome(listener, gaps, old_pid, new_pid, elapsed)


def _hook_error(caplog: pytest.LogCaptureFixture) -> str:
    """What the one "on_gap hook failed" record logged carries: its exception's text."""
    (record,) = [r for r in caplog.records if r.getMessage() == "on_gap hook failed"]
    assert record.exc_info is not None, "logged without the traceback"
    return str(record.exc_info[1])


def test_an_on_gap_hook_that_raises_is_logged_and_the_listener_goes_on(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # The hook is the user's code: its exception is logged with its traceback and the
    # listener keeps listening (reliability.md, listen.md), it does not end run().
    calls: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []

    def on_gap(gap: pgherald.Gap) -> None:
        calls.append(gap)
        raise RuntimeError("the hook's own bug")

    caplog.set_level(logging.ERROR, logger="pgherald")
    with pgherald.Listener(dsn, channels=CHANNELS, on_gap=on_gap, **FAST) as listener:
        listener.on()(got.append)
        with running(listener) as bg:
            _round_trip(conn, got, CHANNELS, "before")
            assert _sql(conn, "SELECT pg_terminate_backend(%s)", listener.backend_pid) is True
            wait_until(lambda: calls, 5.0, "on_gap after pg_terminate_backend")
            start = len(got)
            _round_trip(conn, got, CHANNELS, "after")
            assert bg.thread.is_alive(), "run() ended with the hook's exception"
    assert _sent(got, start) == [(ch, "after") for ch in CHANNELS]
    assert _hook_error(caplog) == "the hook's own bug"


@pytest.mark.anyio
async def test_async_an_on_gap_hook_that_raises_is_logged_and_the_listener_goes_on(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []

    async def on_gap(gap: pgherald.Gap) -> None:  # awaited; what it raises is only logged too
        calls.append(gap)
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("the hook's own bug")

    caplog.set_level(logging.ERROR, logger="pgherald")
    async with pgherald.AsyncListener(dsn, channels=CHANNELS, on_gap=on_gap, **FAST) as listener:
        listener.on()(got.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _around_trip(conn, got, CHANNELS, "before")
            pid = listener.backend_pid
            assert await _asql(conn, "SELECT pg_terminate_backend(%s)", pid) is True
            await await_until(lambda: calls, 5.0, "on_gap after pg_terminate_backend")
            start = len(got)
            # run() still going: a raised hook would have ended the task group with it
            await _around_trip(conn, got, CHANNELS, "after")
            listener.stop()
    assert _sent(got, start) == [(ch, "after") for ch in CHANNELS]
    assert _hook_error(caplog) == "the hook's own bug"


# --------------------------------------------------------------------------------------------
# 2. Half-open connection (proxy.freeze): only the health check can notice
# --------------------------------------------------------------------------------------------


def _check_half_open_outcome(
    listener: pgherald.Listener | pgherald.AsyncListener,
    gaps: list[pgherald.Gap],
    checks_before: int,
    accepted_before: int,
    proxy: FreezingProxy,
    detected: float,
) -> None:
    # interval 0.5 + probe timeout 0.5 + a reconnection: about 1 s; TCP keepalives need 10 s+.
    assert detected < 3.0, f"half-open connection took {detected:.2f}s to detect and repair"
    assert listener.stats.health_checks >= checks_before + 1
    assert proxy.accepted > accepted_before, "the reconnection did not go through the proxy"
    assert len(gaps) == 1, gaps
    gap = gaps[0]
    assert gap.reason == "reconnect"
    assert gap.error is not None
    assert "half-open" in gap.error
    assert listener.stats.reconnects == 1


def test_half_open_connection_is_detected_by_health_check(
    dsn: str, conn: psycopg.Connection, proxy: FreezingProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    with pgherald.Listener(
        proxy.dsn_for(dsn), channels=["hb"], on_gap=gaps.append, **FAST
    ) as listener:
        listener.on("hb")(got.append)
        with running(listener):
            _round_trip(conn, got, ["hb"], "before")
            checks_before = listener.stats.health_checks
            accepted_before = proxy.accepted
            assert proxy.freeze() == 1
            t0 = time.monotonic()
            detected = wait_until(lambda: gaps, 5.0, "the half-open connection to be replaced")
            _round_trip(conn, got, ["hb"], "after")
            total = time.monotonic() - t0
    _check_half_open_outcome(listener, gaps, checks_before, accepted_before, proxy, detected)
    assert total < 4.0
    assert _sent(got) == [("hb", "before"), ("hb", "after")]


@pytest.mark.anyio
async def test_async_half_open_connection_is_detected_by_health_check(
    dsn: str, conn: psycopg.Connection, proxy: FreezingProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    async with pgherald.AsyncListener(
        proxy.dsn_for(dsn), channels=["hb"], on_gap=gaps.append, **FAST
    ) as listener:
        listener.on("hb")(got.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _around_trip(conn, got, ["hb"], "before")
            checks_before = listener.stats.health_checks
            accepted_before = proxy.accepted
            assert proxy.freeze() == 1
            t0 = time.monotonic()
            detected = await await_until(
                lambda: gaps, 5.0, "the half-open connection to be replaced"
            )
            await _around_trip(conn, got, ["hb"], "after")
            total = time.monotonic() - t0
            listener.stop()
    _check_half_open_outcome(listener, gaps, checks_before, accepted_before, proxy, detected)
    assert total < 4.0
    assert _sent(got) == [("hb", "before"), ("hb", "after")]


# --------------------------------------------------------------------------------------------
# 3. Severed connection (RST)
# --------------------------------------------------------------------------------------------


def test_severed_connection_reconnects(
    dsn: str, conn: psycopg.Connection, proxy: FreezingProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    with pgherald.Listener(
        proxy.dsn_for(dsn), channels=CHANNELS, on_gap=gaps.append, **FAST
    ) as listener:
        listener.on()(got.append)
        with running(listener):
            _round_trip(conn, got, CHANNELS, "before")
            accepted_before = proxy.accepted
            proxy.sever()
            t0 = time.monotonic()
            wait_until(lambda: gaps, 5.0, "on_gap after the connection was severed")
            _round_trip(conn, got, CHANNELS, "after")
            elapsed = time.monotonic() - t0
    assert elapsed < 3.0
    assert proxy.accepted > accepted_before
    assert [g.reason for g in gaps] == ["reconnect"]
    assert listener.stats.reconnects == 1
    assert _sent(got) == [(ch, p) for p in ("before", "after") for ch in CHANNELS]


@pytest.mark.anyio
async def test_async_severed_connection_reconnects(
    dsn: str, conn: psycopg.Connection, proxy: FreezingProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    async with pgherald.AsyncListener(
        proxy.dsn_for(dsn), channels=CHANNELS, on_gap=gaps.append, **FAST
    ) as listener:
        listener.on()(got.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _around_trip(conn, got, CHANNELS, "before")
            accepted_before = proxy.accepted
            proxy.sever()
            t0 = time.monotonic()
            await await_until(lambda: gaps, 5.0, "on_gap after the connection was severed")
            await _around_trip(conn, got, CHANNELS, "after")
            elapsed = time.monotonic() - t0
            listener.stop()
    assert elapsed < 3.0
    assert proxy.accepted > accepted_before
    assert [g.reason for g in gaps] == ["reconnect"]
    assert listener.stats.reconnects == 1
    assert _sent(got) == [(ch, p) for p in ("before", "after") for ch in CHANNELS]


# --------------------------------------------------------------------------------------------
# 4. Server unreachable: exponential backoff, recovery, and giving up
# --------------------------------------------------------------------------------------------

FAILED_ATTEMPTS = 4  # refused attempts to see before the server comes back


def _attempt(record: logging.LogRecord) -> tuple[int, float]:
    """(attempt, delay) of a "reconnect attempt %d failed (%s); next in %.2fs" record."""
    args: Any = record.args
    return int(args[0]), float(args[2])


def _check_backoff(records: list[logging.LogRecord], initial: float, cap: float) -> None:
    """The "reconnect attempt N failed ...; next in D" records show exponential backoff."""
    attempts = [_attempt(r)[0] for r in records]
    delays = [_attempt(r)[1] for r in records]
    assert attempts == list(range(1, len(records) + 1))
    for n, delay in enumerate(delays, start=1):
        base = min(cap, initial * 2 ** (n - 1))
        # equal jitter: half fixed, half random
        assert base / 2 - 1e-9 <= delay <= base + 1e-9, (n, delay, base)
    # ...and the listener really waited that long between attempts.
    for before, after, delay in zip(records, records[1:], delays, strict=False):
        assert after.created - before.created >= delay * 0.9, (before.args, after.args)
    # The waits grow: attempt 4's minimum (0.2 s) is above attempt 1's maximum (0.05 s).
    assert delays[-1] > delays[0]


def test_unreachable_server_backoff_then_recovery(
    dsn: str,
    conn: psycopg.Connection,
    fault_proxy: FaultProxy,
    listener_log: LogWatch,
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    initial, cap = 0.05, 0.4
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["up"],
        on_gap=gaps.append,
        health_check_interval=0.5,
        health_check_timeout=0.5,
        reconnect_initial_delay=initial,
        reconnect_max_delay=cap,
    ) as listener:
        listener.on("up")(got.append)
        with running(listener):
            _round_trip(conn, got, ["up"], "before")
            fault_proxy.refuse()
            fault_proxy.sever()
            t0 = time.monotonic()
            failed = listener_log.wait_for("reconnect attempt", FAILED_ATTEMPTS, 5.0)
            assert not gaps, "reported listening again while the server was unreachable"
            fault_proxy.allow()
            wait_until(lambda: gaps, 5.0, "recovery once the server is reachable again")
            _round_trip(conn, got, ["up"], "after")
            elapsed = time.monotonic() - t0
    assert elapsed < 5.0
    (gap,) = gaps
    assert gap.reason == "reconnect"
    assert gap.attempts > FAILED_ATTEMPTS >= 2
    assert gap.error is not None
    assert "refused" in gap.error.lower()
    assert gap.ended - gap.started >= sum(_attempt(r)[1] for r in failed[:FAILED_ATTEMPTS]) * 0.9
    # Each failed attempt is logged once, before its wait: check the schedule they show.
    failures = listener_log.matching("reconnect attempt")
    assert len(failures) == gap.attempts - 1
    _check_backoff(failures[:FAILED_ATTEMPTS], initial, cap)
    assert listener.stats.reconnects == 1
    assert _sent(got) == [("up", "before"), ("up", "after")]


def test_unreachable_server_gives_up_after_max_attempts(
    dsn: str, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    gaps: list[pgherald.Gap] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["up"],
        on_gap=gaps.append,
        reconnect_max_attempts=2,
        **FAST,
    ) as listener:
        listener.on("up")(lambda n: None)
        fault_proxy.refuse()
        fault_proxy.sever()
        t0 = time.monotonic()
        bg = Background(listener.run).start()
        bg.thread.join(5.0)
        elapsed = time.monotonic() - t0
        if bg.thread.is_alive():
            listener.stop()
            bg.thread.join(5.0)
            pytest.fail("run() kept retrying past reconnect_max_attempts=2")
    assert elapsed < 3.0
    assert isinstance(bg.error, pgherald.ConnectionLost), repr(bg.error)
    assert "after 2 attempts" in str(bg.error)
    assert "refused" in str(bg.error).lower()
    assert gaps == []
    assert listener.stats.reconnects == 0
    assert not listener.connected
    assert len(listener_log.matching("reconnect attempt")) == 1  # the 2nd failure raises


@pytest.mark.anyio
async def test_async_unreachable_server_backoff_then_recovery(
    dsn: str,
    conn: psycopg.Connection,
    fault_proxy: FaultProxy,
    listener_log: LogWatch,
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    initial, cap = 0.05, 0.4
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn),
        channels=["up"],
        on_gap=gaps.append,
        health_check_interval=0.5,
        health_check_timeout=0.5,
        reconnect_initial_delay=initial,
        reconnect_max_delay=cap,
    ) as listener:
        listener.on("up")(got.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await _around_trip(conn, got, ["up"], "before")
            fault_proxy.refuse()
            fault_proxy.sever()
            t0 = time.monotonic()
            await await_until(
                lambda: len(listener_log.matching("reconnect attempt")) >= FAILED_ATTEMPTS,
                5.0,
                f"{FAILED_ATTEMPTS} failed reconnection attempts",
            )
            assert not gaps
            fault_proxy.allow()
            await await_until(lambda: gaps, 5.0, "recovery once the server is reachable again")
            await _around_trip(conn, got, ["up"], "after")
            elapsed = time.monotonic() - t0
            listener.stop()
    assert elapsed < 5.0
    (gap,) = gaps
    assert gap.reason == "reconnect"
    assert gap.attempts > FAILED_ATTEMPTS
    assert gap.error is not None
    assert "refused" in gap.error.lower()
    _check_backoff(listener_log.matching("reconnect attempt")[:FAILED_ATTEMPTS], initial, cap)
    assert _sent(got) == [("up", "before"), ("up", "after")]


@pytest.mark.anyio
async def test_async_unreachable_server_gives_up_after_max_attempts(
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
        listener.on("up")(lambda n: None)
        fault_proxy.refuse()
        fault_proxy.sever()
        with anyio.fail_after(5), pytest.raises(pgherald.ConnectionLost, match="after 2 attempts"):
            await listener.run()
    assert gaps == []
    assert not listener.connected


# --------------------------------------------------------------------------------------------
# 5. A burst behind a slow consumer: the backlog waits in PostgreSQL, memory stays bounded
# --------------------------------------------------------------------------------------------

BURST_TX = 4
BURST_PER_TX = 5_000
BURST = BURST_TX * BURST_PER_TX  # 20,000 notifications...
BURST_SIZE = 1_000  # ...of ~1 KB each: ~20 MB that must not end up in this process
BURST_BYTES = BURST * (8 + BURST_SIZE)
# What a bounded listener may hold: libpq's buffer is one network read (tens of KB; we see
# under 0.1 MB traced, under 0.2 MB of RSS); anything that kept the backlog, in Python or in
# libpq, would need about BURST_BYTES (20 MB) or more.
MAX_TRACED = 1 * MB
MAX_RSS_GROWTH = 4 * MB
MAX_PENDING = 100


class BurstCheck:
    """
    Checks a burst as it is consumed: order, integrity, exactly once, memory on the way.

    It keeps counters, not the notifications (nor even their numbers), so that what it
    measures is the listener's memory, not its own.
    """

    def __init__(self, pending: Any = None) -> None:
        self.count = 0
        self.next = 1  # the payload number expected next
        self.bad: list[str] = []  # the first few anomalies
        self.max_pending = 0
        self.rss_base = 0
        self.rss_max = 0
        self._pending = pending

    def start_measuring(self) -> None:
        tracemalloc.start()
        self.rss_base = self.rss_max = rss_bytes()

    def sample(self) -> None:
        self.rss_max = max(self.rss_max, rss_bytes())
        if self._pending is not None:
            self.max_pending = max(self.max_pending, len(self._pending))

    def take(self, n: pgherald.Notification) -> None:
        number = int(n.payload[:8])
        if (number != self.next or len(n.payload) != 8 + BURST_SIZE) and len(self.bad) < 10:
            self.bad.append(f"#{self.count + 1}: expected {self.next}, got {n.payload[:20]!r}")
        self.next = number + 1
        self.count += 1
        if not self.count % 250:
            self.sample()

    @property
    def done(self) -> bool:
        return self.count >= BURST

    def check_prefix(self) -> None:
        """What arrived is the burst's beginning (possibly all of it): in order, each once."""
        assert self.bad == [], "out of order, duplicated or damaged"
        assert self.next == self.count + 1

    def finish(self) -> int:
        """Stop measuring; return the traced peak (bytes)."""
        self.sample()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak

    def verify(self, peak: int) -> None:
        self.check_prefix()
        assert self.count == BURST, f"{self.count} of {BURST} arrived"
        assert peak < MAX_TRACED, (
            f"Python memory peaked at {peak / MB:.1f} MB while a {BURST_BYTES / MB:.0f} MB "
            "backlog was consumed: notifications are being buffered"
        )
        growth = self.rss_max - self.rss_base
        assert growth < MAX_RSS_GROWTH, (
            f"RSS grew by {growth / MB:.1f} MB during a {BURST_BYTES / MB:.0f} MB backlog"
        )
        assert self.max_pending < MAX_PENDING


def test_burst_behind_blocked_handler_waits_in_postgres_memory_bounded(
    dsn: str, conn: psycopg.Connection
) -> None:
    blocked = threading.Event()
    release = threading.Event()
    released_in_time: list[bool] = []
    with pgherald.Listener(dsn, channels=["burst"], **FAST) as listener:
        check = BurstCheck(listener._engine._pending)

        @listener.on("burst")
        def handler(n: pgherald.Notification) -> None:
            if n.payload == "start":
                blocked.set()
                released_in_time.append(release.wait(10))
                return
            check.take(n)

        with running(listener):
            pgherald.notify(conn, "burst", "start")
            wait_until(blocked.is_set, 5.0, "the handler to block")
            check.start_measuring()
            t0 = time.monotonic()
            assert (
                send_burst(
                    conn,
                    "burst",
                    transactions=BURST_TX,
                    per_transaction=BURST_PER_TX,
                    size=BURST_SIZE,
                )
                == BURST
            )
            # The handler has not returned: the backlog is PostgreSQL's, not ours.
            usage_blocked = queue_usage(conn)
            check.sample()
            release.set()
            wait_until(lambda: check.done, 10.0, "the whole burst")
            elapsed = time.monotonic() - t0
            peak = check.finish()
    assert released_in_time == [True]
    assert usage_blocked > 0
    check.verify(peak)
    assert listener.stats.received == BURST + 1
    assert listener.stats.gaps == []
    assert elapsed < 10.0


def test_burst_iterator_that_does_not_pull_memory_bounded(
    dsn: str, conn: psycopg.Connection
) -> None:
    with pgherald.Listener(dsn, channels=["burst"], **FAST) as listener:
        check = BurstCheck(listener._engine._pending)
        it = listener.notifications(timeout=5.0)
        pgherald.notify(conn, "burst", "start")
        assert next(it).payload == "start"
        # The consumer holds the iterator and does not pull: the listener cannot read meanwhile.
        check.start_measuring()
        send_burst(
            conn, "burst", transactions=BURST_TX, per_transaction=BURST_PER_TX, size=BURST_SIZE
        )
        usage_idle = queue_usage(conn)
        check.sample()
        for n in it:
            check.take(n)
            if check.done:
                break
        it.close()  # type: ignore[attr-defined]  # a generator
        peak = check.finish()
    assert usage_idle > 0
    check.verify(peak)


@pytest.mark.anyio
async def test_async_burst_behind_blocked_handler_memory_bounded(
    dsn: str, conn: psycopg.Connection
) -> None:
    blocked = anyio.Event()
    release = anyio.Event()
    async with pgherald.AsyncListener(dsn, channels=["burst"], **FAST) as listener:
        check = BurstCheck(listener._engine._pending)

        @listener.on("burst")
        async def handler(n: pgherald.Notification) -> None:
            if n.payload == "start":
                blocked.set()
                with anyio.fail_after(10):
                    await release.wait()
                return
            check.take(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", "start")
            with anyio.fail_after(5):
                await blocked.wait()
            check.start_measuring()
            await anyio.to_thread.run_sync(
                lambda: send_burst(
                    conn,
                    "burst",
                    transactions=BURST_TX,
                    per_transaction=BURST_PER_TX,
                    size=BURST_SIZE,
                )
            )
            usage_blocked = await anyio.to_thread.run_sync(queue_usage, conn)
            check.sample()
            release.set()
            await await_until(lambda: check.done, 10.0, "the whole burst")
            peak = check.finish()
            listener.stop()
    assert usage_blocked > 0
    check.verify(peak)
    assert listener.stats.handler_errors == 0


@pytest.mark.anyio
async def test_async_burst_iterator_that_does_not_pull(dsn: str, conn: psycopg.Connection) -> None:
    async with pgherald.AsyncListener(dsn, channels=["burst"], **FAST) as listener:
        check = BurstCheck(listener._engine._pending)
        it = listener.notifications(timeout=5.0)
        await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", "start")
        with anyio.fail_after(5):
            first = await it.__anext__()
        assert first.payload == "start"
        check.start_measuring()
        await anyio.to_thread.run_sync(
            lambda: send_burst(
                conn, "burst", transactions=BURST_TX, per_transaction=BURST_PER_TX, size=BURST_SIZE
            )
        )
        assert await anyio.to_thread.run_sync(queue_usage, conn) > 0
        async for n in it:
            check.take(n)
            if check.done:
                break
        await it.aclose()  # type: ignore[attr-defined]  # an async generator
        peak = check.finish()
    check.verify(peak)


# --------------------------------------------------------------------------------------------
# 6. The NOTIFY queue limit: warn, then give up the queue position to protect writers
# --------------------------------------------------------------------------------------------

QUEUE_CHECK = 0.2


def hold_on_start(blocked: threading.Event, release: threading.Event) -> None:
    """What a consumer does with "start": blocks until released, and for at least 1.5
    queue-check intervals in all (behind for longer than queue_check_interval, whatever the
    speed of the burst)."""
    t0 = time.monotonic()
    blocked.set()
    release.wait(10)
    left = t0 + QUEUE_CHECK * 1.5 - time.monotonic()
    if left > 0:
        time.sleep(left)


def fall_behind(conn: psycopg.Connection, blocked: threading.Event) -> float:
    """Send "start", wait for the consumer to block on it (`hold_on_start`), then send the
    burst; returns the queue usage it leaves (above 0: the consumer holds the backlog)."""
    pgherald.notify(conn, "burst", "start")
    wait_until(blocked.is_set, 5.0, "the consumer to block")
    send_burst(conn, "burst", transactions=BURST_TX, per_transaction=BURST_PER_TX, size=BURST_SIZE)
    usage = queue_usage(conn)
    assert usage > 0
    return usage


def _slow_first_handler(
    check: BurstCheck, blocked: threading.Event, release: threading.Event
) -> Any:
    """Blocks on "start" (`hold_on_start`); takes the burst into *check*."""

    def handler(n: pgherald.Notification) -> None:
        if n.payload == "start":
            hold_on_start(blocked, release)
            return
        if n.payload.startswith("after"):
            return
        check.take(n)

    return handler


def test_queue_limit_gives_up_queue_position(dsn: str, conn: psycopg.Connection) -> None:
    blocked = threading.Event()
    release = threading.Event()
    gaps: list[pgherald.Gap] = []
    check = BurstCheck()
    after: list[str] = []
    with pgherald.Listener(
        dsn,
        channels=["burst"],
        on_gap=gaps.append,
        queue_check_interval=QUEUE_CHECK,
        queue_max_usage=1e-9,  # any backlog at all is too much
        queue_warn_usage=1e-9,
        **FAST,
    ) as listener:
        handler = _slow_first_handler(check, blocked, release)
        listener.on("burst")(handler)
        listener.on("burst")(
            lambda n: after.append(n.payload) if n.payload.startswith("after") else None
        )
        with running(listener):
            usage_behind = fall_behind(conn, blocked)
            old_pid = listener.backend_pid  # (it gives up only once released)
            release.set()
            wait_until(lambda: gaps, 5.0, "on_gap(queue_limit)")
            # The old session is gone, and with it the queue position that held the backlog:
            # the usage falls although the backlog was never consumed. (It is 0 on a quiet
            # server; the queue is cluster-wide, so other sessions may hold a page or two.)
            wait_until(lambda: not backend_alive(conn, old_pid), 5.0, "the old backend to exit")
            wait_until(
                lambda: queue_usage(conn) <= usage_behind * 0.1,
                5.0,
                f"pg_notification_queue_usage() to fall from {usage_behind:g} (is another "
                "session on this cluster holding the NOTIFY queue?)",
            )
            assert check.count < BURST // 2, "the backlog was consumed, not given up"
            # Still listening, on a new session.
            pgherald.notify(conn, "burst", "after-1")
            pgherald.notify(conn, "burst", "after-2")
            wait_until(lambda: len(after) >= 2, 5.0, "notifications after the gap")
            new_pid = listener.backend_pid
    (gap,) = gaps
    assert gap.reason == "queue_limit"
    assert gap.error is not None
    assert "full" in gap.error
    assert listener.stats.queue_checks >= 1
    assert (listener.stats.last_queue_usage or 0) > 0
    assert listener.stats.reconnects == 1
    assert new_pid is not None
    assert new_pid != old_pid
    assert after == ["after-1", "after-2"]
    # What did arrive of the burst is its beginning, in order, once: nothing was replayed.
    check.check_prefix()


@pytest.mark.anyio
async def test_async_queue_limit_gives_up_queue_position(
    dsn: str, conn: psycopg.Connection
) -> None:
    # The same on AsyncListener (asyncio and trio): its handler is a coroutine that waits.
    blocked = anyio.Event()
    release = anyio.Event()
    gaps: list[pgherald.Gap] = []
    check = BurstCheck()
    after: list[str] = []

    async def handler(n: pgherald.Notification) -> None:
        if n.payload == "start":
            t0 = time.monotonic()
            blocked.set()
            with anyio.fail_after(10):
                await release.wait()
            # Past the delivery budget (1 s, more than queue_check_interval): an async
            # delivery goes on reading while its budget lasts (the burst would be read in a
            # fraction of it), and the check comes when it hands control back.
            await anyio.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
        elif n.payload.startswith("after"):
            after.append(n.payload)
        else:
            check.take(n)

    def sql(query: str, *params: object) -> Any:
        return anyio.to_thread.run_sync(lambda: _sql(conn, query, *params))

    async with pgherald.AsyncListener(
        dsn,
        channels=["burst"],
        on_gap=gaps.append,
        queue_check_interval=QUEUE_CHECK,
        queue_max_usage=1e-9,  # any backlog at all is too much
        queue_warn_usage=1e-9,
        **FAST,
    ) as listener:
        listener.on("burst")(handler)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", "start")
            with anyio.fail_after(5):
                await blocked.wait()
            old_pid = listener.backend_pid
            await anyio.to_thread.run_sync(
                lambda: send_burst(
                    conn,
                    "burst",
                    transactions=BURST_TX,
                    per_transaction=BURST_PER_TX,
                    size=BURST_SIZE,
                )
            )
            usage_behind = await anyio.to_thread.run_sync(queue_usage, conn)
            assert usage_behind > 0
            release.set()
            await await_until(lambda: gaps, 5.0, "on_gap(queue_limit)")
            # The old session goes, and with it the backlog's queue position (see the sync test).
            with anyio.fail_after(5):  # polling the server: there is no event to wait on
                while await sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", old_pid):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                while await sql("SELECT pg_notification_queue_usage()") > usage_behind * 0.1:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert check.count < BURST // 2, "the backlog was consumed, not given up"
            for payload in ("after-1", "after-2"):
                await anyio.to_thread.run_sync(pgherald.notify, conn, "burst", payload)
            await await_until(lambda: len(after) >= 2, 5.0, "notifications after the gap")
            new_pid = listener.backend_pid
            listener.stop()
    (gap,) = gaps
    assert gap.reason == "queue_limit"
    assert gap.error is not None
    assert "full" in gap.error
    assert listener.stats.queue_checks >= 1
    assert listener.stats.reconnects == 1
    assert new_pid not in (None, old_pid)
    assert after == ["after-1", "after-2"]
    check.check_prefix()


def test_queue_warn_usage_logs_and_keeps_going(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = threading.Event()
    release = threading.Event()
    gaps: list[pgherald.Gap] = []
    check = BurstCheck()
    with pgherald.Listener(
        dsn,
        channels=["burst"],
        on_gap=gaps.append,
        queue_check_interval=QUEUE_CHECK,
        queue_warn_usage=1e-9,  # above this: warn...
        queue_max_usage=0.5,  # ...but far below this: keep the position
        **FAST,
    ) as listener:
        listener.on("burst")(_slow_first_handler(check, blocked, release))
        with caplog.at_level(logging.WARNING, logger="pgherald.listener"), running(listener):
            pgherald.notify(conn, "burst", "start")
            wait_until(blocked.is_set, 5.0, "the handler to block")
            send_burst(
                conn, "burst", transactions=BURST_TX, per_transaction=BURST_PER_TX, size=BURST_SIZE
            )
            assert queue_usage(conn) > 0
            release.set()
            wait_until(lambda: check.done, 10.0, "the whole burst")
    warnings = [
        r
        for r in caplog.records
        if r.name == "pgherald.listener"
        and r.levelno == logging.WARNING
        and "full and this listener is behind" in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert gaps == []
    assert listener.stats.queue_checks >= 1
    # Each warning is a reading over queue_warn_usage; none reached queue_max_usage. (The last
    # reading may be 0: the listener goes on checking while it works through the burst.)
    assert all(float(w.getMessage().split("% full")[0].rsplit(" ", 1)[1]) < 50 for w in warnings)
    assert (listener.stats.last_queue_usage or 0) < 0.5
    check.check_prefix()
    assert check.count == BURST


# --------------------------------------------------------------------------------------------
# 7. A handler that raises on every notification of a burst
# --------------------------------------------------------------------------------------------

ERR_BURST = 5_000


def test_handler_raising_on_every_call_under_burst(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    with pgherald.Listener(dsn, channels=["boom", "done"], **FAST) as listener:

        @listener.on("boom")
        def boom(n: pgherald.Notification) -> None:
            calls.append(int(n.payload[:8]))
            raise RuntimeError(f"bad handler #{n.payload[:8]}")

        listener.on("done")(lambda n: listener.stop())
        send_burst(conn, "boom", transactions=1, per_transaction=ERR_BURST)
        pgherald.notify(conn, "done", "")
        t0 = time.monotonic()
        listener.run()  # returns because the "done" handler ran: the errors did not stop it
        elapsed = time.monotonic() - t0
        # ...and the same listener goes on listening afterwards.
        pgherald.notify(conn, "boom", f"{ERR_BURST + 1:08d}")
        pgherald.notify(conn, "done", "")
        listener.run()
    assert elapsed < 10.0
    assert calls == list(range(1, ERR_BURST + 2))
    assert listener.stats.handler_errors == ERR_BURST + 1
    assert listener.stats.received == ERR_BURST + 3
    assert listener.stats.reconnects == 0
    failed = [r for r in caplog.records if "failed on a notification" in r.getMessage()]
    assert len(failed) == ERR_BURST + 1
    assert failed[-1].exc_info is not None
    assert "bad handler" in str(failed[-1].exc_info[1])


@pytest.mark.anyio
async def test_async_handler_raising_on_every_call_under_burst(
    dsn: str, conn: psycopg.Connection
) -> None:
    calls: list[int] = []
    async with pgherald.AsyncListener(dsn, channels=["boom", "done"], **FAST) as listener:

        @listener.on("boom")
        async def boom(n: pgherald.Notification) -> None:
            calls.append(int(n.payload[:8]))
            raise RuntimeError("bad async handler")

        listener.on("done")(lambda n: listener.stop())
        await anyio.to_thread.run_sync(
            lambda: send_burst(conn, "boom", transactions=1, per_transaction=ERR_BURST)
        )
        await anyio.to_thread.run_sync(pgherald.notify, conn, "done", "")
        with anyio.fail_after(10):
            await listener.run()
    assert calls == list(range(1, ERR_BURST + 1))
    assert listener.stats.handler_errors == ERR_BURST
    assert listener.stats.received == ERR_BURST + 1


# --------------------------------------------------------------------------------------------
# Regressions: bugs found while writing these tests, fixed since
# --------------------------------------------------------------------------------------------


def test_iteration_timeout_is_honoured_while_server_unreachable(
    dsn: str, fault_proxy: FaultProxy
) -> None:
    result: list[pgherald.Notification] = []
    with pgherald.Listener(fault_proxy.dsn_for(dsn), channels=["up"], **FAST) as listener:
        fault_proxy.refuse()
        fault_proxy.sever()
        bg = Background(lambda: result.extend(listener.notifications(timeout=1.0))).start()
        bg.thread.join(3.0)
        stuck = bg.thread.is_alive()
        if stuck:
            listener.stop()  # ends the reconnection loop, so the iteration returns
            bg.thread.join(5.0)
        assert not bg.thread.is_alive()
    assert bg.error is None, repr(bg.error)
    assert not stuck, "notifications(timeout=1.0) had not returned 3 s into an outage"
    assert result == []


@pytest.mark.anyio
async def test_async_iteration_timeout_is_honoured_while_server_unreachable(
    dsn: str, fault_proxy: FaultProxy
) -> None:
    async with pgherald.AsyncListener(
        fault_proxy.dsn_for(dsn), channels=["up"], **FAST
    ) as listener:
        fault_proxy.refuse()
        fault_proxy.sever()
        it = listener.notifications(timeout=1.0)
        got: list[pgherald.Notification] = []
        with anyio.move_on_after(3.0) as scope:
            async for n in it:
                got.append(n)
        await it.aclose()  # type: ignore[attr-defined]  # an async generator
    assert not scope.cancelled_caught, (
        "notifications(timeout=1.0) had not returned 3 s into an outage"
    )
    assert got == []


def test_outage_interrupted_by_stop_is_still_reported_as_gap(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy, listener_log: LogWatch
) -> None:
    gaps: list[pgherald.Gap] = []
    got: list[pgherald.Notification] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn), channels=["up"], on_gap=gaps.append, **FAST
    ) as listener:
        listener.on("up")(got.append)
        with running(listener):
            _round_trip(conn, got, ["up"], "before")
            fault_proxy.refuse()
            fault_proxy.sever()
            lost_at = time.time()
            listener_log.wait_for("reconnect attempt", 2, 5.0)
            # ...and the loop is stopped mid-outage (a shutdown, a supervisor restarting it).
        pgherald.notify(conn, "up", "missed")  # nobody listens now: this one is lost
        fault_proxy.allow()
        with running(listener):
            wait_until(lambda: gaps, 3.0, "a Gap covering the outage")
            _round_trip(conn, got, ["up"], "after")
    (gap,) = gaps
    assert gap.started <= lost_at + 0.5, "the Gap does not cover the time the outage began"
    assert _sent(got) == [("up", "before"), ("up", "after")]


def test_iteration_timeout_during_health_check_keeps_connection(
    dsn: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    gaps: list[pgherald.Gap] = []
    with pgherald.Listener(
        fault_proxy.dsn_for(dsn),
        channels=["t"],
        on_gap=gaps.append,
        health_check_interval=0.2,
        health_check_timeout=3.0,
    ) as listener:
        fault_proxy.freeze()  # a network stall: the probe sent at 0.2 s waits for an answer
        t0 = time.monotonic()
        assert list(listener.notifications(timeout=0.6)) == []
        assert time.monotonic() - t0 < 2.0
        assert listener.stats.health_checks == 1  # the iteration ended with the probe out
        fault_proxy.thaw()  # the stall is over: the connection and its probe are fine
        pgherald.notify(conn, "t", "kept")
        got = [n.payload for n in listener.notifications(timeout=1.0)]
    assert got == ["kept"]
    assert gaps == []
    assert listener.stats.reconnects == 0


def test_channel_with_the_ping_prefix_loses_nothing_read_along_with_a_statement(
    dsn: str, conn: psycopg.Connection
) -> None:
    # Only this connection's own ping channel is filtered out of what libpq reads along with
    # the listener's statements (here a LISTEN), not every channel that shares its prefix.
    channel = "pgherald_ping_mine"
    with pgherald.Listener(dsn, channels=[channel]) as listener:
        for i in range(20):
            pgherald.notify(conn, channel, str(i))
        # Sent and committed: the listening backend has them on the socket before it answers
        # this LISTEN, so libpq reads them with the answer.
        listener.subscribe("another")
        got = []
        for n in listener.notifications(timeout=5):
            got.append(n.payload)
            if len(got) == 20:
                break
        assert got == [str(i) for i in range(20)]
