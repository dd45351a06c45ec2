"""
`ChangeStream.into_log` with its log connection frozen while a log transaction's COMMIT is in
flight (docs/cdc.md, "Exactly once into the durable log"): sent by into_log, not yet received by
the server, whose session still holds the transaction open. into_log gives the connection up
after its statement deadline and stores the transaction again on a new one; when the link heals,
the old COMMIT must not store it a second time. So into_log ends the old session before it reads
what the log has.

Where the fault lands is made certain by a gate, not by timing: a trigger on the log (in this
test's database only) makes the insert of the event of row 2 wait for an advisory lock that the
test holds. The test sees it wait, freezes what the log's connection sends (what the server
sends still arrives), and opens the gate: the insert ends, into_log gets its answer and sends
COMMIT into the frozen link, where the test sees it.

A previous session that into_log may not end (another role's) is reported, and the log is
opened all the same.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgherald
from pgherald import ChangeStream
from tests.fix_faults import FaultProxy, OneWayProxy, await_until, watching
from tests.integration.test_cdc import (
    FAST,
    add_gate,
    into_log_async,
    into_log_behind_the_gate,
    into_log_on_a_thread,
    log_connection_losses,
    one,
    slot_ready,
    sql,
)

STATEMENT_TIMEOUT = 2.0  # a frozen log connection is given up after this long


def stored(dsn: str) -> list[tuple[int, str]]:
    """(row id, cdc_lsn) of every event in the log, in the log's order."""
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT (payload -> 'new' ->> 'id')::int, headers->>'cdc_lsn'"
            " FROM pgherald.events_v1 ORDER BY id"
        ).fetchall()
    return [(i, lsn) for i, lsn in rows]


def log_session(dsn: str, state: str, wait_event: str | None = None) -> int | None:
    """The pid of the log's session in *state* (waiting on *wait_event*, if given)."""
    pid = one(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'pgherald-cdc-log' AND state = %s"
        " AND (%s::text IS NULL OR wait_event = %s::text)",
        state,
        wait_event,
        wait_event,
    )
    return None if pid is None else int(pid)


def session_alive(dsn: str, pid: int) -> bool:
    return bool(one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid))


