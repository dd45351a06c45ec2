"""The log's partition count: set at install (up to 256), changed by `repartition`."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

import pgherald
from tests.fix_durable import FAST, Running, drain, wait_until


def spread(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT DISTINCT partition FROM pgherald.events_v1")}


def test_install_with_64_partitions_lets_a_group_grow_past_16(
    dsn: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    pgherald.install(conn, partitions=64)  # (the fixture installed: this repartitions)
    assert pgherald.partition_count(conn) == 64
    ids = pgherald.publish_many(conn, "ch", list(range(2000)))
    assert spread(conn) == set(range(64))
    members = [running(group="wide") for _ in range(20)]  # more than 16 members
    # At least once: members join one by one, and a partition handed over between a read and
    # its acknowledgement comes again to its new holder; so wait for every event, not a count.
    wait_until(
        lambda: {e.id for m in members for e in list(m.seen)} >= set(ids),
        15,
        "the 20 members to share it",
    )

    def balanced() -> pgherald.GroupInfo | None:
        (info,) = pgherald.list_groups(conn, groups=["wide"])
        working = [m for m in info.members if m.partitions]
        held = sorted(p for m in info.members for p in m.partitions)
        # Every member at work, past 16, and every partition held (not mid-handover).
        return info if len(working) == 20 and held == list(range(64)) else None

    info = wait_until(balanced, 15, "all 20 members to hold partitions")
    held = sorted(p for m in info.members for p in m.partitions)
    assert held == list(range(64))
    assert sorted({e.id for m in members for e in m.seen}) == ids


def test_repartition_keeps_every_event_and_skips_none(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    first = pgherald.publish_many(conn, "ch", list(range(100)))
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        assert sorted(e.id for e in drain(c, 100)) == first
    later = pgherald.publish_many(conn, "ch", list(range(100, 150)))
    r = running(group="g")
    with pytest.raises(pgherald.UsageError, match="stop every consumer first"):
        pgherald.repartition(conn, 32)
    r.wait_count(50)
    r.stop()
    assert sorted(r.ids) == later
    last = pgherald.publish_many(conn, "ch", list(range(150, 200)))
    assert pgherald.repartition(conn, 32) == 16
    assert pgherald.partition_count(conn) == 32
    assert spread(conn) <= set(range(32))
    assert len(spread(conn)) > 16
    got: list[int] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        for e in c:  # nothing skipped (some may come again)
            got.append(e.id)
            if set(last) <= set(got):
                c.stop()
    assert set(got) <= set(first + later + last)
    assert len(got) < 200  # again at most what an old partition had not passed
    assert pgherald.repartition(conn, 16) == 32  # and back, as installed
    assert pgherald.partition_count(conn) == 16


def test_bad_partition_counts_are_refused(dsn: str, conn: psycopg.Connection) -> None:
    for bad in (0, 257, "16", True):
        with pytest.raises(pgherald.UsageError, match="from 1 to 256"):
            pgherald.install(conn, partitions=bad)  # type: ignore[arg-type]
