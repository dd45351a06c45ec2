"""`pgherald relay` / `Relay` into Redis Streams, against real servers (no mocks)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import (
    OwnRedis,
    RelayProcess,
    dead_again,
    publish_paced,
    relay_thread,
    stop_while_frozen,
)
from tests.fix_durable import uncovered
from tests.fix_faults import wait_until
from tests.fix_server import OwnServer

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")


def entries(url: str, stream: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [fields for _, fields in client.xrange(stream)]
    finally:
        client.close()


def length(url: str, stream: str) -> int:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return int(client.xlen(stream))
    except redis.exceptions.ConnectionError:
        return -1  # restarting
    finally:
        client.close()


def delete(url: str, *keys: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.delete(*keys)
    finally:
        client.close()


def check_exactly_once_in_key_order(got: list[dict[str, str]], ids: list[int]) -> None:
    seen = [int(f["id"]) for f in got]
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} events twice"
    assert sorted(seen) == sorted(ids), "events lost or foreign"
    last: dict[str, int] = {}
    for f, event_id in zip(got, seen, strict=True):
        key = f["key"]
        assert last.get(key, 0) < event_id, f"key {key}: {event_id} after {last[key]}"
        last[key] = event_id


@pytest.mark.slow
def test_twenty_thousand_events_through_two_relay_kills_and_a_redis_restart(
    installed: str, conn: psycopg.Connection, own_redis: OwnRedis
) -> None:
    total = 20_000
    stream = "faults"
    relay = RelayProcess(installed, "--to", own_redis.url, "--stream", stream, "orders").start()
    ids: list[int] = []
    publisher = threading.Thread(
        target=lambda: ids.extend(publish_paced(installed, "orders", total, 500, 0.05))
    )
    publisher.start()
    try:
        wait_until(lambda: length(own_redis.url, stream) >= 3000, 20, "3,000 relayed")
        relay.kill()  # SIGKILL, mid-stream
        relay.start()
        wait_until(lambda: length(own_redis.url, stream) >= 8000, 20, "8,000 relayed")
        own_redis.restart()  # SIGTERM and start: the relay loses its connection
        wait_until(lambda: length(own_redis.url, stream) >= 12000, 20, "12,000 relayed")
        relay.kill()
        relay.start()
        publisher.join(60)
        assert len(ids) == total
        wait_until(lambda: uncovered(conn, "relay") == 0, 20, "the relay to catch up")
        assert relay.stop() == 0, relay.output()
    finally:
        relay.kill()
        publisher.join(60)
    check_exactly_once_in_key_order(entries(own_redis.url, stream), ids)
    assert relay.output().count("connected to Redis") >= 3, relay.output()


@pytest.mark.slow
def test_the_relay_goes_on_across_two_postgresql_restarts(
    server: OwnServer, redis_url: str, unique: str
) -> None:
    """relay.md: PostgreSQL restarted, the relay's consumer reconnects and at most one read is
    sent again (the script skips its copies): every event once, each key's in order."""
    with psycopg.connect(server.dsn, autocommit=True) as c:
        pgherald.install(c)
    relay = pgherald.Relay(
        server.dsn,
        to=redis_url,
        channels=["orders"],
        stream=unique,
        batch_size=250,
        max_batch_size=500,
    )
    ids: list[int] = []
    try:
        with relay_thread(relay) as t:
            for round_ in range(3):
                ids += publish_paced(server.dsn, "orders", 2_000, 250, 0, keys=20)
                if round_ < 2:  # once the relay is into this round's events, maybe mid-read
                    at = len(ids) - 1_500
                    wait_until(lambda at=at: relay.stats.relayed >= at, 20, "relaying")
                    server.restart()
            wait_until(lambda: length(redis_url, unique) >= len(ids), 30, "every event relayed")
            assert t.is_alive(), "the relay ended"
        check_exactly_once_in_key_order(entries(redis_url, unique), ids)
        assert relay.stats.duplicates <= 2 * 500  # at most one read of 500 again per restart
        assert relay._relay._consumer.stats.reconnects >= 2  # it did lose PostgreSQL twice
    finally:
        delete(redis_url, unique, f"{unique}:pgherald-positions")


