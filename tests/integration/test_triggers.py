"""Table-change and DDL event triggers through a real server, read by a real Listener/Consumer.

"Sends nothing" is always proven with a sentinel: the change that must be silent is followed by
one that must be heard, and the sentinel has to be the *next* event; no sleeps, no guesses.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgherald
from tests.fix_durable import FAST, Running, wait_until

_SENTINELS = itertools.count(-1, -1)
EVENT_KEYS = {"op", "schema", "table", "new", "old", "changed", "tx", "ts"}


def take(listener: pgherald.Listener, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next *n* events (decoded), failing if they do not arrive within *timeout* idle."""
    got: list[dict[str, Any]] = []
    if n:
        for note in listener.notifications(timeout=timeout):
            got.append({"channel": note.channel, **note.json()})
            if len(got) == n:
                break
    assert len(got) == n, f"expected {n} events, got {got}"
    return got


def strip(event: dict[str, Any]) -> dict[str, Any]:
    """The event without its variable fields (after checking they are well-formed)."""
    assert int(event["tx"]) > 0
    datetime.fromisoformat(event["ts"])
    return {k: v for k, v in event.items() if k not in ("tx", "ts")}


def nothing_then_sentinel(
    listener: pgherald.Listener, conn: psycopg.Connection, table: str
) -> None:
    """Insert a sentinel row; it must be the very next event (so the previous change was silent)."""
    key = next(_SENTINELS)
    conn.execute(sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(table)), (key,))
    (event,) = take(listener, 1)
    assert (event["op"], event["new"]["id"]) == ("INSERT", key), event


@pytest.fixture
def installed(conn: psycopg.Connection) -> psycopg.Connection:
    pgherald.install(conn)
    return conn


# -- 1. every operation, exact payloads --


def test_insert_update_delete_truncate_exact_payloads(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)")
    t = pgherald.add_table_trigger(conn, "orders")
    assert (t.schema, t.table, t.channel, t.durable) == ("public", "orders", "public.orders", False)
    assert t.events == ("insert", "update", "delete", "truncate")
    with pgherald.Listener(dsn, channels=["public.orders"]) as listener:
        conn.execute("INSERT INTO orders VALUES (1, 'apple', 3)")
        conn.execute("UPDATE orders SET qty = 5 WHERE id = 1")
        conn.execute("DELETE FROM orders WHERE id = 1")
        conn.execute("TRUNCATE orders")
        ins, upd, dele, trunc = take(listener, 4)
    base = {"channel": "public.orders", "schema": "public", "table": "orders"}
    assert strip(ins) == base | {
        "op": "INSERT",
        "new": {"id": 1, "item": "apple", "qty": 3},
        "old": None,
        "changed": None,
    }
    assert strip(upd) == base | {
        "op": "UPDATE",
        "new": {"id": 1, "item": "apple", "qty": 5},
        "old": {"id": 1, "item": "apple", "qty": 3},
        "changed": ["qty"],
    }
    assert strip(dele) == base | {
        "op": "DELETE",
        "new": None,
        "old": {"id": 1, "item": "apple", "qty": 5},
        "changed": None,
    }
    assert strip(trunc) == base | {"op": "TRUNCATE", "new": None, "old": None, "changed": None}
    for e in (ins, upd, dele, trunc):
        assert set(e) == EVENT_KEYS | {"channel"}
    assert len({e["tx"] for e in (ins, upd, dele, trunc)}) == 4  # autocommit: one tx each


def test_events_of_one_transaction_share_tx_and_rollback_sends_nothing(
    dsn: str, installed: psycopg.Connection
) -> None:
    installed.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgherald.add_table_trigger(installed, "t")
    with pgherald.Listener(dsn, channels=["public.t"]) as listener, psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t VALUES (1, 'a')")
        w.rollback()
        w.execute("INSERT INTO t VALUES (2, 'b'), (3, 'c')")
        w.execute("UPDATE t SET v = 'B', id = 20 WHERE id = 2")
        w.commit()
        a, b, c = take(listener, 3)
        nothing_then_sentinel(listener, installed, "t")
    assert [e["op"] for e in (a, b, c)] == ["INSERT", "INSERT", "UPDATE"]
    assert [e["new"]["id"] for e in (a, b, c)] == [2, 3, 20]
    # changed lists columns in the order of the keys of new and old (jsonb's: shorter first)
    assert (c["changed"], c["old"]) == (["v", "id"], {"id": 2, "v": "b"})
    assert a["tx"] == b["tx"] == c["tx"]


# -- 2. names --


