"""
Listeners across a restart of a server the test starts itself (`tests/fix_server.py`), on every
runtime: the listener reconnects, LISTENs again, reports the gap, and hears what comes after.
(Consumers: tests/integration/test_consumer_faults.py.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_faults import wait_until
from tests.fix_server import OwnServer

RUNTIMES = ["sync", "asyncio", "trio"]


def notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.notify(conn, "orders", payload)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_listener_survives_a_server_restart(runtime: str, server: OwnServer) -> None:
    heard: list[str] = []
    gaps: list[pgherald.Gap] = []
    options: dict[str, Any] = {
        "on_gap": gaps.append,
        "reconnect_initial_delay": 0.05,
        "reconnect_max_delay": 0.5,
        "health_check_interval": 1.0,
        "health_check_timeout": 1.0,
    }
    if runtime == "sync":
        listener: Any = pgherald.Listener(server.dsn, **options)
    else:
        listener = pgherald.AsyncListener(server.dsn, **options)
    listener.on("orders")(lambda n: heard.append(n.payload))
    errors: list[BaseException] = []

    def main() -> None:
        try:
            if runtime == "sync":
                listener.run()
            else:
                anyio.run(listener.run, backend=runtime)
        except BaseException as exc:  # kept for the test
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    wait_until(lambda: "orders" in listener.listening or errors, 10, "the listener to LISTEN")
    notify(server.dsn, "before")
    wait_until(lambda: heard == ["before"], 5, "the first notification")
    server.restart()
    wait_until(lambda: gaps or errors, 15, "the listener to come back and report the gap")
    assert not errors, errors
    assert gaps[0].reason == "reconnect"
    assert gaps[0].ended >= gaps[0].started
    notify(server.dsn, "after")
    wait_until(lambda: heard == ["before", "after"], 5, "the notification after the restart")
    started = time.monotonic()
    listener.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1
    if runtime == "sync":
        listener.close()
    else:
        anyio.run(listener.aclose, backend="asyncio")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_dropped_database_ends_run_after_three_attempts(runtime: str, server: OwnServer) -> None:
    """Only what retrying cannot fix ends run(): here the database is gone for good."""
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE doomed")
    dsn = server.dsn.rsplit("/", 1)[0] + "/doomed"
    options: dict[str, Any] = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.1}
    if runtime == "sync":
        listener: Any = pgherald.Listener(dsn, **options)
    else:
        listener = pgherald.AsyncListener(dsn, **options)
    heard: list[str] = []
    listener.on("orders")(lambda n: heard.append(n.payload))
    errors: list[BaseException] = []

    def main() -> None:
        try:
            if runtime == "sync":
                listener.run()
            else:
                anyio.run(listener.run, backend=runtime)
        except BaseException as exc:  # kept for the test
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    # Ready once a notification made the trip (its start-up checks are over by then).
    deadline = time.monotonic() + 10
    while not heard and not errors and time.monotonic() < deadline:
        notify(dsn, "ready")
        time.sleep(0.05)  # between tries: nothing marks the end of the start-up checks
    assert heard, errors
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE doomed WITH (FORCE)")
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], pgherald.ConnectionLost), repr(errors[0])
    assert 'database "doomed" does not exist' in str(errors[0])
    assert listener.stats.connect_failures == 3
    if runtime == "sync":
        listener.close()
    else:
        anyio.run(listener.aclose, backend="asyncio")
