"""The durable event log through a real server: install, publish, consume, groups, failures."""

from __future__ import annotations

import gc
import io
import math
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

import pgherald
from pgherald import sql
from tests.fix_db import sqlalchemy_engine
from tests.fix_durable import (
    FAST,
    Running,
    drain,
    publish_each,
    terminate,
    uncovered,
    wait_until,
)
from tests.fix_server import OwnServer


def catalog(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "namespaces": conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1").fetchall(),
        "relations": conn.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2"
        ).fetchall(),
        "functions": conn.execute(
            "SELECT n.nspname, p.proname FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace ORDER BY 1, 2"
        ).fetchall(),
    }


def quiet(r: Running, seconds: float = 1.0) -> list[int]:
    """What *r* handles over *seconds* (a bounded wait proving that nothing arrives)."""
    before = len(r.seen)
    time.sleep(seconds)  # a bounded observation window, not synchronisation
    assert r.error is None, repr(r.error)
    return r.ids[before:]


# -- 1. install / uninstall / schema missing --


def test_install_is_idempotent_and_uninstall_removes_everything(
    conn: psycopg.Connection,
) -> None:
    before = catalog(conn)
    applied = pgherald.install(conn)
    assert applied == [name for name, _ in pgherald.sql.migrations()]
    assert applied, "a fresh install records the migrations"
    assert pgherald.install(conn) == []
    after = catalog(conn)
    assert ("pgherald",) in after["namespaces"]
    rels = {r[1] for r in after["relations"] if r[0] == "pgherald"}
    assert {"events_v1", "positions_v2", "migrations", "events_v1_read"} <= rels
    assert ("pgherald", "publish_v1") in after["functions"]
    assert conn.execute("SELECT count(*) FROM pgherald.migrations").fetchone() == (len(applied),)
    pgherald.uninstall(conn)
    assert catalog(conn) == before


def test_publish_and_consumer_before_install_raise_schema_missing(
    dsn: str, conn: psycopg.Connection
) -> None:
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.publish(conn, "ch", {"x": 1})
    c = pgherald.Consumer(dsn, group="g", channels=["ch"])
    try:
        with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
            c.connect()
    finally:
        c.close()


def test_failed_enter_releases_its_sockets(dsn: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(pgherald.SchemaMissing):  # noqa: SIM117
            with pgherald.Consumer(dsn, group="g", channels=["ch"]):
                pass
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# -- 2. publish --


def test_publish_is_transactional(installed: str, running: Callable[..., Running]) -> None:
    r = running()
    with psycopg.connect(installed) as c:
        pgherald.publish(c, "ch", "rolled back")
        c.rollback()
        big = {"blob": "ü" * 100_000, "n": list(range(1000))}  # about 200 KB of JSON
        committed = pgherald.publish(c, "ch", big, key="k", headers={"h": 1})
        c.commit()
    r.wait_count(1)
    assert quiet(r, 0.5) == []
    [e] = r.seen
    assert e.id == committed
    assert e.payload == big
    assert (e.channel, e.key, e.headers) == ("ch", "k", {"h": 1})


def test_publish_through_psycopg2(installed: str, running: Callable[..., Running]) -> None:
    import psycopg2

    r = running()
    pg2 = psycopg2.connect(installed)
    try:
        pgherald.publish(pg2, "ch", {"from": "psycopg2"})
        pg2.rollback()
        event_id = pgherald.publish(pg2, "ch", {"from": "psycopg2", "n": 2})
        pg2.commit()
    finally:
        pg2.close()
    r.wait_count(1)
    assert quiet(r, 0.5) == []
    assert [(e.id, e.payload) for e in r.seen] == [(event_id, {"from": "psycopg2", "n": 2})]


def test_publish_through_sqlalchemy(installed: str, running: Callable[..., Running]) -> None:
    engine = sqlalchemy_engine(installed)
    r = running()
    try:
        with engine.connect() as sa_conn:
            pgherald.publish(sa_conn, "ch", {"from": "sqlalchemy", "rolled back": True})
            sa_conn.rollback()
        with engine.begin() as sa_conn:
            ids = [pgherald.publish(sa_conn, "ch", {"from": "sqlalchemy"})]
        raw = engine.raw_connection()
        try:
            ids.append(pgherald.publish(raw, "ch", {"from": "raw"}))
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()
    r.wait_count(2)
    assert quiet(r, 0.5) == []
    assert [e.payload for e in r.seen] == [{"from": "sqlalchemy"}, {"from": "raw"}]
    assert r.ids == ids


@pytest.mark.anyio
async def test_apublish_psycopg_async_connection(installed: str, anyio_backend: str) -> None:
    if anyio_backend == "trio":
        pytest.xfail("psycopg's AsyncConnection runs on asyncio only (psycopg issue #29)")
    async with await psycopg.AsyncConnection.connect(installed) as aconn:
        await pgherald.apublish(aconn, "ch", {"k": 1})
        await aconn.rollback()
        event_id = await pgherald.apublish(aconn, "ch", {"k": 2})
        await aconn.commit()
    async with pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **FAST) as c:
        got = []
        with anyio.fail_after(5):
            async for e in c:
                got.append(e)
                c.stop()
    assert [(e.id, e.payload) for e in got] == [(event_id, {"k": 2})]


