"""
Promises of docs/relay.md and docs/cdc.md that no other test checked, against real PostgreSQL,
NATS and Redis (no mocks).

- relay.md "Run N relays": relays of *different* groups each relay every event; into one
  Redis stream both copies are appended (each group keeps its own positions), into one
  JetStream stream the second copy is dropped by ``Nats-Msg-Id``.
- relay.md "Redis Streams": a stream name without ``{channel}`` puts every channel in one
  stream, and only ``{channel}`` is replaced (a Redis Cluster hash tag such as ``{events}``
  stays, on the stream and on its positions hash).
- relay.md "Run a relay": a new group starts where ``start`` says; an existing group continues
  where it stopped (what was published while the relay was down is not skipped).
- relay.md "Webhooks": a batch is a JSON array of whole events whose ids
  ``Pgherald-Event-Ids`` lists; requests go one at a time, in log order (asyncio and trio).
- cdc.md "Guarantees": an idle stream acknowledges the server's keepalive positions, so a slot
  whose tables are quiet does not hold back the WAL that other tables write.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_brokers import publish_paced, relay_thread
from tests.fix_durable import uncovered
from tests.fix_faults import await_until, wait_until
from tests.integration.test_cdc import confirmed, current_lsn, slot_ready, sql

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")
nats = pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")

from tests.integration.test_relay_nats import delete_stream, messages  # noqa: E402
from tests.integration.test_relay_redis import delete, entries  # noqa: E402


def check_each_key_in_order(events: list[tuple[str, int]]) -> None:
    """(key, event id) pairs in arrival order: each key's ids ascend."""
    last: dict[str, int] = {}
    for key, event_id in events:
        assert last.get(key, 0) < event_id, f"key {key}: {event_id} after {last[key]}"
        last[key] = event_id


# -- relay.md: groups, one stream for every channel, hash tags --


