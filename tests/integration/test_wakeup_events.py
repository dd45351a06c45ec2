"""
Events handed out straight from their wake-ups (schema.sql wake_note_v1, consumer.py
`_note_events`): used only when their order is proven, never forged, never overtaking.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql as pgsql

import pgherald
from tests.fix_durable import Running, acknowledged, publish_each, terminate, wait_until
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)

pytestmark = pytest.mark.usefixtures("installed")

# Beyond the tests' waits for a wake-up (1 s), short of their timeouts (10 s): an event may
# wait behind a transaction of another test, whose end nothing announces (a read at growing
# intervals, up to poll_interval, finds it).
SLOW_POLL: dict[str, Any] = {"poll_interval": 3.0}


def publish_one(dsn: str, payload: Any, **kwargs: Any) -> int:
    return publish_each(dsn, [payload], **kwargs)[0]


def from_wakeups(r: Running, dsn: str, *, key: str | None = None) -> list[int]:
    """Publish one event at a time until one comes from its wake-up; the ids published."""
    ids: list[int] = []
    before = len(r.seen)
    deadline = time.monotonic() + 20
    while r.consumer.stats.from_wakeups == 0:
        assert time.monotonic() < deadline, "no event came from its wake-up"
        ids.append(publish_one(dsn, {"warm": len(ids)}, key=key))
        r.wait_count(before + len(ids), timeout=10)
    assert r.ids[before:] == ids
    return ids


def assert_as_read(conn: psycopg.Connection, events: list[pgherald.Event]) -> None:
    """Every field of *events* as a read gives it (the same events read back from the log)."""
    rows = {
        row[0]: row
        for row in conn.execute(
            "SELECT id, channel, key, payload, headers, created_at, partition, tx::text"
            " FROM pgherald.events_v1 WHERE id = ANY(%s)",
            ([e.id for e in events],),
        )
    }
    assert len(rows) == len(events)
    for e in events:
        assert (e.id, e.channel, e.key, e.payload, e.headers, e.created_at, e.partition, e.tx) == (
            rows[e.id]
        )


def skips(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgherald.wake_skips_v1"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_events_come_from_wakeups_whole_and_in_order(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r = running(channels=("ch", "odd|chännel"), **SLOW_POLL)
    warm = from_wakeups(r, installed)
    before = r.consumer.stats.from_wakeups
    published = []
    with psycopg.connect(installed, autocommit=True) as c:
        for i in range(30):  # one at a time: each comes while the consumer waits
            channel = "odd|chännel" if i % 3 == 0 else "ch"
            key = None if i % 2 else f"k|{i % 4}|ü"
            headers = {"h": "|".join("ab"), "i": i} if i % 5 == 0 else None
            payload = {"i": i, "text": "a|b|ç" * i, "nested": [1, {"x": None}]}
            published.append(pgherald.publish(c, channel, payload, key=key, headers=headers))
            r.wait_count(len(warm) + i + 1, timeout=10)
    assert r.ids == warm + published  # each once, in order
    # From wake-ups, save when a transaction of another test ran on the server meanwhile
    # (its note then lists it: a read instead).
    assert r.consumer.stats.from_wakeups > before
    assert_as_read(conn, r.seen[len(warm) :])
    r.stop()  # the acknowledgements put off (ack_delay) are made on the way out
    assert set(published) <= acknowledged(conn, "g")


@pytest.mark.parametrize("function", ["generated", "shared"])
def test_trigger_events_come_from_wakeups(
    function: str, installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
    if function == "generated":  # `trigger add` now
        pgherald.add_table_trigger(conn, "orders", channel="ch", durable=True)
    else:  # as `trigger add` of earlier versions: the shared function, keyed by id
        conn.execute(
            "CREATE TRIGGER pgherald_change_v1 AFTER INSERT OR UPDATE OR DELETE ON orders "
            "FOR EACH ROW EXECUTE FUNCTION pgherald.notify_change_v1('ch', '[]', 't', 'id')"
        )
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed)
    before = r.consumer.stats.from_wakeups
    with psycopg.connect(installed, autocommit=True) as c:
        for i in range(10):  # one change at a time: each comes while the consumer waits
            c.execute("INSERT INTO orders VALUES (%s, 'new')", (i,))
            r.wait_count(len(warm) + 2 * i + 1, timeout=10)
            c.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (i,))
            r.wait_count(len(warm) + 2 * i + 2, timeout=10)
    changes = r.seen[len(warm) :]
    assert [(e.key, e.payload["op"]) for e in changes] == [
        (str(i), op) for i in range(10) for op in ("INSERT", "UPDATE")
    ]
    # From wake-ups (save when another test's transaction ran meanwhile: then by read).
    assert r.consumer.stats.from_wakeups > before
    assert_as_read(conn, changes)


class Iterating:
    """An `AsyncConsumer` iterated in a task: publish one event, and wait until it comes."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.consumer = pgherald.AsyncConsumer(dsn, group="g", channels=["ch"], **SLOW_POLL)
        self.got: list[int] = []
        self.published: list[int] = []
        self._progress = anyio.Event()  # set (and replaced) at each event that comes

    async def consume(self) -> None:
        async for e in self.consumer:
            self.got.append(e.id)
            self._progress.set()
            self._progress = anyio.Event()

    async def publish_and_wait(self) -> None:
        payload = len(self.published)
        self.published.append(await anyio.to_thread.run_sync(publish_one, self.dsn, payload))
        with anyio.fail_after(10):
            while self.published[-1] not in self.got:
                await self._progress.wait()

    async def until_from_wakeups(self) -> None:
        """Publish until an event comes from its wake-up (pausing past the linger each time)."""
        n = self.consumer.stats.from_wakeups
        while self.consumer.stats.from_wakeups == n:
            await self.publish_and_wait()
            await anyio.sleep(0.05)  # past the linger: the consumer then asks for wake-ups


