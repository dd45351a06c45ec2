"""
`ChangeStream.into_log` with its log connection severed or frozen *during the backfill* of a new
slot (docs/cdc.md, "Backfill" and "Exactly once into the durable log"): every row of the
snapshot is stored once as a READ event, then every change made during and after the backfill
once, in commit order, and the stream goes on.

Where the fault lands is made certain by a gate, not by timing: the publication has two tables,
``a`` and ``b``, backfilled in that order, and a trigger on the log (in this test's database
only) makes each insert of an event of ``b`` wait for an advisory lock that the test holds. The
backfill stores all of ``a`` in the log's open transaction, then waits at the gate: the test sees
it wait, breaks the log's connection, and opens the gate.

When what is lost is only the answer to the backfill's COMMIT (the COMMIT reached the server
and the backfill is in the log), the backfill must not come again: the gate then holds the
backfill's last insert only; the test freezes what the log's connection sends, opens the gate,
sees the COMMIT held in the proxy, freezes what the server sends and lets the COMMIT through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeStream
from pgherald._cdc import add_tables
from pgherald._protocol.pgoutput import lsn_to_int
from tests.fix_faults import OneWayProxy, await_until
from tests.integration.test_cdc import (
    FAST,
    add_gate,
    into_log_async,
    into_log_behind_the_gate,
    into_log_on_a_thread,
    log_connection_losses,
    one,
    sql,
)

ROWS = 3000  # per table: three of into_log's batches (1000) each
STATEMENT_TIMEOUT = 3.0  # a frozen log connection is found after this long


def stored(dsn: str) -> list[tuple[str, str, str, Any, int]]:
    """(op, table, key, new, cdc_lsn) of every event in the log, in the log's order."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT payload->>'op', channel, key, payload->'new', headers->>'cdc_lsn'"
            " FROM pgherald.events_v1 ORDER BY id"
        ).fetchall()
    return [(op, ch, key, new, lsn_to_int(lsn)) for op, ch, key, new, lsn in rows]


def reads(dsn: str) -> int:
    return int(one(dsn, "SELECT count(*) FROM pgherald.events_v1 WHERE payload->>'op' = 'READ'"))