def test_two_groups_into_one_redis_stream_for_two_channels_append_every_event_once_each(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """relay.md:102 "a name without {channel} puts every channel in one stream", :125 (only
    {channel} is replaced: a hash tag stays), :176 "into Redis: each group keeps its own
    positions, so both are appended"."""
    stream = f"{{{unique}}}:all"  # a Redis Cluster hash tag, and no {channel}
    # Both channels interleaved in each transaction, keys shared across them: one partition
    # holds both channels' events, which must not shadow each other in the positions.
    ids: list[int] = []
    with psycopg.connect(installed, autocommit=True) as c:
        for start in range(0, 300, 50):
            with c.transaction():
                for i in range(start, start + 50):
                    ch = "orders" if i % 3 else "refunds"
                    ids.append(pgherald.publish(c, ch, {"i": i}, key=f"k{i % 7}"))
    relays = [
        pgherald.Relay(
            installed, to=redis_url, channels=["orders", "refunds"], stream=stream, group=group
        )
        for group in ("relay_a", "relay_b")
    ]
    try:
        with relay_thread(relays[0]), relay_thread(relays[1]):
            wait_until(
                lambda: uncovered(conn, "relay_a") == 0 and uncovered(conn, "relay_b") == 0,
                20,
                "both groups to relay every event",
            )
        got = entries(redis_url, stream)
        assert sorted(int(f["id"]) for f in got) == sorted(ids + ids)  # each event twice
        assert {f["channel"] for f in got} == {"orders", "refunds"}
        # Each group's copies: every event once, each key in log order.
        assert [r.stats.duplicates for r in relays] == [0, 0]
        assert [r.stats.relayed for r in relays] == [300, 300]
        for copy in (0, 1):
            seen: dict[int, int] = {}
            mine: list[tuple[str, int]] = []
            for f in got:
                n = seen[int(f["id"])] = seen.get(int(f["id"]), -1) + 1
                if n == copy:
                    mine.append((f["key"], int(f["id"])))
            # The n-th copies of two events of a key come in the key's order whichever group
            # sent each (each group sends a key's events in order).
            assert sorted(i for _, i in mine) == sorted(ids)
            check_each_key_in_order(mine)
        # Hash tag kept on the positions hash: one field per group, channel and partition.
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            fields = client.hkeys(f"{stream}:pgherald-positions")
        finally:
            client.close()
        assert {f.split("\0")[0] for f in fields} == {"relay_a", "relay_b"}
        assert {f.split("\0")[1] for f in fields} == {"orders", "refunds"}
        # A read sent again (the group reset) is still skipped, per group.
        pgherald.reset_group(conn, "relay_b", to="beginning")
        again = pgherald.Relay(
            installed,
            to=redis_url,
            channels=["orders", "refunds"],
            stream=stream,
            group="relay_b",
        )
        with relay_thread(again):
            wait_until(lambda: again.stats.relayed >= 300, 20, "the log relayed again")
        assert again.stats.duplicates == 300
        assert len(entries(redis_url, stream)) == 600
    finally:
        delete(redis_url, stream, f"{stream}:pgherald-positions")


def test_two_groups_into_one_jetstream_stream_store_each_event_once(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    """relay.md:175 "two groups into one JetStream stream: the second copy is dropped as a
    duplicate if it comes within the duplicate window"."""
    stream = unique.upper()
    ids = publish_paced(installed, "orders", 200, 50, 0, keys=9)
    options: dict[str, Any] = {
        "to": nats_url,
        "channels": ["orders"],
        "stream": stream,
        "subject": f"{unique}.{{channel}}",
    }
    first = pgherald.Relay(installed, group="relay_a", **options)
    second = pgherald.Relay(installed, group="relay_b", **options)
    try:
        with relay_thread(first):
            wait_until(lambda: uncovered(conn, "relay_a") == 0, 15, "group a to relay all")
        with relay_thread(second):
            wait_until(lambda: uncovered(conn, "relay_b") == 0, 15, "group b to relay all")
        assert first.stats.relayed == second.stats.relayed == 200
        assert second.stats.duplicates == 200  # every copy of group b dropped by JetStream
        msgs = messages(nats_url, stream)
        seen = [int(m.headers["Pgherald-Event-Id"]) for m in msgs]
        assert seen == ids  # once each, in log order (one key per event, ids ascend)
    finally:
        delete_stream(nats_url, stream)


# -- relay.md: where a group starts, and that it continues where it stopped --


def group_exists(conn: psycopg.Connection, name: str) -> bool:
    return any(g.name == name for g in pgherald.list_groups(conn))


def test_a_new_group_from_now_skips_the_backlog_and_continues_where_it_stopped(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """relay.md:51 "A new group starts at the beginning of the log (--from now|ID|TIMESTAMP to
    start elsewhere). An existing group continues where it stopped": a relay restarted with the
    same ``start="now"`` relays what was published while it was down (AsyncRelay the second
    time: the twin takes ``start`` too)."""
    backlog = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(30)], key="k")
    relay = pgherald.Relay(
        installed, to=redis_url, channels=["orders"], stream=unique, group="fresh", start="now"
    )
    try:
        with relay_thread(relay):
            # The group (and its start) exists once the relay has connected: from here on,
            # events are after "now".
            wait_until(lambda: group_exists(conn, "fresh"), 15, "the group created")
            live = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(30, 40)], key="k")
            wait_until(lambda: relay.stats.relayed >= 10, 15, "the live events relayed")
        assert [int(f["id"]) for f in entries(redis_url, unique)] == live  # backlog skipped
        assert not set(backlog) & {int(f["id"]) for f in entries(redis_url, unique)}

        down = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(40, 60)], key="k")

        async def again() -> int:
            relay = pgherald.AsyncRelay(
                installed,
                to=redis_url,
                channels=["orders"],
                stream=unique,
                group="fresh",
                start="now",
            )
            task = asyncio.create_task(relay.run())
            try:
                await await_until(lambda: uncovered(conn, "fresh") == 0, 15, "caught up")
            finally:
                relay.stop()
                await asyncio.wait_for(task, 10)
            return relay.stats.relayed

        assert asyncio.run(again()) == 20  # what was published while it was down, no more
        assert [int(f["id"]) for f in entries(redis_url, unique)] == live + down
    finally:
        delete(redis_url, unique, f"{unique}:pgherald-positions")


# -- relay.md: webhooks --


