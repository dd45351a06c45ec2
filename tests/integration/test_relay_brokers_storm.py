"""
The relay into NATS JetStream and into Redis Streams in a storm of real faults, on both sides.

A relay (`Relay` on a thread, `AsyncRelay` on asyncio: their clients run on asyncio only)
reads the log through a proxy while a publisher writes keyed events. Faults come one after the
other, picked at random: on the database side as in tests/integration/test_relay_storm.py (its
backend terminated or cancelled, its connection severed, frozen, refused), and on the broker's:
a private nats-server or redis-server stopped (SIGSTOP) for a while, or restarted. Then the
faults stop and the relay must catch up. What docs/relay.md promises must hold: "Nothing is
lost", "Duplicates are absorbed by the broker" (JetStream by message id, the Redis script by
position), "Order per key"; so the stream holds every event exactly once, each key's in log
order; none is dead-lettered; `run()` keeps going and ends on `stop()`.

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import OwnBroker, OwnNats, OwnRedis, relay_pid
from tests.fix_chaos import Fault, Paced, backend_faults, chaos_seed, proxy_faults, storm
from tests.fix_durable import _OnAThread, uncovered
from tests.fix_faults import FaultProxy, wait_until

pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")
pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")

from tests.integration import test_relay_nats as via_nats
from tests.integration import test_relay_redis as via_redis

STREAM = "STORM"


def publish_step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[int]:
    """One to three keyed events."""
    return [
        pgherald.publish(conn, "orders", {"n": i}, key=f"k{i % 7}")
        for i in range(n, n + rng.randint(1, 3))
    ]


def broker_faults(broker: OwnBroker) -> dict[str, Fault]:
    """The broker stopped (SIGSTOP) for 0.2 to 1.5 s, or restarted (SIGTERM, then again)."""

    def freeze(rng: random.Random) -> str:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        held = rng.uniform(0.2, 1.5)
        try:
            time.sleep(held)  # stopped for this long
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        return f"{held:.1f}s"

    def restart(rng: random.Random) -> str:
        broker.restart()
        return ""

    return {"broker freeze": freeze, "broker restart": restart}


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[OwnBroker]:
    server: OwnBroker = OwnNats() if request.param == "nats" else OwnRedis()
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
    server.close()


@pytest.mark.parametrize("broker", ["nats", "redis"], indirect=True)
@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_the_relay_into_a_broker_through_a_storm_of_faults(
    runtime: str,
    broker: OwnBroker,
    installed: str,
    conn: psycopg.Connection[Any],
    fault_proxy: FaultProxy,
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    nats = isinstance(broker, OwnNats)
    cls = pgherald.Relay if runtime == "sync" else pgherald.AsyncRelay
    relay: Any = cls(
        fault_proxy.dsn_for(installed),
        to=broker.url,
        channels=["orders"],
        stream=STREAM,
        retry_delay=0.01,
        retry_max_delay=0.2,
        stats_interval=None,
    )

    def in_stream() -> int:
        return (
            via_nats.stream_count(broker.url, STREAM)
            if nats
            else via_redis.length(broker.url, STREAM)
        )

    running = _OnAThread(runtime, relay)
    publisher = Paced(installed, publish_step)
    report = f"seed {seed}"
    try:
        wait_until(lambda: in_stream() > 0 or not running.thread.is_alive(), 15, "a relayed event")
        faults = proxy_faults(fault_proxy) | backend_faults(conn, lambda: relay_pid(conn))
        faults |= broker_faults(broker)
        done = storm(rng, faults, first=["sever", "broker restart"])
        ids = publisher.stop()
        report = f"seed {seed}; faults: {', '.join(done)}"
        assert running.thread.is_alive(), f"run() ended: {running.error!r} ({report})"
        wait_until(lambda: uncovered(conn, "relay") == 0, 60, f"the relay to catch up ({report})")
        running.stop(within=2.0)
        assert running.error is None, f"{running.error!r} ({report})"
    finally:
        publisher.stop()
        running.end()
    if nats:
        via_nats.check_exactly_once_in_key_order(via_nats.messages(broker.url, STREAM), ids)
    else:
        via_redis.check_exactly_once_in_key_order(via_redis.entries(broker.url, STREAM), ids)
    dead = conn.execute("SELECT count(*) FROM pgherald.dead_letters_v1").fetchone()
    assert dead == (0,), f"events dead-lettered ({report})"
