"""On a hot standby: every pgherald entry point says to point it at the primary, in one line."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pgherald
from tests.fix_cli import run
from tests.fix_faults import free_port
from tests.fix_server import OwnServer, own_server


class Standby:
    """A hot standby of *primary*, streaming from it (pg_basebackup -R)."""

    def __init__(self, primary: OwnServer) -> None:
        self.primary = primary
        self.port = free_port()
        self.data = primary.dir / "standby"
        self.log = primary.dir / "standby.log"
        primary._run(
            "pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-d",
            f"host=127.0.0.1 port={primary.port} user=postgres",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"\nport = {self.port}\nhot_standby = on\n")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.primary._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start"
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.primary._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(Path(self.data), ignore_errors=True)


@pytest.fixture(scope="module")
def standby() -> Iterator[Standby]:
    with own_server() as primary:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            pgherald.install(conn)
            pgherald.publish(conn, "orders", {"id": 1})
        s = Standby(primary)
        try:
            s.start()
            deadline = time.monotonic() + 30
            while True:
                with (
                    contextlib.suppress(psycopg.OperationalError),
                    psycopg.connect(s.dsn, connect_timeout=2) as c,
                ):
                    if c.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
                        break
                if time.monotonic() > deadline:
                    pytest.fail("the standby did not start in 30 s")
                time.sleep(0.05)  # polling a server that is starting: no event to wait on
            yield s
        finally:
            s.stop()


PRIMARY_HINT = "point pgherald at the primary"


def test_a_consumer_on_a_standby_says_so(standby: Standby) -> None:
    consumer = pgherald.Consumer(standby.dsn, group="g", channels=["orders"])
    with pytest.raises(pgherald.HeraldError, match=PRIMARY_HINT) as info:
        consumer.connect()
    assert "read-only" in str(info.value)
    consumer.close()


@pytest.mark.anyio
async def test_an_async_consumer_on_a_standby_says_so(standby: Standby) -> None:
    consumer = pgherald.AsyncConsumer(standby.dsn, group="g", channels=["orders"])
    with pytest.raises(pgherald.HeraldError, match=PRIMARY_HINT):
        await consumer.connect()
    await consumer.aclose()


def test_a_listener_on_a_standby_says_so(standby: Standby) -> None:
    # errors.md: the first connection's refused LISTEN is a ConnectError, raised by the
    # connect that `with` makes (a retry would not help, so it comes at once).
    listener = pgherald.Listener(standby.dsn, channels=["orders"])
    started = time.monotonic()
    with pytest.raises(pgherald.ConnectError, match="not a read-only standby"):
        listener.connect()
    assert time.monotonic() - started < 5
    listener.close()


def test_publish_and_read_log_on_a_standby(standby: Standby) -> None:
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        with pytest.raises(pgherald.PublishError, match=PRIMARY_HINT):
            pgherald.publish(conn, "orders", {"id": 2})
        # Reading the log works on a standby: it is only reads.
        assert [e.payload for e in pgherald.read_log(conn, channels=["orders"])] == [{"id": 1}]


def test_the_cli_on_a_standby_is_one_line(standby: Standby) -> None:
    for args in (["consume", "--group", "g", "orders"], ["publish", "orders", "1"]):
        out = run(standby.dsn, *args, timeout=30)
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert PRIMARY_HINT in lines[0]