def table_rows(dsn: str, table: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(f"SELECT id, v FROM {table}".encode()).fetchall()
    return {str(i): {"id": i, "v": v} for i, v in rows}


def waits_at_gate(dsn: str) -> bool:
    """The log's connection stores the first event of b: it waits at the gate."""
    return bool(
        one(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'pgherald-cdc-log' AND wait_event_type = 'Lock'"
            " AND wait_event = 'advisory'",
        )
    )


def log_in_transaction(dsn: str) -> bool:
    """The log's connection has written in its open transaction (the backfill stored so far)."""
    return bool(
        one(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'pgherald-cdc-log' AND backend_xid IS NOT NULL",
        )
    )


def inserted(dsn: str) -> int:
    """Rows inserted into the log so far, committed or not (the identity's sequence)."""
    return int(
        one(
            dsn,
            "SELECT coalesce(last_value, 0) FROM pg_sequences"
            " WHERE schemaname = 'pgherald' AND sequencename = 'events_v1_id_seq'",
        )
        or 0
    )


def check_backfill_then(dsn: str, changes: list[tuple[str, str, str]]) -> None:
    """
    The log holds every row of both tables once, as READ, before anything streamed, all at
    the slot's start and as the snapshot saw them; then *changes* (op, table, key) once each,
    in commit order; and replayed, it gives the tables as they are.
    """
    events = stored(dsn)
    backfill = [e for e in events if e[0] == "READ"]
    assert len(backfill) == 2 * ROWS
    assert events[: 2 * ROWS] == backfill
    assert sorted((t, int(k)) for _, t, k, _, _ in backfill) == [
        (t, i) for t in ("public.a", "public.b") for i in range(1, ROWS + 1)
    ]
    assert len({lsn for *_, lsn in backfill}) == 1
    # The snapshot's rows: before the changes made during the backfill.
    assert {k: new for _, t, k, new, _ in backfill if t == "public.a"}["1"] == {"id": 1, "v": "a"}
    streamed = events[2 * ROWS :]
    assert [(op, t, k) for op, t, k, _, _ in streamed] == changes
    lsns = [backfill[0][4]] + [lsn for *_, lsn in streamed]
    assert lsns == sorted(set(lsns))
    replayed: dict[str, dict[str, Any]] = {"public.a": {}, "public.b": {}}
    for op, t, k, new, _ in events:
        if op == "DELETE":
            del replayed[t][k]
        else:
            replayed[t][k] = new
    assert replayed == {"public.a": table_rows(dsn, "a"), "public.b": table_rows(dsn, "b")}


# Changes a test makes while the backfill is under way, and the changes they stream.
DURING_BACKFILL = (
    "INSERT INTO a VALUES (100001, 'new')",
    "UPDATE a SET v = 'changed' WHERE id = 1",
    "DELETE FROM a WHERE id = 2",
)
DURING_BACKFILL_CHANGES = [
    ("INSERT", "public.a", "100001"),
    ("UPDATE", "public.a", "1"),
    ("DELETE", "public.a", "2"),
]


def two_tables(dsn: str, slot: str) -> None:
    """The log, and ``a`` and ``b`` of ROWS rows each in a publication (the stream makes the slot)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
    sql(
        dsn,
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
        "CREATE TABLE b (id int PRIMARY KEY, v text)",
        f"INSERT INTO a SELECT g, 'a' FROM generate_series(1, {ROWS}) g",
        f"INSERT INTO b SELECT g, 'b' FROM generate_series(1, {ROWS}) g",
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        add_tables(c, ["a", "b"], slot=slot, create_slot=False)


async def later_change_in_the_log(dsn: str, errors: list[BaseException]) -> None:
    """A change made after the fault reaches the log: the stream went on."""
    sql(dsn, "INSERT INTO a VALUES (100002, 'later')")
    await await_until(
        lambda: (
            one(dsn, "SELECT count(*) FROM pgherald.events_v1 WHERE key = %s", "100002") or errors
        ),
        10,
        "a later change in the log",
    )


async def _backfill_log_fault(
    dsn: str,
    proxy: OneWayProxy,
    into_log: Callable[[Any, str], Any],
    make: Any,
    fault: str,
    slot: str,
) -> None:
    two_tables(dsn, slot)
    add_gate(dsn, "NEW.channel = 'public.b'")
    stream = make(dsn, slot=slot, backfill=True, statement_timeout=STATEMENT_TIMEOUT, **FAST)
    async with into_log_behind_the_gate(dsn, proxy, into_log, stream) as (log, errors, open_gate):
        await await_until(lambda: waits_at_gate(dsn) or errors, 10, "the backfill of b")
        assert errors == []
        # Mid-backfill: a is in the log's open transaction, nothing is committed yet.
        assert log_in_transaction(dsn)
        assert inserted(dsn) >= ROWS
        assert reads(dsn) == 0
        sql(dsn, *DURING_BACKFILL)  # after the slot's snapshot: streamed after it
        accepted = proxy.accepted
        if fault == "sever":
            proxy.sever()
        else:
            assert proxy.freeze() == 1  # the log's connection only
        open_gate()
        sql(dsn, "UPDATE b SET v = 'changed' WHERE id = 3")
        await await_until(
            lambda: proxy.accepted > accepted or errors,
            STATEMENT_TIMEOUT + 5,
            "a new log connection",
        )
        await await_until(lambda: reads(dsn) >= 2 * ROWS or errors, 15, "the backfill in the log")
        assert errors == []
        await later_change_in_the_log(dsn, errors)
    assert errors == []
    lost = log_connection_losses(log)
    assert lost, "the lost log connection was not reported"
    if fault == "freeze":
        assert f"no answer in {STATEMENT_TIMEOUT:g}s" in lost[0]
    # The backfill started again in its snapshot; the stream itself was never lost.
    assert log.matching("starts again, from the same snapshot")
    assert not log.matching("change stream lost")

    check_backfill_then(
        dsn,
        [
            *DURING_BACKFILL_CHANGES,
            ("UPDATE", "public.b", "3"),
            ("INSERT", "public.a", "100002"),
        ],
    )


FAULTS = ["sever", "freeze"]


@pytest.mark.parametrize("fault", FAULTS)
def test_into_log_with_its_log_connection_at_fault_during_the_backfill(
    cdc_dsn: str, log_proxy: OneWayProxy, fault: str
) -> None:
    anyio.run(
        _backfill_log_fault,
        cdc_dsn,
        log_proxy,
        into_log_on_a_thread,
        ChangeStream,
        fault,
        f"s_fill_{fault}",
    )


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS)
async def test_async_into_log_with_its_log_connection_at_fault_during_the_backfill(
    cdc_dsn: str, log_proxy: OneWayProxy, fault: str
) -> None:
    await _backfill_log_fault(
        cdc_dsn, log_proxy, into_log_async, pgherald.AsyncChangeStream, fault, f"s_fill_{fault}"
    )


async def _backfill_commit_answer_lost(
    dsn: str,
    proxy: OneWayProxy,
    into_log: Callable[[Any, str], Any],
    make: Any,
    slot: str,
) -> None:
    two_tables(dsn, slot)
    # The backfill's last row: its insert is the last statement before the COMMIT.
    add_gate(dsn, f"NEW.channel = 'public.b' AND NEW.key = '{ROWS}'")
    stream = make(dsn, slot=slot, backfill=True, statement_timeout=STATEMENT_TIMEOUT, **FAST)
    async with into_log_behind_the_gate(dsn, proxy, into_log, stream) as (log, errors, open_gate):
        await await_until(lambda: waits_at_gate(dsn) or errors, 15, "the backfill's last insert")
        assert errors == []
        # The whole backfill is in the log's open transaction; nothing is committed.
        assert inserted(dsn) == 2 * ROWS
        assert reads(dsn) == 0
        sql(dsn, *DURING_BACKFILL)  # after the slot's snapshot: streamed after it
        assert proxy.freeze_requests() == 1  # the log's connection only
        open_gate()
        await await_until(lambda: b"COMMIT\x00" in proxy.held() or errors, 5, "COMMIT in flight")
        # The COMMIT reaches the server; its answer never reaches into_log.
        accepted = proxy.accepted
        assert proxy.freeze_answers() == 1
        proxy.thaw_requests()
        await await_until(lambda: reads(dsn) == 2 * ROWS or errors, 5, "the backfill committed")
        assert errors == []
        assert proxy.accepted == accepted  # into_log still awaits the answer
        await await_until(
            lambda: proxy.accepted > accepted or errors,
            STATEMENT_TIMEOUT + 5,
            "a new log connection",
        )
        await later_change_in_the_log(dsn, errors)
    assert errors == []
    lost = log_connection_losses(log)
    assert lost, "the lost log connection was not reported"
    assert f"no answer in {STATEMENT_TIMEOUT:g}s" in lost[0]
    # The backfill was found in the log: it did not start again; the stream was never lost.
    assert not log.matching("starts again, from the same snapshot")
    assert log.matching("is in the log already (the answer to its commit was lost)")
    assert not log.matching("change stream lost")

    check_backfill_then(
        dsn,
        [
            *DURING_BACKFILL_CHANGES,
            ("INSERT", "public.a", "100002"),
        ],
    )


def test_into_log_when_the_answer_to_the_backfills_commit_is_lost(
    cdc_dsn: str, log_proxy: OneWayProxy
) -> None:
    anyio.run(
        _backfill_commit_answer_lost,
        cdc_dsn,
        log_proxy,
        into_log_on_a_thread,
        ChangeStream,
        "s_fill_answer",
    )


@pytest.mark.anyio
async def test_async_into_log_when_the_answer_to_the_backfills_commit_is_lost(
    cdc_dsn: str, log_proxy: OneWayProxy
) -> None:
    await _backfill_commit_answer_lost(
        cdc_dsn, log_proxy, into_log_async, pgherald.AsyncChangeStream, "s_fill_answer"
    )
