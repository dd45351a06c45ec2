"""Install, upgrade and remove pgherald's schema (the SQL lives in ``pgherald/sql``)."""

from __future__ import annotations

from typing import Any

import psycopg

from . import sql
from .errors import SchemaMissing, UsageError

SCHEMA = "pgherald"


def install_sql() -> str:
    """The DDL of a fresh install, for users who run their own migration tool."""
    names = "\n".join(
        f"INSERT INTO pgherald.migrations (name) VALUES ('{name}');" for name, _ in sql.migrations()
    )
    return f"BEGIN;\n\n{sql.read('schema.sql').strip()}\n\n{names}\n\nCOMMIT;\n"


def uninstall_sql() -> str:
    return f"{sql.query('uninstall')};\n"


def install(conn: psycopg.Connection[Any], *, partitions: int | None = None) -> list[str]:
    """
    Create pgherald's schema, or bring it up to date: idempotent, in one transaction.

    Returns the migrations applied (all of them on a fresh database, none when up to date).
    Concurrent installs are serialised by an advisory lock. *partitions* (1 to 256; default
    16) spreads the log over that many partitions: a consumer group has up to that many
    members at work. On a log that already has another count, that is `repartition`.

    .. versionadded:: 0.1
    """
    if partitions is not None:
        _check_partitions(partitions)
    with conn.transaction():
        applied = _install(conn)
        if partitions is not None:
            conn.execute(sql.query("repartition"), {"count": partitions})
        return applied


def _check_partitions(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 256:
        raise UsageError(f"partitions must be an int from 1 to 256, not {count!r}")


def _install(conn: psycopg.Connection[Any]) -> list[str]:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgherald.install'), 0)")
        row = conn.execute("SELECT to_regclass('pgherald.migrations') IS NOT NULL").fetchone()
        migrations = sql.migrations()
        if not (row and row[0]):
            conn.execute(sql.read("schema.sql"))
            applied: list[str] = []
            for name, _ in migrations:
                conn.execute(sql.query("record_migration"), {"name": name})
            return [name for name, _ in migrations]
        done = {r[0] for r in conn.execute(sql.query("applied_migrations"))}
        applied = []
        for name, text in migrations:
            if name not in done:
                conn.execute(text)
                conn.execute(sql.query("record_migration"), {"name": name})
                applied.append(name)
        return applied


def uninstall(conn: psycopg.Connection[Any]) -> None:
    """Drop pgherald's schema and everything in it (events and positions included)."""
    with conn.transaction():
        conn.execute(sql.query("uninstall"))


def is_installed(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(sql.query("schema_installed")).fetchone()
    return bool(row and row[0])


MISSING = (
    "pgherald's schema is not installed in this database: run `pgherald install` "
    "(or pgherald.install(conn), or apply `pgherald sql install` with your migration tool)"
)


def missing_schema_error(exc: BaseException) -> SchemaMissing | None:
    """A `SchemaMissing` if *exc* says our tables or functions do not exist, else None."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the DBAPI error
    if orig is not None:
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in {"42P01", "42883", "3F000"} and "pgherald" in str(exc):
        return SchemaMissing(MISSING)
    return None