@pytest.mark.anyio
async def test_async_consumer_takes_events_from_wakeups(installed: str) -> None:
    it = Iterating(installed)
    async with it.consumer, anyio.create_task_group() as tg:
        tg.start_soon(it.consume)
        with anyio.fail_after(60):
            await it.until_from_wakeups()
            before = it.consumer.stats.from_wakeups
            for _ in range(30):
                await it.publish_and_wait()
        it.consumer.stop()
    assert it.got == it.published
    assert it.consumer.stats.from_wakeups > before


def test_a_forged_wakeup_is_never_an_event(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed)
    row = conn.execute(
        "SELECT tx::text, partition FROM pgherald.events_v1 WHERE id = %s", (warm[-1],)
    ).fetchone()
    assert row is not None
    tx, partition = row
    # A note as wake_note_v1 writes one (it would be handed out if it checked out: the next
    # transaction id, nothing older running, no skip), signed with another secret.
    body = (
        f"{warm[-1] + 1000}|{int(tx) + 1}|{partition}|0||{skips(conn)}|2|-1|-1|" + 'ch{"forged": 1}'
    )
    wrong = b"not-the-secret"
    inner = hashlib.sha256(wrong + body.encode()).hexdigest().encode()
    fakes = [
        "n1|" + hashlib.sha256(wrong + inner).hexdigest() + "|" + body,
        "n1|" + "0" * 64 + "|" + body,
        "n1|garbage",
        "",
    ]
    with psycopg.connect(installed, autocommit=True) as c:
        for fake in fakes:
            c.execute("SELECT pg_notify('pgherald_wake_v1', %s)", (fake,))
    real = publish_one(installed, {"real": True})
    r.wait_count(len(warm) + 1, timeout=10)
    time.sleep(0.3)  # a bounded window for anything forged to show up (nothing should)
    assert r.ids == [*warm, real]
    assert all(e.payload != {"forged": 1} for e in r.seen)


def test_the_signature_is_the_schema_owners_and_signs_own_events_only(installed: str) -> None:
    conn = psycopg.connect(installed, autocommit=True)
    event_id = publish_one(installed, {"x": 1})
    created = conn.execute(
        "SELECT created_at FROM pgherald.events_v1 WHERE id = %s", (event_id,)
    ).fetchone()
    assert created is not None
    role = f"pgherald_stranger_{conn.info.backend_pid}"
    conn.execute(pgsql.SQL("CREATE ROLE {}").format(pgsql.Identifier(role)))
    try:
        conn.execute(
            pgsql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(pgsql.Identifier(role))
        )
        conn.execute(pgsql.SQL("SET ROLE {}").format(pgsql.Identifier(role)))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM pgherald.wake_secret_v1")
        # Any role may call the signer, for events of its own transaction only: another's
        # committed event gets no note.
        note = conn.execute(
            "SELECT pgherald.wake_note_v1(%s, %s)", (event_id, created[0])
        ).fetchone()
        assert note == ("",)
    finally:
        conn.execute("RESET ROLE")
        conn.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(role)))
        conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(role)))
        conn.close()


