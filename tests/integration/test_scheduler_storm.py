"""
Two schedulers in a storm of real faults, on every runtime.

Two `Scheduler`s (`AsyncScheduler`s on asyncio and trio), each through a proxy of its own,
serve one database while a publisher writes delayed events due over the storm's window (and a
little past it), and a ticker makes the ticks of three yearly schedules fall due during it (it
sets a schedule's ``next_tick`` to about now, each time the tick it made due before has been
published). Meanwhile faults come one after the other, picked at random: a scheduler's backend
terminated or its statement cancelled (also while it sets up a new connection: found by its
name in ``pg_stat_activity``), its connection severed, frozen for a while (half-open) or its
proxy refusing reconnections for a while. Then the faults stop and the schedulers must
catch up. What docs/durable.md promises must hold: "each exactly once however many schedulers
run at once":

- every delayed event enters the log exactly once, never before its ``deliver_at`` (the log
  row's ``created_at``, the release's transaction time on the server's clock, is not earlier);
- every tick made due is published exactly once (and not before it was due);
- nothing else is published;
- `run()` keeps going through every fault, logs no error or traceback, and ends within 2 s of
  `stop()`.

Cancelling a scheduler's session while it set up a new connection (its LISTEN) ended `run()`
with `ListenError`; it now starts over on a new connection, as after a lost one. (That window
is short: the storm reaches it seldom, a loop of severs and cancels at once.)

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_chaos import STORM, Fault, Paced, backend_faults, chaos_seed, proxy_faults, storm
from tests.fix_durable import SchedulerRun
from tests.fix_faults import FaultProxy, wait_until, watching

RUNTIMES = ["sync", "asyncio", "trio"]
LATER = "later"  # the delayed events' channel
TICKS = "ticks"  # the schedules' channel
# Yearly: no tick of their own falls due during the test, only those the ticker makes due.
SCHEDULES = {"new-year": "0 0 1 1 *", "midsummer": "0 12 1 7 *", "ides": "30 6 15 3 *"}
OPTIONS: dict[str, Any] = {
    "max_wait": 0.2,
    # A frozen connection is replaced after max_wait + 1 s; a connection attempt caught by a
    # freeze gives up after 2 s (the defaults are 10 s).
    "statement_timeout": 1.0,
    "connect_timeout": 2.0,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.5,
}
Delayed = tuple[int, datetime]  # (n, deliver_at)
Tick = tuple[str, datetime]  # (schedule, the tick made due)


def delayed_step(until: float) -> Any:
    """One or two delayed events, due between a moment ago and *until* (a `time.time()`)."""

    def step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[Delayed]:
        batch: list[Delayed] = []
        for i in range(n, n + rng.randint(1, 2)):
            now = time.time()
            due = datetime.fromtimestamp(rng.uniform(now - 0.2, max(now, until)), timezone.utc)
            pgherald.publish(conn, LATER, {"n": i, "due": due.isoformat()}, deliver_at=due)
            batch.append((i, due))
        return batch

    return step


def tick_step() -> Any:
    """
    Make a schedule's tick due about now (from 0.2 s ago to 0.4 s ahead), if the one made due
    before was published (its ``last_tick``): else it would be moved, not published. A
    wake-up with it, or not (then the schedulers find it within max_wait).
    """
    made: dict[str, datetime | None] = dict.fromkeys(SCHEDULES)

    def step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[Tick]:
        name = rng.choice(sorted(SCHEDULES))
        row = conn.execute(
            "UPDATE pgherald.schedules_v1"
            " SET next_tick = clock_timestamp() + %s * interval '1 second'"
            " WHERE name = %s AND last_tick IS NOT DISTINCT FROM %s RETURNING next_tick",
            (rng.uniform(-0.2, 0.4), name, made[name]),
        ).fetchone()
        if row is None:
            return []
        if rng.random() < 0.5:
            conn.execute("NOTIFY pgherald_wake_v1")
        made[name] = row[0]
        return [(name, row[0])]

    return step


def session_of(conn: psycopg.Connection[Any], i: int) -> int | None:
    """
    Scheduler *i*'s newest session, by its name in ``pg_stat_activity``: also while it sets
    up (its ``backend_pid`` is None until its LISTEN is done), as an operator would find it.
    """
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        " AND datname = current_database() ORDER BY backend_start DESC LIMIT 1",
        (f"pgherald-schedule storm-{i}",),
    ).fetchone()
    return None if row is None else int(row[0])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_two_schedulers_through_a_storm_of_faults(
    runtime: str,
    installed: str,
    conn: psycopg.Connection[Any],
    fault_proxies: list[FaultProxy],
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    for name, cron in SCHEDULES.items():
        pgherald.add_schedule(conn, name, cron, TICKS, {"schedule": name})
    report = f"seed {seed}"
    with watching("pgherald") as log:
        runs: list[SchedulerRun] = []
        try:
            for i, p in enumerate(fault_proxies):
                dsn = f"{p.dsn_for(installed)} application_name=storm-{i}"
                runs.append(SchedulerRun(runtime, dsn, **OPTIONS))
            # Events due over the storm and up to a second after it; ticks due during it.
            publisher = Paced(installed, delayed_step(time.time() + STORM + 1.0), pace=0.02)
            ticker = Paced(installed, tick_step(), pace=0.1)
            try:
                faults: dict[str, Fault] = {}
                for i, p in enumerate(fault_proxies):
                    faults |= proxy_faults(p, str(i))
                    faults |= backend_faults(conn, lambda i=i: session_of(conn, i), str(i))
                # Each scheduler loses a connection at least once; then faults at random.
                done = storm(rng, faults, first=["sever 0", "sever 1"])
            finally:
                made = ticker.stop()
                delayed = publisher.stop()
            report = f"seed {seed}; faults: {', '.join(done)}"
            for run in runs:
                assert run.thread.is_alive(), f"run() ended: {run.error!r} ({report})"

            def caught_up() -> bool:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE channel = %s),"
                    " count(*) FILTER (WHERE channel = %s) FROM pgherald.events_v1",
                    (LATER, TICKS),
                ).fetchone()
                return row is not None and row[0] >= len(delayed) and row[1] >= len(made)

            wait_until(caught_up, 30, f"every delayed event and every tick ({report})")
            for run in runs:
                run.stop(within=2.0)
        finally:
            for run in runs:
                run.end()
        troubles = [
            f"{r.levelname} {r.getMessage()}"
            for r in log.records
            if r.levelno >= 40 or r.exc_info is not None
        ]

    counts = ", ".join(
        f"scheduler {i}: {r.scheduler.released} released, {r.scheduler.ticks} ticks,"
        f" {r.scheduler.reconnects} reconnects"
        for i, r in enumerate(runs)
    )
    report = f"{report}; {counts}"
    assert troubles == [], f"errors logged: {troubles[:5]} ({report})"
    rows = conn.execute(
        "SELECT channel, payload, headers->>'pgherald_schedule',"
        " CAST(headers->>'pgherald_tick' AS timestamptz), created_at FROM pgherald.events_v1"
    ).fetchall()
    assert {r[0] for r in rows} <= {LATER, TICKS}, f"published elsewhere ({report})"

    released = sorted(r[1]["n"] for r in rows if r[0] == LATER)
    assert released == sorted(n for n, _ in delayed), (
        f"delayed events lost or doubled: {_odd(released, [n for n, _ in delayed])} ({report})"
    )
    early = [
        (r[1]["n"], r[4] - datetime.fromisoformat(r[1]["due"]))
        for r in rows
        if r[0] == LATER and r[4] < datetime.fromisoformat(r[1]["due"])
    ]
    assert early == [], f"delayed events released before their time: {early[:5]} ({report})"

    ticked = sorted((r[2], r[3]) for r in rows if r[0] == TICKS)
    assert ticked == sorted(made), (
        f"ticks lost, doubled or not made due: {_odd(ticked, made)} ({report})"
    )
    early_ticks = [(r[2], r[3], r[4]) for r in rows if r[0] == TICKS and r[4] < r[3]]
    assert early_ticks == [], f"ticks published before their time: {early_ticks} ({report})"
    # The storm did reach both: each came back from at least one lost connection.
    assert all(r.scheduler.reconnects >= 1 for r in runs), report
    assert len(made) >= 10, f"too few ticks made due: {len(made)} ({report})"


def _odd(got: list[Any], expected: list[Any]) -> str:
    """What differs: missing and extra (a double is extra), a few of each."""
    left = list(got)
    missing = []
    for x in expected:
        if x in left:
            left.remove(x)
        else:
            missing.append(x)
    return f"missing {missing[:5]} ({len(missing)}), extra {left[:5]} ({len(left)})"
