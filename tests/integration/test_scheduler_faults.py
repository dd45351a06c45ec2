"""
`Scheduler` / `AsyncScheduler` (what ``pgherald schedule run`` runs) under real faults, on
every runtime: a frozen (half-open) connection, refused reconnections, a terminated backend, a
restarted server, and `stop()` in every state. What must hold: a delayed event published
while the fault lasts is released once the scheduler is back, once.

Each scheduler runs on a thread of its own: `Scheduler.run()` there directly,
`AsyncScheduler.run()` inside ``anyio.run`` on asyncio or trio; the test thread injects the
fault and calls `stop()`, which is documented as safe from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_durable import SchedulerRun, log_payloads, publish_delayed
from tests.fix_faults import (
    FaultProxy,
    SilentServer,
    await_until,
    free_port,
    wait_until,
    watching,
)
from tests.fix_server import OwnServer

RUNTIMES = ["sync", "asyncio", "trio"]


def waiting(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgherald.scheduled_v1").fetchone()
        assert row is not None
        return int(row[0])


FAST = {"max_wait": 0.2, "reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_released_while_running(
    runtime: str, installed: str, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, installed, max_wait=30)
    publish_delayed(installed, "a", after=0.3)
    # Its wake-up tells the idle scheduler when the event is due, though max_wait is 30 s.
    # (Counted once its answer is read: the event may be in the log a moment before.)
    took = wait_until(lambda: run.scheduler.released == 1, 5, "the scheduler's release")
    assert took < 3, f"released after {took:.2f}s"
    assert log_payloads(installed) == ["a"]
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_frozen_connection_is_replaced_and_nothing_is_lost(
    runtime: str, installed: str, fault_proxy: FaultProxy, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, fault_proxy.dsn_for(installed), statement_timeout=1.0, **FAST)
    assert fault_proxy.freeze() >= 1
    publish_delayed(installed, "during")
    # The first statement after the freeze gets no answer: found after max_wait + timeout.
    took = wait_until(lambda: log_payloads(installed) == ["during"], 8, "the delayed event")
    assert took < 0.2 + 1.0 + 3.0, f"found the frozen connection after {took:.2f}s"
    assert run.scheduler.reconnects == 1
    assert waiting(installed) == 0
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_statements_cancelled_while_it_sets_up_a_connection(
    runtime: str, installed: str, schedulers: Callable[..., SchedulerRun]
) -> None:
    """
    A cancel that lands on a statement of a new connection's setup is met like a lost
    connection: a new one, and run() goes on (it ended with ListenError). The setup's
    statements take under a millisecond, so to land a cancel on one for sure, the scheduler's
    session finds a ``pg_backend_pid()`` of ours first on its search_path, which waits for an
    advisory lock the test holds; the test cancels it while it waits, then lets go.
    """
    with psycopg.connect(installed, autocommit=True) as conn:
        conn.execute(
            "CREATE SCHEMA blocker;"
            " CREATE FUNCTION blocker.pg_backend_pid() RETURNS int LANGUAGE sql AS"
            " 'SELECT pg_catalog.pg_advisory_xact_lock_shared(4242);"
            " SELECT pg_catalog.pg_backend_pid()'"
        )
    dsn = f"{installed} options='-c search_path=blocker,pg_catalog,public'"
    with watching("pgherald.schedule") as log:
        run = schedulers(runtime, dsn, **FAST)
        with (
            psycopg.connect(installed) as holder,
            psycopg.connect(installed, autocommit=True) as watcher,
        ):
            holder.execute("SELECT pg_advisory_xact_lock(4242)")  # held until holder commits

            def cancelled_setups() -> int:
                said = [r.getMessage() for r in list(log.records)]
                return sum("listen for wake-ups failed (canceling statement" in m for m in said)

            def waiting_setup() -> int | None:
                row = watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'pgherald-schedule%%'"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                return None if row is None else int(row[0])

            watcher.execute("SELECT pg_terminate_backend(%s)", (run.scheduler.backend_pid,))
            wait_until(waiting_setup, 10, "the new connection's setup waiting for the lock")
            watcher.execute("SELECT pg_cancel_backend(%s)", (waiting_setup(),))
            wait_until(
                lambda: cancelled_setups() or not run.thread.is_alive(), 10, "the cancel's effect"
            )
            assert run.thread.is_alive(), f"run() ended: {run.error!r}"
            assert cancelled_setups() == 1
            # run() goes on: the next connection waits at the same place.
            wait_until(waiting_setup, 10, "the next connection's setup")
            holder.commit()
    publish_delayed(installed, "after")
    wait_until(lambda: log_payloads(installed) == ["after"], 10, "the delayed event")
    assert run.thread.is_alive(), f"run() ended: {run.error!r}"
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_three_rounds_of_refused_reconnects(
    runtime: str, installed: str, fault_proxy: FaultProxy, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, fault_proxy.dsn_for(installed), **FAST)
    expected: list[str] = []
    for round_ in range(3):
        failures = run.scheduler.connect_failures
        fault_proxy.refuse()
        fault_proxy.sever()
        expected.append(f"round {round_}")
        publish_delayed(installed, expected[-1])
        wait_until(
            lambda f=failures: run.scheduler.connect_failures >= f + 3,
            5,
            f"3 refusals in round {round_}",
        )
        assert run.alive()
        assert log_payloads(installed) == expected[:-1]  # not released while refused
        fault_proxy.allow()
        wait_until(lambda e=list(expected): log_payloads(installed) == e, 10, f"round {round_}")
    assert run.scheduler.reconnects == 3
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_terminated_backend_reconnects(
    runtime: str, installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, installed, **FAST)
    conn.execute("SELECT pg_terminate_backend(%s)", (run.scheduler.backend_pid,))
    publish_delayed(installed, "after")
    wait_until(lambda: log_payloads(installed) == ["after"], 10, "the event after the termination")
    assert run.scheduler.reconnects == 1
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_survives_a_server_restart_and_ticks_once(
    runtime: str, server: OwnServer, schedulers: Callable[..., SchedulerRun]
) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        pgherald.install(conn)
    run = schedulers(runtime, server.dsn, **FAST)
    before = run.scheduler.backend_pid
    server.restart()
    publish_delayed(server.dsn, "after the restart")
    wait_until(
        lambda: log_payloads(server.dsn) == ["after the restart"], 15, "the event after the restart"
    )
    assert run.scheduler.reconnects == 1
    assert run.scheduler.backend_pid != before
    # A schedule due now ticks once, whichever scheduler gets it (here: this one, back).
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        pgherald.add_schedule(conn, "yearly", "0 0 1 1 *", channel="ticks")
        conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() - interval '1 s'")
        conn.execute("NOTIFY pgherald_wake_v1")
        wait_until(lambda: run.scheduler.ticks == 1, 5, "the tick")
        row = conn.execute(
            "SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'ticks'"
        ).fetchone()
        assert row == (1,)
    run.stop()


def _locked_tick(conn: psycopg.Connection, dsn: str) -> psycopg.Connection:
    """A schedule due now, its row locked by another session (returned; commit to release)."""
    pgherald.add_schedule(conn, "yearly", "0 0 1 1 *", "ticks")
    conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() - interval '1 s'")
    locker = psycopg.connect(dsn)
    locker.execute("SELECT 1 FROM pgherald.schedules_v1 WHERE name = 'yearly' FOR UPDATE")
    return locker


def _waiting_on_a_lock(
    conn: psycopg.Connection, pid: int | None, after: datetime | None = None
) -> bool:
    """Whether *pid* waits on a lock (in a statement started after *after*, when given)."""
    row = conn.execute(
        "SELECT wait_event_type = 'Lock' AND (%s::timestamptz IS NULL OR query_start > %s)"
        " FROM pg_stat_activity WHERE pid = %s",
        (after, after, pid),
    ).fetchone()
    return bool(row and row[0])


def _query_start(conn: psycopg.Connection, pid: int | None) -> datetime | None:
    row = conn.execute("SELECT query_start FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_wakeup_that_comes_during_a_round_starts_the_next(
    runtime: str, installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    locker = _locked_tick(conn, installed)
    try:
        run = schedulers(runtime, installed, max_wait=30)
        pid = run.scheduler.backend_pid
        wait_until(lambda: _waiting_on_a_lock(conn, pid), 5, "the tick to wait on the row lock")
        publish_delayed(installed, "during", after=0.1)  # its wake-up comes mid-round
        locker.commit()
        # Without a look at the wake-ups read with the round's answers, it would sleep 30 s.
        took = wait_until(lambda: log_payloads(installed) == ["during"], 10, "the event")
        assert took < 3, f"released after {took:.2f}s"
        assert run.scheduler.ticks == 1
    finally:
        locker.close()
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_cancelled_statement_is_retried_not_fatal(
    runtime: str, installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    locker = _locked_tick(conn, installed)
    try:
        run = schedulers(runtime, installed, **FAST)
        pid = run.scheduler.backend_pid
        wait_until(lambda: _waiting_on_a_lock(conn, pid), 5, "the tick to wait on the row lock")
        first = _query_start(conn, pid)
        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))  # 57014: transient
        wait_until(lambda: _waiting_on_a_lock(conn, pid, first), 5, "the tick to be tried again")
        locker.commit()
        wait_until(lambda: run.scheduler.ticks == 1, 5, "the tick")
    finally:
        locker.close()
    assert run.alive()
    assert run.scheduler.reconnects == 0  # the same connection: a retry, not a reconnection
    run.stop()


def test_ticks_whatever_the_sessions_datestyle_and_zone(
    installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    # The engine reads next_tick as text and gives it back: a DateStyle with zone abbreviations
    # (IST read back as Israel's, not India's) made the tick never match, silently.
    dbname = conn.info.dbname
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET DateStyle = 'SQL, DMY'")
    conn.execute(f"ALTER DATABASE \"{dbname}\" SET TimeZone = 'Asia/Kolkata'")
    pgherald.add_schedule(conn, "yearly", "0 0 1 1 *", "ticks")
    conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() - interval '1 s'")
    run = schedulers("sync", installed, **FAST)
    wait_until(lambda: run.scheduler.ticks == 1, 5, "the tick")
    (s,) = pgherald.list_schedules(conn)
    assert s.last_tick is not None
    # Moved on to next year's tick (00:00 UTC on 1 January), once.
    assert s.next_tick.astimezone(timezone.utc).year > s.last_tick.astimezone(timezone.utc).year
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_with_a_backlog_of_due_events(
    runtime: str, installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    conn.execute(
        "INSERT INTO pgherald.scheduled_v1 (deliver_at, channel, payload) "
        "SELECT now() - interval '1 s', 'ch', to_jsonb(g) FROM generate_series(1, 50000) AS g"
    )
    run = schedulers(runtime, installed, **FAST)
    wait_until(lambda: run.scheduler.released > 0, 10, "the first release")
    run.stop()  # between two batches of 1,000, not after the whole backlog
    assert run.scheduler.released < 50000


# -- stop() within a second, in every state --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_waiting(
    runtime: str, installed: str, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, installed, max_wait=60)
    wait_until(lambda: run.scheduler._engine.rounds >= 1, 5, "its first round")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_inside_a_statement_on_a_frozen_connection(
    runtime: str, installed: str, fault_proxy: FaultProxy, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, fault_proxy.dsn_for(installed), max_wait=0.05, statement_timeout=60)
    fault_proxy.freeze()
    engine = run.scheduler._engine
    # Within max_wait a statement goes out on the frozen connection: no answer for up to 60 s.
    wait_until(lambda: engine.statement is not None, 5, "a statement in flight")
    rounds = engine.rounds
    time.sleep(0.3)  # a window in which nothing may complete
    assert engine.statement is not None
    assert engine.rounds == rounds
    assert run.scheduler.reconnects == 0
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_backing_off(
    runtime: str, installed: str, fault_proxy: FaultProxy, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, fault_proxy.dsn_for(installed), reconnect_initial_delay=60)
    fault_proxy.refuse()
    fault_proxy.sever()
    wait_until(lambda: run.scheduler.backend_pid is None, 5, "the connection to be lost")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_connecting_to_a_server_that_never_answers(
    runtime: str,
    installed: str,
    fault_proxy: FaultProxy,
    silent_server: SilentServer,
    schedulers: Callable[..., SchedulerRun],
) -> None:
    run = schedulers(
        runtime, fault_proxy.dsn_for(installed), connect_timeout=60, reconnect_initial_delay=0.01
    )
    fault_proxy._target = ("127.0.0.1", silent_server.port)
    fault_proxy.sever()
    wait_until(lambda: silent_server.accepted, 5, "a connection attempt to the hung server")
    run.stop()


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_cancellation_inside_a_statement_on_a_frozen_connection(
    runtime: str, installed: str, fault_proxy: FaultProxy
) -> None:
    async def main() -> tuple[float, int | None]:
        scheduler = pgherald.AsyncScheduler(
            fault_proxy.dsn_for(installed), max_wait=0.05, statement_timeout=60
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(scheduler.run)
            with anyio.fail_after(10):
                while scheduler.backend_pid is None:  # noqa: ASYNC110 (no event to await)
                    await anyio.sleep(0.01)
            pid = scheduler.backend_pid
            fault_proxy.freeze()  # within max_wait its next statement gets no answer
            await await_until(
                lambda: scheduler._engine.statement is not None, 5, "a statement in flight"
            )
            started = time.monotonic()
            tg.cancel_scope.cancel()
        took = time.monotonic() - started
        assert scheduler.backend_pid is None  # its connection closed on the way out
        return took, pid

    took, pid = anyio.run(main, backend=runtime)
    assert pid is not None
    assert took < 0.5, f"cancellation took {took:.2f}s"


# -- what ends run(): only what retrying cannot fix --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_dropped_database_ends_run_after_three_attempts(
    runtime: str, server: OwnServer, schedulers: Callable[..., SchedulerRun]
) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE doomed")
    dsn = server.dsn.rsplit("/", 1)[0] + "/doomed"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
    run = schedulers(runtime, dsn, **FAST)
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE doomed WITH (FORCE)")
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert isinstance(run.error, pgherald.ConnectError), repr(run.error)
    assert 'database "doomed" does not exist' in str(run.error)
    assert run.scheduler.connect_failures == 3


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_schema_dropped_under_a_running_scheduler_says_install(
    runtime: str, installed: str, conn: psycopg.Connection, schedulers: Callable[..., SchedulerRun]
) -> None:
    run = schedulers(runtime, installed, **FAST)
    pgherald.uninstall(conn)
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert isinstance(run.error, pgherald.SchemaMissing), repr(run.error)
    assert "pgherald install" in str(run.error)


def test_one_run_at_a_time_and_options_are_checked(installed: str) -> None:
    with pytest.raises(pgherald.UsageError, match="statement_timeout must be a number"):
        pgherald.Scheduler(installed, statement_timeout=0)
    with pytest.raises(pgherald.UsageError, match="max_wait must be a number"):
        pgherald.AsyncScheduler(installed, max_wait=float("inf"))
    scheduler = pgherald.Scheduler(installed)
    scheduler.stop()  # before run: that run ends at once
    scheduler.run()
    started = threading.Event()

    def main() -> None:
        started.set()
        scheduler.run()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    started.wait(5)
    wait_until(lambda: scheduler.backend_pid is not None, 10, "run() to connect")
    with pytest.raises(pgherald.UsageError, match="already running"):
        scheduler.run()
    scheduler.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_with_checks_the_server_and_the_schema(dsn: str) -> None:
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"), pgherald.Scheduler(dsn):
        pass  # the test database has no schema: refused on entry, not in run()'s retries
    port = free_port()  # a port nobody listens on
    unreachable = f"host=127.0.0.1 port={port} user=postgres connect_timeout=2"
    with (
        pytest.raises(pgherald.ConnectError, match="cannot connect"),
        pgherald.Scheduler(unreachable),
    ):
        pass