def test_an_older_open_transaction_is_not_overtaken(
    installed: str, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed, key="k")
    with psycopg.connect(installed) as older, psycopg.connect(installed, autocommit=True) as c:
        older.execute("SELECT pg_current_xact_id()")  # older: it has its transaction id
        second = pgherald.publish(c, "ch", {"n": 2}, key="k")  # its note lists `older`
        time.sleep(0.3)  # a bounded window: nothing may come before `older` commits
        assert r.ids == warm
        first = pgherald.publish(older, "ch", {"n": 1}, key="k")  # sorts first: older tx
        older.commit()
    r.wait_count(len(warm) + 2, timeout=10)
    assert r.ids == [*warm, first, second]
    # And events come from wake-ups again afterwards.
    n = r.consumer.stats.from_wakeups
    more = [publish_one(installed, {"n": i}, key="k") for i in range(3)]
    wait_until(lambda: r.consumer.stats.from_wakeups > n or len(r.seen) >= len(warm) + 5, 10)
    r.wait_count(len(warm) + 5, timeout=10)
    assert r.ids == [*warm, first, second, *more]


def test_a_wakeup_not_sent_is_counted_and_its_event_not_overtaken(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed, key="k")
    counted = skips(conn)
    with psycopg.connect(installed) as gate:
        # Another transaction holds the right to notify: a publisher meanwhile sends none.
        gate.execute("SELECT pg_advisory_xact_lock(hashtext('pgherald.wake_v1'), 0)")
        silent = publish_one(installed, {"n": "silent"}, key="k")  # no wake-up
        gate.rollback()
    assert skips(conn) > counted  # the publisher counted the wake-up it did not send
    announced = publish_one(installed, {"n": "announced"}, key="k")
    r.wait_count(len(warm) + 2, timeout=10)
    assert r.ids == [*warm, silent, announced]  # not the announced one alone, nor first


