"""
Storms of real faults, for the storm tests (tests/integration/test_*_storm.py,
test_consumer_chaos.py): a seed, a paced publisher on a thread, the faults of a proxied
connection and of a backend, and the storm that runs them one after the other.

The faults are random but reproducible: a storm test names its seed and the faults it ran in
every failure message. ``PGHERALD_CHAOS_SEED`` replays a seed (the timings still differ);
``PGHERALD_CHAOS_SECONDS`` makes the storm longer than its 8 s, for a soak run by hand.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import psycopg

from tests.fix_faults import FaultProxy, black_hole

T = TypeVar("T")

STORM = float(os.environ.get("PGHERALD_CHAOS_SECONDS") or 8.0)
"""Seconds of faults."""

Fault = Callable[[random.Random], "str | None"]
"""A fault: does it (with the storm's random source); returns details for the report ("" for
none), or None when there was nothing to do (no session to end)."""


def chaos_seed() -> int:
    """``PGHERALD_CHAOS_SEED``, or a new random seed."""
    return int(os.environ.get("PGHERALD_CHAOS_SEED") or random.randrange(2**32))


class Paced(Generic[T]):
    """
    ``step(conn, rng, n)`` in a transaction of its own every *pace* seconds, on a thread, until
    `stop`: it publishes (or notifies) and returns what it sent; `stop` returns all of it, in
    commit order. *n* counts what the steps returned so far (a sequence number to go on from).
    """

    def __init__(
        self,
        dsn: str,
        step: Callable[[psycopg.Connection[Any], random.Random, int], list[T]],
        pace: float = 0.01,
    ) -> None:
        self.sent: list[T] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(dsn, step, pace), name="paced", daemon=True
        )
        self._thread.start()

    def _main(
        self,
        dsn: str,
        step: Callable[[psycopg.Connection[Any], random.Random, int], list[T]],
        pace: float,
    ) -> None:
        rng = random.Random(0)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not self._stop.wait(pace):  # the pace, not a synchronisation
                    with conn.transaction():
                        batch = step(conn, rng, len(self.sent))
                    self.sent += batch
        except BaseException as exc:  # kept for the test
            self.error = exc

    def stop(self) -> list[T]:
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, repr(self.error)
        return self.sent


def proxy_faults(proxy: FaultProxy, name: str = "") -> dict[str, Fault]:
    """
    The faults of the connections through *proxy*: ``sever`` them (RST), ``freeze`` them for
    0.2 to 1.5 s (a half-open connection while it lasts, then thawed), ``drop`` every packet
    to and from it for 0.2 to 1.5 s (a network path that dies and comes back: nothing sent
    meanwhile is acknowledged, TCP retransmits it, later and later, and new connections'
    SYNs go unanswered), ``refuse`` new ones for 0.2 to 1 s (after a sever: a server that is
    down). Named ``sever`` etc., or ``sever NAME``.
    """

    def sever(rng: random.Random) -> str:
        proxy.sever()
        return ""

    def freeze(rng: random.Random) -> str:
        proxy.freeze()
        held = rng.uniform(0.2, 1.5)
        time.sleep(held)  # frozen for this long
        proxy.thaw()
        return f"{held:.1f}s"

    def drop(rng: random.Random) -> str:
        held = rng.uniform(0.2, 1.5)
        with black_hole(proxy.port):
            time.sleep(held)  # dropped for this long
        return f"{held:.1f}s"

    def refuse(rng: random.Random) -> str:
        proxy.refuse()
        proxy.sever()
        held = rng.uniform(0.2, 1.0)
        time.sleep(held)  # refusing for this long
        proxy.allow()
        return f"{held:.1f}s"

    suffix = f" {name}" if name else ""
    return {
        f"{k}{suffix}": f
        for k, f in (("sever", sever), ("freeze", freeze), ("drop", drop), ("refuse", refuse))
    }


def backend_faults(
    conn: psycopg.Connection[Any], pid: Callable[[], int | None], name: str = ""
) -> dict[str, Fault]:
    """
    The faults of a backend: ``terminate`` it, ``cancel`` its statement; *pid* says which
    backend it is now (None between sessions: nothing to do).
    """

    def call(function: str) -> Fault:
        def fault(rng: random.Random) -> str | None:
            target = pid()
            if target is None:
                return None
            # Only in this test's database: the pid of a session gone meanwhile may be reused.
            conn.execute(
                f"SELECT {function}(pid) FROM pg_stat_activity"
                " WHERE pid = %s AND datname = current_database()",
                (target,),
            )
            return ""

        return fault

    suffix = f" {name}" if name else ""
    return {
        f"terminate{suffix}": call("pg_terminate_backend"),
        f"cancel{suffix}": call("pg_cancel_backend"),
    }


def storm(rng: random.Random, faults: Mapping[str, Fault], first: Sequence[str] = ()) -> list[str]:
    """
    Faults one after the other for `STORM` seconds, 0.1 to 0.5 s apart: those named in
    *first*, in order, then any of *faults* at random. Returns what each did and when (seconds
    into the storm), for the report.
    """
    done: list[str] = []
    names = sorted(faults)
    queue = list(first)
    began = time.monotonic()
    until = began + STORM
    while time.monotonic() < until:
        time.sleep(rng.uniform(0.1, 0.5))  # the pace of the storm, not a synchronisation
        name = queue.pop(0) if queue else rng.choice(names)
        at = time.monotonic() - began
        details = faults[name](rng)
        if details is not None:
            done.append(f"{name} {details} @{at:.2f}s" if details else f"{name} @{at:.2f}s")
    return done
