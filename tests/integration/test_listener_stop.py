"""
`stop()` ends a listener's `run()` within a second in every state, on every runtime, and three
rounds of refused reconnections never end it (consumers: test_consumer_faults.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_faults import FaultProxy, SilentServer, wait_until

RUNTIMES = ["sync", "asyncio", "trio"]


class ListenerRun:
    """A listener of one runtime, run on a thread of its own."""

    def __init__(self, runtime: str, dsn: str, *, direct_dsn: str, **options: Any) -> None:
        self.runtime = runtime
        self.heard: list[str] = []
        self.gaps: list[pgherald.Gap] = []
        self.error: BaseException | None = None
        self.returned_at: float | None = None
        cls = pgherald.Listener if runtime == "sync" else pgherald.AsyncListener
        self.listener: Any = cls(dsn, on_gap=self.gaps.append, **options)
        self.listener.on("orders")(lambda n: self.heard.append(n.payload))
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        # Ready once a notification made the trip (the start-up checks are over by then).
        deadline = time.monotonic() + 10
        while not self.heard and self.thread.is_alive() and time.monotonic() < deadline:
            notify(direct_dsn, "ready")
            time.sleep(0.05)  # between tries: nothing marks the end of the start-up checks
        assert self.heard, f"the listener never heard a notification: {self.error!r}"
        self.heard.clear()

    def _main(self) -> None:
        try:
            if self.runtime == "sync":
                self.listener.run()
            else:
                anyio.run(self.listener.run, backend=self.runtime)
        except BaseException as exc:  # kept for the test
            self.error = exc
        finally:
            self.returned_at = time.monotonic()

    def stop(self, within: float = 1.0) -> None:
        started = time.monotonic()
        self.listener.stop()
        self.thread.join(within + 10)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        took = (self.returned_at or time.monotonic()) - started
        assert took < within, f"run() took {took:.2f}s after stop() (at most {within}s)"
        assert self.error is None, repr(self.error)

    def close(self) -> None:
        if self.thread.is_alive():
            self.listener.stop()
            self.thread.join(10)
        if self.runtime == "sync":
            self.listener.close()
        else:
            anyio.run(self.listener.aclose, backend="asyncio")


@pytest.fixture
def listeners() -> Iterator[Callable[..., ListenerRun]]:
    started: list[ListenerRun] = []

    def start(runtime: str, dsn: str, *, direct_dsn: str, **options: Any) -> ListenerRun:
        run = ListenerRun(runtime, dsn, direct_dsn=direct_dsn, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def notify(dsn: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.notify(conn, "orders", payload)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_waiting(runtime: str, dsn: str, listeners: Callable[..., ListenerRun]) -> None:
    run = listeners(runtime, dsn, direct_dsn=dsn, health_check_interval=60)
    notify(dsn, "x")
    wait_until(lambda: run.heard, 5, "a notification")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_during_a_health_check_on_a_frozen_connection(
    runtime: str, dsn: str, fault_proxy: FaultProxy, listeners: Callable[..., ListenerRun]
) -> None:
    run = listeners(
        runtime,
        fault_proxy.dsn_for(dsn),
        direct_dsn=dsn,
        health_check_interval=0.2,
        health_check_timeout=30,
    )
    fault_proxy.freeze()
    checks = run.listener.stats.health_checks
    # The next probe goes out on the frozen connection and waits (30 s before it gives up).
    wait_until(lambda: run.listener.stats.health_checks > checks, 5, "a probe on the frozen link")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_backing_off(
    runtime: str, dsn: str, fault_proxy: FaultProxy, listeners: Callable[..., ListenerRun]
) -> None:
    run = listeners(runtime, fault_proxy.dsn_for(dsn), direct_dsn=dsn, reconnect_initial_delay=60)
    fault_proxy.refuse()
    fault_proxy.sever()
    wait_until(lambda: not run.listener.connected, 5, "the listener to lose its connection")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_connecting_to_a_server_that_never_answers(
    runtime: str,
    dsn: str,
    fault_proxy: FaultProxy,
    silent_server: SilentServer,
    listeners: Callable[..., ListenerRun],
) -> None:
    run = listeners(
        runtime,
        fault_proxy.dsn_for(dsn),
        direct_dsn=dsn,
        connect_timeout=60,
        reconnect_initial_delay=0.01,
    )
    fault_proxy._target = ("127.0.0.1", silent_server.port)  # its reconnections go to a hung server
    fault_proxy.sever()
    wait_until(lambda: not run.listener.connected, 5, "the listener to lose its connection")
    # Inside its (60 s) connection attempt once the hung server has accepted it.
    wait_until(lambda: silent_server.accepted, 5, "a connection attempt to the hung server")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_three_rounds_of_refused_reconnects(
    runtime: str, dsn: str, fault_proxy: FaultProxy, listeners: Callable[..., ListenerRun]
) -> None:
    run = listeners(
        runtime,
        fault_proxy.dsn_for(dsn),
        direct_dsn=dsn,
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.2,
    )
    for round_ in range(3):
        failures = run.listener.stats.connect_failures
        fault_proxy.refuse()
        fault_proxy.sever()
        wait_until(lambda f=failures: run.listener.stats.connect_failures >= f + 3, 5, "3 refusals")
        assert run.thread.is_alive(), f"run() ended: {run.error!r}"
        fault_proxy.allow()
        wait_until(lambda n=round_: len(run.gaps) == n + 1, 10, f"round {round_}'s recovery")
        assert run.gaps[-1].attempts > 1
        notify(dsn, str(round_))
        wait_until(lambda n=round_: str(n) in run.heard, 5, f"round {round_}'s notification")
    run.stop()