def test_mixed_case_and_schema_qualified_names_default_channel(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute('CREATE TABLE "Orders" (id int PRIMARY KEY)')
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")  # the case-folded twin: not ours
    conn.execute("CREATE SCHEMA sales")
    conn.execute('CREATE TABLE sales."Line Items" (id int PRIMARY KEY, "Unit Price" numeric)')
    a = pgherald.add_table_trigger(conn, '"Orders"')
    b = pgherald.add_table_trigger(conn, 'sales."Line Items"')
    assert (a.schema, a.table, a.channel) == ("public", "Orders", "public.Orders")
    assert (b.schema, b.table, b.channel) == ("sales", "Line Items", "sales.Line Items")
    channels = ["public.Orders", "sales.Line Items", "public.orders"]
    with pgherald.Listener(dsn, channels=channels) as listener:
        conn.execute("INSERT INTO orders VALUES (99)")  # no trigger: silent
        conn.execute('INSERT INTO "Orders" VALUES (1)')
        conn.execute('INSERT INTO sales."Line Items" VALUES (2, 1.50)')
        e1, e2 = take(listener, 2)
    assert (e1["channel"], e1["schema"], e1["table"], e1["new"]) == (
        "public.Orders",
        "public",
        "Orders",
        {"id": 1},
    )
    assert (e2["channel"], e2["schema"], e2["table"], e2["new"]) == (
        "sales.Line Items",
        "sales",
        "Line Items",
        {"id": 2, "Unit Price": 1.50},
    )
    # Unquoted names fold to lower case, like SQL: this is the twin.
    assert pgherald.add_table_trigger(conn, "Orders").table == "orders"
    with pytest.raises(pgherald.UsageError, match="does not exist"):
        pgherald.add_table_trigger(conn, 'sales."line items"')


def test_custom_channel(dsn: str, installed: psycopg.Connection) -> None:
    installed.execute('CREATE TABLE "Orders" (id int PRIMARY KEY)')
    t = pgherald.add_table_trigger(installed, '"Orders"', channel="Order Feed")
    assert t.channel == "Order Feed"
    with pgherald.Listener(dsn, channels=["Order Feed", "public.Orders"]) as listener:
        installed.execute('INSERT INTO "Orders" VALUES (7)')
        (e,) = take(listener, 1)
        installed.execute("SELECT pg_notify('public.Orders', '{\"sentinel\": 1}')")
        (s,) = take(listener, 1)
    assert (e["channel"], e["table"], e["new"]) == ("Order Feed", "Orders", {"id": 7})
    assert s == {"channel": "public.Orders", "sentinel": 1}  # nothing went to the default


# -- 3. wide rows --


def test_50kb_row_is_written_and_sent_as_key_with_truncated(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    pgherald.add_table_trigger(conn, "docs")
    body = (uuid.uuid4().hex * 1600)[:50_000]
    with pgherald.Listener(dsn, channels=["public.docs"]) as listener:
        conn.execute("INSERT INTO docs VALUES (42, %s, 1)", (body,))  # no "payload string too long"
        conn.execute("UPDATE docs SET n = 2 WHERE id = 42")
        conn.execute("DELETE FROM docs WHERE id = 42")
        ins, upd, dele = take(listener, 3)
    for e, op in ((ins, "INSERT"), (upd, "UPDATE"), (dele, "DELETE")):
        assert (e["op"], e["truncated"], e["key"]) == (op, True, {"id": 42}), e
        assert not {"new", "old"} & set(e)
        assert (e["schema"], e["table"]) == ("public", "docs")
    assert upd["changed"] == ["n"]
    # The reader fetches the row by the key (here: before the delete, in a fresh write).
    conn.execute("INSERT INTO docs VALUES (43, %s, 1)", (body,))
    row = conn.execute("SELECT body FROM docs WHERE id = %(id)s", {"id": 43}).fetchone()
    assert row == (body,)


def test_50kb_row_durable_arrives_whole_through_a_consumer(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    t = pgherald.add_table_trigger(conn, "docs", durable=True)
    assert t.durable
    body = (uuid.uuid4().hex * 1600)[:50_000]
    conn.execute("INSERT INTO docs VALUES (1, %s)", (body,))
    conn.execute("DELETE FROM docs")
    with pgherald.Consumer(dsn, group="g", channels=["public.docs"], **FAST) as consumer:
        got: list[pgherald.Event] = []
        for ev in consumer:
            got.append(ev)
            if len(got) == 2:
                consumer.stop()
    assert [e.channel for e in got] == ["public.docs", "public.docs"]
    ins, dele = (e.payload for e in got)
    assert (ins["op"], ins["new"]) == ("INSERT", {"id": 1, "body": body})
    assert (dele["op"], dele["old"]) == ("DELETE", {"id": 1, "body": body})
    assert "truncated" not in ins
    assert (ins["table"], ins["tx"]) == ("docs", got[0].tx)


# -- 4. column filtering --


def test_columns_filter_images_and_silence_unwatched_and_noop_updates(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int, secret text, note text)")
    pgherald.add_table_trigger(conn, "acct", columns=["id", "balance"])
    with pgherald.Listener(dsn, channels=["public.acct"]) as listener:
        conn.execute("INSERT INTO acct VALUES (1, 10, 'pw', 'hi')")
        (ins,) = take(listener, 1)
        conn.execute("UPDATE acct SET secret = 'pw2', note = 'x' WHERE id = 1")  # unlisted only
        nothing_then_sentinel(listener, conn, "acct")
        conn.execute("UPDATE acct SET balance = balance WHERE id = 1")  # same values
        nothing_then_sentinel(listener, conn, "acct")
        conn.execute("UPDATE acct SET balance = 11, note = 'y' WHERE id = 1")
        (upd,) = take(listener, 1)
        conn.execute("DELETE FROM acct WHERE id = 1")
        (dele,) = take(listener, 1)
    assert ins["new"] == {"id": 1, "balance": 10}
    assert (upd["new"], upd["old"], upd["changed"]) == (
        {"id": 1, "balance": 11},
        {"id": 1, "balance": 10},
        ["balance"],
    )
    assert dele["old"] == {"id": 1, "balance": 11}


def test_noop_update_without_column_list_sends_nothing(
    dsn: str, installed: psycopg.Connection
) -> None:
    installed.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    installed.execute("INSERT INTO t VALUES (1, 'a')")
    pgherald.add_table_trigger(installed, "t")
    with pgherald.Listener(dsn, channels=["public.t"]) as listener:
        installed.execute("UPDATE t SET v = 'a'")
        nothing_then_sentinel(listener, installed, "t")


def test_unknown_column_is_refused(installed: psycopg.Connection) -> None:
    installed.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with pytest.raises(pgherald.UsageError, match="nope"):
        pgherald.add_table_trigger(installed, "t", columns=["id", "nope"])
    assert pgherald.list_table_triggers(installed) == []


# -- 5. partitioned tables --


@pytest.fixture
def partitioned(installed: psycopg.Connection) -> psycopg.Connection:
    installed.execute(
        "CREATE TABLE m (id int, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)"
    )
    installed.execute(
        "CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
    )
    installed.execute(
        "CREATE TABLE m_2026 PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
    )
    return installed


def test_partitioned_table_events_name_the_partition_on_the_parents_channel(
    dsn: str, partitioned: psycopg.Connection
) -> None:
    conn = partitioned
    t = pgherald.add_table_trigger(conn, "m")
    assert (t.table, t.channel) == ("m", "public.m")
    with pgherald.Listener(dsn, channels=["public.m", "public.m_2025", "public.m_2026"]) as lst:
        conn.execute("INSERT INTO m VALUES (1, '2025-06-01', 'a'), (2, '2026-06-01', 'b')")
        conn.execute("UPDATE m SET day = '2026-02-01' WHERE id = 1")  # moves partitions
        conn.execute("TRUNCATE m")
        events = take(lst, 5)
    # What happens (PostgreSQL's TG_TABLE_NAME in a cloned row trigger): "table" is the
    # partition the row is in; the channel is the parent's (fixed when the trigger is added).
    # A row moved between partitions is a DELETE from one and an INSERT into the other.
    # TRUNCATE is a statement trigger on the parent only.
    assert [(e["channel"], e["op"], e["table"]) for e in events] == [
        ("public.m", "INSERT", "m_2025"),
        ("public.m", "INSERT", "m_2026"),
        ("public.m", "DELETE", "m_2025"),
        ("public.m", "INSERT", "m_2026"),
        ("public.m", "TRUNCATE", "m"),
    ]
    assert events[3]["new"] == {"id": 1, "day": "2026-02-01", "v": "a"}


def test_partitioned_table_is_listed_once(partitioned: psycopg.Connection) -> None:
    pgherald.add_table_trigger(partitioned, "m", columns=["id"])
    assert [(t.table, t.columns) for t in pgherald.list_table_triggers(partitioned)] == [
        ("m", ("id",))
    ]


def test_partitioned_table_via_sql_trigger_add_sends_on_the_parents_channel(
    dsn: str, partitioned: psycopg.Connection
) -> None:
    from pgherald._triggers import trigger_sql

    partitioned.execute(trigger_sql("m"))
    [listed] = [t for t in pgherald.list_table_triggers(partitioned) if t.table == "m"]
    assert listed.channel == "public.m"
    with pgherald.Listener(dsn, channels=["public.m", "public.m_2025"]) as lst:
        partitioned.execute("INSERT INTO m VALUES (1, '2025-06-01', 'a')")
        (e,) = take(lst, 1)
    assert (e["channel"], e["table"]) == ("public.m", "m_2025")


def test_partitioned_table_options_change_and_remove(
    dsn: str, partitioned: psycopg.Connection
) -> None:
    conn = partitioned
    pgherald.add_table_trigger(conn, "m")
    pgherald.add_table_trigger(conn, "m", channel="m2", columns=["id"])  # replaces on clones too
    with pgherald.Listener(dsn, channels=["public.m", "m2"]) as lst:
        conn.execute("INSERT INTO m VALUES (1, '2025-06-01', 'a')")
        (e,) = take(lst, 1)
        assert (e["channel"], e["new"]) == ("m2", {"id": 1})
        assert pgherald.remove_table_trigger(conn, "m") is True
        conn.execute("INSERT INTO m VALUES (2, '2026-06-01', 'a')")
        conn.execute("SELECT pg_notify('m2', '{\"sentinel\": 1}')")
        assert take(lst, 1) == [{"channel": "m2", "sentinel": 1}]
    assert pgherald.list_table_triggers(conn) == []


# -- 6. idempotency, list, remove --


def test_adding_twice_changes_options_never_doubles_events(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int, b int)")
    pgherald.add_table_trigger(conn, "t")
    pgherald.add_table_trigger(conn, "t")  # same options again
    [listed] = pgherald.list_table_triggers(conn)
    assert listed == pgherald.TableTrigger(
        "public", "t", "public.t", ("insert", "update", "delete", "truncate"), (), False, ("id",)
    )
    with pgherald.Listener(dsn, channels=["public.t", "c2"]) as lst:
        conn.execute("INSERT INTO t VALUES (1, 1, 1)")
        (e,) = take(lst, 1)
        nothing_then_sentinel(lst, conn, "t")  # not two events for the one insert
        assert e["new"] == {"id": 1, "a": 1, "b": 1}

        t2 = pgherald.add_table_trigger(
            conn, "t", channel="c2", events=["insert", "update"], columns=["id", "a"], durable=False
        )
        [listed] = pgherald.list_table_triggers(conn)
        assert (
            listed
            == t2
            == pgherald.TableTrigger(
                "public", "t", "c2", ("insert", "update"), ("id", "a"), False, ("id",)
            )
        )
        conn.execute("INSERT INTO t VALUES (2, 2, 2)")
        conn.execute("UPDATE t SET a = 5 WHERE id = 1")
        conn.execute("UPDATE t SET b = 5 WHERE id = 1")  # b is no longer watched
        conn.execute("DELETE FROM t WHERE id = 2")  # delete no longer watched
        conn.execute("TRUNCATE t")  # neither is truncate
        conn.execute("SELECT pg_notify('c2', '{\"sentinel\": 1}')")
        got = take(lst, 3)
        assert [(e["channel"], e.get("op"), e.get("new")) for e in got] == [
            ("c2", "INSERT", {"id": 2, "a": 2}),
            ("c2", "UPDATE", {"id": 1, "a": 5}),
            ("c2", None, None),
        ]
        conn.execute("SELECT pg_notify('public.t', '{\"sentinel\": 2}')")
        assert take(lst, 1) == [{"channel": "public.t", "sentinel": 2}]  # old channel silent
    assert pgherald.remove_table_trigger(conn, "t") is True
    assert pgherald.list_table_triggers(conn) == []
    assert pgherald.remove_table_trigger(conn, "t") is False
    left = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND NOT tgisinternal"
    ).fetchone()
    assert left == (0,)


def test_durable_option_is_listed_and_switches_back(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pgherald.add_table_trigger(conn, "t", durable=True)
    assert [t.durable for t in pgherald.list_table_triggers(conn)] == [True]
    conn.execute("INSERT INTO t VALUES (1)")
    pgherald.add_table_trigger(conn, "t")
    assert [t.durable for t in pgherald.list_table_triggers(conn)] == [False]
    with pgherald.Listener(dsn, channels=["public.t"]) as lst:
        conn.execute("INSERT INTO t VALUES (2)")
        (e,) = take(lst, 1)
    assert e["new"] == {"id": 2}
    rows = conn.execute("SELECT payload->'new' FROM pgherald.events_v1 ORDER BY id").fetchall()
    assert rows == [({"id": 1},)]  # one durable event, from before the switch


def test_list_shows_non_ascii_channel_and_columns(installed: psycopg.Connection) -> None:
    installed.execute('CREATE TABLE "Größe" (id int PRIMARY KEY, "Maß" int)')
    pgherald.add_table_trigger(installed, '"Größe"', channel="Kanäle", columns=["Maß"])
    [t] = pgherald.list_table_triggers(installed)
    assert (t.table, t.channel, t.columns) == ("Größe", "Kanäle", ("Maß",))


def test_non_ascii_names_deliver(dsn: str, installed: psycopg.Connection) -> None:
    installed.execute('CREATE TABLE "Größe" (id int PRIMARY KEY, "Maß" int, x int)')
    pgherald.add_table_trigger(installed, '"Größe"', columns=["Maß"])
    with pgherald.Listener(dsn, channels=["public.Größe"]) as lst:
        installed.execute('INSERT INTO "Größe" VALUES (1, 2, 3)')
        (e,) = take(lst, 1)
    assert (e["table"], e["new"]) == ("Größe", {"Maß": 2})


# -- 7. no stray objects --


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "triggers": conn.execute(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal "
            "ORDER BY 1, 2"
        ).fetchall(),
        "event_triggers": conn.execute(
            "SELECT evtname FROM pg_event_trigger ORDER BY 1"
        ).fetchall(),
        "pgherald_functions": conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgherald' ORDER BY 1"
        ).fetchall(),
        "namespaces": conn.execute("SELECT nspname FROM pg_namespace ORDER BY 1").fetchall(),
    }


def test_install_triggers_ddl_uninstall_remove_leaves_no_stray_objects(
    conn: psycopg.Connection,
) -> None:
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE SCHEMA sales")
    conn.execute('CREATE TABLE sales."Line Items" (id int PRIMARY KEY)')
    before = snapshot(conn)
    pgherald.install(conn)
    pgherald.add_table_trigger(conn, "a")
    pgherald.add_table_trigger(conn, 'sales."Line Items"', durable=True, events=["truncate"])
    pgherald.enable_ddl_events(conn)
    during = snapshot(conn)
    assert (len(during["triggers"]), len(during["event_triggers"])) == (3, 2)
    assert {"notify_change_v1()", "notify_ddl_v1()"} <= {
        f[0].removeprefix("pgherald.") for f in during["pgherald_functions"]
    }
    pgherald.uninstall(conn)
    pgherald.remove_table_trigger(conn, "a")
    pgherald.remove_table_trigger(conn, 'sales."Line Items"')
    assert snapshot(conn) == before
    conn.execute("INSERT INTO a VALUES (1)")  # the table still works
    conn.execute("CREATE TABLE b (id int)")  # so does DDL


def test_remove_and_disable_before_uninstall_leave_no_stray_objects(
    conn: psycopg.Connection,
) -> None:
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    before = snapshot(conn)
    pgherald.install(conn)
    pgherald.add_table_trigger(conn, "a")
    pgherald.enable_ddl_events(conn)
    pgherald.enable_ddl_events(conn)  # twice: still two event triggers
    assert len(snapshot(conn)["event_triggers"]) == 2
    assert pgherald.remove_table_trigger(conn, "a") is True
    pgherald.disable_ddl_events(conn)
    after = snapshot(conn)
    assert (after["event_triggers"], after["triggers"]) == ([], [])
    pgherald.uninstall(conn)
    assert snapshot(conn) == before


def test_add_before_install_says_install(installed: psycopg.Connection) -> None:
    pgherald.uninstall(installed)
    installed.execute("CREATE TABLE a (id int)")
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.add_table_trigger(installed, "a")


# -- 8. DDL events --


def test_ddl_events_create_alter_drop(dsn: str, installed: psycopg.Connection) -> None:
    conn = installed
    pgherald.enable_ddl_events(conn)
    with pgherald.Listener(dsn, channels=["pgherald_ddl"]) as lst:
        conn.execute('CREATE TABLE "Audit Log" (id int)')
        (created,) = take(lst, 1)
        conn.execute('ALTER TABLE "Audit Log" ADD COLUMN note text')
        (altered,) = take(lst, 1)
        conn.execute('DROP TABLE "Audit Log"')
        conn.execute("SELECT pg_notify('pgherald_ddl', '{\"sentinel\": 1}')")
        dropped: list[dict[str, Any]] = []
        for note in lst.notifications(timeout=5):
            dropped.append(note.json())
            if dropped[-1].get("sentinel"):
                break
    assert created == {
        "channel": "pgherald_ddl",
        "event": "ddl_command_end",
        "command_tag": "CREATE TABLE",
        "object_type": "table",
        "schema": "public",
        "object_identity": 'public."Audit Log"',
    }
    assert altered == created | {"command_tag": "ALTER TABLE"}
    assert dropped[-1] == {"sentinel": 1}
    assert {
        "event": "sql_drop",
        "command_tag": "DROP TABLE",
        "object_type": "table",
        "schema": "public",
        "object_identity": 'public."Audit Log"',
    } in dropped
    assert {e.get("command_tag") for e in dropped[:-1]} == {"DROP TABLE"}


def test_ddl_disable_stops_events(dsn: str, installed: psycopg.Connection) -> None:
    pgherald.enable_ddl_events(installed)
    pgherald.disable_ddl_events(installed)
    with pgherald.Listener(dsn, channels=["pgherald_ddl"]) as lst:
        installed.execute("CREATE TABLE x (id int)")
        installed.execute("SELECT pg_notify('pgherald_ddl', '{\"sentinel\": 1}')")
        assert [n.json() for n in lst.notifications(timeout=5)][:1] == [{"sentinel": 1}]


@pytest.fixture
def plain_role_dsn(dsn: str, conn: psycopg.Connection) -> Iterator[str]:
    """A LOGIN role without superuser, and a DSN connecting as it to the test database."""
    role = f"pgherald_plain_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))  # its grants
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_ddl_enable_as_non_superuser_raises_privilege_error(
    plain_role_dsn: str, installed: psycopg.Connection
) -> None:
    role = str(conninfo_to_dict(plain_role_dsn)["user"])
    installed.execute(sql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(sql.Identifier(role)))
    with psycopg.connect(plain_role_dsn, autocommit=True) as plain:
        su = plain.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert su.fetchone() == (False,)
        with pytest.raises(pgherald.PrivilegeError, match="superuser"):
            pgherald.enable_ddl_events(plain)
        with pytest.raises(pgherald.PrivilegeError, match="superuser"):
            pgherald.disable_ddl_events(plain)
    assert installed.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)