def test_a_wakeup_not_sent_while_another_was_is_found_after_the_linger(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    # No later note tells of the skip: the look at the skip count after the last note's
    # linger must (a poll would come only after 30 s, past the wait below).
    r = running(poll_interval=30.0)
    warm = from_wakeups(r, installed, key="k")
    counted = skips(conn)
    with psycopg.connect(installed) as sender:
        first = pgherald.publish(sender, "ch", {"n": "first"}, key="k")  # sends the note
        silent = publish_one(installed, {"n": "silent"}, key="k")  # sees it: sends none
        sender.commit()
    assert skips(conn) > counted
    r.wait_count(len(warm) + 2, timeout=10)
    assert r.ids == [*warm, first, silent]


def test_events_too_large_for_a_wakeup_come_by_read(
    installed: str, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed)
    big = publish_one(installed, {"blob": "x" * 9000})
    r.wait_count(len(warm) + 1, timeout=10)
    small = publish_one(installed, {"small": 1})
    r.wait_count(len(warm) + 2, timeout=10)
    assert r.ids == [*warm, big, small]
    assert r.seen[len(warm)].payload == {"blob": "x" * 9000}


def test_triggers_of_an_earlier_version_turn_it_off(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    # A trigger function generated before wake_skips_v1 could skip a wake-up uncounted.
    conn.execute(
        "CREATE FUNCTION pgherald.change_v1_old() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_notify('pgherald_wake_v1', ''); RETURN NULL; END $$"
    )
    r = running(**{**SLOW_POLL, "poll_interval": 0.2})
    ids = [publish_one(installed, i) for i in range(5)]
    r.wait_count(5)
    for i in range(5):
        ids.append(publish_one(installed, 5 + i))
        r.wait_count(6 + i)
    assert r.ids == ids
    assert r.consumer.stats.from_wakeups == 0


def test_a_consumer_role_without_the_secret_reads(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    role = f"pgherald_reader_{conn.info.backend_pid}"
    ident = pgsql.Identifier(role)
    conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(ident))
    try:
        conn.execute(pgsql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(ident))
        conn.execute(
            pgsql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgherald TO {}"
            ).format(ident)
        )
        conn.execute(pgsql.SQL("REVOKE ALL ON pgherald.wake_secret_v1 FROM {}").format(ident))
        conn.execute(
            pgsql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgherald TO {}").format(ident)
        )
        dsn = psycopg.conninfo.make_conninfo(installed, user=role)
        r = Running(dsn, poll_interval=0.2)
        try:
            ids = []
            for i in range(10):
                ids.append(publish_one(installed, i))
                r.wait_count(i + 1)
            assert r.ids == ids
            assert r.consumer.stats.from_wakeups == 0
        finally:
            r.stop()
    finally:
        conn.execute(pgsql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(pgsql.SQL("DROP ROLE {}").format(ident))


def test_two_members_and_four_writers_every_event_once_in_key_order(
    installed: str, running: Callable[..., Running]
) -> None:
    # Writers at a pace a consumer keeps up with (so that it waits, and takes events from
    # wake-ups), in transactions of 1 to 3 events that overlap (so that notes list older
    # transactions, and some wake-ups are not sent): each event exactly once, each key's in
    # order, whichever member and whichever path.
    seen: list[pgherald.Event] = []
    lock = threading.Lock()

    def keep(e: pgherald.Event) -> None:
        with lock:
            seen.append(e)

    # A short linger: the members ask for wake-ups in the writers' pauses.
    members = [running(handler=keep, linger=0.002, **SLOW_POLL) for _ in range(2)]
    errors: list[BaseException] = []
    committed: list[tuple[int, int]] = []

    def write(w: int) -> None:
        try:
            with psycopg.connect(installed) as c:
                for seq in range(0, 150, 3):
                    for s in range(seq, seq + 1 + (w + seq) % 3):
                        pgherald.publish(c, "ch", {"w": w, "s": s}, key=f"w{w}")
                    time.sleep(0.002)
                    c.commit()
                    with lock:
                        committed.extend((w, s) for s in range(seq, seq + 1 + (w + seq) % 3))
                    time.sleep(0.003 + 0.02 * (seq % 9 == w))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    wait_until(lambda: len(seen) >= len(committed), 20, f"{len(committed)} events")
    time.sleep(0.3)  # a bounded window: nothing more should come
    got = [(e.payload["w"], e.payload["s"]) for e in seen]
    assert sorted(got) == sorted(committed)
    for w in range(4):
        seqs = [s for ww, s in got if ww == w]
        assert seqs == sorted(seqs), f"writer {w}'s events out of order"
    assert sum(m.consumer.stats.from_wakeups for m in members) > 0


def test_acknowledgements_only_move_forward(installed: str, conn: psycopg.Connection) -> None:
    # Deferred acknowledgements may come after a dead letter or a reset moved the position:
    # an older one never moves it back.
    from pgherald import sql
    from pgherald._protocol.consumer import _ack_params

    ids = [publish_one(installed, i, key="k") for i in range(2)]
    r = Running(installed, **SLOW_POLL)
    try:
        r.wait_count(2, timeout=10)
    finally:
        r.stop()
    first, second = r.seen
    position = (
        "SELECT tx::text, event_id FROM pgherald.positions_v2 WHERE group_name = 'g'"
        " AND channel = 'ch' AND partition = %s"
    )
    assert conn.execute(position, (second.partition,)).fetchone() == (second.tx, ids[1])
    conn.execute(sql.query("ack"), _ack_params("g", [first]))
    assert conn.execute(position, (second.partition,)).fetchone() == (second.tx, ids[1])


def test_plain_wakeups_unless_a_consumer_that_takes_notes_waits(
    installed: str, running: Callable[..., Running]
) -> None:
    # The gateway's log tail (hold_wakeups) waits without taking notes: publishers then send
    # plain wake-ups, and pay nothing for notes.
    from pgherald import sql

    with psycopg.connect(installed, autocommit=True) as tail:
        tail.execute(sql.query("hold_wakeups"))
        tail.execute("LISTEN pgherald_wake_v1")
        publish_one(installed, "plain")
        [n] = list(tail.notifies(timeout=2.0, stop_after=1))
        assert n.payload == ""
        r = running(**SLOW_POLL)
        r.wait_count(1, timeout=10)
        warm = from_wakeups(r, installed)  # a consumer that takes notes now waits
        list(tail.notifies(timeout=0.2))  # (the wake-ups so far)
        event_id = publish_one(installed, "noted")
        heard = [x.payload for x in tail.notifies(timeout=2.0, stop_after=1)]
        assert len(heard) == 1
        assert heard[0].startswith("n1|")
        assert f"|{event_id}|" in heard[0]
        r.wait_count(len(warm) + 2, timeout=10)


def test_a_transaction_of_many_events_sends_16_notes_then_one_plain_wakeup(
    installed: str, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed)
    with psycopg.connect(installed, autocommit=True) as listen:
        listen.execute("LISTEN pgherald_wake_v1")
        with psycopg.connect(installed) as c:
            ids = [pgherald.publish(c, "ch", {"n": i}) for i in range(200)]
            ids.append(c.execute("SELECT pgherald.publish_v1('ch', '{\"n\": 200}')").fetchone()[0])  # type: ignore[index]
            c.commit()
        heard = [n.payload for n in listen.notifies(timeout=1.0)]
    assert sum(p.startswith("n1|") for p in heard) == 16
    assert heard.count("") == 1  # the rest, folded into one
    r.wait_count(len(warm) + 201, timeout=10)
    assert r.ids == [*warm, *ids]


def _terminate(dsn: str, pid: int | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        terminate(c, pid)


def _first_seen(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def test_terminated_while_taking_events_from_wakeups(
    installed: str, running: Callable[..., Running]
) -> None:
    r = running(**SLOW_POLL)
    warm = from_wakeups(r, installed)
    _terminate(installed, r.consumer.backend_pid)
    during = [publish_one(installed, {"during": i}) for i in range(5)]  # while it reconnects
    wait_until(lambda: set(during) <= set(r.ids), 10, "the events published meanwhile")
    n = r.consumer.stats.from_wakeups
    after = []
    for i in range(20):  # and wake-ups carry events again
        after.append(publish_one(installed, {"after": i}))
        wait_until(lambda: after[-1] in r.ids, 10, "the event")
    assert r.consumer.stats.reconnects >= 1
    assert r.consumer.stats.from_wakeups > n
    # At least once (an acknowledgement put off may be lost with the session), in order.
    assert _first_seen(r.ids) == [*warm, *during, *after]


@pytest.mark.anyio
async def test_async_consumer_terminated_while_taking_events_from_wakeups(installed: str) -> None:
    it = Iterating(installed)
    async with it.consumer, anyio.create_task_group() as tg:
        tg.start_soon(it.consume)
        with anyio.fail_after(60):
            await it.until_from_wakeups()
            await anyio.to_thread.run_sync(_terminate, installed, it.consumer.backend_pid)
            for _ in range(5):
                await it.publish_and_wait()
            await it.until_from_wakeups()  # and wake-ups carry events again
        it.consumer.stop()
    assert it.consumer.stats.reconnects >= 1
    assert _first_seen(it.got) == it.published


def test_a_publisher_role_with_no_default_execute_privilege_publishes(
    installed: str, conn: psycopg.Connection
) -> None:
    # Hardened databases revoke EXECUTE from PUBLIC by default; publish's statement names
    # wake_v1 (checked even when no consumer waits), which calls wake_note_v1 as the
    # publisher: install grants both to PUBLIC.
    for fn in ("wake_v1", "wake_note_v1"):
        (acl,) = conn.execute(  # type: ignore[misc]
            "SELECT proacl::text FROM pg_proc WHERE oid = %s::regproc", (f"pgherald.{fn}",)
        ).fetchone()
        assert "=X/" in acl, fn  # an explicit grant to PUBLIC, not the default privileges
    role = f"pgherald_writer_{conn.info.backend_pid}"
    ident = pgsql.Identifier(role)
    conn.execute(pgsql.SQL("CREATE ROLE {}").format(ident))
    try:
        conn.execute(pgsql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(ident))
        conn.execute(
            pgsql.SQL("GRANT SELECT, INSERT ON TABLE pgherald.events_v1 TO {}").format(ident)
        )
        conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgherald FROM PUBLIC")
        for fn in ("wake_v1", "wake_note_v1"):
            conn.execute(f"GRANT EXECUTE ON FUNCTION pgherald.{fn}(bigint, timestamptz) TO PUBLIC")
        # (what install and the migration do, after the revocation a hardened database makes)
        with psycopg.connect(installed) as c:
            c.execute(pgsql.SQL("SET ROLE {}").format(ident))
            event_id = pgherald.publish(c, "ch", {"by": "a writer"})
            c.commit()
        assert conn.execute(
            "SELECT payload FROM pgherald.events_v1 WHERE id = %s", (event_id,)
        ).fetchone() == ({"by": "a writer"},)
        conn.execute("REVOKE EXECUTE ON FUNCTION pgherald.wake_v1(bigint, timestamptz) FROM PUBLIC")
        with psycopg.connect(installed) as c:  # without it, every publish is refused
            c.execute(pgsql.SQL("SET ROLE {}").format(ident))
            with pytest.raises(pgherald.HeraldError):
                pgherald.publish(c, "ch", {"by": "a writer"})
    finally:
        conn.execute(pgsql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(pgsql.SQL("DROP ROLE {}").format(ident))