def test_publish_refuses_bad_input(installed: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.PayloadNotSerializable):
        pgherald.publish(conn, "ch", {1, 2})
    with pytest.raises(pgherald.PayloadNotSerializable):
        pgherald.publish(conn, "ch", {"x": math.nan})
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.publish(conn, "", "x")
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.publish(conn, "c" * 64, "x")
    # What jsonb refuses, said in words that name the cause (not the server's "unsupported
    # Unicode escape sequence" as a PublishError); an escaped backslash before "u0000" is fine.
    with pytest.raises(pgherald.PayloadNotSerializable, match="payload holds a NUL"):
        pgherald.publish(conn, "ch", {"a": "x\x00y"})
    with pytest.raises(pgherald.PayloadNotSerializable, match="payload holds a lone surrogate"):
        pgherald.publish(conn, "ch", {"a": "x\udcffy"})
    with pytest.raises(pgherald.PayloadNotSerializable, match="headers holds a NUL"):
        pgherald.publish(conn, "ch", 1, headers={"a": "\x00"})
    with pytest.raises(pgherald.PayloadNotSerializable, match="headers must be a dict"):
        pgherald.publish(conn, "ch", 1, headers="abc")  # type: ignore[arg-type]
    with pytest.raises(pgherald.PayloadNotSerializable, match="headers cannot be stored"):
        pgherald.publish(conn, "ch", 1, headers={"x": math.nan})
    with pytest.raises(pgherald.PayloadNotSerializable, match="payload at index 1 holds a NUL"):
        pgherald.publish_many(conn, "ch", [1, {"a": "\x00"}])
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)
    assert pgherald.publish(conn, "ch", {"a": "x\\u0000y"}) > 0


def test_a_key_with_a_nul_is_a_publish_error_on_every_driver(installed: str) -> None:
    import psycopg2

    with psycopg.connect(installed, autocommit=True) as c3, psycopg2.connect(installed) as c2:
        for c in (c3, c2):
            with pytest.raises(pgherald.PublishError, match="key holds a NUL character"):
                pgherald.publish(c, "ch", 1, key="a\x00b")  # psycopg2: its ValueError
        with pytest.raises(pgherald.PublishError, match="key at index 1 holds a NUL"):
            pgherald.publish_many(c3, "ch", [1, 2], key=["a", "b\x00"])