def test_ddl_enable_as_non_superuser_without_schema_usage_raises_privilege_error(
    plain_role_dsn: str, installed: psycopg.Connection
) -> None:
    with (
        psycopg.connect(plain_role_dsn, autocommit=True) as plain,
        pytest.raises(pgherald.PrivilegeError, match="superuser"),
    ):
        pgherald.enable_ddl_events(plain)


# -- 9. the user's write never breaks --


def test_table_without_primary_key(dsn: str, installed: psycopg.Connection) -> None:
    conn = installed
    conn.execute("CREATE TABLE log (line text, n int)")
    pgherald.add_table_trigger(conn, "log")
    wide = "y" * 20_000
    with pgherald.Listener(dsn, channels=["public.log"]) as lst:
        conn.execute("INSERT INTO log VALUES ('short', 1), (%s, 2)", (wide,))
        conn.execute("UPDATE log SET n = n + 10")
        conn.execute("DELETE FROM log")
        events = take(lst, 6)
    assert [e["op"] for e in events] == ["INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE", "DELETE"]
    small = [e for e in events if not e.get("truncated")]
    big = [e for e in events if e.get("truncated")]
    assert len(small) == len(big) == 3
    assert small[0]["new"] == {"line": "short", "n": 1}
    for e in big:  # no primary key: nothing to fetch by, but the write and the event go through
        assert e["key"] is None
        assert "new" not in e