class RecordingReceiver:
    """An HTTP endpoint that answers 200, records each request's headers and body, and how
    many requests it had at once (the handler holds each request until *gate* opens only for
    the first few: time for a second request to overlap, if the relay sent one)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver.lock:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                    first = not receiver.requests
                # The first request waits for the test: a relay sending in parallel would
                # have its second request in meanwhile (the test looks for that).
                if first:
                    receiver.gate.wait(10)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.requests.append((dict(self.headers.items()), body))
                    receiver.in_flight -= 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.server.server_address[1]}/hook"  # loopback by name
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recording_receiver() -> Iterator[RecordingReceiver]:
    receiver = RecordingReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.mark.anyio
async def test_webhook_batches_carry_whole_events_their_ids_and_go_one_at_a_time(
    installed: str, anyio_backend: str, recording_receiver: RecordingReceiver
) -> None:
    """relay.md:138 "With --webhook-batch N (N > 1), up to N events per POST, as a JSON array",
    :141 "Pgherald-Event-Id (the first event's, for a batch; Pgherald-Event-Ids lists them
    all)", :161 http:// to localhost is allowed, :163 "Requests go one after another, in log
    order: an endpoint sees at most one request at a time per relay"."""
    receiver = recording_receiver
    with psycopg.connect(installed, autocommit=True) as c:
        ids = pgherald.publish_many(
            c,
            "orders",
            [{"n": n} for n in range(10)],
            key=[f"k{n % 2}" for n in range(10)],
            headers={"src": "test"},
        )
    relay = pgherald.AsyncRelay(
        installed, to=receiver.url, channels=["orders"], webhook_batch=4, batch_size=100
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        await await_until(
            lambda: receiver.in_flight == 1,
            10,
            "exactly one request in flight (more: the relay sends requests at once)",
        )
        receiver.gate.set()
        await await_until(lambda: relay.stats.relayed >= 10, 10, "every event delivered")
        relay.stop()
    assert receiver.most_in_flight == 1  # one request at a time
    bodies = [body for _, body in receiver.requests]
    assert all(isinstance(b, list) for b in bodies)
    assert [len(b) for b in bodies] == [4, 4, 2]  # up to 4 per POST, in one read of 10
    delivered = [e for b in bodies for e in b]
    assert [e["id"] for e in delivered] == ids  # in log order, once each
    for headers, body in receiver.requests:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["pgherald-event-id"] == str(body[0]["id"])
        assert lowered["pgherald-event-ids"] == ",".join(str(e["id"]) for e in body)
        assert lowered["pgherald-channel"] == "orders"
        assert "pgherald-signature" not in lowered  # no secret: not signed
    assert delivered[3] == {
        "id": ids[3],
        "channel": "orders",
        "key": "k1",
        "payload": {"n": 3},
        "headers": {"src": "test"},
        "created_at": delivered[3]["created_at"],
    }
    assert delivered[3]["created_at"].startswith("20")


# -- cdc.md: an idle stream acknowledges keepalives --


FAST_HEALTH: dict[str, Any] = {"health_check_interval": 0.3, "status_interval": 0.2}
"""Keepalives asked for every 0.3 s (15 s by default): the server's answer carries its
position, which an idle stream acknowledges."""


def wal_written_elsewhere(dsn: str) -> int:
    """Write to a table the slot does not capture; the WAL position after it."""
    sql(dsn, "INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")
    return current_lsn(dsn)


def test_an_idle_stream_acknowledges_keepalives_so_a_quiet_slot_holds_no_wal(
    cdc_dsn: str,
) -> None:
    """cdc.md:226 "When the stream is idle, the positions of the server's keepalives are
    acknowledged as well, so a slot whose tables are quiet does not hold WAL back"."""
    sql(cdc_dsn, "CREATE TABLE quiet (id int PRIMARY KEY)", "CREATE TABLE other (id int, t text)")
    stream = pgherald.ChangeStream(cdc_dsn, slot="s_quiet", tables=["quiet"], **FAST_HEALTH)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            stream.run(lambda e: None)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_until(lambda: slot_ready(cdc_dsn, "s_quiet"), 10, "the stream to start")
        end = wal_written_elsewhere(cdc_dsn)
        # No change of "quiet" at all: only keepalives can move the slot past the writes.
        wait_until(lambda: confirmed(cdc_dsn, "s_quiet") >= end, 10, "the slot to move on")
        assert stream.changes == 0
    finally:
        stream.stop()
        t.join(5)
    assert not errors, errors


@pytest.mark.anyio
async def test_an_idle_async_stream_acknowledges_keepalives_so_a_quiet_slot_holds_no_wal(
    cdc_dsn: str, anyio_backend: str
) -> None:
    """The same promise of `AsyncChangeStream` (asyncio and trio)."""
    sql(cdc_dsn, "CREATE TABLE quiet (id int PRIMARY KEY)", "CREATE TABLE other (id int, t text)")
    stream = pgherald.AsyncChangeStream(cdc_dsn, slot="s_aquiet", tables=["quiet"], **FAST_HEALTH)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run, lambda e: None)
            await await_until(lambda: slot_ready(cdc_dsn, "s_aquiet"), 10, "the stream to start")
            end = await anyio.to_thread.run_sync(wal_written_elsewhere, cdc_dsn)
            await await_until(
                lambda: confirmed(cdc_dsn, "s_aquiet") >= end, 10, "the slot to move on"
            )
            assert stream.changes == 0
            stream.stop()
