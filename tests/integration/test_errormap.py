"""Real server errors through every driver come out of notify/publish as the same HeraldError."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg2
import pytest
from psycopg import sql

import pgherald
from tests.fix_db import sqlalchemy_engine

Opener = Callable[[str], AbstractContextManager[Any]]


@contextmanager
def open_psycopg(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn) as c:
        yield c


@contextmanager
def open_psycopg2(dsn: str) -> Iterator[Any]:
    c = psycopg2.connect(dsn)
    try:
        yield c
    finally:
        c.close()


@contextmanager
def open_sqlalchemy(dsn: str) -> Iterator[Any]:
    engine = sqlalchemy_engine(dsn)
    try:
        with engine.connect() as c:
            yield c
    finally:
        engine.dispose()


DRIVERS = pytest.mark.parametrize(
    "opener", [open_psycopg, open_psycopg2, open_sqlalchemy], ids=["psycopg", "psycopg2", "sa"]
)


def run(c: Any, statement: str) -> Any:
    """Run *statement* on any of the three connections, returning the first value."""
    if hasattr(c, "exec_driver_sql"):
        result = c.exec_driver_sql(statement)
        return result.scalar() if result.returns_rows else None
    cur = c.cursor()
    cur.execute(statement)
    return cur.fetchone()[0] if cur.description else None


def is_driver_error(exc: BaseException | None) -> bool:
    return type(exc).__module__.split(".")[0] in ("psycopg", "psycopg2", "sqlalchemy")


@DRIVERS
def test_publish_before_install_is_schema_missing(dsn: str, opener: Opener) -> None:
    with opener(dsn) as c, pytest.raises(pgherald.SchemaMissing, match="pgherald install") as info:
        pgherald.publish(c, "orders", {"id": 1})
    assert is_driver_error(info.value.__cause__)
    assert info.value.sqlstate == "42P01"  # the server's code, kept (undefined_table)


@DRIVERS
def test_notify_in_a_failed_transaction_is_a_transaction_state_error(
    dsn: str, opener: Opener
) -> None:
    with opener(dsn) as c:
        with pytest.raises(Exception, match="division by zero"):
            run(c, "SELECT 1/0")
        with pytest.raises(pgherald.TransactionStateError, match="roll it back") as info:
            pgherald.notify(c, "x", "y")
        assert is_driver_error(info.value.__cause__)
        assert info.value.sqlstate == "25P02"


@DRIVERS
def test_a_terminated_connection_is_connection_lost(
    dsn: str, conn: psycopg.Connection, opener: Opener
) -> None:
    with opener(dsn) as c:
        pid = run(c, "SELECT pg_backend_pid()")
        run(c, "COMMIT")
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(pgherald.ConnectionLost, match="open a new one") as info:
            pgherald.notify(c, "x", "y")
        assert is_driver_error(info.value.__cause__)


@DRIVERS
def test_a_closed_connection_is_connection_lost(dsn: str, opener: Opener) -> None:
    with opener(dsn) as c:
        c.close()
        with pytest.raises(pgherald.ConnectionLost, match="open a new one") as info:
            pgherald.notify(c, "x", "y")
        assert is_driver_error(info.value.__cause__)


@DRIVERS
def test_publish_on_a_read_only_session_says_use_the_primary(
    dsn: str, conn: psycopg.Connection, opener: Opener
) -> None:
    pgherald.install(conn)
    with opener(dsn) as c:
        run(c, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        run(c, "COMMIT")
        with pytest.raises(pgherald.PublishError, match="point pgherald at the primary"):
            pgherald.publish(c, "orders", {"id": 1})


@pytest.fixture
def role(conn: psycopg.Connection) -> Iterator[str]:
    """A role without any privilege on pgherald's schema (roles are cluster-wide: dropped after)."""
    name = f"pgherald_norights_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_privilege_errors_name_the_grant_and_the_grants_work(
    dsn: str, conn: psycopg.Connection, role: str
) -> None:
    pgherald.install(conn)
    granted: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        for _ in range(5):  # follow each hint until publish works
            try:
                pgherald.publish(c, "orders", {"id": 1})
                break
            except pgherald.PrivilegeError as exc:
                grant = str(exc).rsplit("run ", 1)[1]
                assert grant.endswith(" TO <role>"), grant
                conn.execute(grant.replace("<role>", role))  # type: ignore[call-overload]
                granted.append(grant.split(" TO ")[0])
        else:
            raise AssertionError(f"publish still refused after {granted}")
    assert granted[0] == "GRANT USAGE ON SCHEMA pgherald"
    assert "GRANT SELECT, INSERT ON TABLE pgherald.events_v1" in granted


@pytest.mark.anyio
async def test_async_notify_and_publish_map_errors(dsn: str, anyio_backend: str) -> None:
    if anyio_backend == "trio":
        pytest.xfail("psycopg's AsyncConnection runs on asyncio only (psycopg issue #29)")
    async with await psycopg.AsyncConnection.connect(dsn) as c:
        with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
            await pgherald.apublish(c, "orders", {"id": 1})
        with pytest.raises(pgherald.TransactionStateError, match="roll it back"):
            await pgherald.anotify(c, "x", "y")