def test_very_wide_row_and_huge_key_never_fail_the_write(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute("CREATE TABLE big (k text PRIMARY KEY, body text, j jsonb)")
    pgherald.add_table_trigger(conn, "big")
    body = uuid.uuid4().hex * 125_000  # 4 MB
    huge_key = "k" * 9000  # alone over NOTIFY's limit (compressible, so the btree accepts it)
    with pgherald.Listener(dsn, channels=["public.big"]) as lst:
        conn.execute(
            "INSERT INTO big VALUES ('a', %s, %s)",
            (body, json.dumps({"list": list(range(10_000))})),
        )
        conn.execute("INSERT INTO big VALUES (%s, 'x', NULL)", (huge_key,))
        wide, huge = take(lst, 2)
    assert (wide["truncated"], wide["key"]) == (True, {"k": "a"})
    assert (huge["truncated"], huge["op"]) == (True, "INSERT")
    assert "key" not in huge
    assert conn.execute("SELECT count(*) FROM big").fetchone() == (2,)


# 150 columns of 60-byte names: all of them changed make a ~9,600-byte "changed" list.
WIDE_COLUMNS = [f"c{i:03d}_" + "x" * 55 for i in range(150)]


@pytest.mark.parametrize("function", ["generated", "shared"])
@pytest.mark.parametrize(
    ("key_length", "changed_count", "kept"),
    [
        # a huge key, one changed column: the key goes, "changed" stays
        (9000, 1, {"changed"}),
        # a one-byte key, a huge changed-column list: "changed" goes, the key stays
        (1, 150, {"key"}),
        # each fits alone, not both together: the key stays (the row is fetched by it)
        (4000, 80, {"key"}),
        # neither fits alone: both go
        (9000, 150, set()),
    ],
    ids=["huge_key", "huge_changed", "both_fit_alone_not_together", "both_huge"],
)
def test_too_wide_reduced_event_drops_only_what_does_not_fit(
    dsn: str,
    installed: psycopg.Connection,
    function: str,
    key_length: int,
    changed_count: int,
    kept: set[str],
) -> None:
    """A reduced event still over NOTIFY's limit loses the key only when it alone is too wide,
    and "changed" when it does not fit beside the key (or alone): never both needlessly."""
    conn = installed
    conn.execute(
        sql.SQL("CREATE TABLE wide (k text PRIMARY KEY, {})").format(
            sql.SQL(", ").join(sql.SQL("{} int").format(sql.Identifier(c)) for c in WIDE_COLUMNS)
        )
    )
    if function == "generated":
        pgherald.add_table_trigger(conn, "wide")
    else:
        shared_trigger(conn, "wide", "public.wide", "[]", "f", "k")
    key = "k" * key_length  # compressible: the btree takes it
    conn.execute("INSERT INTO wide (k) VALUES (%s)", (key,))  # before the LISTEN: not heard
    changed = WIDE_COLUMNS[:changed_count]  # jsonb's order: one length, so by name
    with pgherald.Listener(dsn, channels=["public.wide"]) as listener:
        conn.execute(
            sql.SQL("UPDATE wide SET {}").format(
                sql.SQL(", ").join(sql.SQL("{} = 1").format(sql.Identifier(c)) for c in changed)
            )
        )
        (e,) = take(listener, 1)
        nothing_then_sentinel_sql(listener, conn)
    reduced = {"channel": "public.wide", "op": "UPDATE", "schema": "public", "table": "wide"}
    optional = {"key": {"k": key}, "changed": changed}
    assert set(e) == {*reduced, "tx", "ts", "truncated", *kept}
    assert strip(e) == reduced | {"truncated": True} | {f: optional[f] for f in kept}
    assert len(json.dumps(e).encode()) < 8000


def nothing_then_sentinel_sql(listener: pgherald.Listener, conn: psycopg.Connection) -> None:
    """A NOTIFY after the change must be the next event: the change sent exactly one."""
    conn.execute("SELECT pg_notify('public.wide', '{\"sentinel\": 1}')")
    (s,) = take(listener, 1)
    assert s == {"channel": "public.wide", "sentinel": 1}


def test_durable_trigger_write_rolls_back_with_the_transaction(
    dsn: str, installed: psycopg.Connection
) -> None:
    installed.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pgherald.add_table_trigger(installed, "t", durable=True)
    with psycopg.connect(dsn) as w:
        w.execute("INSERT INTO t VALUES (1)")
        w.rollback()
        w.execute("INSERT INTO t VALUES (2)")
        w.commit()
    rows = installed.execute("SELECT channel, payload->'new' FROM pgherald.events_v1").fetchall()
    assert rows == [("public.t", {"id": 2})]


# -- 10. the per-row function's shortcuts change nothing --


def raw_payloads(listener: pgherald.Listener, n: int) -> list[str]:
    got = [note.payload for note in itertools.islice(listener.notifications(timeout=5), n)]
    assert len(got) == n, got
    return got


def test_payload_text_is_jsonbs_own_text_for_every_operation_and_odd_names(
    dsn: str, installed: psycopg.Connection
) -> None:
    # The NOTIFY text is assembled without building a jsonb first: it must stay byte for byte
    # what jsonb_build_object(...)::text gave (keys in jsonb's order, jsonb's spacing).
    conn = installed
    conn.execute('CREATE SCHEMA "Sch""ema ü"')
    conn.execute(
        'CREATE TABLE "Sch""ema ü"."T\\able ""x"" ö" (id int PRIMARY KEY, "Unit Price" numeric, '
        "f float8, t text, j jsonb, a int[], at timestamptz, b bytea)"
    )
    table = '"Sch""ema ü"."T\\able ""x"" ö"'
    pgherald.add_table_trigger(conn, table, channel="odd")
    with pgherald.Listener(dsn, channels=["odd"]) as listener:
        conn.execute(
            f"INSERT INTO {table} VALUES (1, 1.50, 0.1, %s, %s, '{{1,NULL}}', "
            "'2024-01-02 03:04:05.678+02', '\\x00ff')",
            ('he said "hi"\n\ttab ✓ \\', json.dumps({"b": [1, 2.0, None], "a": "x"})),
        )
        conn.execute(f'UPDATE {table} SET f = 1e300, "Unit Price" = 1.500 WHERE id = 1')
        conn.execute(f"UPDATE {table} SET t = NULL, id = 2")
        conn.execute(f"DELETE FROM {table}")
        conn.execute(f"TRUNCATE {table}")
        payloads = raw_payloads(listener, 5)
    for payload in payloads:
        assert conn.execute("SELECT %s::jsonb::text", (payload,)).fetchone() == (payload,)
    events = [json.loads(p) for p in payloads]
    assert [e["op"] for e in events] == ["INSERT", "UPDATE", "UPDATE", "DELETE", "TRUNCATE"]
    assert {(e["schema"], e["table"]) for e in events} == {('Sch"ema ü', 'T\\able "x" ö')}
    assert events[0]["new"]["t"] == 'he said "hi"\n\ttab ✓ \\'
    assert events[1]["changed"] == ["f"]  # 1.50 -> 1.500 is no change, as numeric says
    assert events[2]["changed"] == ["t", "id"]
    assert list(events[0]) == ["op", "ts", "tx", "new", "old", "table", "schema", "changed"]


def test_changed_columns_follow_the_jsonb_key_order(
    dsn: str, installed: psycopg.Connection
) -> None:
    # jsonb orders keys by byte length, then bytes: neither the column order, nor C or
    # locale sorting. The odd names also go through the diff loop's key handling.
    installed.execute(
        'CREATE TABLE t (id int PRIMARY KEY, "Zeta" int, bb int, "q""x" int, "é" int, a int)'
    )
    installed.execute("INSERT INTO t VALUES (1, 1, 1, 1, 1, 1)")
    pgherald.add_table_trigger(installed, "t")
    with pgherald.Listener(dsn, channels=["public.t"]) as listener:
        installed.execute('UPDATE t SET "Zeta" = 2, bb = 2, "q""x" = 2, "é" = 2, a = 2')
        (e,) = take(listener, 1)
    assert e["changed"] == ["a", "bb", "é", 'q"x', "Zeta"]
    assert list(e["new"]) == ["a", "bb", "id", "é", 'q"x', "Zeta"]


def test_trigger_add_stores_the_resolved_channel(partitioned: psycopg.Connection) -> None:
    # The function then needs no catalog lookup per row.
    partitioned.execute("CREATE TABLE plain_t (id int PRIMARY KEY)")
    pgherald.add_table_trigger(partitioned, "plain_t")
    pgherald.add_table_trigger(partitioned, "m")
    args = partitioned.execute(
        "SELECT tgrelid::regclass::text, tgname, tgargs FROM pg_trigger "
        "WHERE tgname LIKE 'pgherald_%%' AND tgparentid = 0 ORDER BY 1, 2"
    ).fetchall()
    assert [(rel, name, bytes(a).split(b"\0")[0].decode()) for rel, name, a in args] == [
        ("m", "pgherald_change_v1", "public.m"),
        ("m", "pgherald_truncate_v1", "public.m"),
        ("plain_t", "pgherald_change_v1", "public.plain_t"),
        ("plain_t", "pgherald_truncate_v1", "public.plain_t"),
    ]


@pytest.mark.parametrize("args", ["'', '[]', 'f'", ""], ids=["empty-channel", "no-arguments"])
def test_triggers_without_a_channel_still_send_on_the_default_channel(
    dsn: str, partitioned: psycopg.Connection, args: str
) -> None:
    # Triggers made by `sql trigger add` (or by hand, or by older versions) name no channel:
    # the function finds the table's (for a partition, its root's) name itself.
    conn = partitioned
    conn.execute('CREATE SCHEMA "Big Sales"')
    conn.execute('CREATE TABLE "Big Sales"."Orders" (id int PRIMARY KEY, v text)')
    for table in ('"Big Sales"."Orders"', "m"):
        conn.execute(
            f"CREATE TRIGGER pgherald_change_v1 AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION pgherald.notify_change_v1({args})"
        )
    with pgherald.Listener(dsn, channels=["Big Sales.Orders", "public.m"]) as listener:
        conn.execute("""INSERT INTO "Big Sales"."Orders" VALUES (1, 'a')""")
        conn.execute("""UPDATE "Big Sales"."Orders" SET v = 'b'""")
        conn.execute("INSERT INTO m VALUES (1, '2026-06-01', 'a')")
        events = take(listener, 3)
    assert [(e["channel"], e["op"], e["table"]) for e in events] == [
        ("Big Sales.Orders", "INSERT", "Orders"),
        ("Big Sales.Orders", "UPDATE", "Orders"),
        ("public.m", "INSERT", "m_2026"),
    ]
    assert (events[1]["changed"], events[1]["new"]) == (["v"], {"id": 1, "v": "b"})


def test_wide_row_key_comes_from_the_whole_row_even_with_a_column_list(
    dsn: str, installed: psycopg.Connection
) -> None:
    installed.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    pgherald.add_table_trigger(installed, "docs", columns=["body"])
    with pgherald.Listener(dsn, channels=["public.docs"]) as listener:
        installed.execute("INSERT INTO docs VALUES (7, %s)", (uuid.uuid4().hex * 600,))
        (e,) = take(listener, 1)
    assert (e["truncated"], e["key"]) == (True, {"id": 7})


def test_durable_trigger_stores_the_event_and_wakes_consumers_like_publish(
    dsn: str, installed: psycopg.Connection
) -> None:
    # The durable path inserts into the log itself (not through publish_v1): same row, same
    # gated wake-up on pgherald_wake_v1.
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgherald.add_table_trigger(conn, "t", durable=True)
    gate = "SELECT pg_advisory_xact_lock(hashtext('pgherald.wake_v1'), 0)"
    sentinel = "SELECT pg_notify('pgherald_wake_v1', 'sentinel')"
    waiting = pgherald.sql.query("hold_wakeups")
    with (
        pgherald.Listener(dsn, channels=["pgherald_wake_v1"]) as listener,
        psycopg.connect(dsn) as other,
        psycopg.connect(dsn, autocommit=True) as consumer,
    ):
        conn.execute("INSERT INTO t VALUES (0, 'nobody waits')")  # no wake-up: none needed
        conn.execute(sentinel)
        got = [n.payload for n in itertools.islice(listener.notifications(timeout=5), 1)]
        assert got == ["sentinel"]
        conn.execute("DELETE FROM pgherald.events_v1")  # (stored all the same: out of the way)
        consumer.execute(waiting)  # as a consumer about to wait does
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        assert [n.payload for n in itertools.islice(listener.notifications(timeout=5), 1)] == [""]
        other.execute(gate)  # another writer holds the gate: it is the one that notifies
        conn.execute("INSERT INTO t VALUES (2, 'b')")
        other.rollback()
        conn.execute("SET pgherald.wake_max_queue_usage = 0")  # queue "too full": no wake-up
        conn.execute("UPDATE t SET v = 'c' WHERE id = 1")
        conn.execute("RESET pgherald.wake_max_queue_usage")
        conn.execute(sentinel)
        got = [n.payload for n in itertools.islice(listener.notifications(timeout=5), 1)]
        assert got == ["sentinel"]  # neither of the two changes in between woke anyone
    rows = conn.execute(
        "SELECT channel, key, headers, payload, tx = (payload->>'tx')::xid8 "
        "FROM pgherald.events_v1 ORDER BY id"
    ).fetchall()
    assert [(ch, key, headers, same_tx) for ch, key, headers, _, same_tx in rows] == [
        ("public.t", "1", None, True),
        ("public.t", "2", None, True),
        ("public.t", "1", None, True),
    ]  # keyed by the primary key
    assert [strip(payload) for *_, payload, _ in rows] == [
        {
            "op": "INSERT",
            "schema": "public",
            "table": "t",
            "new": {"id": 1, "v": "a"},
            "old": None,
            "changed": None,
        },
        {
            "op": "INSERT",
            "schema": "public",
            "table": "t",
            "new": {"id": 2, "v": "b"},
            "old": None,
            "changed": None,
        },
        {
            "op": "UPDATE",
            "schema": "public",
            "table": "t",
            "new": {"id": 1, "v": "c"},
            "old": {"id": 1, "v": "a"},
            "changed": ["v"],
        },
    ]


# -- keys: durable change events carry the row's key --


def log_keys(conn: psycopg.Connection) -> list[tuple[str, str | None]]:
    """(op, key) of every event in the log, in insertion order."""
    rows = conn.execute("SELECT payload->>'op', key FROM pgherald.events_v1 ORDER BY id")
    return [(op, key) for op, key in rows]


def test_two_members_handle_one_rows_1000_updates_in_order(
    dsn: str, conn: psycopg.Connection
) -> None:
    pgherald.install(conn)
    conn.execute("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)")
    t = pgherald.add_table_trigger(conn, "counter", durable=True)
    assert t.key_columns == ("id",)
    handled: list[tuple[str, pgherald.Event]] = []
    lock = threading.Lock()

    def recorder(name: str) -> Callable[[pgherald.Event], None]:
        def record(event: pgherald.Event) -> None:
            with lock:  # one list in the order events were handled, by either member
                handled.append((name, event))

        return record

    members = [Running(dsn, channels=("public.counter",), handler=recorder(name)) for name in "ab"]
    try:
        a, b = (m.consumer for m in members)
        wait_until(
            lambda: a.partitions and b.partitions and not set(a.partitions) & set(b.partitions),
            10,
            "both members to hold partitions",
        )
        conn.execute("INSERT INTO counter VALUES (1, 0)")
        for _ in range(1000):  # 1,000 transactions, one update each
            conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        # Other rows, keyed elsewhere: both members have events to handle meanwhile.
        conn.execute("INSERT INTO counter SELECT g, 0 FROM generate_series(2, 61) g")
        wait_until(lambda: len(handled) >= 1061, 60, "1,061 events handled")
        assert all(len(m.consumer.partitions) > 0 for m in members)
    finally:
        for m in members:
            m.stop()
    row = [(name, e) for name, e in handled if e.payload["new"]["id"] == 1]
    assert [e.payload["new"]["n"] for _, e in row] == list(range(1001))  # handled in order
    assert {e.key for _, e in row} == {"1"}
    assert len({e.partition for _, e in row}) == 1  # one partition...
    assert len({name for name, _ in row}) == 1  # ...so one member handled them all
    assert {name for name, _ in handled} == {"a", "b"}  # while the other had work too
    assert len(handled) == 1061


def test_key_is_the_primary_key_for_every_operation(installed: psycopg.Connection) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (id text PRIMARY KEY, v int)")
    pgherald.add_table_trigger(conn, "t", durable=True)
    conn.execute("INSERT INTO t VALUES ('a b', 1), ('é', 1)")
    conn.execute("UPDATE t SET v = 2 WHERE id = 'a b'")
    conn.execute("UPDATE t SET id = 'c' WHERE id = 'é'")  # a new key: the new row's
    conn.execute("DELETE FROM t WHERE id = 'a b'")
    conn.execute("TRUNCATE t")  # a statement: no row, no key
    assert log_keys(conn) == [
        ("INSERT", "a b"),
        ("INSERT", "é"),
        ("UPDATE", "a b"),
        ("UPDATE", "c"),
        ("DELETE", "a b"),
        ("TRUNCATE", None),
    ]
    # The partition is the key's, as for publish(key=...).
    same = conn.execute(
        "SELECT bool_and(partition = (SELECT partition FROM pgherald.events_v1 e2 "
        "WHERE e2.key = 'a b' ORDER BY id LIMIT 1)) FROM pgherald.events_v1 WHERE key = 'a b'"
    ).fetchone()
    assert same == (True,)


def test_key_columns_option_and_the_column_list(dsn: str, installed: psycopg.Connection) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, account int, v int, doc text)")
    t = pgherald.add_table_trigger(conn, "t", durable=True, key_columns=["account"], columns=["v"])
    assert t.key_columns == ("account",)
    [listed] = pgherald.list_table_triggers(conn)
    assert listed == t
    conn.execute("INSERT INTO t VALUES (1, 7, 1), (2, NULL, 1)")
    conn.execute("UPDATE t SET v = 2 WHERE id = 1")
    # The key comes from the whole row, though "new" only has v; a NULL key: no key.
    assert log_keys(conn) == [("INSERT", "7"), ("INSERT", None), ("UPDATE", "7")]
    assert conn.execute("SELECT payload->'new' FROM pgherald.events_v1").fetchall()[0] == (
        {"v": 1},
    )
    with pytest.raises(pgherald.UsageError, match="no column 'nope'"):
        pgherald.add_table_trigger(conn, "t", durable=True, key_columns=["id", "nope"])
    # Without durable, a row too wide for NOTIFY is sent as its key columns.
    pgherald.add_table_trigger(conn, "t", key_columns=["account"])
    with pgherald.Listener(dsn, channels=["public.t"]) as listener:
        conn.execute("INSERT INTO t VALUES (3, 9, 1, %s)", (uuid.uuid4().hex * 600,))
        (e,) = take(listener, 1)
    assert (e["truncated"], e["key"]) == (True, {"account": 9})


