"""Consumer groups as an operator sees them: list, reset, delete, abandonment, lag estimates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import pgherald
from pgherald import _groups
from tests.fix_durable import Running, drain, uncovered, wait_until


def group(conn: psycopg.Connection, name: str, **kw: object) -> pgherald.GroupInfo:
    [found] = pgherald.list_groups(conn, groups=[name], **kw)  # type: ignore[arg-type]
    return found


def create(dsn: str, name: str, start: str | int = "beginning") -> None:
    """A group at *start*, with no member (a consumer that joined and left)."""
    with pgherald.Consumer(dsn, group=name, start=start):
        pass


def test_list_shows_members_partitions_lag_and_activity(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    for i in range(3):
        pgherald.publish(conn, "a", i)
    for i in range(2):
        pgherald.publish(conn, "b", i)
    create(installed, "idle")
    members = [running(group="live", channels=("a",)) for _ in range(2)]

    def settled() -> pgherald.GroupInfo | None:
        g = group(conn, "live")
        held = [p for m in g.members for p in m.partitions]
        fair = [len(m.partitions) for m in g.members] == [8, 8]
        return g if fair and sorted(held) == list(range(16)) else None

    live = wait_until(settled, 10, "two members holding 8 partitions each")
    wait_until(lambda: group(conn, "live").lag_events == 0, 5, "the live group to catch up")
    assert sum(len(r.seen) for r in members) == 3
    pids = {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT pid, application_name, host(client_addr) FROM pg_stat_activity"
        )
    }
    for m in live.members:
        assert (m.application_name, m.client_addr) == pids[m.pid]
        assert "pgherald-consumer" in (m.application_name or "")
        assert m.connected_at is not None
    assert {m.pid for m in live.members} == {
        r[0]
        for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'pgherald-consumer%'"
        )
    }

    idle = group(conn, "idle")
    assert idle.members == ()
    assert (idle.lag_events, idle.lag_estimated) == (5, False)
    assert idle.lag_by_channel == {"a": 3, "b": 2}
    assert idle.lag_seconds >= 0
    now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    assert now - timedelta(minutes=1) < idle.last_activity <= now
    assert group(conn, "idle", channels=["b"]).lag_events == 2
    assert group(conn, "idle", channels=["nothing"]).lag_events == 0
    assert [g.name for g in pgherald.list_groups(conn)] == ["idle", "live"]


def test_lag_past_the_scan_is_estimated_closely(installed: str, conn: psycopg.Connection) -> None:
    n = 100_000
    for lo in range(1, n + 1, 20_000):  # short transactions (other tests' readers wait for xmin)
        conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload) "
            "SELECT CASE WHEN i %% 4 = 0 THEN 'rare' ELSE 'common' END, '1' "
            "FROM generate_series(%s::int, %s::int) AS i",
            (lo, lo + 19_999),
        )
    create(installed, "behind")
    g = group(conn, "behind")
    assert g.lag_estimated
    assert abs(g.lag_events - n) < n * 0.05, g.lag_events
    assert abs(g.lag_by_channel["rare"] - n / 4) < n * 0.05, g.lag_by_channel
    rare = group(conn, "behind", channels=["rare"])
    assert abs(rare.lag_events - n / 4) < n * 0.05
    # A group near the head is counted exactly again.
    last = conn.execute("SELECT max(id) FROM pgherald.events_v1").fetchone()[0]  # type: ignore[index]
    pgherald.reset_group(conn, "behind", to=last - 9)
    assert (group(conn, "behind").lag_events, group(conn, "behind").lag_estimated) == (10, False)
    _, events, estimated, last_id = _groups.log_size(conn)
    assert (estimated, last_id) == (False, last)
    assert events == n


def test_reset_to_each_start(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    ids = [pgherald.publish(conn, "ch", i) for i in range(5)]
    create(installed, "g")
    with pgherald.Consumer(installed, group="g", poll_interval=0.1) as c:
        assert [e.id for e in drain(c, 5)] == ids
    assert group(conn, "g").lag_events == 0

    pgherald.reset_group(conn, "g", to="beginning")
    assert group(conn, "g").lag_events == 5
    with pgherald.Consumer(installed, group="g", poll_interval=0.1) as c:
        assert [e.id for e in drain(c, 5)] == ids  # all delivered again

    pgherald.reset_group(conn, "g", to=ids[2])
    assert uncovered(conn, "g") == 3  # ids[2] itself and what follows
    at = conn.execute(
        "SELECT created_at FROM pgherald.events_v1 WHERE id = %s", (ids[3],)
    ).fetchone()[0]  # type: ignore[index]
    pgherald.reset_group(conn, "g", to=at)
    assert uncovered(conn, "g") == 2

    pgherald.reset_group(conn, "g", to="now")
    assert group(conn, "g").lag_events == 0
    new = pgherald.publish(conn, "ch", "new")
    with pgherald.Consumer(installed, group="g", poll_interval=0.1) as c:
        assert [e.id for e in drain(c, 1)] == [new]

    with pytest.raises(pgherald.UsageError, match="no event with id 999999"):
        pgherald.reset_group(conn, "g", to=999_999)
    with pytest.raises(pgherald.UsageError, match="'beginning', 'now'"):
        pgherald.reset_group(conn, "g", to="yesterday")
    assert group(conn, "g").lag_events == 0  # the refused resets changed nothing


def test_reset_and_delete_refuse_live_members_and_unknown_groups(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    pgherald.publish(conn, "ch", 1)
    r = running(group="g")
    r.wait_count(1)
    pid = wait_until(lambda: group(conn, "g").members, 5, "a member")[0].pid
    before = conn.execute(
        "SELECT * FROM pgherald.positions_v2 ORDER BY channel, partition"
    ).fetchall()
    with pytest.raises(pgherald.UsageError, match=rf"live members \(server pids {pid}\)"):
        pgherald.reset_group(conn, "g", to="beginning")
    with pytest.raises(pgherald.UsageError, match="stop its consumers first"):
        pgherald.delete_group(conn, "g")
    assert conn.execute(
        "SELECT * FROM pgherald.positions_v2 ORDER BY channel, partition"
    ).fetchall() == (before)
    r.stop()
    pgherald.delete_group(conn, "g")
    assert pgherald.list_groups(conn) == []
    with pytest.raises(pgherald.UsageError, match="no consumer group 'g' to delete"):
        pgherald.delete_group(conn, "g")
    with pytest.raises(pgherald.UsageError, match="no consumer group 'nope' to reset"):
        pgherald.reset_group(conn, "nope")


@pytest.mark.parametrize("call", [pgherald.reset_group, pgherald.delete_group])
def test_reset_and_delete_wait_for_a_member_whose_session_ends_within_a_second(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running], call: Any
) -> None:
    """durable.md: they "wait up to 1 s for a consumer that has just stopped, whose session the
    server may not have ended yet": the member's session ends while the call waits."""
    pgherald.publish(conn, "ch", 1)
    r = running(group="g")
    r.wait_count(1)
    pid = wait_until(lambda: group(conn, "g").members, 5, "a member")[0].pid
    errors: list[BaseException] = []

    def call_it() -> None:
        with psycopg.connect(installed, autocommit=True) as c:
            try:
                call(c, "g")
            except BaseException as exc:
                errors.append(exc)

    t = threading.Thread(target=call_it)
    t.start()
    try:
        wait_until(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0],  # type: ignore[index]
            5,
            "the call to wait for the member's lock",
        )
        # The server ends the member's session (its consumer reconnects and waits to join).
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        t.join(10)
    finally:
        r.stop()
    assert not t.is_alive()
    assert errors == []  # it waited for the lock, rather than refusing a live member


