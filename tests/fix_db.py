"""
A real PostgreSQL for the tests, never a mock.

Where the server comes from, first match wins:

1. ``--test-dsn`` or ``$PGHERALD_TEST_DSN``;
2. the local server on 127.0.0.1:5432 (user postgres, trust auth) when it answers;
3. an embedded server (the ``pgserver`` wheel, PostgreSQL 16) started for the session.

Each test gets a database of its own (LISTEN/NOTIFY is scoped to a database, so channels never
leak between tests), created from a template and dropped afterwards: at the test's end its
sessions are ended, and it is dropped with the next few (see `pgherald.testing.DatabaseDropper`,
which the pytest plugin's ``herald_db`` uses too). Database tests never
skip: when no server can be had, they fail and say why.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgherald import ConnectError
from pgherald.testing import DatabaseDropper, find_server

if TYPE_CHECKING:
    import sqlalchemy as sa


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--test-dsn",
        default=os.environ.get("PGHERALD_TEST_DSN"),
        help="DSN of a PostgreSQL server for the tests (default: $PGHERALD_TEST_DSN, else the "
        "local server on 127.0.0.1:5432, else an embedded one)",
    )


@pytest.fixture(scope="session")
def server_dsn(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An admin DSN of the server the tests use (see the module docstring)."""
    # The same lookup as the pytest plugin users get (pgherald.testing), not a copy of it.
    try:
        with find_server(
            request.config.getoption("--test-dsn"), tmp_path_factory.mktemp("pgdata")
        ) as dsn:
            yield dsn
    except ConnectError as exc:
        pytest.fail(f"{exc} (--test-dsn)", pytrace=False)


def with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def sqlalchemy_engine(dsn: str) -> sa.Engine:
    """A SQLAlchemy engine (psycopg2 driver) on the database of ``dsn``; the caller disposes it."""
    import sqlalchemy as sa

    url = conninfo_to_dict(dsn)
    return sa.create_engine(
        sa.URL.create(
            "postgresql+psycopg2",
            username=str(url.get("user") or ""),
            host=str(url.get("host") or ""),
            port=int(str(url.get("port") or 5432)),
            database=str(url["dbname"]),
        )
    )


@pytest.fixture(scope="session")
def database_dropper(server_dsn: str) -> Iterator[DatabaseDropper]:
    """The session's `DatabaseDropper`; at the session's end, what it still holds is dropped."""
    with DatabaseDropper.session(server_dsn) as dropper:
        yield dropper


@contextlib.contextmanager
def fresh_database(
    server_dsn: str,
    dropper: DatabaseDropper,
    request: pytest.FixtureRequest,
    *,
    prefix: str = "pgherald_test",
    options: str = "",
) -> Iterator[str]:
    """A new database (CREATE DATABASE ... *options*, literal SQL of ours) for the block: its
    sessions ended afterwards, then dropped; its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} {}").format(sql.Identifier(name), sql.SQL(options))
        )
    try:
        yield with_dbname(server_dsn, name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            failed = dropper.retire(admin, name, request.node.nodeid)
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture
def dsn(
    server_dsn: str, database_dropper: DatabaseDropper, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh, empty database for this test; its sessions ended afterwards, then dropped."""
    with fresh_database(server_dsn, database_dropper, request) as new:
        yield new


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the test database, for sending and inspecting."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)