def test_a_redelivered_read_is_skipped_by_the_script(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """The group reset to the beginning: every event comes again, none is appended twice."""
    ids = publish_paced(installed, "orders", 300, 100, 0)
    options: dict[str, Any] = {"to": redis_url, "channels": ["orders"], "stream": unique}
    try:
        for _ in range(2):
            relay = pgherald.Relay(installed, **options)
            with relay_thread(relay):
                wait_until(lambda relay=relay: relay.stats.relayed >= 300, 10, "300 relayed")
            pgherald.reset_group(conn, "relay", to="beginning")
        check_exactly_once_in_key_order(entries(redis_url, unique), ids)
        assert relay.stats.duplicates == 300  # the second run: every one skipped
    finally:
        delete(redis_url, unique, f"{unique}:pgherald-positions")


def test_a_flushed_script_cache_is_loaded_again(
    installed: str, conn: psycopg.Connection, own_redis: OwnRedis
) -> None:
    """The relay calls its script by hash (EVALSHA): after SCRIPT FLUSH it loads it again."""
    first = publish_paced(installed, "orders", 200, 200, 0)
    relay = pgherald.Relay(
        installed, to=own_redis.url, channels=["orders"], stream="flushed", retry_delay=0.01
    )
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(lambda: relay.stats.relayed >= 200, 10, "200 relayed")
        client = redis.Redis.from_url(own_redis.url)
        try:
            client.script_flush()
        finally:
            client.close()
        second = publish_paced(installed, "orders", 200, 200, 0)
        wait_until(lambda: relay.stats.relayed >= 400, 10, "400 relayed")
    finally:
        relay.stop()
        t.join(10)
    assert not t.is_alive()
    check_exactly_once_in_key_order(entries(own_redis.url, "flushed"), first + second)
    assert relay.stats.retries >= 1  # the NOSCRIPT answer was seen, and recovered from
    assert relay.stats.connects == 2
    assert relay.stats.dead_lettered == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_fields_a_stream_per_channel_and_maxlen(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    first = pgherald.publish(conn, "orders", {"id": 1}, key="customer-7", headers={"h": 1})
    pgherald.publish_many(conn, "refunds", [[i] for i in range(300)])
    # Not ASCII: the relay writes the log's JSON text as it is, the lengths are of its bytes.
    wide = {"name": 'Zoë ✓ "q"\n', "nested": {"a": [1, 2.5, None]}}
    third = pgherald.publish(conn, "orders", wide, key="clé-✓", headers={"h": "ü"})
    relay = pgherald.AsyncRelay(
        installed,
        to=redis_url,
        channels=["orders", "refunds"],
        stream=f"{unique}:{{channel}}",
        maxlen=100,
    )
    task = asyncio.create_task(relay.run())
    try:
        for _ in range(500):
            if relay.stats.relayed >= 302:
                break
            await asyncio.sleep(0.01)
        assert relay.stats.relayed == 302
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
    try:
        order, other = entries(redis_url, f"{unique}:orders")
        assert order == {
            "id": str(first),
            "channel": "orders",
            "key": "customer-7",
            "created_at": order["created_at"],
            "payload": '{"id": 1}',  # the JSON text as the log holds it (jsonb's text form)
            "headers": '{"h": 1}',
        }
        assert other["id"] == str(third)
        assert other["key"] == "clé-✓"
        assert json.loads(other["payload"]) == wide
        assert json.loads(other["headers"]) == {"h": "ü"}
        refunds = entries(redis_url, f"{unique}:refunds")
        assert 100 <= len(refunds) < 300  # MAXLEN ~ trims whole nodes
        assert "key" not in refunds[-1]
        assert json.loads(refunds[-1]["payload"]) == [299]
    finally:
        delete(
            redis_url,
            *(
                f"{unique}:{c}{s}"
                for c in ("orders", "refunds")
                for s in ("", ":pgherald-positions")
            ),
        )


def test_metrics_endpoint_counts_relayed_events(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    import httpx

    pgherald.publish_many(conn, "orders", [{"n": n} for n in range(40)])
    relay = pgherald.Relay(
        installed, to=redis_url, channels=["orders"], stream=unique, metrics_port=0
    )
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(lambda: relay.stats.relayed >= 40, 10, "40 relayed")
        wait_until(lambda: relay.metrics_address is not None, 5, "the metrics endpoint")
        host, port = relay.metrics_address  # type: ignore[misc]
        text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
        labels = f'group="relay",target="{redis_url}"'
        assert f"pgherald_relay_events_total{{{labels}}} 40" in text
        assert f"pgherald_relay_partitions{{{labels}}} 16" in text
        assert "# TYPE pgherald_relay_lag_seconds gauge" in text
        assert httpx.get(f"http://{host}:{port}/other", timeout=5).status_code == 404
    finally:
        relay.stop()
        t.join(10)
        delete(redis_url, unique, f"{unique}:pgherald-positions")


def test_a_redelivered_dead_letter_is_appended_late_and_once(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """A dead letter lies behind its partition's position, which the script would skip as a
    re-send: a redelivery is appended (after later events), a redelivery sent again is not."""
    client = redis.Redis.from_url(redis_url)
    relay = pgherald.Relay(
        installed, to=redis_url, channels=["orders"], stream=unique, max_attempts=1
    )
    try:
        client.set(unique, "not a stream")  # WRONGTYPE: Redis refuses the event
        with relay_thread(relay) as t:
            first = pgherald.publish(conn, "orders", {"n": 1}, key="k")
            wait_until(lambda: relay.stats.dead_lettered == 1, 10, "the event dead-lettered")
            client.delete(unique)
            second = pgherald.publish(conn, "orders", {"n": 2}, key="k")  # same partition
            wait_until(lambda: relay.stats.relayed == 1, 10, "the second event relayed")
            assert pgherald.redeliver(conn, "relay", [first]) == [first]
            wait_until(lambda: relay.stats.relayed == 2, 10, "the dead letter redelivered")
            wait_until(
                lambda: pgherald.dead_letters(conn, "relay") == [], 10, "the dead letter gone"
            )
            assert [int(f["id"]) for f in entries(redis_url, unique)] == [second, first]
            assert relay.stats.duplicates == 0
            dead_again(conn, first)
            wait_until(lambda: relay.stats.relayed == 3, 10, "the redelivery sent again")
            assert relay.stats.duplicates == 1  # skipped by the script: not appended twice
            wait_until(
                lambda: pgherald.dead_letters(conn, "relay") == [], 10, "the dead letter gone"
            )
        assert not t.is_alive()
        assert [int(f["id"]) for f in entries(redis_url, unique)] == [second, first]
        assert relay.stats.dead_lettered == 1
        # A read of the log sent again after all this is still skipped, by the positions.
        pgherald.reset_group(conn, "relay", to="beginning")
        again = pgherald.Relay(installed, to=redis_url, channels=["orders"], stream=unique)
        with relay_thread(again):
            wait_until(lambda: again.stats.relayed >= 2, 10, "the log relayed again")
        assert again.stats.duplicates == 2
        assert [int(f["id"]) for f in entries(redis_url, unique)] == [second, first]
    finally:
        delete(redis_url, unique, f"{unique}:pgherald-positions", f"{unique}:pgherald-redelivered")
        client.close()


def test_an_unreachable_redis_is_retried_until_stop_then_relays_once_it_is_back(
    installed: str, conn: psycopg.Connection, own_redis: OwnRedis
) -> None:
    """Redis down: retried for ever (never dead-lettered), stop() is prompt, and once Redis
    listens again the events arrive, exactly once."""
    own_redis.stop()  # its port now refuses connections
    ids = [pgherald.publish(conn, "orders", {"n": n}, key="k") for n in range(3)]
    options: dict[str, Any] = {
        "to": own_redis.url,
        "channels": ["orders"],
        "stream": "back",
        "retry_delay": 0.01,
        "retry_max_delay": 0.05,
    }
    relay = pgherald.Relay(installed, **options)
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        wait_until(lambda: relay.stats.retries >= 5, 10, "five retries")
        assert relay.stats.connects == 0
        assert relay.stats.dead_lettered == 0
    finally:
        started = time.monotonic()
        relay.stop()
        t.join(10)
    took = time.monotonic() - started
    assert not t.is_alive()
    assert took < 1.0, f"stop took {took:.2f}s"
    assert relay.stats.relayed == 0
    assert uncovered(conn, "relay") == 3  # not acknowledged: they come again
    assert pgherald.dead_letters(conn, "relay") == []

    # A relay retrying while Redis comes back connects and relays what waited.
    relay = pgherald.Relay(installed, **options)
    with relay_thread(relay) as t:
        wait_until(lambda: relay.stats.retries >= 2, 10, "the relay retrying")
        own_redis.start()
        wait_until(lambda: uncovered(conn, "relay") == 0, 10, "the events relayed")
    assert not t.is_alive()
    assert relay.stats.relayed == 3
    assert relay.stats.connects == 1
    assert relay.stats.dead_lettered == 0
    assert [int(f["id"]) for f in entries(own_redis.url, "back")] == ids


def _wrongtype_errors(url: str) -> int:
    """How many commands this Redis answered WRONGTYPE (since it started)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("errorstats")
    finally:
        client.close()
    return int(stats.get("errorstat_WRONGTYPE", {}).get("count", 0))


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-a-read-with-others"])
def test_an_event_redis_refuses_is_tried_max_attempts_times_then_dead_lettered(
    installed: str, conn: psycopg.Connection, own_redis: OwnRedis, alone: bool
) -> None:
    client = redis.Redis.from_url(own_redis.url)
    try:
        client.set("r:refunds", "not a stream")  # WRONGTYPE: Redis refuses every XADD to it
    finally:
        client.close()
    # In a read with others, the read's refusal is the first try (then one by one).
    with conn.transaction():
        before = [] if alone else [pgherald.publish(conn, "orders", {"n": 0}, key="k")]
        event = pgherald.publish(conn, "refunds", {"n": 1}, key="k")
        after = [] if alone else [pgherald.publish(conn, "orders", {"n": 2}, key="k")]
    relay = pgherald.Relay(
        installed,
        to=own_redis.url,
        channels=["orders", "refunds"],
        stream="r:{channel}",
        max_attempts=3,
        retry_delay=0.01,
        retry_max_delay=0.05,
    )
    with relay_thread(relay) as t:
        wait_until(lambda: uncovered(conn, "relay") == 0, 10, "every event settled")
    assert not t.is_alive()
    assert _wrongtype_errors(own_redis.url) == 3  # tried 3 times, no more
    (dead,) = pgherald.dead_letters(conn, "relay")
    assert dead.event_id == event
    assert "Redis refused it (3 attempts): WRONGTYPE" in dead.error
    assert relay.stats.dead_lettered == 1
    # Alone: a backoff before each try again; else the first one by one goes at once.
    assert relay.stats.retries == (2 if alone else 1)
    assert [int(f["id"]) for f in entries(own_redis.url, "r:orders")] == before + after


def test_stop_is_prompt_while_redis_is_frozen(
    installed: str, conn: psycopg.Connection, own_redis: OwnRedis
) -> None:
    """relay.md's fault table: Redis stopped (SIGSTOP) with a read in hand: stop() returns within
    a second, not after the relay's `timeout` (10 s); what was not acknowledged comes again."""
    relay = pgherald.Relay(installed, to=own_redis.url, channels=["orders"], stream="frozen")
    consumer_stats = relay._relay._consumer.stats
    took = stop_while_frozen(conn, own_redis, relay, lambda: consumer_stats.received >= 100)
    assert took < 1.0, f"stop took {took:.2f}s"
    assert relay.stats.dead_lettered == 0
    assert relay.stats.relayed == 1
    assert uncovered(conn, "relay") == 99  # not acknowledged: they come again
