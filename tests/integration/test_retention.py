"""Retention by whole days: the log's daily partitions, `maintain`, pinning and abandonment."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import pgherald
from tests.fix_durable import FAST, Running, drain, wait_until

DAY = timedelta(days=1)


def partitions(conn: psycopg.Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'pgherald.events_v1'::regclass ORDER BY 1"
        )
    ]


def day_name(at: datetime) -> str:
    return "events_v1_p" + at.astimezone(timezone.utc).strftime("%Y%m%d")


def old_events(conn: psycopg.Connection, channel: str, at: datetime, n: int) -> list[int]:
    """*n* events stored as if at *at* (what a log running for weeks holds)."""
    rows = conn.execute(
        "INSERT INTO pgherald.events_v1 (channel, payload, created_at)"
        " SELECT %s, to_jsonb(i), %s FROM generate_series(1, %s) AS i RETURNING id",
        (channel, at, n),
    )
    return [r[0] for r in rows]


def now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index,no-any-return]


def test_install_makes_the_coming_days_and_publish_lands_in_today(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    names = partitions(conn)
    assert "events_v1_default" in names
    for i in range(4):
        assert day_name(today + i * DAY) in names
    event_id = pgherald.publish(conn, "ch", 1)
    where = conn.execute(
        "SELECT tableoid::regclass::text FROM pgherald.events_v1 WHERE id = %s", (event_id,)
    ).fetchone()
    assert where == (f"pgherald.{day_name(today)}",)
    # Nothing to drop without a retention setting; maintaining again creates nothing new.
    assert [m for m in pgherald.maintain(conn) if m.action != "created"] == []
    assert pgherald.retention(conn).keep is None


def test_a_30_day_retention_drops_whole_old_days_and_keeps_the_rest(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    made = pgherald.maintain(conn, now=today - 40 * DAY)  # as if it ran 40 days ago
    assert {m.target for m in made if m.action == "created"} == {
        f"pgherald.{day_name(today - d * DAY)}" for d in (40, 39, 38, 37)
    }
    for d in (40, 39, 38, 37):
        old_events(conn, "ch", today - d * DAY, 1000)
    recent = pgherald.publish(conn, "ch", "recent")
    pgherald.set_retention(conn, timedelta(days=30))
    assert pgherald.retention(conn).keep == timedelta(days=30)
    done = pgherald.maintain(conn)
    dropped = {m.target for m in done if m.action == "dropped"}
    assert dropped == {f"pgherald.{day_name(today - d * DAY)}" for d in (40, 39, 38, 37)}
    assert not set(partitions(conn)) & {t.removeprefix("pgherald.") for t in dropped}
    assert conn.execute("SELECT array_agg(id) FROM pgherald.events_v1").fetchone() == ([recent],)
    assert day_name(today) in partitions(conn)


def test_a_group_that_has_not_consumed_a_day_pins_it_until_it_is_deleted(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    pgherald.maintain(conn, now=today - 40 * DAY)
    old = old_events(conn, "orders", today - 40 * DAY, 10)
    other = old_events(conn, "other", today - 39 * DAY, 10)
    with pgherald.Consumer(installed, group="slow", channels=["orders"], **FAST):
        pass  # joined (its start: the beginning), consumed nothing
    pgherald.set_retention(conn, timedelta(days=30))
    done = {m.target: m for m in pgherald.maintain(conn)}
    pinned = done[f"pgherald.{day_name(today - 40 * DAY)}"]
    assert (pinned.action, pinned.warning) == ("pinned", True)
    assert "slow" in pinned.detail
    # The other channel's day is nobody's: it goes.
    assert done[f"pgherald.{day_name(today - 39 * DAY)}"].action == "dropped"
    kept = conn.execute("SELECT array_agg(id ORDER BY id) FROM pgherald.events_v1").fetchone()
    assert kept == (old,)
    assert not set(other) & set(old)
    # The group reads it all, then it goes.
    with pgherald.Consumer(installed, group="slow", channels=["orders"], **FAST) as c:
        assert [e.id for e in drain(c, 10)] == old
    assert {m.action for m in pgherald.maintain(conn)} >= {"dropped"}
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


def test_groups_delete_then_maintain_frees_the_log(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    pgherald.maintain(conn, now=today - 40 * DAY)
    old_events(conn, "orders", today - 40 * DAY, 10)
    with pgherald.Consumer(installed, group="gone", channels=["orders"], **FAST):
        pass
    pgherald.set_retention(conn, timedelta(days=30))
    day = f"pgherald.{day_name(today - 40 * DAY)}"
    assert {m.target: m.action for m in pgherald.maintain(conn)}[day] == "pinned"
    pgherald.delete_group(conn, "gone")
    assert {m.target: m.action for m in pgherald.maintain(conn)}[day] == "dropped"
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


def test_an_abandoned_group_no_longer_pins_and_is_named(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    pgherald.maintain(conn, now=today - 40 * DAY)
    old_events(conn, "orders", today - 40 * DAY, 10)
    with pgherald.Consumer(installed, group="left", channels=["orders"], **FAST):
        pass
    with pgherald.Consumer(installed, group="resting", channels=["elsewhere"], **FAST):
        pass
    pgherald.set_retention(conn, timedelta(days=30), abandon_after=timedelta(days=2))
    conn.execute(
        "UPDATE pgherald.positions_v2 SET updated_at = now() - interval '3 days'"
        " WHERE group_name = 'left'"
    )
    conn.execute(
        "UPDATE pgherald.positions_v2 SET updated_at = now() - interval '1.5 days'"
        " WHERE group_name = 'resting'"
    )
    done = pgherald.maintain(conn)
    actions = {(m.action, m.target) for m in done}
    assert ("abandoned", "left") in actions
    assert ("idle", "resting") in actions  # a warning first
    assert ("dropped", f"pgherald.{day_name(today - 40 * DAY)}") in actions


def test_events_stored_before_their_day_had_a_partition_move_into_it(
    installed: str, conn: psycopg.Connection
) -> None:
    later = now(conn) + 30 * DAY  # past the days install made
    ids = old_events(conn, "ch", later, 5)
    where = conn.execute("SELECT DISTINCT tableoid::regclass::text FROM pgherald.events_v1")
    assert where.fetchall() == [("pgherald.events_v1_default",)]
    made = pgherald.maintain(conn, now=later)
    assert ("created", f"pgherald.{day_name(later)}") in {(m.action, m.target) for m in made}
    rows = conn.execute(
        "SELECT id, tableoid::regclass::text FROM pgherald.events_v1 ORDER BY id"
    ).fetchall()
    assert rows == [(i, f"pgherald.{day_name(later)}") for i in ids]


def test_a_running_consumer_maintains_the_log(
    installed: str,
    conn: psycopg.Connection,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    today = now(conn)
    pgherald.maintain(conn, now=today - 40 * DAY)
    old_events(conn, "other", today - 40 * DAY, 10)
    pgherald.set_retention(conn, timedelta(days=30))
    caplog.set_level(logging.INFO, logger="pgherald.consumer")
    r = running(group="g", channels=("ch",), maintain_interval=0.2)
    wait_until(
        lambda: day_name(today - 40 * DAY) not in partitions(conn),
        10,
        "the consumer to drop the day past retention",
    )
    r.stop()
    assert "maintain: dropped" in caplog.text


def test_a_channel_may_keep_its_events_longer_or_shorter(
    installed: str, conn: psycopg.Connection
) -> None:
    today = now(conn)
    pgherald.maintain(conn, now=today - 40 * DAY)
    audit = old_events(conn, "audit", today - 40 * DAY, 3)
    old_events(conn, "noise", today - 39 * DAY, 3)
    chatter = old_events(conn, "chatter", today - 3 * DAY, 3)
    fresh = pgherald.publish(conn, "chatter", "fresh")
    pgherald.set_retention(conn, timedelta(days=30))
    pgherald.set_retention(conn, timedelta(days=90), channel="audit")
    pgherald.set_retention(conn, timedelta(days=1), channel="chatter")
    assert pgherald.retention(conn).channels == {
        "audit": timedelta(days=90),
        "chatter": timedelta(days=1),
    }
    done = {(m.action, m.target) for m in pgherald.maintain(conn)}
    assert ("kept", f"pgherald.{day_name(today - 40 * DAY)}") in done  # audit's day
    assert ("dropped", f"pgherald.{day_name(today - 39 * DAY)}") in done
    assert ("deleted", "chatter") in done
    left = [r[0] for r in conn.execute("SELECT id FROM pgherald.events_v1 ORDER BY id")]
    assert left == [*audit, fresh]
    assert not set(chatter) & set(left)
    pgherald.set_retention(conn, None, channel="audit")  # back to the log's 30 days
    done = {(m.action, m.target) for m in pgherald.maintain(conn)}
    assert ("dropped", f"pgherald.{day_name(today - 40 * DAY)}") in done


def test_bad_retention_values_are_refused(installed: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.UsageError, match="positive timedelta"):
        pgherald.set_retention(conn, timedelta(0))
    with pytest.raises(pgherald.UsageError, match="positive timedelta"):
        pgherald.set_retention(conn, "7d")  # type: ignore[arg-type]
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.set_retention(conn, timedelta(days=1), channel="x" * 64)


def test_retention_past_100_years_is_refused(installed: str, conn: psycopg.Connection) -> None:
    """`now() - keep` must stay a date PostgreSQL has: stored, 9999999 weeks made every
    `maintain` (and every consumer's) fail with "timestamp out of range"."""
    too_long = timedelta(days=36526)
    for kwargs in (
        {"keep": too_long},
        {"keep": timedelta.max},
        {"keep": timedelta(days=7), "abandon_after": too_long},
        {"keep": timedelta(days=7), "channel": "audit", "abandon_after": too_long},
        {"keep": too_long, "channel": "audit"},
    ):
        with pytest.raises(pgherald.UsageError, match=r"at most 100 years \(36525d\)"):
            pgherald.set_retention(conn, **kwargs)  # type: ignore[arg-type]
    assert pgherald.retention(conn) == pgherald.Retention(None, timedelta(days=7))
    longest = timedelta(days=36525)
    pgherald.set_retention(conn, longest, abandon_after=longest)
    pgherald.set_retention(conn, longest, channel="audit")
    pgherald.maintain(conn)  # and a group pinning nothing yet: abandon_after is read too
    with pgherald.Consumer(installed, group="g", channels=["audit"]):
        pass
    pgherald.maintain(conn)


def test_maintain_names_the_setting_stored_too_long(
    installed: str, conn: psycopg.Connection
) -> None:
    conn.execute(
        "INSERT INTO pgherald.settings_v1 (name, value) VALUES "
        "('retention', '9999999 weeks'), ('retention:audit', '99999999 weeks')"
    )
    with pytest.raises(pgherald.UsageError) as caught:
        pgherald.maintain(conn)
    message = str(caught.value)
    assert "timestamp out of range" not in message
    assert "retention (69,999,993 days)" in message
    assert "retention of 'audit' (699,999,993 days)" in message
    assert "pgherald retention set" in message
    pgherald.set_retention(conn, timedelta(days=30))
    pgherald.set_retention(conn, None, channel="audit")
    pgherald.maintain(conn)


def test_a_consumer_names_the_fix_for_a_retention_stored_too_long(
    installed: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # Its own maintenance meets the same date out of range: the warning says what to do, and
    # consuming goes on.
    conn.execute(
        "INSERT INTO pgherald.settings_v1 (name, value) VALUES ('retention', '9999999 weeks')"
    )
    pgherald.publish(conn, "ch", 1)
    with pgherald.Consumer(installed, group="g", channels=["ch"], maintain_interval=0.01) as c:
        for event in c:
            assert event.payload == 1
            c.stop()
    warnings = [r.getMessage() for r in caplog.records if "does not maintain" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "pgherald retention set" in warnings[0]
    assert "out of range" not in warnings[0]