async def _commit_in_flight(
    dsn: str, proxy: OneWayProxy, into_log: Callable[[Any, str], Any], make: Any, slot: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
    sql(
        dsn,
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    add_gate(dsn, "NEW.payload -> 'new' ->> 'id' = '2'")
    stream = make(dsn, slot=slot, tables=["t"], statement_timeout=STATEMENT_TIMEOUT, **FAST)
    async with into_log_behind_the_gate(dsn, proxy, into_log, stream) as (log, errors, open_gate):
        await await_until(lambda: slot_ready(dsn, slot) or errors, 10, "the stream")
        sql(dsn, "INSERT INTO t VALUES (1)")
        await await_until(lambda: len(stored(dsn)) == 1 or errors, 10, "change 1")
        sql(dsn, "INSERT INTO t VALUES (2)")
        await await_until(lambda: log_session(dsn, "active", "advisory") or errors, 10, "the gate")
        assert errors == []
        old = log_session(dsn, "active", "advisory")
        assert old is not None
        accepted = proxy.accepted
        assert proxy.freeze_requests() == 1  # the log's connection only
        open_gate()
        # Change 2 is in the old session's open transaction; its COMMIT is on the way.
        await await_until(lambda: b"COMMIT\x00" in proxy.held() or errors, 5, "COMMIT in flight")
        assert log_session(dsn, "idle in transaction") == old
        # into_log gives the connection up and stores change 2 on a new one.
        await await_until(
            lambda: proxy.accepted > accepted or errors,
            STATEMENT_TIMEOUT + 5,
            "a new log connection",
        )
        await await_until(lambda: [i for i, _ in stored(dsn)] == [1, 2] or errors, 10, "change 2")
        # The link heals: what the old connection sent reaches the server.
        proxy.thaw()
        await await_until(lambda: not session_alive(dsn, old), 10, "the old log session to end")
        sql(dsn, "INSERT INTO t VALUES (3)")
        await await_until(lambda: 3 in [i for i, _ in stored(dsn)] or errors, 10, "change 3")
    assert errors == []
    lost = log_connection_losses(log)
    assert lost
    assert f"no answer in {STATEMENT_TIMEOUT:g}s" in lost[0]
    events = stored(dsn)
    # Each source transaction once: the old COMMIT did not store change 2 again.
    assert [i for i, _ in events] == [1, 2, 3]
    assert len({lsn for _, lsn in events}) == 3


def test_into_log_with_a_commit_in_flight_on_its_frozen_log_connection(
    cdc_dsn: str, log_proxy: OneWayProxy
) -> None:
    anyio.run(
        _commit_in_flight, cdc_dsn, log_proxy, into_log_on_a_thread, ChangeStream, "s_inflight"
    )


@pytest.mark.anyio
async def test_async_into_log_with_a_commit_in_flight_on_its_frozen_log_connection(
    cdc_dsn: str, log_proxy: OneWayProxy
) -> None:
    await _commit_in_flight(
        cdc_dsn, log_proxy, into_log_async, pgherald.AsyncChangeStream, "s_inflight_async"
    )


def test_a_previous_log_session_it_may_not_end_is_reported(cdc_dsn: str) -> None:
    """Another role's session (a superuser's): a warning, and the log is opened all the same."""
    from types import SimpleNamespace

    from pgherald._cdc import _LogStore
    from pgherald._waiting import Waiter

    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
    role = f"r_{uuid.uuid4().hex[:10]}"
    sql(
        cdc_dsn,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT USAGE ON SCHEMA pgherald TO {role}",
        f"GRANT SELECT ON pgherald.events_v1 TO {role}",
    )
    config = ChangeStream(cdc_dsn, slot="s_other", tables=["t"]).config
    store = _LogStore(make_conninfo(cdc_dsn, user=role), "s_other", 1, config)
    other = psycopg.connect(cdc_dsn, autocommit=True, application_name="pgherald-cdc-log")
    waiter = Waiter()
    try:
        store.previous = (other.info.backend_pid, "pgherald-cdc-log")
        engine = SimpleNamespace(skip_through=0)
        waiter.open()
        with watching("pgherald.cdc") as log:
            waiter.run(store._open(engine, lambda: False))  # type: ignore[arg-type]
        assert store.pgconn is not None
        assert store.previous is None
        (warning,) = log.matching("could not end the durable log's previous session")
        assert f"(pid {other.info.backend_pid})" in warning.getMessage()
        assert "may be stored twice" in warning.getMessage()
        assert other.execute("SELECT 1").fetchone() == (1,)  # not ended
    finally:
        store._drop()
        waiter.close()
        other.close()
        sql(cdc_dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_the_previous_session_is_ended_after_libpq_saw_its_connection_fail(
    cdc_dsn: str, log_proxy: FaultProxy
) -> None:
    """
    The usual loss: libpq has seen the connection fail (its backend pid then reads 0) while
    the server's session lives on behind a frozen link. The session is still found (by what
    was recorded at connection) and ended before the log is read.
    """
    import os
    from types import SimpleNamespace

    from pgherald._cdc import _LogLost, _LogStore
    from pgherald._waiting import Waiter

    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
    config = ChangeStream(cdc_dsn, slot="s_prev", tables=["t"]).config
    store = _LogStore(log_proxy.dsn_for(cdc_dsn), "s_prev", 1, config)
    waiter = Waiter()
    engine = SimpleNamespace(skip_through=0)
    waiter.open()

    def alive(pid: int) -> bool:
        with psycopg.connect(cdc_dsn, autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return row.fetchone() == (1,)

    try:
        waiter.run(store._open(engine, lambda: False))  # type: ignore[arg-type]
        old = store.pgconn.backend_pid
        log_proxy.freeze()  # the server's session stays, its link frozen
        with socket.socket(fileno=os.dup(store.pgconn.socket)) as ours:
            ours.shutdown(socket.SHUT_RDWR)  # and our side of it fails
        with pytest.raises(_LogLost):
            waiter.run(store._execute(b"SELECT 1", None, lambda: False))
        assert store.pgconn.backend_pid == 0  # what libpq tells of it now
        assert alive(old)
        waiter.run(store._recover(engine, lambda: False, _LogLost("lost")))  # type: ignore[arg-type]
        assert store.pgconn is not None
        assert store.previous is None
        assert not alive(old), "the previous session was not ended"
    finally:
        store._drop()
        waiter.close()
        log_proxy.thaw()