def test_publish_and_notify_ignore_the_connections_row_factory(installed: str) -> None:
    from psycopg.rows import dict_row

    with psycopg.connect(installed, autocommit=True, row_factory=dict_row) as c:
        first = pgherald.publish(c, "ch", {"n": 1})
        pgherald.notify(c, "ch", "x")
        second = pgherald.publish(c, "ch", {"n": 2})
        assert second == first + 1
        # The application's own statements keep its row factory.
        assert c.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    import psycopg2.extras

    pg2 = psycopg2.connect(installed, cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        assert pgherald.publish(pg2, "ch", {"n": 3}) == second + 1
        pgherald.notify(pg2, "ch", "x")
        pg2.commit()
    finally:
        pg2.close()
    # The connection's own cursors are used: a logging connection sees our statements.
    log = io.StringIO()
    pg2 = psycopg2.connect(installed, connection_factory=psycopg2.extras.LoggingConnection)
    try:
        pg2.initialize(log)
        assert pgherald.publish(pg2, "ch", {"n": 4}) == second + 2
        pg2.commit()
    finally:
        pg2.close()
    assert "pgherald.events_v1" in log.getvalue()


def test_threads_sharing_one_connection_get_their_own_event_ids(installed: str) -> None:
    """psycopg connections are thread-safe: publish from several threads must stay correct."""
    results: dict[int, list[tuple[int, int]]] = {t: [] for t in range(4)}
    with psycopg.connect(installed, autocommit=True) as c:

        def work(t: int) -> None:
            for i in range(150):
                results[t].append((pgherald.publish(c, "ch", {"t": t, "i": i}), i))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        stored = {
            row[0]: (row[1], row[2])
            for row in c.execute(
                "SELECT id, (payload->>'t')::int, (payload->>'i')::int FROM pgherald.events_v1"
            )
        }
    assert sum(map(len, results.values())) == 600
    for t, got in results.items():
        # Each id returned to a thread is the event that thread wrote, not another thread's.
        assert [stored[event_id] for event_id, _ in got] == [(t, i) for _, i in got]


# -- 3. the ordering trap --


def test_late_commit_is_neither_skipped_nor_overtaken(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r = running()
    with psycopg.connect(installed) as a, psycopg.connect(installed) as b:
        id_a = pgherald.publish(a, "ch", "A")  # A's transaction stays open
        id_b = pgherald.publish(b, "ch", "B")
        b.commit()
        # A naive `id > last` reader sees B now, and would skip A once it moved past B's id.
        naive = conn.execute("SELECT id FROM pgherald.events_v1 WHERE id > 0").fetchall()
        assert naive == [(id_b,)]
        assert quiet(r, 1.0) == [], "B was delivered while A, older, was still uncommitted"
        a.commit()
    r.wait_count(2)
    assert quiet(r, 0.3) == []
    assert [(e.id, e.payload) for e in r.seen] == [(id_a, "A"), (id_b, "B")]
    wait_until(lambda: uncovered(conn, "g") == 0, what="the position to cover A and B")
    # A new group reading from the beginning sees the same log order.
    with pgherald.Consumer(installed, group="other", channels=["ch"], **FAST) as c:
        assert [e.payload for e in drain(c, 2)] == ["A", "B"]


# -- 4. concurrent writers --


def test_concurrent_writers_every_committed_event_once_in_writer_order(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    writers, per_writer = 6, 300
    committed: list[tuple[int, int]] = []
    rolled_back: list[tuple[int, int]] = []
    record = threading.Lock()
    errors: list[BaseException] = []
    r = running(batch_size=50)

    def write(w: int) -> None:
        rng = random.Random(w)
        try:
            with psycopg.connect(installed) as c:
                seq = 0
                while seq < per_writer:
                    batch = []
                    for _ in range(min(rng.randint(1, 5), per_writer - seq)):
                        pgherald.publish(c, "ch", {"w": w, "s": seq}, key=f"w{w}")
                        batch.append((w, seq))
                        seq += 1
                    time.sleep(rng.random() * 0.004)  # commit at a random moment
                    if rng.random() < 0.1:
                        c.rollback()
                        with record:
                            rolled_back.extend(batch)
                    else:
                        c.commit()
                        with record:
                            committed.extend(batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert rolled_back, "the test should roll some transactions back"
    r.wait_count(len(committed), timeout=10)
    assert quiet(r, 0.3) == []
    got = [(e.payload["w"], e.payload["s"]) for e in r.seen]
    assert Counter(got) == Counter(committed)  # each committed event exactly once...
    assert not set(got) & set(rolled_back)  # ...and nothing rolled back
    for w in range(writers):
        seqs = [s for ww, s in got if ww == w]
        assert seqs == sorted(seqs), f"writer {w}'s events out of order"
    # A single consumer also sees the whole log in (tx, id) order.
    positions = [(int(e.tx), e.id) for e in r.seen]
    assert positions == sorted(positions)


# -- 5. restart --


def test_restart_continues_where_a_clean_stop_left_off(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = [pgherald.publish(conn, "ch", i) for i in range(20)]
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        first = drain(c, 10)
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        second = drain(c, 10)
    assert [e.id for e in first] + [e.id for e in second] == ids
    assert uncovered(conn, "g") == 0


# -- 6. start positions --


def test_start_positions(installed: str, conn: psycopg.Connection) -> None:
    def consume(group: str, upto: int, **kw: Any) -> list[Any]:
        with pgherald.Consumer(installed, group=group, channels=["ch"], **FAST, **kw) as c:
            got = []
            for e in c:
                got.append(e.payload)
                if e.id == upto:
                    c.stop()
        return got

    e1, e2 = (pgherald.publish(conn, "ch", p) for p in ("e1", "e2"))

    # "now": existing events are skipped, later ones delivered.
    # Creates the group at the current end of the log. "now" is the oldest running transaction
    # of the whole cluster (see test_start_now_with_an_older_open_transaction): retry until no
    # other test's transaction on this server held it back.
    def created_at_the_end() -> bool:
        with pgherald.Consumer(
            installed, group="now", channels=["ch"], start="now", reset=True, **FAST
        ):
            pass
        return uncovered(conn, "now") == 0

    wait_until(created_at_the_end, 10.0, 'group "now" created at the end of the log')
    e3 = pgherald.publish(conn, "ch", "e3")
    at = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    e4 = pgherald.publish(conn, "ch", "e4")
    assert consume("now", e4) == ["e3", "e4"]
    # an event id: from that event, inclusive
    assert consume("by-id", e4, start=e2) == ["e2", "e3", "e4"]
    bad = pgherald.Consumer(installed, group="bad-id", start=e4 + 100)
    try:
        with pytest.raises(pgherald.UsageError, match="no event with id"):
            bad.connect()
    finally:
        bad.close()
    # a timestamp: events created at or after it
    assert consume("by-time", e4, start=at) == ["e4"]
    # an existing group keeps its position; reset=True moves it
    e5 = pgherald.publish(conn, "ch", "e5")
    assert consume("by-id", e5, start=e1) == ["e5"]  # start ignored: the group exists
    assert consume("by-id", e5, start=e3, reset=True) == ["e3", "e4", "e5"]
    assert e1 < e2 < e3 < e4 < e5


# -- 7. connection terminated --


def test_terminated_backend_reconnects_without_loss_iterating(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = [pgherald.publish(conn, "ch", i) for i in range(30)]
    c = pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=10, max_batch_size=20, **FAST
    )
    got: list[int] = []
    with c:
        for e in c:
            got.append(e.id)
            if len(got) == 15:
                terminate(conn, c.backend_pid)  # mid-batch
                ids += [pgherald.publish(conn, "ch", i) for i in range(30, 40)]
            if set(ids) <= set(got):
                c.stop()
    assert c.stats.reconnects >= 1
    assert set(got) == set(ids)  # at least once: a redelivery of the unacked read is allowed
    assert len(got) - len(ids) <= 20  # one read: reads grow from 10 to max_batch_size=20


def test_terminated_backend_reconnects_without_loss_with_handlers(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    ids = [pgherald.publish(conn, "ch", i) for i in range(30)]
    holder: list[Running] = []

    def on_event(e: pgherald.Event) -> None:
        if e.payload == 15 and not holder[0].consumer.stats.reconnects:
            terminate(conn, holder[0].consumer.backend_pid)  # while a handler runs

    r = running(handler=on_event, batch_size=10)
    holder.append(r)
    r.wait_count(len(ids))
    ids += [pgherald.publish(conn, "ch", i) for i in range(30, 40)]
    wait_until(lambda: set(ids) <= set(r.ids) or r.error, what="every event")
    assert r.error is None, repr(r.error)
    assert r.consumer.stats.reconnects >= 1


# -- 9. consumer groups --


def test_group_shares_partitions_and_takes_over_when_one_leaves(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r1 = running()
    wait_until(lambda: len(r1.consumer.partitions) == 16, what="r1 to hold all partitions")
    r2 = running()
    wait_until(
        lambda: len(r1.consumer.partitions) == 8 and len(r2.consumer.partitions) == 8,
        what="8 partitions each",
    )
    assert not set(r1.consumer.partitions) & set(r2.consumer.partitions)
    ids = {
        pgherald.publish(conn, "ch", {"k": i % 10, "s": i}, key=f"k{i % 10}") for i in range(200)
    }
    wait_until(lambda: len(r1.seen) + len(r2.seen) >= 200, what="200 events")
    assert r1.seen, "both consumers should have handled events"
    assert r2.seen, "both consumers should have handled events"
    assert Counter(r1.ids + r2.ids) == Counter(ids)  # exactly one consumer each
    for k in range(10):
        holders = [r for r in (r1, r2) if any(e.payload["k"] == k for e in r.seen)]
        assert len(holders) == 1, f"key k{k} handled by both consumers"
        seqs = [e.payload["s"] for e in holders[0].seen if e.payload["k"] == k]
        assert seqs == sorted(seqs)
    r1.stop()
    wait_until(lambda: len(r2.consumer.partitions) == 16, what="r2 to take all 16 partitions")
    more = {
        pgherald.publish(conn, "ch", {"k": i % 10, "s": i}, key=f"k{i % 10}")
        for i in range(200, 300)
    }
    wait_until(lambda: more <= set(r2.ids), what="r2 to consume the rest")
    assert Counter(r1.ids + r2.ids) == Counter(ids | more)
    wait_until(lambda: uncovered(conn, "g") == 0, what="the group position to cover all")


def test_group_takes_over_from_a_terminated_member(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r1 = running(reconnect_max_attempts=0)  # once its session dies it gives up
    r2 = running()
    wait_until(
        lambda: len(r1.consumer.partitions) == 8 and len(r2.consumer.partitions) == 8,
        what="8 partitions each",
    )
    ids = {pgherald.publish(conn, "ch", i) for i in range(50)}
    wait_until(lambda: len(r1.seen) + len(r2.seen) >= 50, what="50 events")
    wait_until(lambda: uncovered(conn, "g") == 0, what="both to acknowledge")  # r1 idle now
    terminate(conn, r1.consumer.backend_pid)
    r1.thread.join(10)
    assert isinstance(r1.error, pgherald.ConnectionLost)
    wait_until(lambda: len(r2.consumer.partitions) == 16, what="r2 to take all 16 partitions")
    more = {pgherald.publish(conn, "ch", i) for i in range(50, 100)}
    wait_until(lambda: more <= set(r2.ids), what="r2 to consume the rest")
    assert set(r1.ids) | set(r2.ids) == ids | more


# -- 10. exactly-once effects --


def test_transactional_handler_has_exactly_once_effects(
    installed: str, conn: psycopg.Connection
) -> None:
    conn.execute("CREATE TABLE effects (event_id bigint NOT NULL, payload jsonb)")
    ids = [pgherald.publish(conn, "ch", i) for i in range(10)]
    failed: list[int] = []
    c = pgherald.Consumer(installed, group="g", retry_delay=0.01, **FAST)

    @c.on("ch", transactional=True)
    def apply(e: pgherald.Event, tx: psycopg.Connection) -> None:
        tx.execute("INSERT INTO effects VALUES (%s, %s::jsonb)", (e.id, str(e.payload)))
        if e.payload == 4 and not failed:
            failed.append(e.id)
            raise RuntimeError("first attempt fails after writing")
        if e.id == ids[-1]:
            c.stop()

    with c:
        c.run()
    assert failed == [ids[4]]
    assert c.stats.handler_errors == 1
    rows = conn.execute("SELECT event_id, count(*) FROM effects GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [(i, 1) for i in ids]
    assert uncovered(conn, "g") == 0


@pytest.mark.parametrize("synchronous_acks", [False, True])
def test_acks_skip_the_flush_but_transactional_handlers_keep_it(
    installed: str, conn: psycopg.Connection, synchronous_acks: bool
) -> None:
    """Acknowledgements commit with synchronous_commit off (a lost one only redelivers); a
    transactional handler's transaction, which holds the user's effects, keeps the server's
    setting."""
    pgherald.publish(conn, "ch", 1)
    pgherald.publish(conn, "other", 2)
    seen: dict[str, str] = {}
    c = pgherald.Consumer(installed, group="g", synchronous_acks=synchronous_acks, **FAST)

    @c.on("ch", transactional=True)
    def apply(e: pgherald.Event, tx: psycopg.Connection) -> None:
        row = tx.execute("SELECT current_setting('synchronous_commit')").fetchone()
        seen["tx"] = row[0] if row else ""

    @c.on("other")
    def other(e: pgherald.Event) -> None:
        pgconn = c._engine.pgconn  # the consumer's own session, between its statements
        assert pgconn is not None
        res = pgconn.exec_(b"SHOW synchronous_commit")
        seen["session"] = (res.get_value(0, 0) or b"").decode()
        c.stop()

    with c:
        c.run()
    assert seen == {"tx": "on", "session": "on" if synchronous_acks else "off"}
    assert uncovered(conn, "g") == 0


# -- 11. a full NOTIFY queue never makes writes fail --


def test_publish_without_notify_still_reaches_polling_consumer(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    with psycopg.connect(installed, autocommit=True) as listen:
        listen.execute("LISTEN pgherald_wake_v1")
        listen.execute(sql.query("wait_for_wakeups"))  # waits, as a consumer does
        # control: a normal publish does wake consumers
        with psycopg.connect(installed) as pub:
            pgherald.publish(pub, "other", "woken")
            pub.commit()
        assert len(list(listen.notifies(timeout=1.0, stop_after=1))) == 1
        r = running(poll_interval=0.2)
        with psycopg.connect(installed) as pub:
            pub.execute("SET pgherald.wake_max_queue_usage = 0")
            pub.commit()
            event_id = pgherald.publish(pub, "ch", "polled")
            pub.commit()
        assert list(listen.notifies(timeout=0.5)) == []
        r.wait_count(1, timeout=3)
    assert r.ids == [event_id]


def test_wake_ups_only_while_a_consumer_waits(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    with psycopg.connect(installed, autocommit=True) as listen:
        listen.execute("LISTEN pgherald_wake_v1")
        pgherald.publish(conn, "ch", "nobody waits")
        pgherald.publish_many(conn, "ch", ["nor", "now"])
        assert list(listen.notifies(timeout=0.3)) == []  # no consumer: the row, nothing more
        r = running(poll_interval=30)  # waits: only a wake-up can bring the next event soon
        r.wait_count(3)
        wait_until(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1"
                " AND mode = 'ShareLock' AND granted AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()[0],  # type: ignore[index]
            5,
            "the consumer to ask for wake-ups",
        )
        event_id = pgherald.publish(conn, "ch", "woken")
        assert len(list(listen.notifies(timeout=1.0, stop_after=1))) == 1
        r.wait_count(4, timeout=5)  # far sooner than the 30 s poll
    assert r.ids[-1] == event_id


def _wake_key(c: psycopg.Connection) -> int:
    """The wake-up key a publishing session tries (publish_v1: 2 + its pid mod 16)."""
    return 2 + c.info.backend_pid % 16


def test_every_publishing_session_wakes_a_waiting_consumer(installed: str) -> None:
    # Publishers spread their tries over 16 keys by backend pid; a waiting consumer holds all.
    with psycopg.connect(installed, autocommit=True) as waiting:
        waiting.execute("LISTEN pgherald_wake_v1")
        publishers: dict[int, psycopg.Connection] = {}
        try:
            while len(publishers) < 16:  # one session per key (pids come in sequence)
                c = psycopg.connect(installed, autocommit=True)
                if _wake_key(c) in publishers:
                    c.close()
                else:
                    publishers[_wake_key(c)] = c
            for c in publishers.values():  # nobody waits: no wake-up from any key
                pgherald.publish(c, "ch", "unheard")
            assert list(waiting.notifies(timeout=0.3)) == []
            (ok, xid) = waiting.execute(sql.query("wait_for_wakeups")).fetchone()  # type: ignore[misc]
            assert ok
            assert int(xid) > 0
            for key, c in sorted(publishers.items()):
                pgherald.publish(c, "ch", key)
                heard = list(waiting.notifies(timeout=2.0, stop_after=1))
                assert len(heard) == 1, f"no wake-up from the publisher of key {key}"
            waiting.execute(sql.query("busy"))  # busy: none needed any more
            for c in publishers.values():
                pgherald.publish(c, "ch", "unheard again")
            assert list(waiting.notifies(timeout=0.3)) == []
        finally:
            for c in publishers.values():
                c.close()


def test_asking_for_wake_ups_while_a_publisher_looks_keeps_no_lock(installed: str) -> None:
    # A publisher holds its key exclusively for an instant: the consumer's try fails then, and
    # it must not keep the other 16 (it would count twice when it asks again).
    held = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
        " AND classid = (hashtext('pgherald.wake_v1')::bigint & 4294967295)::oid"
    )
    with (
        psycopg.connect(installed, autocommit=True) as publisher,
        psycopg.connect(installed, autocommit=True) as waiting,
    ):
        publisher.execute("SELECT pg_advisory_lock(hashtext('pgherald.wake_v1'), 9)")
        (ok, xid) = waiting.execute(sql.query("wait_for_wakeups")).fetchone()  # type: ignore[misc]
        assert (ok, xid) == (False, None)
        pid = waiting.info.backend_pid
        assert publisher.execute(held, (pid,)).fetchone() == (0,)
        publisher.execute("SELECT pg_advisory_unlock(hashtext('pgherald.wake_v1'), 9)")
        (ok, xid) = waiting.execute(sql.query("wait_for_wakeups")).fetchone()  # type: ignore[misc]
        assert ok is True
        assert publisher.execute(held, (pid,)).fetchone() == (17,)
        waiting.execute(sql.query("busy"))
        assert publisher.execute(held, (pid,)).fetchone() == (0,)


def test_a_publisher_that_looked_before_the_consumer_waited_is_not_missed(
    server: OwnServer,
) -> None:
    # It found nobody waiting (so sent no wake-up), then committed after the consumer had
    # read and begun to wait: the consumer reads on until such writers have ended. A private
    # server: transaction ids are the cluster's, and another test's long transaction would
    # keep the consumer reading at growing intervals past the 2 s this test allows.
    installed = server.dsn
    with psycopg.connect(installed, autocommit=True) as c:
        pgherald.install(c)
    with psycopg.connect(installed) as slow:
        event_id = pgherald.publish(slow, "ch", "late")  # no consumer yet: no wake-up
        r = Running(installed, poll_interval=30)
        wait_until(lambda: r.consumer.stats.reads >= 2, 5, "the consumer to read and wait")
        slow.commit()
    try:
        r.wait_count(1, timeout=2)  # long before the 30 s poll (or any 5 s housekeeping)
        assert r.ids == [event_id]
    finally:
        r.stop()


# -- 12. AsyncConsumer on asyncio and trio --


async def _aconsume_until(dsn: str, got: list[int], n: int) -> None:
    """A new AsyncConsumer of group "g" appends event ids to ``got`` until it holds ``n``."""
    async with pgherald.AsyncConsumer(dsn, group="g", channels=["ch"], **FAST) as c:
        with anyio.fail_after(5):
            async for e in c:
                got.append(e.id)
                if len(got) == n:
                    c.stop()


@pytest.mark.anyio
async def test_async_consumer_iterates_and_resumes(installed: str) -> None:
    ids = await anyio.to_thread.run_sync(publish_each, installed, list(range(10)))
    got: list[int] = []
    await _aconsume_until(installed, got, 5)
    await _aconsume_until(installed, got, 10)
    # Each event once. The first five in order (one consumer, one read); the second consumer
    # may start while the server still ends the first one's session (it then holds half the
    # partitions for a moment), so across partitions the rest may come in another order.
    assert got[:5] == ids[:5]
    assert sorted(got) == ids


@pytest.mark.anyio
async def test_async_consumer_handlers_sync_async_and_transactional(
    installed: str, anyio_backend: str
) -> None:
    ids = await anyio.to_thread.run_sync(publish_each, installed, list(range(6)))
    seen: list[tuple[str, int]] = []
    c = pgherald.AsyncConsumer(installed, group="g", channels=["ch"], retry_delay=0.01, **FAST)

    @c.on("ch")
    async def a(e: pgherald.Event) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(("async", e.payload))

    @c.on("ch")
    def s(e: pgherald.Event) -> None:
        seen.append(("sync", e.payload))
        if e.payload == 2 and ("fail", 2) not in seen:
            seen.append(("fail", 2))
            raise ValueError("retried")

    @c.on("ch", transactional=True)
    async def t(e: pgherald.Event, tx: psycopg.AsyncConnection) -> None:
        await tx.execute("SELECT 1")
        if e.id == ids[-1]:
            c.stop()

    with pytest.raises(pgherald.UsageError, match="must be async"):
        c.on("ch", transactional=True)(s)  # a plain function would block the event loop
    async with c:
        if anyio_backend == "trio":
            with pytest.raises(pgherald.UsageError, match="trio"):
                await c.run()
            return
        with anyio.fail_after(5):
            await c.run()
    expected: list[tuple[str, int]] = []
    for p in range(6):
        expected += [("async", p), ("sync", p)]
        if p == 2:
            expected += [("fail", 2), ("sync", 2)]
    assert seen == expected
    assert c.stats.handler_errors == 1


@pytest.mark.anyio
async def test_async_consumer_cancellation_and_stop(installed: str) -> None:
    seen: list[int] = []
    async with pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **FAST) as c:

        @c.on("ch")
        def on_ch(e: pgherald.Event) -> None:
            seen.append(e.payload)
            if len(seen) == 2:
                c.stop()

        with anyio.move_on_after(0.3) as scope:
            await c.run()
        assert scope.cancelled_caught
        # still usable after cancellation
        await anyio.to_thread.run_sync(publish_each, installed, [1, 2])
        with anyio.fail_after(5):
            await c.run()
    assert seen == [1, 2]


@pytest.mark.anyio
async def test_async_consumer_stop_from_another_thread(installed: str) -> None:
    async with pgherald.AsyncConsumer(
        installed, group="g", channels=["ch"], poll_interval=30, rebalance_interval=0.2
    ) as c:
        c.on("ch")(lambda e: None)

        def stop_later() -> None:
            threading.Event().wait(0.3)
            c.stop()

        started = time.monotonic()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, stop_later)
                await c.run()
    assert time.monotonic() - started < 3


# -- channel filtering --


def test_a_group_reads_and_acknowledges_its_own_channels_only(
    installed: str, conn: psycopg.Connection
) -> None:
    def partition(key: str) -> int:
        return int(conn.execute("SELECT hashtext(%s) & 15", (key,)).fetchone()[0])  # type: ignore[index]

    other_key = next(k for k in (f"x{i}" for i in range(100)) if partition(k) != partition("a"))
    with psycopg.connect(installed) as tx:  # one transaction: one batch
        first = pgherald.publish(tx, "orders", 1, key="a")
        pgherald.publish(tx, "other", "not ours", key=other_key)
        last = pgherald.publish(tx, "orders", 2, key="a")
        tx.commit()
    with pgherald.Consumer(installed, group="g", channels=["orders"], **FAST) as c:
        assert [e.id for e in drain(c, 2)] == [first, last]
    assert uncovered(conn, "g", "orders") == 0
    # "other" is not the group's: never read, and no position of the group's moved past it.
    assert uncovered(conn, "g", "other") == 1
    channels = conn.execute(
        "SELECT DISTINCT channel FROM pgherald.positions_v2 WHERE group_name = 'g'"
    ).fetchall()
    assert sorted(c for (c,) in channels) == ["", "orders"]


def test_start_now_with_an_older_open_transaction(installed: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(installed) as older:
        older.execute("SELECT pg_current_xact_id()")  # an open transaction with an xid
        pgherald.publish(conn, "ch", "before now")  # committed
        with pgherald.Consumer(installed, group="now", channels=["ch"], start="now", **FAST):
            pass
        older.rollback()
    last = pgherald.publish(conn, "ch", "after now")
    with pgherald.Consumer(installed, group="now", channels=["ch"], **FAST) as c:
        got = []
        for e in c:
            got.append(e.payload)
            if e.id == last:
                c.stop()
    assert got == ["after now"]
