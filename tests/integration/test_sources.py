"""A listener given a SQLAlchemy engine, a psycopg2 connection or a SQLAlchemy URL listens."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import psycopg2
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

import pgherald
from pgherald._conninfo import resolve_source
from tests.fix_db import sqlalchemy_engine


@pytest.fixture
def engine(dsn: str) -> Iterator[sa.Engine]:
    e = sqlalchemy_engine(dsn)
    yield e
    e.dispose()


def round_trip(listener: pgherald.Listener, conn: psycopg.Connection) -> list[str]:
    pgherald.notify(conn, "src", "hello")
    for n in listener.notifications(timeout=5.0):
        return [n.payload]
    return []


def test_listener_on_a_sqlalchemy_engine(engine: sa.Engine, conn: psycopg.Connection) -> None:
    with pgherald.Listener(engine, channels=["src"]) as listener:
        assert round_trip(listener, conn) == ["hello"]


def test_listener_on_a_sqlalchemy_connection_opens_its_own(
    engine: sa.Engine, conn: psycopg.Connection
) -> None:
    with engine.connect() as sa_conn, pgherald.Listener(sa_conn, channels=["src"]) as listener:
        own_pid = sa_conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert listener.backend_pid not in (None, own_pid)
        assert round_trip(listener, conn) == ["hello"]


def test_listener_on_a_psycopg2_connection_opens_its_own(
    dsn: str, conn: psycopg.Connection
) -> None:
    with psycopg2.connect(dsn) as pg2, pgherald.Listener(pg2, channels=["src"]) as listener:
        assert listener.backend_pid not in (None, pg2.get_backend_pid())
        assert round_trip(listener, conn) == ["hello"]
        name = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
            [listener.backend_pid],
        ).fetchone()
        assert name is not None
        assert name[0].startswith("pgherald-listener")
    pg2.close()


def test_listener_on_a_sqlalchemy_style_url(dsn: str, conn: psycopg.Connection) -> None:
    p = conninfo_to_dict(dsn)
    url = f"postgresql+psycopg2://{p['user']}@{p['host']}:{p.get('port') or 5432}/{p['dbname']}"
    with pgherald.Listener(url, channels=["src"]) as listener:
        assert round_trip(listener, conn) == ["hello"]


def test_psycopg2_parameters_include_the_password_but_messages_do_not(dsn: str) -> None:
    # Trust authentication ignores the password: it only has to reach the conninfo.
    with psycopg2.connect(dsn, password="hunter2") as pg2:
        conninfo, lent = resolve_source(pg2, application_name="pgherald-test")
        assert lent is None
        assert conninfo_to_dict(conninfo)["password"] == "hunter2"
        assert conninfo_to_dict(conninfo)["dbname"] == conninfo_to_dict(dsn)["dbname"]
        listener = pgherald.Listener(pg2, channels=["src"])
        assert "hunter2" not in repr(listener)
    pg2.close()
    with pytest.raises(pgherald.UsageError, match="psycopg2 connection is closed"):
        pgherald.Listener(pg2)


def test_a_psycopg3_connection_is_lent_not_copied(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, password="hunter2") as c:
        conninfo, lent = resolve_source(c, application_name="pgherald-test")
        assert lent is c.pgconn
        assert conninfo_to_dict(conninfo)["password"] == "hunter2"  # to reconnect after a loss
        c.autocommit = False
        c.execute("SELECT 1")
        with pytest.raises(pgherald.TransactionStateError, match="autocommit"):
            resolve_source(c, application_name="pgherald-test")
