"""
Table-change triggers and DDL event triggers, generated, installed and removed by pgherald.

The trigger functions (``pgherald.notify_change_v1``, ``pgherald.notify_ddl_v1``) come with
`pgherald install`; this module only creates and drops the triggers that call them. Every name
is quoted (`psycopg.sql.Identifier`) and every option travels as a quoted literal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ._protocol.channels import check_channel
from ._schema import MISSING
from .errors import InvalidChannel, PrivilegeError, SchemaMissing, UsageError

ROW_TRIGGER = "pgherald_change_v1"
TRUNCATE_TRIGGER = "pgherald_truncate_v1"
DDL_CHANNEL = "pgherald_ddl"
DDL_TRIGGERS = {"pgherald_ddl_v1": "ddl_command_end", "pgherald_drop_v1": "sql_drop"}
EVENTS = ("insert", "update", "delete", "truncate")

# One part of a qualified name: "quoted ""with"" quotes" or an unquoted identifier.
_PART = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^."\s]+))\s*')


@dataclass(frozen=True)
class TableTrigger:
    """A pgherald trigger on a table, as found in the catalog."""

    schema: str
    table: str
    channel: str
    events: tuple[str, ...]
    columns: tuple[str, ...]
    durable: bool
    key_columns: tuple[str, ...] = ()
    """The columns whose values make each event's key (empty: events have no key)."""


def parse_table(name: str) -> tuple[str | None, str]:
    """
    Split ``schema.table`` with SQL's rules: quoted parts keep their case and characters,
    unquoted parts fold to lower case. ``sales."Line Items"`` -> ("sales", "Line Items").
    """
    parts: list[str] = []
    pos = 0
    while True:
        m = _PART.match(name, pos)
        if not m or m.end() == pos:
            raise UsageError(
                f"cannot read the table name {name!r}: write table, schema.table, or quote "
                'mixed case and spaces like sales."Line Items"'
            )
        parts.append(
            m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).lower()
        )
        pos = m.end()
        if pos == len(name):
            break
        if name[pos] != ".":
            raise UsageError(f"cannot read the table name {name!r} (unexpected {name[pos]!r})")
        pos += 1
    if len(parts) > 2:
        raise UsageError(f"table name {name!r} has more than schema.table")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def default_channel(schema: str, table: str) -> str:
    """``schema.table``, e.g. ``public.orders``: what the trigger sends on without --channel."""
    return f"{schema}.{table}"


def checked_default_channel(schema: str, table: str) -> str:
    """`default_channel`, refused when over NOTIFY's 63 bytes: every write would then fail."""
    channel = default_channel(schema, table)
    try:
        check_channel(channel)
    except InvalidChannel:
        raise InvalidChannel(
            f"the default channel {channel!r} is over 63 bytes, and every write to the table "
            "would fail: pass a channel name (--channel, or channel=)"
        ) from None
    return channel


def _events(events: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(e.strip().lower() for e in events if e.strip()))
    bad = [e for e in chosen if e not in EVENTS]
    if bad or not chosen:
        raise UsageError(f"events must be some of {', '.join(EVENTS)}; got {list(events)!r}")
    return chosen


def trigger_statements(
    schema: str | None,
    table: str,
    *,
    channel: str | None = None,
    events: Iterable[str] = EVENTS,
    columns: Sequence[str] = (),
    durable: bool = False,
    key_columns: Sequence[str] = (),
) -> list[sql.Composed]:
    """
    The DDL that makes the table's pgherald triggers match these options (idempotent).

    The key columns follow the three fixed arguments, one argument each: the function reads
    them from the row without looking anything up.
    """
    chosen = _events(events)
    if channel is not None:
        check_channel(channel)
    target = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
    args = sql.SQL(", ").join(
        [
            sql.Literal(channel or ""),
            sql.Literal(json.dumps(list(columns), ensure_ascii=False)),
            sql.Literal("t" if durable else "f"),
            *map(sql.Literal, _key_columns(key_columns)),
        ]
    )
    row_events = [e.upper() for e in chosen if e != "truncate"]
    statements = []
    if row_events:
        statements.append(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {} AFTER {} ON {} FOR EACH ROW "
                "EXECUTE FUNCTION pgherald.notify_change_v1({})"
            ).format(sql.Identifier(ROW_TRIGGER), sql.SQL(" OR ".join(row_events)), target, args)
        )
    else:
        statements.append(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(ROW_TRIGGER), target)
        )
    if "truncate" in chosen:
        statements.append(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT "
                "EXECUTE FUNCTION pgherald.notify_change_v1({})"
            ).format(sql.Identifier(TRUNCATE_TRIGGER), target, args)
        )
    else:
        statements.append(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(TRUNCATE_TRIGGER), target
            )
        )
    return statements


def _key_columns(columns: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(columns))
    if any(not c for c in chosen):
        raise UsageError("a key column name is empty: pass --key col1,col2")
    return chosen


def trigger_sql(table: str, **options: Any) -> str:
    """`trigger_statements` as text, for ``pgherald sql trigger add`` (no connection)."""
    schema, name = parse_table(table)
    if options.get("channel") is None:
        # As `add_table_trigger` checks. Unqualified, the table is found on the search_path
        # when the DDL runs: check it as public's, the usual (docs/triggers.md says so).
        checked_default_channel("public" if schema is None else schema, name)
    text = "".join(f"{s.as_string(None)};\n" for s in trigger_statements(schema, name, **options))
    if not options.get("key_columns"):
        # Without a connection the primary key is unknown: say what that means for consumers.
        text = (
            "-- No key columns (pass --key): events carry no key, so a consumer group with\n"
            "-- several members may handle one row's changes out of order.\n" + text
        )
    return text


