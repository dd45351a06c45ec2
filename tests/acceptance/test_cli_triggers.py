"""`pgherald trigger|ddl|watch|sql trigger` in a subprocess, as a user runs them."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgherald
from tests.fix_cli import cli_env, one_line_error, pgherald_cmd, run


def pgherald_triggers(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal "
        "ORDER BY 1",
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def db(conn: psycopg.Connection) -> psycopg.Connection:
    pgherald.install(conn)
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)")
    conn.execute("CREATE SCHEMA sales")
    conn.execute('CREATE TABLE sales."Line Items" (id int PRIMARY KEY, sku text)')
    return conn


# -- trigger add / list / remove --


def test_trigger_add_list_remove_output(dsn: str, db: psycopg.Connection) -> None:
    added = run(dsn, "trigger", "add", "orders")
    assert added.returncode == 0, added.stderr
    assert added.stdout == (
        "public.orders: insert,update,delete,truncate -> channel 'public.orders' via NOTIFY; "
        "key id\n"
    )
    added = run(
        dsn,
        "trigger",
        "add",
        'sales."Line Items"',
        "--channel",
        "items",
        "--events",
        "insert,update",
        "--columns",
        "id",
        "--durable",
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout == (
        "sales.Line Items: insert,update -> channel 'items' via the durable log; key id\n"
    )
    listed = run(dsn, "trigger", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "public.orders: insert,update,delete,truncate; all columns; key id; channel "
        "'public.orders'",
        "sales.Line Items: insert,update; id; key id; channel 'items' (durable)",
    ]
    as_json = run(dsn, "trigger", "list", "--json")
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
        {
            "schema": "public",
            "table": "orders",
            "channel": "public.orders",
            "events": ["insert", "update", "delete", "truncate"],
            "columns": [],
            "durable": False,
            "key_columns": ["id"],
        },
        {
            "schema": "sales",
            "table": "Line Items",
            "channel": "items",
            "events": ["insert", "update"],
            "columns": ["id"],
            "durable": True,
            "key_columns": ["id"],
        },
    ]
    removed = run(dsn, "trigger", "remove", "orders")
    assert (removed.returncode, removed.stdout) == (0, "removed\n")
    assert pgherald_triggers(db, "orders") == []
    again = run(dsn, "trigger", "remove", "orders")
    assert (again.returncode, again.stdout) == (0, "orders had no pgherald trigger\n")
    run(dsn, "trigger", "remove", 'sales."Line Items"')
    assert run(dsn, "trigger", "list").stdout == "no pgherald triggers\n"


def test_trigger_add_errors_are_one_line(dsn: str, db: psycopg.Connection) -> None:
    assert "does not exist" in one_line_error(run(dsn, "trigger", "add", "nope"))
    assert "no column" in one_line_error(run(dsn, "trigger", "add", "orders", "--columns", "x"))
    assert "events must be" in one_line_error(
        run(dsn, "trigger", "add", "orders", "--events", "upsert")
    )
    assert pgherald_triggers(db, "orders") == []


def test_trigger_add_key_option_and_a_table_without_primary_key(
    dsn: str, db: psycopg.Connection
) -> None:
    added = run(dsn, "trigger", "add", "orders", "--durable", "--key", "item")
    assert added.returncode == 0, added.stderr
    assert added.stdout.endswith("via the durable log; key item\n")
    assert added.stderr == ""
    db.execute("INSERT INTO orders VALUES (1, 'tea', 1), (2, 'tea', 1), (3, 'jam', 1)")
    keys = db.execute("SELECT key FROM pgherald.events_v1 ORDER BY id").fetchall()
    assert keys == [("tea",), ("tea",), ("jam",)]
    assert "no column 'nope'" in one_line_error(
        run(dsn, "trigger", "add", "orders", "--durable", "--key", "item,nope")
    )
    db.execute("CREATE TABLE notes (body text)")
    keyless = run(dsn, "trigger", "add", "notes", "--durable")
    assert keyless.returncode == 0, keyless.stderr
    assert keyless.stdout.endswith("via the durable log; no key\n")
    assert "has no primary key" in keyless.stderr
    assert "--key col1,col2" in keyless.stderr
    listed = run(dsn, "trigger", "list").stdout.splitlines()
    assert listed[0].startswith("public.notes: insert,update,delete,truncate; all columns; no key;")
    assert "; key item; " in listed[1]


def test_sql_trigger_add_key_option(dsn: str, db: psycopg.Connection) -> None:
    unreachable = "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2"
    plain = run(unreachable, "sql", "trigger", "add", "orders", "--durable")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("-- No key columns (pass --key)")
    out = run(unreachable, "sql", "trigger", "add", "orders", "--durable", "--key", "id,item")
    assert out.returncode == 0, out.stderr
    assert "\"change_v1_public.orders\"('', '[]', 't', 'id', 'item')" in out.stdout
    assert "No key columns" not in out.stdout
    db.execute(out.stdout)
    [t] = pgherald.list_table_triggers(db)
    assert t.key_columns == ("id", "item")
    db.execute("INSERT INTO orders VALUES (1, 'tea', 1)")
    assert db.execute("SELECT key FROM pgherald.events_v1").fetchall() == [('[1, "tea"]',)]


def test_ddl_enable_disable(dsn: str, db: psycopg.Connection) -> None:
    on = run(dsn, "ddl", "enable")
    assert (on.returncode, on.stdout) == (0, "DDL events enabled on channel 'pgherald_ddl'\n")
    assert db.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (2,)
    off = run(dsn, "ddl", "disable")
    assert (off.returncode, off.stdout) == (0, "DDL events disabled\n")
    assert db.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)


def test_ddl_enable_as_non_superuser_is_a_one_line_error(dsn: str, db: psycopg.Connection) -> None:
    role = f"pgherald_plain_{uuid.uuid4().hex[:8]}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    db.execute(sql.SQL("GRANT USAGE ON SCHEMA pgherald TO {}").format(sql.Identifier(role)))
    try:
        line = one_line_error(run(make_conninfo(dsn, user=role), "ddl", "enable"))
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert "superuser" in line
    assert db.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)


# -- sql trigger add: no database needed --


def test_sql_trigger_add_needs_no_database_and_the_sql_works(
    dsn: str, db: psycopg.Connection
) -> None:
    unreachable = "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2"
    out = run(unreachable, "sql", "trigger", "add", 'sales."Line Items"', "--columns", "sku")
    assert out.returncode == 0, out.stderr
    assert 'ON "sales"."Line Items" FOR EACH ROW' in out.stdout
    assert "AFTER INSERT OR UPDATE OR DELETE" in out.stdout
    assert "AFTER TRUNCATE" in out.stdout
    # The printed SQL, applied by "a migration tool", gives the same triggers and events.
    db.execute(out.stdout)
    [t] = pgherald.list_table_triggers(db)
    assert (t.schema, t.table, t.channel, t.columns) == (
        "sales",
        "Line Items",
        "sales.Line Items",
        ("sku",),
    )
    with pgherald.Listener(dsn, channels=["sales.Line Items"]) as listener:
        db.execute("INSERT INTO sales.\"Line Items\" VALUES (1, 'A-1')")
        (n,) = list(listener.notifications(timeout=5))
    assert n.json()["new"] == {"sku": "A-1"}


def test_sql_trigger_add_refuses_a_default_channel_over_63_bytes_as_trigger_add_does(
    dsn: str, db: psycopg.Connection
) -> None:
    """The printed DDL would make every write to the table fail ("channel name too long")."""
    unreachable = "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2"
    name = "t" * 58  # sales. + 58 = 64 bytes
    db.execute(sql.SQL("CREATE TABLE sales.{} (id int PRIMARY KEY)").format(sql.Identifier(name)))
    offline = run(unreachable, "sql", "trigger", "add", f"sales.{name}")
    connected = run(dsn, "trigger", "add", f"sales.{name}")
    assert one_line_error(offline) == one_line_error(connected)
    assert offline.returncode == connected.returncode
    assert f"'sales.{name}' is over 63 bytes" in one_line_error(offline)
    assert "--channel" in one_line_error(offline)
    assert offline.stdout == ""
    # Unqualified, it is checked as public's (public. + 57 = 64 bytes).
    assert "over 63 bytes" in one_line_error(run(unreachable, "sql", "trigger", "add", "u" * 57))
    # One byte less fits; with a channel of its own any table does, and its writes work.
    assert run(unreachable, "sql", "trigger", "add", "sales." + "t" * 57).returncode == 0
    out = run(unreachable, "sql", "trigger", "add", f"sales.{name}", "--channel", "long")
    assert out.returncode == 0, out.stderr
    db.execute(out.stdout)
    db.execute(sql.SQL("INSERT INTO sales.{} VALUES (1)").format(sql.Identifier(name)))
    assert pgherald_triggers(db, f"sales.{name}") == ["pgherald_change_v1", "pgherald_truncate_v1"]


# -- watch --


@pytest.fixture
def start_watch(dsn: str, db: psycopg.Connection) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            pgherald_cmd("watch", *args),
            env={**cli_env(dsn), "PYTHONFAULTHANDLER": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until its listener backend has LISTENed
            row = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle' AND query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row and row[0]:
                return proc
            if proc.poll() is not None:
                pytest.fail(f"watch exited early: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)  # polling a condition, bounded by the deadline
        pytest.fail("watch did not start listening")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # only the processes this fixture started
        proc.communicate()  # (closes its pipes too)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str, str]:
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        # SIGABRT: faulthandler (PYTHONFAULTHANDLER, set by start_watch) writes where every
        # thread of it was to stderr, for the failure to show where it hung.
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"watch did not stop within 15 s of signal {sig}; its stderr:\n{err}")
    return proc.returncode, out, err


def test_watch_prints_one_readable_line_per_change(
    start_watch: object, db: psycopg.Connection
) -> None:
    pgherald.add_table_trigger(db, "orders")
    proc = start_watch("orders")  # type: ignore[operator]
    db.execute("INSERT INTO orders VALUES (1, 'apple', 3)")
    db.execute("UPDATE orders SET qty = 5, item = 'pear' WHERE id = 1")
    db.execute("DELETE FROM orders")
    db.execute("TRUNCATE orders")
    assert proc.stdout is not None
    lines = [proc.stdout.readline().rstrip("\n") for _ in range(4)]
    code, rest, err = stop(proc)
    # Row images print in jsonb's key order (shorter keys first), not the table's column order.
    heads = [line.split(" {", 1)[0] for line in lines]
    assert heads == [
        "INSERT public.orders",
        'UPDATE public.orders qty: 3 -> 5, item: "apple" -> "pear"',
        "DELETE public.orders",
        "TRUNCATE public.orders",
    ]
    assert json.loads(lines[0].split(" ", 2)[2]) == {"id": 1, "item": "apple", "qty": 3}
    assert json.loads(lines[2].split(" ", 2)[2]) == {"id": 1, "item": "pear", "qty": 5}
    assert (code, rest) == (0, ""), err
    assert "Traceback" not in err


def test_watch_survives_hostile_notifications_on_its_channel(
    start_watch: object, db: psycopg.Connection
) -> None:
    pgherald.add_table_trigger(db, "orders")
    proc = start_watch("orders")  # type: ignore[operator]
    deep = "[" * 3999 + "]" * 3999  # any role may NOTIFY this on the trigger's channel
    pgherald.notify(db, "public.orders", deep)
    pgherald.notify(db, "public.orders", "NaN")
    db.execute("INSERT INTO orders VALUES (1, 'apple', 3)")
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    code, _, err = stop(proc)
    assert deep in lines[0]
    assert " NaN " in lines[1]
    assert lines[2].startswith("INSERT public.orders ")
    assert code == 0
    assert "Traceback" not in err


def test_watch_json_prints_the_event(start_watch: object, db: psycopg.Connection) -> None:
    pgherald.add_table_trigger(db, 'sales."Line Items"')
    proc = start_watch("--json", 'sales."Line Items"')  # type: ignore[operator]
    db.execute("INSERT INTO sales.\"Line Items\" VALUES (1, 'A-1')")
    assert proc.stdout is not None
    event = json.loads(proc.stdout.readline())
    code, _, err = stop(proc, signal.SIGINT)
    assert code == 0, err
    assert {k: event[k] for k in ("op", "schema", "table", "new", "old", "changed")} == {
        "op": "INSERT",
        "schema": "sales",
        "table": "Line Items",
        "new": {"id": 1, "sku": "A-1"},
        "old": None,
        "changed": None,
    }
    assert {"tx", "ts"} <= set(event)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_watch_temporary_adds_and_removes_the_trigger(
    start_watch: object, db: psycopg.Connection, sig: int
) -> None:
    assert pgherald_triggers(db, "orders") == []
    proc = start_watch("--temporary", "orders")  # type: ignore[operator]
    assert pgherald_triggers(db, "orders") == ["pgherald_change_v1", "pgherald_truncate_v1"]
    db.execute("INSERT INTO orders VALUES (1, 'apple', 3)")
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("INSERT public.orders ")
    code, _, err = stop(proc, sig)
    assert code == 0, err
    assert "Traceback" not in err
    assert pgherald_triggers(db, "orders") == []


def test_watch_temporary_keeps_an_existing_trigger(
    start_watch: object, db: psycopg.Connection
) -> None:
    pgherald.add_table_trigger(db, "orders", columns=["id"])
    proc = start_watch("--temporary", "orders")  # type: ignore[operator]
    code, _, err = stop(proc)
    assert code == 0, err
    assert [t.columns for t in pgherald.list_table_triggers(db)] == [("id",)]


def test_watch_without_trigger_and_no_tty_fails_clearly(dsn: str, db: psycopg.Connection) -> None:
    line = one_line_error(run(dsn, "watch", "orders"))
    assert "orders has no pgherald trigger" in line
    assert "--temporary" in line
    assert "pgherald trigger add orders" in line
    assert pgherald_triggers(db, "orders") == []


def test_watch_hint_is_a_command_the_shell_takes(dsn: str, db: psycopg.Connection) -> None:
    # A name that needs SQL quotes is shell-quoted in the hint: pasted, it adds the trigger.
    db.execute('CREATE TABLE "Watch Me" (id int PRIMARY KEY)')
    line = one_line_error(run(dsn, "watch", '"Watch Me"'))
    hint = line.split("run `", 1)[1].split("`", 1)[0]
    assert hint == "pgherald trigger add '\"Watch Me\"'"
    r = run(dsn, *shlex.split(hint)[1:])
    assert r.returncode == 0, r.stderr
    assert [t.table for t in pgherald.list_table_triggers(db)] == ["Watch Me"]


def test_watch_yes_adds_a_trigger_that_stays(start_watch: object, db: psycopg.Connection) -> None:
    proc = start_watch("--yes", "orders")  # type: ignore[operator]
    code, _, err = stop(proc)
    assert code == 0, err
    assert pgherald_triggers(db, "orders") == ["pgherald_change_v1", "pgherald_truncate_v1"]


def test_watch_durable_trigger_points_to_consume(dsn: str, db: psycopg.Connection) -> None:
    pgherald.add_table_trigger(db, "orders", durable=True)
    line = one_line_error(run(dsn, "watch", "orders"))
    assert "durable" in line
    assert "consume" in line
