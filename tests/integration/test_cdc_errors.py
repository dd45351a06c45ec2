"""
Change data capture: the errors docs/cdc.md promises (section "Reference", "Errors"), on the
private ``wal_level=logical`` server: a slot of another plugin, a role without REPLICATION,
``create=False`` with something missing (`UsageError`, nothing created), and
``reconnect_max_attempts`` running out against a stopped server (`ConnectionLost`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeEvent, ChangeStream
from tests.fix_faults import LogWatch, await_until, wait_until, watching
from tests.fix_server import OwnServer
from tests.integration.test_cdc import Reader, reader, slot_ready, sql

__all__ = ["reader"]  # the fixture, shared with test_cdc


def read_one(dsn: str, **kwargs: Any) -> None:
    """Iterate a ChangeStream until its first change (the errors here come before any); stopped
    after 10 s, so that an error that never comes fails the test instead of hanging it."""
    with ChangeStream(dsn, **kwargs) as stream:
        watchdog = threading.Timer(10, stream.stop)
        watchdog.start()
        try:
            for _ in stream:
                break
        finally:
            watchdog.cancel()


def slots(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as c:
        return {r[0] for r in c.execute("SELECT slot_name FROM pg_replication_slots")}


def published(dsn: str, publication: str) -> set[str] | None:
    """The tables of *publication*; None when it does not exist."""
    with psycopg.connect(dsn) as c:
        if (
            c.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
            is None
        ):
            return None
        rows = c.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
        ).fetchall()
    return {r[0] for r in rows}


# -- setup errors: UsageError, before anything is created --


def test_slot_of_another_plugin(cdc_dsn: str) -> None:
    sql(
        cdc_dsn,
        "CREATE TABLE t (id int PRIMARY KEY)",
        "SELECT pg_create_logical_replication_slot('s_other', 'test_decoding')",
    )
    with pytest.raises(pgherald.UsageError) as info:
        read_one(cdc_dsn, slot="s_other", tables=["t"])
    message = str(info.value)
    assert "'s_other' uses the plugin 'test_decoding', not pgoutput" in message
    assert "pick another slot name" in message
    # Refused before the publication was made for a slot it cannot read.
    assert published(cdc_dsn, "s_other") is None


@pytest.fixture
def plain_role(cdc_dsn: str) -> Iterator[str]:
    """A login role without REPLICATION that owns table ``t`` of the test's database (roles
    are the whole server's: dropped afterwards); its DSN."""
    role = f"plain_{uuid.uuid4().hex[:8]}"
    sql(
        cdc_dsn,
        f"CREATE ROLE {role} LOGIN NOREPLICATION",
        "CREATE TABLE t (id int PRIMARY KEY)",
        f"ALTER TABLE t OWNER TO {role}",
    )
    yield cdc_dsn.replace("postgres@", f"{role}@", 1)
    sql(cdc_dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_role_without_replication(cdc_dsn: str, plain_role: str) -> None:
    # The publication exists (made by a superuser): only the replication connection, which
    # needs the REPLICATION attribute, can fail.
    sql(cdc_dsn, "CREATE PUBLICATION s_norepl FOR TABLE t")
    with pytest.raises(pgherald.UsageError) as info:
        read_one(plain_role, slot="s_norepl", tables=["t"])
    message = str(info.value)
    assert "needs a role with the REPLICATION attribute" in message
    assert "ALTER ROLE ... REPLICATION" in message
    assert "s_norepl" not in slots(cdc_dsn)


@pytest.mark.parametrize("before", ["no_publication", "publication_of_another_table"])
def test_role_without_replication_leaves_the_publication_as_it_was(
    cdc_dsn: str, plain_role: str, before: str
) -> None:
    # The role may create publications (CREATE on the database, owner of the tables), so the
    # publication is made or changed before the replication connection is refused.
    role = plain_role.split("://", 1)[1].split("@", 1)[0]
    sql(
        cdc_dsn,
        f"DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {role}', "
        "current_database()); END $$",
        "CREATE TABLE u (id int PRIMARY KEY)",
        f"ALTER TABLE u OWNER TO {role}",
    )
    if before == "publication_of_another_table":
        sql(plain_role, "CREATE PUBLICATION s_undo FOR TABLE u")
    expected = published(cdc_dsn, "s_undo")
    with pytest.raises(pgherald.UsageError) as info:
        read_one(plain_role, slot="s_undo", tables=["t"])
    assert "needs a role with the REPLICATION attribute" in str(info.value)
    assert published(cdc_dsn, "s_undo") == expected  # None, or {"u"}: t was taken back
    assert "s_undo" not in slots(cdc_dsn)


# (setup SQL, ChangeStream arguments, key words of the error)
CREATE_FALSE: dict[str, tuple[list[str], dict[str, Any], list[str]]] = {
    "publication_lacks_a_table": (
        [
            "CREATE PUBLICATION s_nc FOR TABLE a",
            "SELECT pg_create_logical_replication_slot('s_nc', 'pgoutput')",
        ],
        {"tables": ["a", "b"]},
        ["publication 's_nc' lacks public.b", "`pgherald cdc add TABLE...`", "create=True"],
    ),
    "missing_publication": (
        ["SELECT pg_create_logical_replication_slot('s_nc', 'pgoutput')"],
        {},
        ["publication 's_nc' does not exist", "run `pgherald cdc add TABLE... --slot s_nc`"],
    ),
    "missing_slot": (
        ["CREATE PUBLICATION s_nc FOR TABLE a"],
        {"tables": ["a"]},
        [
            "replication slot 's_nc' does not exist",
            "run `pgherald cdc add TABLE... --slot s_nc`",
            "create=True",
        ],
    ),
}


@pytest.mark.parametrize("case", CREATE_FALSE)
def test_create_false_with_something_missing(cdc_dsn: str, case: str) -> None:
    setup, kwargs, words = CREATE_FALSE[case]
    sql(
        cdc_dsn,
        "CREATE TABLE a (id int PRIMARY KEY)",
        "CREATE TABLE b (id int PRIMARY KEY)",
        *setup,
    )
    before = (slots(cdc_dsn), published(cdc_dsn, "s_nc"))
    with pytest.raises(pgherald.UsageError) as info:
        read_one(cdc_dsn, slot="s_nc", create=False, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, message
    # create=False: neither the slot nor the publication was made or changed.
    assert (slots(cdc_dsn), published(cdc_dsn, "s_nc")) == before


# -- reconnect_max_attempts: ConnectionLost once the server cannot be reached that often --

ATTEMPTS = 3
GIVE_UP: dict[str, Any] = {
    "reconnect_max_attempts": ATTEMPTS,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.1,
    "connect_timeout": 2,
}
WITHIN = 5.0  # the backoff adds up to 0.25 s; a stopped server refuses at once


def _losses(log: LogWatch) -> list[str]:
    return [r.getMessage() for r in log.matching("change stream lost")]


def _check_given_up(error: BaseException | None, log: LogWatch) -> None:
    assert isinstance(error, pgherald.ConnectionLost), repr(error)
    assert f"could not be resumed after {ATTEMPTS} attempts" in str(error)
    # Tried exactly that often (each failed attempt logs its delay), not fewer, not more.
    assert len(_losses(log)) == ATTEMPTS, _losses(log)


def test_reconnect_max_attempts_gives_up(server: OwnServer, reader: Callable[..., Reader]) -> None:
    sql(server.dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    with watching("pgherald.cdc") as log:
        r = reader(ChangeStream(server.dsn, slot="s_give_up", tables=["t"], **GIVE_UP))
        wait_until(lambda: slot_ready(server.dsn, "s_give_up"), 10, "the stream to start")
        sql(server.dsn, "INSERT INTO t VALUES (1)")
        assert [e.key for e in r.wait(1)] == ["1"]
        server.stop("immediate")
        wait_until(lambda: r.error is not None, WITHIN, "the stream to give up")
        r.thread.join(1)
        assert not r.thread.is_alive(), "the stream raised, yet its iteration goes on"
    _check_given_up(r.error, log)


@pytest.mark.anyio
async def test_async_reconnect_max_attempts_gives_up(server: OwnServer) -> None:
    sql(server.dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = pgherald.AsyncChangeStream(server.dsn, slot="s_give_up", tables=["t"], **GIVE_UP)
    events: list[ChangeEvent] = []
    errors: list[BaseException] = []

    async def run() -> None:
        try:
            await stream.run(events.append)
        except pgherald.ConnectionLost as exc:  # asserted below
            errors.append(exc)

    with watching("pgherald.cdc") as log, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await await_until(lambda: slot_ready(server.dsn, "s_give_up"), 10, "the stream")
            sql(server.dsn, "INSERT INTO t VALUES (1)")
            await await_until(lambda: events, 10, "change 1")
            await anyio.to_thread.run_sync(server.stop, "immediate")
            await await_until(lambda: errors, WITHIN, "the stream to give up")
            # run() returned as it raised: the task group ends with it, no stop() needed.
    assert [e.key for e in events] == ["1"]
    assert len(errors) == 1
    _check_given_up(errors[0], log)