def resolve_table(conn: psycopg.Connection[Any], table: str) -> tuple[str, str]:
    schema, name = parse_table(table)
    qualified = (
        sql.Identifier(name) if schema is None else sql.Identifier(schema, name)
    ).as_string(conn)
    row = conn.execute(
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (qualified,),
    ).fetchone()
    if row is None:
        raise UsageError(
            f"table {table!r} does not exist (as {qualified}); check the name and "
            "quote mixed case: '\"Orders\"'"
        )
    if row[2] not in ("r", "p"):
        raise UsageError(f"{qualified} is not a table (relkind {row[2]!r})")
    return row[0], row[1]


def primary_key(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[str, ...]:
    """The table's primary key columns, in the key's order (empty: it has none)."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_index AS i "
        "CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) "
        "JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY k.n",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return tuple(r[0] for r in rows)


def _require_functions(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT to_regprocedure('pgherald.notify_change_v1()') IS NOT NULL"
    ).fetchone()
    if not (row and row[0]):
        raise SchemaMissing(MISSING)


def add_table_trigger(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    channel: str | None = None,
    events: Iterable[str] = EVENTS,
    columns: Sequence[str] = (),
    durable: bool = False,
    key_columns: Sequence[str] | None = None,
) -> TableTrigger:
    """
    Send a JSON event for every change of *table* (adding twice changes the options, never
    doubles the events).

    Events go to *channel* (default ``schema.table``) as NOTIFY, or with *durable* into the
    event log. *columns* limits the row images to those columns; an UPDATE that changes none
    of them (or nothing at all) sends nothing. *key_columns* (default: the primary key; ``()``
    or a table without one: no key) make a durable event's key, so that one row's events stay
    in order within a consumer group; see docs/triggers.md for its text.

    .. versionadded:: 0.1
    """
    _require_functions(conn)
    schema, name = resolve_table(conn, table)
    if channel is None:
        channel = checked_default_channel(schema, name)
    key = primary_key(conn, schema, name) if key_columns is None else _key_columns(key_columns)
    if columns or key_columns:
        known = {
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                "AND NOT attisdropped",
                (sql.Identifier(schema, name).as_string(conn),),
            )
        }
        unknown = [c for c in (*columns, *key) if c not in known]
        if unknown:
            raise UsageError(
                f"{schema}.{name} has no column {', '.join(map(repr, dict.fromkeys(unknown)))}"
            )
    statements = trigger_statements(
        schema,
        name,
        channel=channel,
        events=events,
        columns=columns,
        durable=durable,
        key_columns=key,
    )
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
    return TableTrigger(schema, name, channel, _events(events), tuple(columns), durable, key)


def remove_table_trigger(conn: psycopg.Connection[Any], table: str) -> bool:
    """Drop pgherald's triggers from *table*; True if there were any."""
    schema, name = resolve_table(conn, table)
    existed = any(t.schema == schema and t.table == name for t in list_table_triggers(conn))
    target = sql.Identifier(schema, name)
    with conn.transaction():
        for trigger in (ROW_TRIGGER, TRUNCATE_TRIGGER):
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(trigger), target)
            )
    return existed


def list_table_triggers(conn: psycopg.Connection[Any]) -> list[TableTrigger]:
    """Every table with pgherald triggers, with their options."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, t.tgname, t.tgtype, t.tgnargs, t.tgargs "
        "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        # tgparentid: the copies PostgreSQL makes on each partition are not triggers of ours.
        "WHERE t.tgname IN (%s, %s) AND NOT t.tgisinternal AND t.tgparentid = 0 "
        "ORDER BY 1, 2, 3",
        (ROW_TRIGGER, TRUNCATE_TRIGGER),
    ).fetchall()
    found: dict[tuple[str, str], TableTrigger] = {}
    for schema, table, _tgname, tgtype, nargs, raw in rows:
        args = bytes(raw or b"").decode("utf-8").split("\0")[:nargs]  # each ends in a NUL
        channel = args[0] or default_channel(schema, table)
        columns = tuple(json.loads(args[1])) if len(args) > 1 and args[1] else ()
        durable = len(args) > 2 and args[2] == "t"
        key = tuple(args[3:])
        # tgtype bits (pg_trigger.h): 4 insert, 8 delete, 16 update, 32 truncate
        events = tuple(
            e
            for e, bit in (("insert", 4), ("update", 16), ("delete", 8), ("truncate", 32))
            if tgtype & bit
        )
        old = found.get((schema, table))
        if old is not None:
            events = old.events + events
        found[(schema, table)] = TableTrigger(schema, table, channel, events, columns, durable, key)
    return list(found.values())


def _require_superuser(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (row and row[0]):
        raise PrivilegeError(
            "DDL event triggers need a superuser: run `pgherald ddl enable` (or `ddl disable`) "
            "as one (for example --dsn with user=postgres), or ask your DBA to run it"
        )


def enable_ddl_events(conn: psycopg.Connection[Any]) -> None:
    """
    Send ``{event, command_tag, object_type, schema, object_identity}`` on channel
    ``pgherald_ddl`` for every DDL command and dropped object (needs a superuser).

    .. versionadded:: 0.1
    """
    _require_superuser(conn)  # first: a role without it may not even see our schema
    _require_functions(conn)
    with conn.transaction():
        for name, event in DDL_TRIGGERS.items():
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL(
                    "CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION pgherald.notify_ddl_v1()"
                ).format(sql.Identifier(name), sql.SQL(event))
            )


def disable_ddl_events(conn: psycopg.Connection[Any]) -> None:
    """Remove the DDL event triggers (needs a superuser)."""
    _require_superuser(conn)
    with conn.transaction():
        for name in DDL_TRIGGERS:
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