def test_composite_key_is_a_json_array_in_key_order(installed: psycopg.Connection) -> None:
    conn = installed
    conn.execute(
        "CREATE TABLE t (id int, region text, v int, PRIMARY KEY (region, id))"
    )  # the key's order differs from the table's
    t = pgherald.add_table_trigger(conn, "t", durable=True)
    assert t.key_columns == ("region", "id")
    conn.execute("INSERT INTO t VALUES (1, 'eu \"west\"', 0)")
    conn.execute("DELETE FROM t")
    pgherald.add_table_trigger(conn, "t", durable=True, key_columns=["id", "region"])
    conn.execute("INSERT INTO t VALUES (2, 'us', 0)")
    conn.execute("TRUNCATE t")
    assert log_keys(conn) == [
        ("INSERT", '["eu \\"west\\"", 1]'),
        ("DELETE", '["eu \\"west\\"", 1]'),
        ("INSERT", '[2, "us"]'),
        ("TRUNCATE", None),
    ]
    assert [json.loads(k) for _, k in log_keys(conn)[:3]] == [['eu "west"', 1]] * 2 + [[2, "us"]]


def test_table_without_primary_key_has_no_key_unless_given(
    installed: psycopg.Connection,
) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (a int, b int)")
    t = pgherald.add_table_trigger(conn, "t", durable=True)
    assert t.key_columns == ()
    assert pgherald.list_table_triggers(conn)[0].key_columns == ()
    conn.execute("INSERT INTO t VALUES (1, 1)")
    pgherald.add_table_trigger(conn, "t", durable=True, key_columns=["b"])
    conn.execute("INSERT INTO t VALUES (2, 2)")
    pgherald.add_table_trigger(conn, "t", durable=True, key_columns=[])  # explicitly none
    conn.execute("INSERT INTO t VALUES (3, 3)")
    assert log_keys(conn) == [("INSERT", None), ("INSERT", "2"), ("INSERT", None)]


