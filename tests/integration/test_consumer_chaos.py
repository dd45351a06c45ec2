"""
A consumer group in a storm of real faults, on every runtime.

Two members of one group, each through a proxy of its own, consume while a publisher writes
keyed events. Meanwhile faults come one after the other, picked at random: a member's backend
terminated or its statement cancelled, its connection severed, frozen for a while (half-open),
or its proxy refusing reconnections for a while. Then the faults stop and the group must catch
up. What the docs promise must hold through all of it:

- with transactional handlers (sync, asyncio): each event's effect exactly once, and one key's
  effects in publishing order;
- with plain handlers (trio, where psycopg's async connection does not run): every event at
  least once, and one key's events first seen in publishing order;
- delayed events (`deliver_at`, about one transaction in eight) as the others, and none
  handed out before its time;
- no event dead-lettered (no handler failed on its own), and `run()` ends cleanly on `stop()`.

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_chaos import Fault, Paced, backend_faults, chaos_seed, proxy_faults, storm
from tests.fix_durable import ConsumerOnAThread
from tests.fix_faults import FaultProxy, wait_until

RUNTIMES = ["sync", "asyncio", "trio"]
KEYS = 6
LATE = "late"  # the key of delayed events: released at their time, so out of the keys' order
Sent = tuple[int, str, int]  # (the id publish returned, key, n)
OPTIONS: dict[str, Any] = {
    "group": "chaos",
    "channels": ["orders"],
    "poll_interval": 0.2,
    "rebalance_interval": 0.2,
    "health_check_interval": 0.5,
    "health_check_timeout": 0.5,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.5,
    "retry_delay": 0.01,
}


def publish_step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[Sent]:
    """One to three keyed events, and about one transaction in eight a delayed one first."""
    batch: list[Sent] = []
    if rng.random() < 1 / 8:
        due = datetime.now(timezone.utc) + timedelta(seconds=rng.uniform(0, 1.5))
        payload = {"n": n, "due": due.timestamp()}
        batch.append((pgherald.publish(conn, "orders", payload, key=LATE, deliver_at=due), LATE, n))
        n += 1
    for _ in range(rng.randint(1, 3)):
        key = f"k{n % KEYS}"
        batch.append((pgherald.publish(conn, "orders", {"n": n}, key=key), key, n))
        n += 1
    return batch


class Member(ConsumerOnAThread):
    """One member of the group, of one runtime, on a thread."""

    def __init__(self, runtime: str, dsn: str, number: int, seen: list[tuple[int, int]]) -> None:
        cls = pgherald.Consumer if runtime == "sync" else pgherald.AsyncConsumer
        consumer: Any = cls(dsn, application_name=f"chaos-{number}", **OPTIONS)
        # A delayed event enters the log with a new id: events are told apart by their n.
        insert = (
            "INSERT INTO effects (event_id, key, n, member, due, at)"
            " VALUES (%s, %s, %s, %s, %s, extract(epoch FROM clock_timestamp()))"
        )

        def values(e: pgherald.Event) -> tuple[int, str | None, int, int, float | None]:
            return (e.id, e.key, e.payload["n"], number, e.payload.get("due"))

        if runtime == "sync":

            @consumer.on("orders", transactional=True)
            def effect(e: pgherald.Event, conn: psycopg.Connection[Any]) -> None:
                conn.execute(insert, values(e))

        elif runtime == "asyncio":

            @consumer.on("orders", transactional=True)
            async def aeffect(e: pgherald.Event, conn: psycopg.AsyncConnection[Any]) -> None:
                await conn.execute(insert, values(e))

        else:

            @consumer.on("orders")
            async def record(e: pgherald.Event) -> None:
                seen.append((e.payload["n"], time.time() - e.payload.get("due", 0.0)))

        # Connected, in the group, reading before the storm: a first connection's failure is
        # not retried (documented).
        super().__init__(runtime, consumer)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_group_of_two_through_a_storm_of_faults(
    runtime: str,
    installed: str,
    conn: psycopg.Connection[Any],
    fault_proxies: list[FaultProxy],
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    conn.execute(
        "CREATE TABLE effects (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " event_id bigint NOT NULL, key text NOT NULL, n int NOT NULL, member int NOT NULL,"
        " due float8, at float8 NOT NULL)"
    )
    seen: list[tuple[int, float]] = []
    members = [Member(runtime, p.dsn_for(installed), i, seen) for i, p in enumerate(fault_proxies)]
    publisher = Paced(installed, publish_step, pace=0.004)
    try:
        faults: dict[str, Fault] = {}
        for i, (m, p) in enumerate(zip(members, fault_proxies, strict=True)):
            faults |= proxy_faults(p, str(i))
            faults |= backend_faults(conn, lambda m=m: m.consumer.backend_pid, str(i))
        # Each member loses a session at least once; then faults at random.
        done = storm(rng, faults, first=["sever 0", "sever 1"])
        published = publisher.stop()
        report = f"seed {seed}; faults: {', '.join(done)}"
        for m in members:
            assert m.thread.is_alive(), f"run() ended: {m.error!r} ({report})"

        def delivered() -> int:
            if runtime == "trio":
                return len({i for i, _ in seen})
            row = conn.execute("SELECT count(DISTINCT n) FROM effects").fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: delivered() >= len(published), 60, f"every event ({report})")
        for m in members:
            m.stop(within=2.0)
            assert m.error is None, f"{m.error!r} ({report})"
    finally:
        publisher.stop()
        for m in members:
            m.close()

    order = {k: [n for _, key, n in published if key == k] for _, k, _ in published if k != LATE}
    keys = {n: k for _, k, n in published}
    if runtime == "trio":
        assert {n for n, _ in seen} == set(keys), report
        early = [(n, late) for n, late in seen if late < 0]
        first: dict[str, list[int]] = {}
        for n in dict.fromkeys(n for n, _ in seen):  # first sightings, in order
            first.setdefault(keys[n], []).append(n)
    else:
        twice = conn.execute(
            "SELECT n, count(*) FROM effects GROUP BY n HAVING count(*) > 1"
        ).fetchall()
        assert twice == [], f"effects more than once: {twice[:5]} ({report})"
        early = conn.execute("SELECT n, at - due FROM effects WHERE at < due").fetchall()
        first = {}
        for k, n in conn.execute("SELECT key, n FROM effects ORDER BY seq").fetchall():
            first.setdefault(k, []).append(n)
    assert early == [], f"delayed events handed out before their time ({report})"
    assert len(first.pop(LATE, [])) == sum(k == LATE for k in keys.values()), report
    assert first == order, f"a key's events out of order ({report})"
    dead = conn.execute("SELECT count(*) FROM pgherald.dead_letters_v1").fetchone()
    assert dead == (0,), f"events dead-lettered ({report})"
    # The storm did reach the members: each came back from at least one lost session.
    assert all(m.consumer.stats.reconnects >= 1 for m in members), report
