"""
A real PostgreSQL for the tests, never a mock.

Where the server comes from, first match wins:

1. ``--test-dsn`` or ``$PGHERALD_TEST_DSN``;
2. the local server on 127.0.0.1:5432 (user postgres, trust auth) when it answers;
3. an embedded server (the ``pgserver`` wheel, PostgreSQL 16) started for the session.

Each test gets a database of its own (LISTEN/NOTIFY is scoped to a database, so channels never
leak between tests), created from a template and dropped afterwards: at the test's end its
sessions are ended, and it is dropped with the next few (see `Dropper`). Database tests never
skip: when no server can be had, they fail and say why.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgherald import ConnectError
from pgherald.testing import find_server

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


class Dropper:
    """
    Drops the tests' databases several at a time: one checkpoint wait for a batch, not each.

    DROP DATABASE ends with an immediate checkpoint and waits for it (PostgreSQL 15 logs
    ``checkpoint starting: immediate force wait``): the cluster's dirty buffers are written and
    its files fsynced. With the suite on three workers (and other users of the server) the
    checkpointer runs back to back, and every teardown waited in its queue: 0.5 s on average,
    up to 5 s. Drops issued together share one checkpoint (eight: 0.1 s, not 0.6 s), so
    `retire` does at once only what a test must not leak past its end (no new session can
    connect; every session of the database has ended, waited for) and keeps the name; every
    `BATCH` databases, that test's teardown drops them all at once.

    The drops stay in teardowns on purpose: a DROP DATABASE holds a transaction id while it
    waits, which holds back the durable log's read horizon; dropped in the background during
    the next tests, it made their delayed events seconds late. A drop that fails (a replication
    slot in use, a prepared transaction left behind) fails that teardown, naming the test whose
    database it was; the rest are dropped at the session's end.
    """

    BATCH = 8
    """Databases dropped together (each is a few MB on disk until then)."""
    TIMEOUT = 60.0
    """Seconds a batch of drops may take."""

    def __init__(self, admin_dsn: str) -> None:
        self._admin_dsn = admin_dsn
        self._retired: list[tuple[str, str]] = []  # (database, test)

    def retire(self, admin: psycopg.Connection, name: str, test: str) -> list[str]:
        """
        Close *name* to new sessions and end its sessions (waiting up to 5 s each); drop the
        retired databases when there are `BATCH` of them. The drops that failed, if any.
        """
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return []  # the test dropped it itself
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
        # The pids first, then one call each: in one statement the planner may call
        # pg_terminate_backend on rows before the datname filter (every session of the server).
        pids = [
            pid
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        ]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for the exit
        left = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
        assert not left, f"sessions of {name} did not end within 5 s: {left}"
        self._retired.append((name, test))
        return self.drop_retired() if len(self._retired) >= self.BATCH else []

    def drop_retired(self) -> list[str]:
        """Drop every retired database, all at once; the drops that failed."""
        batch, self._retired = self._retired, []
        failed: list[str] = []
        threads = [
            threading.Thread(target=self._drop, args=(name, test, failed), daemon=True)
            for name, test in batch
        ]
        deadline = time.monotonic() + self.TIMEOUT
        for t in threads:
            t.start()
        for t, (name, test) in zip(threads, batch, strict=True):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                failed.append(f"{test}: DROP DATABASE {name} took over {self.TIMEOUT:.0f} s")
        return failed

    def _drop(self, name: str, test: str, failed: list[str]) -> None:
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        try:
            with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
                admin.execute(query)
        except psycopg.Error as exc:
            failed.append(f"{test}: DROP DATABASE {name} failed: {exc}")  # list.append: atomic


@pytest.fixture(scope="session")
def database_dropper(server_dsn: str) -> Iterator[Dropper]:
    """The session's `Dropper`; at the session's end, the databases it still holds are dropped."""
    dropper = Dropper(server_dsn)
    yield dropper
    failed = dropper.drop_retired()
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture
def dsn(
    server_dsn: str, database_dropper: Dropper, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh, empty database for this test; its sessions ended afterwards, then dropped."""
    name = f"pgherald_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(server_dsn, name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            failed = database_dropper.retire(admin, name, request.node.nodeid)
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the test database, for sending and inspecting."""
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)