def test_a_consumer_waits_while_a_reset_runs(installed: str, conn: psycopg.Connection) -> None:
    """The reset's lock keeps members out: none can join between the check and the update."""
    create(installed, "g")
    with psycopg.connect(installed) as other, other.transaction():
        pgherald.reset_group(other, "g", to="now")  # lock held until `other` commits
        c = pgherald.Consumer(installed, group="g")
        started = time.monotonic()
        joined: list[float] = []

        def join() -> None:
            c.connect()
            joined.append(time.monotonic())

        t = threading.Thread(target=join)
        t.start()
        wait_until(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0],  # type: ignore[index]
            5,
            "the consumer to wait on the group's lock",
        )
        assert not joined
    t.join(10)
    c.close()
    assert joined
    assert joined[0] > started


def test_abandoned_groups_have_no_member_and_old_activity(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    for name in ("old", "recent"):
        create(installed, name)
    r = running(group="busy")
    wait_until(lambda: group(conn, "busy").members, 5, "a member")
    # Its channels' positions are registered at its first read (after it joins): wait for them,
    # or they would be written after the UPDATE below, with a fresh updated_at.
    wait_until(lambda: r.consumer.stats.reads > 0, 5, "a first read")
    conn.execute(
        "UPDATE pgherald.positions_v2 SET updated_at = now() - interval '8 days' "
        "WHERE group_name IN ('old', 'busy')"
    )
    found = _groups.abandoned_groups(conn, timedelta(days=7))
    assert [g for g, _ in found] == ["old"]
    assert _groups.abandoned_groups(conn, timedelta(days=9)) == []
    r.stop()
    # Its session ends on the server a moment after the client closes it (the lock goes then).
    wait_until(lambda: not group(conn, "busy").members, 5, "the member's session to end")
    assert [g for g, _ in _groups.abandoned_groups(conn, timedelta(days=7))] == ["busy", "old"]


def test_in_a_callers_transaction_nothing_is_left_behind(
    installed: str, conn: psycopg.Connection
) -> None:
    create(installed, "g")
    with psycopg.connect(installed) as tx:  # not autocommit: one transaction throughout
        tx.execute("SET LOCAL enable_sort = on")
        assert [g.name for g in pgherald.list_groups(tx)] == ["g"]
        assert tx.execute("SHOW enable_sort").fetchone() == ("on",)  # the lag plan undone
        assert tx.execute("SHOW jit").fetchone() == conn.execute("SHOW jit").fetchone()
        pgherald.delete_group(tx, "g")
        assert [g.name for g in pgherald.list_groups(conn)] == ["g"]  # not committed yet
        tx.rollback()
    assert [g.name for g in pgherald.list_groups(conn)] == ["g"]


def test_before_install_the_error_says_how_to_fix(dsn: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.list_groups(conn)
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.reset_group(conn, "g")
