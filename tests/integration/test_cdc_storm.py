"""
Change data capture into the durable log in a storm of real faults, on every runtime.

Two writers insert rows ``(writer, seq)``, one to three per transaction, into a captured table,
while `ChangeStream.into_log` (on a thread, asyncio and trio) stores the changes. Its
replication connection and its log connection each go through a proxy and meet faults one
after the other, picked at random: the stream's server process (the walsender) terminated, a
connection severed, frozen for a while, or refused for a while. Then the faults stop and the
log must
catch up. What docs/cdc.md promises must hold: every change stored exactly once ("stores each
source transaction's changes ... in one database transaction ... skips every transaction that
committed at or before that LSN"), in commit order (the commit LSN never goes back, each
writer's rows in its order), whole transactions (one ``cdc_lsn`` per source transaction);
`into_log` keeps going through every fault ("Reconnects after a dropped connection ... resumes
from what it acknowledged"; "A frozen connection is found") and ends on `stop()`.

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgherald
from pgherald._protocol.pgoutput import lsn_to_int
from tests.fix_chaos import Paced, backend_faults, chaos_seed, proxy_faults, storm
from tests.fix_durable import _OnAThread
from tests.fix_faults import FaultProxy, wait_until
from tests.fix_proxy import _target_of
from tests.fix_server import OwnServer
from tests.integration.test_cdc import FAST, confirmed, current_lsn

RUNTIMES = ["sync", "asyncio", "trio"]


class IntoLog:
    """`into_log` of a stream of one runtime, on a thread (``run`` for `_OnAThread`)."""

    def __init__(self, stream: Any, log_dsn: str) -> None:
        self.stream = stream
        self.log_dsn = log_dsn

    def run(self) -> Any:
        return self.stream.into_log(self.log_dsn)

    def stop(self) -> None:
        self.stream.stop()


@pytest.fixture
def proxies(logical_server: OwnServer) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """The stream's proxy, and the log's."""
    made = (FaultProxy(_target_of(logical_server.dsn)), FaultProxy(_target_of(logical_server.dsn)))
    yield made
    for p in made:
        p.close()


def walsender(conn: psycopg.Connection[Any], slot: str) -> int | None:
    row = conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def log_size(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_into_log_through_a_storm_of_faults(
    runtime: str, cdc_dsn: str, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    proxy, log_proxy = proxies
    seed = chaos_seed()
    rng = random.Random(seed)
    slot = "storm"
    with psycopg.connect(cdc_dsn, autocommit=True) as conn:
        pgherald.install(conn)
        conn.execute("CREATE TABLE w (writer int, seq int, PRIMARY KEY (writer, seq))")
        conn.execute(f"CREATE PUBLICATION {slot} FOR TABLE w")
        conn.execute(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        cls = pgherald.ChangeStream if runtime == "sync" else pgherald.AsyncChangeStream
        stream = cls(proxy.dsn_for(cdc_dsn), slot=slot, create=False, **FAST)
        running = _OnAThread(runtime, IntoLog(stream, log_proxy.dsn_for(cdc_dsn)))

        def writes(writer: int) -> Paced[tuple[int, int]]:
            def step(c: psycopg.Connection[Any], r: random.Random, n: int) -> list[tuple[int, int]]:
                rows = [(writer, seq) for seq in range(n, n + r.randint(1, 3))]
                c.cursor().executemany("INSERT INTO w VALUES (%s, %s)", rows)
                return rows

            return Paced(cdc_dsn, step, pace=0.005)

        writers = [writes(0), writes(1)]
        report = f"seed {seed}"
        try:
            # Storing before the storm: the log's first connection is not retried (documented).
            wait_until(lambda: log_size(conn) or not running.thread.is_alive(), 10, "a change")
            faults = proxy_faults(proxy) | backend_faults(conn, lambda: walsender(conn, slot))
            del faults["cancel"]  # a walsender has no statement to cancel
            faults |= proxy_faults(log_proxy, "log")
            done = storm(rng, faults, first=["sever", "sever log"])  # each ends a session
            written = [w.stop() for w in writers]
            report = f"seed {seed}; faults: {', '.join(done)}"
            assert running.thread.is_alive(), f"into_log ended: {running.error!r} ({report})"
            end = current_lsn(cdc_dsn)  # the insert position (the write one lags, see there)
            wait_until(
                lambda: confirmed(cdc_dsn, slot) >= end, 60, f"the log to catch up ({report})"
            )
            running.stop(within=2.0)
            assert running.error is None, f"{running.error!r} ({report})"
        finally:
            for w in writers:
                w.stop()
            running.end()

        rows = conn.execute(
            "SELECT payload, headers FROM pgherald.events_v1 WHERE channel = 'public.w' ORDER BY id"
        ).fetchall()
        stored = [(r[0]["new"]["writer"], r[0]["new"]["seq"]) for r in rows]
        assert len(stored) == len(set(stored)), f"a change stored twice ({report})"
        assert sorted(stored) == sorted(written[0] + written[1]), f"changes missing ({report})"
        lsns = [lsn_to_int(r[1]["cdc_lsn"]) for r in rows]
        assert lsns == sorted(lsns), f"out of commit order ({report})"
        for writer, rows_written in enumerate(written):
            assert [s for w, s in stored if w == writer] == [s for _, s in rows_written], report
        # Whole transactions: each writer's transaction is one cdc_lsn, and one lsn one writer's.
        by_lsn: dict[int, set[int]] = {}
        for (w, _), lsn in zip(stored, lsns, strict=True):
            by_lsn.setdefault(lsn, set()).add(w)
        assert all(len(ws) == 1 for ws in by_lsn.values()), report
        assert running.obj.stream._engine.reconnects >= 1, report