def test_triggers_added_before_keys_keep_working_without_a_key(
    installed: psycopg.Connection,
) -> None:
    # What `trigger add --durable` created before 0.1.0_09: three arguments, no key.
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    conn.execute(
        "CREATE TRIGGER pgherald_change_v1 AFTER INSERT OR UPDATE OR DELETE ON t FOR EACH ROW "
        "EXECUTE FUNCTION pgherald.notify_change_v1('public.t', '[]', 't')"
    )
    conn.execute("INSERT INTO t VALUES (1, 1)")
    conn.execute("UPDATE t SET v = 2")
    assert log_keys(conn) == [("INSERT", None), ("UPDATE", None)]
    [listed] = pgherald.list_table_triggers(conn)
    assert (listed.durable, listed.key_columns) == (True, ())
    pgherald.add_table_trigger(conn, "t", durable=True)  # adding again gives it the key
    conn.execute("UPDATE t SET v = 3")
    assert log_keys(conn)[-1] == ("UPDATE", "1")


def test_plain_trigger_skips_its_event_past_the_queue_threshold_and_the_write_commits(
    dsn: str, installed: psycopg.Connection
) -> None:
    """Past pgherald.change_max_queue_usage the write commits without its event (a full queue
    would fail the COMMIT); a threshold of 0 stands in for a full queue. The default notifies."""
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pgherald.add_table_trigger(conn, "t")
    conn.execute("CREATE TABLE d (id int PRIMARY KEY)")
    pgherald.add_table_trigger(conn, "d", durable=True)
    with pgherald.Listener(dsn, channels=["public.t"]) as listener:
        conn.execute("SET pgherald.change_max_queue_usage = 0")
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            conn.execute("UPDATE t SET v = 'b'")
        conn.execute("DELETE FROM t")
        conn.execute("INSERT INTO d VALUES (1)")  # the durable log does not depend on it
        conn.execute("RESET pgherald.change_max_queue_usage")
        nothing_then_sentinel(listener, conn, "t")
        conn.execute("SET pgherald.change_max_queue_usage = ''")  # empty: the default too
        conn.execute("INSERT INTO t VALUES (2, 'c')")
        (event,) = take(listener, 1)
    assert (event["op"], event["new"]) == ("INSERT", {"id": 2, "v": "c"})
    stored = conn.execute("SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'public.d'")
    assert stored.fetchone() == (1,)


