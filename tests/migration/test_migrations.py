"""schema.sql (a fresh install) equals every migration applied in order, object by object."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql as psql

import pgherald
from pgherald import sql

# The log's partitions are data, not schema: which days exist depends on when and how the
# database was made (an upgrade turns the old log into one), so they are left out, but the
# default partition, which both must have.
PARTITIONS = """
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'pgherald' AND c.relispartition AND c.relname <> 'events_v1_default'
    UNION ALL
    SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_class c ON c.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'pgherald' AND c.relispartition AND c.relname <> 'events_v1_default'"""

CATALOG = {
    "columns": f"""
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
               column_default, is_identity, identity_generation, is_generated,
               generation_expression
        FROM information_schema.columns WHERE table_schema = 'pgherald'
          AND table_name NOT IN ({PARTITIONS}) ORDER BY 1, 3""",
    "indexes": f"""
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgherald'
          AND tablename NOT IN ({PARTITIONS}) ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_function_result(p.oid), p.prosrc, p.provolatile, l.lanname
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        JOIN pg_language l ON l.oid = p.prolang
        WHERE n.nspname = 'pgherald' ORDER BY 1, 2""",
    "constraints": f"""
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        JOIN pg_class r ON r.oid = c.conrelid
        WHERE n.nspname = 'pgherald' AND r.relname NOT IN ({PARTITIONS}) ORDER BY 1, 2""",
    "relations": f"""
        SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'pgherald' AND c.relname NOT IN ({PARTITIONS}) ORDER BY 1""",
    "migrations": "SELECT name FROM pgherald.migrations ORDER BY 1",
}


def catalog(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: conn.execute(q).fetchall() for name, q in CATALOG.items()}


@pytest.fixture
def second_db(dsn: str) -> Any:
    from tests.fix_db import with_dbname

    name = "pgherald_migr_" + dsn.split("pgherald_test_")[-1].split()[0][:12]
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
    try:
        yield with_dbname(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name))
            )


def test_schema_sql_equals_all_migrations_in_order(
    conn: psycopg.Connection, second_db: str
) -> None:
    migrations = sql.migrations()
    assert migrations, "there is at least the first migration"
    assert [n for n, _ in migrations] == sorted(n for n, _ in migrations)
    assert pgherald.install(conn) == [n for n, _ in migrations]
    fresh = catalog(conn)
    with psycopg.connect(second_db, autocommit=True) as migrated:
        with migrated.transaction():
            for name, text in migrations:
                migrated.execute(text)
                migrated.execute(sql.query("record_migration"), {"name": name})
        upgraded = catalog(migrated)
        # and install() on the migrated database has nothing left to do
        assert pgherald.install(migrated) == []
    assert fresh["relations"], "the install created objects"
    for part in CATALOG:
        assert fresh[part] == upgraded[part], part


def test_install_sql_text_equals_install(conn: psycopg.Connection, second_db: str) -> None:
    pgherald.install(conn)
    with psycopg.connect(second_db, autocommit=True) as other:
        other.execute(pgherald._schema.install_sql())
        assert catalog(other) == catalog(conn)


def test_upgrade_gives_existing_shared_triggers_the_reduced_event_rule(dsn: str) -> None:
    """A database at 0.1.0_17 whose table already calls notify_change_v1: after install(),
    a reduced event with a too-wide key keeps "changed" (0.1.0_18; it lost both before)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            for name, text in sql.migrations():
                if name < "0.1.0_18":
                    conn.execute(text)
                    conn.execute(sql.query("record_migration"), {"name": name})
        conn.execute("CREATE TABLE t (k text PRIMARY KEY, n int)")
        conn.execute(
            "CREATE TRIGGER pgherald_change_v1 AFTER INSERT OR UPDATE OR DELETE ON t "
            "FOR EACH ROW EXECUTE FUNCTION pgherald.notify_change_v1('ch', '[]', 'f', 'k')"
        )
        conn.execute("INSERT INTO t VALUES (%s, 1)", ("k" * 9000,))  # over NOTIFY's limit
        assert pgherald.install(conn) == ["0.1.0_18_post_change_trigger_reduced_fit"]
        with pgherald.Listener(dsn, channels=["ch"]) as listener:
            conn.execute("UPDATE t SET n = 2")
            event = next(iter(listener.notifications(timeout=5))).json()
    assert (event["truncated"], event["changed"], "key" in event) == (True, ["n"], False)
