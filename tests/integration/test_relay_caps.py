"""
The relay's bounded structures, against the machine's PostgreSQL, Redis and NATS (no mocks).

- relay.md, *Redis Streams*: redelivered dead letters are noted in
  ``<stream>:pgherald-redelivered``, a sorted set of which "the latest 100,000 are kept". The
  set is filled in Redis directly with 100,000 older redeliveries (what a long-lived stream
  holds), then real dead letters are redelivered through a running relay: the set stays at
  100,000, the oldest go, the new ones are kept (and still skip a redelivery sent again).
- The sinks' in-process caches of encoded keys (Redis: the RESP argument, NATS: the header
  line) are "a cache of the keys seen, not a leak": past 100,000 keys they start again. The
  caches are filled with 100,001 entries of the form the sink itself writes (relaying 100,001
  events of distinct keys would take the suite's time for nothing), then events with new keys
  are relayed: the old entries are gone, the cache holds what the new read needed, and the
  events reach the broker with their keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pgherald
from pgherald._relay_nats import NatsSink, _header_value
from pgherald._relay_redis import RedisSink, _bulk
from tests.fix_brokers import dead_again, relay_thread
from tests.fix_faults import wait_until
from tests.integration.test_relay_nats import delete_stream

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")

CAP = 100_000
"""relay.md: the latest 100,000 redelivered ids are kept; the key caches start again past it."""


def _members(client: Any, key: str, *members: str) -> list[bool]:
    """Whether each of *members* is in sorted set *key*."""
    pipe = client.pipeline(transaction=False)
    for m in members:
        pipe.zscore(key, m)
    return [score is not None for score in pipe.execute()]


def _entries(client: Any, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in client.xrange(stream)]


def test_the_redelivered_set_keeps_the_latest_100000(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    key = f"{unique}:pgherald-redelivered"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # 100,000 redeliveries noted before (a day ago and older, one second apart): as the
    # script writes them, "<group> NUL <event id>" scored by the time of the redelivery.
    old = [f"relay\0{10**9 + i}" for i in range(CAP)]
    since = time.time() - 86_400 - CAP
    try:
        pipe = client.pipeline(transaction=False)
        for start in range(0, CAP, 10_000):
            pipe.zadd(
                key, {m: since + start + i for i, m in enumerate(old[start : start + 10_000])}
            )
        pipe.execute()
        assert client.zcard(key) == CAP
        ids = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(3)], key="k")
        relay = pgherald.Relay(installed, to=redis_url, channels=["orders"], stream=unique)
        with relay_thread(relay) as t:
            wait_until(lambda: relay.stats.relayed == 3, 10, "the events relayed")
            assert client.zcard(key) == CAP  # a read of the log notes nothing there

            dead_again(conn, ids[0])  # the log asks for its redelivery
            wait_until(lambda: relay.stats.relayed == 4, 10, "the first redelivery")
            assert client.zcard(key) == CAP
            new = [f"relay\0{i}" for i in ids]
            assert _members(client, key, new[0], old[0], old[1]) == [True, False, True]

            for event_id in ids[1:]:
                dead_again(conn, event_id)
            wait_until(lambda: relay.stats.relayed == 6, 10, "two more redeliveries")
            assert client.zcard(key) == CAP
            # The latest kept: the three new ones and every old one but the three oldest.
            assert _members(client, key, *new) == [True, True, True]
            assert _members(client, key, *old[:3]) == [False, False, False]
            assert client.zrange(key, 0, 0) == [old[3]]
            assert client.zrange(key, -3, -1) == new

            # A kept redelivery still skips the same redelivery sent again.
            wait_until(
                lambda: pgherald.dead_letters(conn, "relay") == [], 10, "the dead letters gone"
            )
            dead_again(conn, ids[1])
            wait_until(lambda: relay.stats.relayed == 7, 10, "the redelivery sent again")
            assert relay.stats.duplicates == 1
            assert client.zcard(key) == CAP
        assert not t.is_alive()
        got = [int(f["id"]) for f in _entries(client, unique)]
        # Each event, then each redelivery, once (the last two may come in one read).
        assert got[:4] == [*ids, ids[0]]
        assert sorted(got[4:]) == ids[1:]
    finally:
        client.delete(unique, f"{unique}:pgherald-positions", key)
        client.close()


def test_the_redis_key_cache_starts_again_past_100000_keys(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    relay = pgherald.Relay(installed, to=redis_url, channels=["orders"], stream=unique)
    sink = relay._relay._sink
    assert isinstance(sink, RedisSink)
    cache = sink._keys
    # What the sink would hold after relaying events of 100,001 distinct keys.
    cache.update({f"old-{i}": _bulk(b"=old-%d" % i) for i in range(CAP + 1)})
    keys = [f"new-{i}" for i in range(50)]
    ids = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(50)], key=keys)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with relay_thread(relay):
            wait_until(lambda: relay.stats.relayed == 50, 10, "the events relayed")
        assert set(cache) == set(keys)  # started again: only what the new read needed
        got = _entries(client, unique)
        assert sorted((int(f["id"]), f["key"]) for f in got) == list(zip(ids, keys, strict=True))
    finally:
        client.delete(unique, f"{unique}:pgherald-positions")
        client.close()


async def _stream_keys(url: str, stream: str) -> list[tuple[int, str]]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        config = ConsumerConfig(ack_policy=AckPolicy.NONE)
        sub = await js.pull_subscribe("", stream=stream, config=config)
        total = (await js.stream_info(stream)).state.messages
        out: list[Any] = []
        while len(out) < total:
            out += await sub.fetch(total - len(out), timeout=5)
        return [(int(m.headers["Pgherald-Event-Id"]), m.headers["Pgherald-Key"]) for m in out]
    finally:
        await nc.close()


def test_the_nats_key_cache_starts_again_past_100000_keys(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")
    stream = unique.upper()
    relay = pgherald.Relay(
        installed,
        to=nats_url,
        channels=["orders"],
        stream=stream,
        subject=f"{unique}.{{channel}}",
    )
    sink = relay._relay._sink
    assert isinstance(sink, NatsSink)
    cache = sink._key_lines
    # What the sink would hold after relaying events of 100,001 distinct keys.
    cache.update(
        {f"old-{i}": b"\r\nPgherald-Key: " + _header_value(f"old-{i}") for i in range(CAP + 1)}
    )
    keys = [f"new-{i}" for i in range(50)]
    ids = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(50)], key=keys)
    try:
        with relay_thread(relay):
            wait_until(lambda: relay.stats.relayed == 50, 10, "the events relayed")
        assert set(cache) == set(keys)  # started again: only what the new read needed
        got = asyncio.run(_stream_keys(nats_url, stream))
        assert sorted(got) == list(zip(ids, keys, strict=True))
    finally:
        delete_stream(nats_url, stream)