# -- generated functions: one per table, the shared function's events --


def functions_of(conn: psycopg.Connection) -> list[str]:
    """The generated trigger functions in schema pgherald."""
    rows = conn.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'pgherald'::regnamespace "
        "AND p.proname LIKE 'change\\_v1\\_%' ORDER BY 1"
    )
    return [r[0] for r in rows]


def test_trigger_add_generates_the_tables_own_function_and_remove_drops_it(
    installed: psycopg.Connection,
) -> None:
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    t = pgherald.add_table_trigger(conn, "t")
    assert t.function == "pgherald.change_v1_public.t"
    [listed] = pgherald.list_table_triggers(conn)
    assert listed.function == t.function
    assert functions_of(conn) == ["change_v1_public.t"]
    called = conn.execute(
        "SELECT DISTINCT tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = 't'::regclass"
    ).fetchall()
    assert called == [('pgherald."change_v1_public.t"',)]
    comment = conn.execute(
        "SELECT obj_description('pgherald.\"change_v1_public.t\"'::regproc, 'pg_proc')"
    ).fetchone()
    assert comment is not None
    assert "generated by `pgherald trigger add` (v1)" in comment[0]
    conn.execute("ALTER TABLE t RENAME TO u")  # the function keeps its name; a new add
    pgherald.add_table_trigger(conn, "u", durable=True)  # replaces it, the old one goes
    assert functions_of(conn) == ["change_v1_public.u"]
    assert pgherald.remove_table_trigger(conn, "u") is True
    assert functions_of(conn) == []


def test_long_names_give_distinct_functions_within_63_bytes(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    names = ["ü" * 29 + "a", "ü" * 29 + "b"]  # 59 bytes each: "change_v1_public." is 17 more
    for name in names:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(name)))
        pgherald.add_table_trigger(conn, sql.Identifier(name).as_string(conn), channel=name[-1])
    made = functions_of(conn)
    assert len(made) == 2
    assert all(len(f.encode()) <= 63 for f in made)
    with pgherald.Listener(dsn, channels=["a", "b"]) as listener:
        for name in names:
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(name)))
        got = take(listener, 2)
    assert [(e["channel"], e["table"]) for e in got] == [("a", names[0]), ("b", names[1])]


def shared_trigger(conn: psycopg.Connection, table: str, *args: str) -> None:
    """What `trigger add` created before 0.1.0 generated functions: the shared function."""
    literals = sql.SQL(", ").join(map(sql.Literal, args))
    for when, each in (("INSERT OR UPDATE OR DELETE", "ROW"), ("TRUNCATE", "STATEMENT")):
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER {} ON {} FOR EACH {} "
                "EXECUTE FUNCTION pgherald.notify_change_v1({})"
            ).format(
                sql.Identifier("pgherald_change_v1" if each == "ROW" else "pgherald_truncate_v1"),
                sql.SQL(when),
                sql.Identifier(table),
                sql.SQL(each),
                literals,
            )
        )


CHANGES = [
    "INSERT INTO {} VALUES (1, 'eu', 1.50, 'a', '2024-01-02 03:04:05+00', '{{1,2}}', NULL)",
    "INSERT INTO {} VALUES (2, 'us', 2, repeat('w', 9000), '2025-06-07 08:09:10.5+00', NULL, '{{\"x\": [1]}}')",
    "UPDATE {} SET n = 1.500 WHERE id = 1",  # no change, as numeric says: no event
    "UPDATE {} SET n = 3, t = 'b' WHERE id = 1",
    "UPDATE {} SET t = t WHERE id = 2",  # nothing changed
    "UPDATE {} SET j = '{{\"x\": [2]}}', id = 3 WHERE id = 2",  # a too-wide row: key only
    "UPDATE {} SET a = NULL",
    "DELETE FROM {} WHERE id = 1",
    "TRUNCATE {}",
]


