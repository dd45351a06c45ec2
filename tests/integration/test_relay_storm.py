"""
The webhook relay in a storm of real faults, on every runtime.

A relay reads the log through a proxy of its own while a publisher writes events; meanwhile
its database side meets faults one after the other, picked at random (its backend terminated
or its statement cancelled, its connection severed, frozen for a while, or refusing
reconnections for a while), and the receiver answers about one POST in six with a 500 or 503.
Then the faults stop and the relay must catch up. What docs/relay.md promises must hold:
nothing is lost (every event reaches the receiver, at least once); order per key (one key's
events first arrive in log order); none is dead-lettered (no event failed `max_attempts` times
in a row); `run()` keeps going through every fault and ends on `stop()`.

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import SECRET, Receiver, relay_pid
from tests.fix_chaos import STORM, Paced, backend_faults, chaos_seed, proxy_faults, storm
from tests.fix_durable import _OnAThread
from tests.fix_faults import FaultProxy, wait_until

RUNTIMES = ["sync", "asyncio", "trio"]
Sent = tuple[int, str]  # (event id, key)


def publish_step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[Sent]:
    """One to three keyed events."""
    batch = []
    for i in range(n, n + rng.randint(1, 3)):
        key = f"k{i % 7}"
        batch.append((pgherald.publish(conn, "orders", {"n": i}, key=key), key))
    return batch


# A soak (a longer storm, PGHERALD_CHAOS_SECONDS) needs longer than the suite's 120 s: the storm,
# then the catch-up (see below).
@pytest.mark.timeout(max(120.0, 30 + 4 * STORM))
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_webhook_relay_through_a_storm_of_faults(
    runtime: str,
    installed: str,
    conn: psycopg.Connection[Any],
    fault_proxy: FaultProxy,
    receiver_factory: Callable[..., Receiver],
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    lock = threading.Lock()
    failed_in_a_row: dict[int, int] = {}
    answers = random.Random(seed + 1)  # the receiver's (on its own threads)

    def decide(n: int, body: Any) -> tuple[int, dict[str, str]]:
        with lock:  # never 4 refusals of one event in a row: none may be dead-lettered
            refusals = failed_in_a_row.get(body["id"], 0)
            if refusals < 3 and answers.random() < 1 / 6:
                failed_in_a_row[body["id"]] = refusals + 1
                return answers.choice((500, 503)), {}
            failed_in_a_row[body["id"]] = 0
            return 200, {}

    receiver = receiver_factory(decide)
    cls = pgherald.Relay if runtime == "sync" else pgherald.AsyncRelay
    relay: Any = cls(
        fault_proxy.dsn_for(installed),
        to=receiver.url,
        channels=["orders"],
        secret=SECRET,
        retry_delay=0.01,
        retry_max_delay=0.1,
        stats_interval=None,
    )
    running = _OnAThread(runtime, relay)
    publisher = Paced(installed, publish_step)
    report = f"seed {seed}"
    try:
        wait_until(
            lambda: receiver.accepted or not running.thread.is_alive(), 10, "a relayed event"
        )
        faults = proxy_faults(fault_proxy) | backend_faults(conn, lambda: relay_pid(conn))
        done = storm(rng, faults, first=["sever"])  # the first one ends a session
        sent = publisher.stop()
        ids = [i for i, _ in sent]
        report = f"seed {seed}; faults: {', '.join(done)}"
        assert running.thread.is_alive(), f"run() ended: {running.error!r} ({report})"

        def relayed() -> set[int]:
            with receiver.lock:
                return {body["id"] for body in receiver.accepted}

        # The webhook takes events one at a time and refuses one in six: what a fault held up
        # drains little faster than it is published, so a longer storm (a soak) needs longer.
        catch_up = max(60.0, 3 * STORM)
        wait_until(lambda: relayed() >= set(ids), catch_up, f"every event relayed ({report})")
        running.stop(within=2.0)
        assert running.error is None, f"{running.error!r} ({report})"
    finally:
        publisher.stop()
        running.end()

    with receiver.lock:
        arrivals = [body["id"] for body in receiver.accepted]
    keys = dict(sent)

    def per_key(order: list[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i in order:
            out.setdefault(keys[i], []).append(i)
        return out

    first = list(dict.fromkeys(arrivals))  # each event's first arrival, in arrival order
    assert sorted(first) == sorted(ids), report
    assert per_key(first) == per_key(ids), f"a key's events first relayed out of order ({report})"
    assert receiver.bad_signatures == 0
    dead = conn.execute("SELECT count(*) FROM pgherald.dead_letters_v1").fetchone()
    assert dead == (0,), f"events dead-lettered ({report})"
    assert relay.stats.relayed >= len(ids)
