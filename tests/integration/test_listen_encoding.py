"""
Listening in a database that is not UTF-8: pgherald's own connections speak UTF8 whatever the
database's encoding (or the DSN's ``client_encoding``), and a lent connection in another
encoding is switched to UTF8 while listening and handed back in its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anyio
import psycopg
import pytest

import pgherald
from pgherald._conninfo import listener_conninfo, resolve_source
from pgherald.testing import DatabaseDropper
from tests.fix_db import fresh_database
from tests.fix_faults import FaultProxy, wait_until

SENT = [("café", "crème"), ("plain", "crème brûlée"), ("café", "plain ascii")]


@pytest.fixture
def latin1_dsn(
    server_dsn: str, database_dropper: DatabaseDropper, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh LATIN1 database for this test, dropped afterwards."""
    with fresh_database(
        server_dsn,
        database_dropper,
        request,
        prefix="pgherald_test_latin1",
        options="ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'",
    ) as new:
        yield new


def _send(dsn: str) -> None:
    """NOTIFY from an ordinary connection, in the database's own encoding (LATIN1)."""
    with psycopg.connect(dsn, autocommit=True) as sender:
        assert sender.info.encoding == "iso8859-1"
        for channel, payload in SENT:
            pgherald.notify(sender, channel, payload)


def _received(listener: pgherald.Listener) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    for n in listener.notifications(timeout=10):
        got.append((n.channel, n.payload))
        if len(got) == len(SENT):
            break
    return got


def test_listener_hears_non_ascii_channels_and_payloads_in_a_latin1_database(
    latin1_dsn: str,
) -> None:
    with pgherald.Listener(latin1_dsn, channels=["café", "plain"]) as listener:
        assert listener.listening == {"café", "plain"}
        _send(latin1_dsn)
        assert _received(listener) == SENT


def test_a_dsn_client_encoding_is_overridden_for_pgherald_own_connections(
    latin1_dsn: str,
) -> None:
    dsn = f"{latin1_dsn} client_encoding=LATIN1"
    for made in (listener_conninfo(dsn), resolve_source(dsn, application_name="x")[0]):
        assert psycopg.conninfo.conninfo_to_dict(made)["client_encoding"] == "UTF8"
    with pgherald.Listener(dsn, channels=["café", "plain"]) as listener:
        _send(latin1_dsn)
        assert _received(listener) == SENT


@pytest.mark.anyio
async def test_async_listener_in_a_latin1_database(latin1_dsn: str) -> None:
    async with pgherald.AsyncListener(latin1_dsn, channels=["café", "plain"]) as listener:
        await anyio.to_thread.run_sync(_send, latin1_dsn)
        got: list[tuple[str, str]] = []
        with anyio.fail_after(10):
            async for n in listener.notifications(timeout=10):
                got.append((n.channel, n.payload))
                if len(got) == len(SENT):
                    break
        assert got == SENT


def test_a_lent_latin1_connection_listens_in_utf8_and_is_handed_back_in_latin1(
    latin1_dsn: str,
) -> None:
    with psycopg.connect(latin1_dsn, autocommit=True) as lent:
        assert lent.info.encoding == "iso8859-1"
        with pgherald.Listener(lent, channels=["café", "plain"]) as listener:
            assert listener.backend_pid == lent.info.backend_pid  # listening on it
            _send(latin1_dsn)
            assert _received(listener) == SENT
        # Handed back as it was lent: its own encoding, nothing listened to.
        assert lent.info.encoding == "iso8859-1"
        assert lent.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert lent.execute("SELECT 'crème'::text").fetchone() == ("crème",)
        assert lent.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)


def test_a_lent_connection_stopped_in_its_first_statement_is_handed_back_as_lent(
    latin1_dsn: str, fault_proxy: FaultProxy
) -> None:
    # stop() while the first open's SET client_encoding hangs (a frozen connection): the
    # statement is abandoned; on close the listener takes its answer, then hands the
    # connection back in its own encoding, listening to nothing, usable.
    with psycopg.connect(fault_proxy.dsn_for(latin1_dsn), autocommit=True) as lent:
        listener = pgherald.Listener(lent, channels=["café"])
        listener.on("café")(lambda n: None)
        assert fault_proxy.freeze() == 1
        errors: list[BaseException] = []

        def run() -> None:
            try:
                listener.run()
            except BaseException as exc:  # kept for the test
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_until(
            lambda: lent.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE,
            5,
            "the first statement in flight",
        )
        listener.stop()
        t.join(10)
        assert not t.is_alive()
        fault_proxy.thaw()
        listener.close()
        assert lent.info.encoding == "iso8859-1"
        assert lent.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert lent.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert lent.execute("SELECT 'crème'::text").fetchone() == ("crème",)