@pytest.mark.parametrize(
    ("options", "args"),
    [
        ({}, ("c_{}", "[]", "f", "id")),
        ({"columns": ["t", "n", "id"]}, ("c_{}", '["t", "n", "id"]', "f", "id")),
        ({"key_columns": ["r", "id"]}, ("c_{}", "[]", "f", "r", "id")),
        ({"key_columns": []}, ("c_{}", "[]", "f")),
        ({"durable": True}, ("c_{}", "[]", "t", "id")),
        ({"durable": True, "columns": ["n"]}, ("c_{}", '["n"]', "t", "id")),
        ({"durable": True, "key_columns": ["r", "id"]}, ("c_{}", "[]", "t", "r", "id")),
    ],
)
def test_generated_function_sends_exactly_the_shared_functions_events(
    dsn: str, installed: psycopg.Connection, options: dict[str, Any], args: tuple[str, ...]
) -> None:
    """Two equal tables, one with the shared function's trigger (as earlier versions added
    it), one with `trigger add`'s generated function: the same changes give the same events,
    byte for byte (NOTIFY), or the same log rows (durable)."""
    conn = installed
    for name in ("old", "new"):
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, r text, n numeric, t text, "
                "at timestamptz, a int[], j jsonb)"
            ).format(sql.Identifier(name))
        )
    shared_trigger(conn, "old", *(a.format("old") for a in args))
    pgherald.add_table_trigger(conn, "new", channel="c_new", **options)
    assert [t.function for t in pgherald.list_table_triggers(conn)] == [
        "pgherald.change_v1_public.new",
        "pgherald.notify_change_v1",
    ]
    with pgherald.Listener(dsn, channels=["c_old", "c_new"]) as listener:
        for name in ("old", "new"):
            for change in CHANGES:
                with conn.transaction():  # one transaction each: the same tx for both events
                    conn.execute(sql.SQL(change).format(sql.Identifier(name)))
        if options.get("durable"):
            logged = {
                channel: conn.execute(
                    "SELECT key, payload - 'tx' - 'ts' - 'table' FROM pgherald.events_v1 "
                    "WHERE channel = %s ORDER BY id",
                    (channel,),
                ).fetchall()
                for channel in ("c_old", "c_new")
            }
            assert len(logged["c_old"]) >= 5
            assert logged["c_old"] == logged["c_new"]
            return
        conn.execute("SELECT pg_notify('c_new', 'end')")
        payloads: dict[str, list[str]] = {"c_old": [], "c_new": []}
        for note in listener.notifications(timeout=5):
            if note.payload == "end":
                break
            payloads[note.channel].append(note.payload)

    def comparable(payload: str) -> str:
        event = json.loads(payload)
        assert event.pop("table") in ("old", "new")
        return json.dumps({k: v for k, v in event.items() if k not in ("tx", "ts")})

    assert len(payloads["c_old"]) >= 5
    assert list(map(comparable, payloads["c_old"])) == list(map(comparable, payloads["c_new"]))
    for payload in payloads["c_new"]:  # jsonb's own text, as the shared function sends
        assert conn.execute("SELECT %s::jsonb::text", (payload,)).fetchone() == (payload,)
    truncated = [json.loads(p) for p in payloads["c_new"] if '"truncated"' in p]
    assert len(truncated) == 2  # the wide row's insert and update


def test_a_column_added_or_dropped_after_trigger_add_never_loses_an_event_or_a_write(
    dsn: str, installed: psycopg.Connection
) -> None:
    """The generated diff compares the columns known at `trigger add`; a column added since
    still sends its changes, and a dropped one never fails the write."""
    conn = installed
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int, b int)")
    pgherald.add_table_trigger(conn, "t")
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    with pgherald.Listener(dsn, channels=["public.t"]) as listener:
        conn.execute("ALTER TABLE t ADD COLUMN c int")
        conn.execute("UPDATE t SET c = 5")
        conn.execute("ALTER TABLE t DROP COLUMN b")
        conn.execute("UPDATE t SET a = 2")
        conn.execute("UPDATE t SET a = 2")  # nothing changed: nothing sent
        nothing = take(listener, 2)
        nothing_then_sentinel(listener, conn, "t")
    assert [(e["changed"], e["new"]) for e in nothing] == [
        (["c"], {"a": 1, "b": 1, "c": 5, "id": 1}),
        (["a"], {"a": 2, "c": 5, "id": 1}),
    ]


def test_odd_channels_and_names_are_data_in_the_generated_code(
    dsn: str, installed: psycopg.Connection
) -> None:
    conn = installed
    conn.execute('CREATE TABLE "$pgherald$" ("$$" int PRIMARY KEY, "it\'s" text)')
    channel = "$pgherald$ it's $$ \\ \" ü"
    pgherald.add_table_trigger(conn, '"$pgherald$"', channel=channel, columns=["it's"])
    with pgherald.Listener(dsn, channels=[channel]) as listener:
        conn.execute("""INSERT INTO "$pgherald$" VALUES (1, 'x')""")
        conn.execute("""UPDATE "$pgherald$" SET "it's" = 'y'""")
        got = take(listener, 2)
    assert [(e["channel"], e["new"], e["changed"]) for e in got] == [
        (channel, {"it's": "x"}, None),
        (channel, {"it's": "y"}, ["it's"]),
    ]


def test_sql_trigger_add_prints_a_function_that_sends_what_trigger_adds_sends(
    dsn: str, installed: psycopg.Connection
) -> None:
    """The offline DDL has no connection (no columns, no types): its function diffs another
    way, and sends the same events."""
    from pgherald._triggers import trigger_sql

    conn = installed
    for name in ("a", "b"):
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v numeric, t text, j jsonb)").format(
                sql.Identifier(name)
            )
        )
    offline = trigger_sql("a", channel="a", key_columns=["id"])
    assert "-- Without a connection the table's columns are unknown" in offline
    conn.execute(offline)
    pgherald.add_table_trigger(conn, "b", channel="b")
    changes = [
        "INSERT INTO {} VALUES (1, 1.50, 'x', '[1.0]')",
        "UPDATE {} SET v = 1.500, j = '[1.00]'",  # equal numbers: no change, no event
        "UPDATE {} SET t = 'y', j = '[2]'",
        "DELETE FROM {}",
    ]
    with pgherald.Listener(dsn, channels=["a", "b"]) as listener:
        for name in ("a", "b"):
            for change in changes:
                conn.execute(sql.SQL(change).format(sql.Identifier(name)))
        got = take(listener, 6)
    events = [{k: v for k, v in strip(e).items() if k not in ("channel", "table")} for e in got]
    assert events[:3] == events[3:]
    assert [e["changed"] for e in events[:3]] == [None, ["j", "t"], None]


def test_trigger_add_without_create_on_the_schema_says_which_grant(
    plain_role_dsn: str, installed: psycopg.Connection
) -> None:
    role = sql.Identifier(str(conninfo_to_dict(plain_role_dsn)["user"]))
    installed.execute(sql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(role))
    installed.execute("CREATE TABLE t (id int PRIMARY KEY)")
    installed.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(role))
    with psycopg.connect(plain_role_dsn, autocommit=True) as plain:
        with pytest.raises(pgherald.PrivilegeError, match="GRANT CREATE ON SCHEMA pgherald"):
            pgherald.add_table_trigger(plain, "t")
        installed.execute(sql.SQL("GRANT CREATE ON SCHEMA pgherald TO {}").format(role))
        t = pgherald.add_table_trigger(plain, "t")
    assert t.function == "pgherald.change_v1_public.t"
    installed.execute("INSERT INTO t VALUES (1)")
