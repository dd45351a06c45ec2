"""`pgherald relay` / `Relay` into NATS JetStream, against real servers (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import (
    OwnNats,
    RelayProcess,
    dead_again,
    publish_paced,
    relay_thread,
    stop_while_frozen,
)
from tests.fix_durable import uncovered
from tests.fix_faults import await_until, wait_until

nats = pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")


async def _messages(url: str, stream: str) -> list[Any]:
    """Every message of *stream*, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        from nats.js.api import AckPolicy, ConsumerConfig

        # No acknowledgements: the default (explicit) stops at 1,000 pending.
        config = ConsumerConfig(ack_policy=AckPolicy.NONE)
        sub = await js.pull_subscribe("", stream=stream, config=config)
        out: list[Any] = []
        while len(out) < total:
            out += await sub.fetch(min(5000, total - len(out)), timeout=5)
        return out
    finally:
        await nc.close()


def messages(url: str, stream: str) -> list[Any]:
    return asyncio.run(_messages(url, stream))


def stream_count(url: str, stream: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        finally:
            await nc.close()

    try:
        return asyncio.run(count())
    except Exception:  # down (restarting) or the stream not there yet
        return -1


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


def delete_stream(url: str, stream: str) -> None:
    asyncio.run(_delete_stream(url, stream))


def check_exactly_once_in_key_order(msgs: list[Any], ids: list[int]) -> None:
    seen = [int(m.headers["Pgherald-Event-Id"]) for m in msgs]
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} events twice"
    assert sorted(seen) == sorted(ids), "events lost or foreign"
    last: dict[str, int] = {}
    for m, event_id in zip(msgs, seen, strict=True):
        key = m.headers["Pgherald-Key"]
        assert last.get(key, 0) < event_id, f"key {key}: {event_id} after {last[key]}"
        last[key] = event_id


@pytest.mark.slow
def test_twenty_thousand_events_through_two_relay_kills_and_a_nats_restart(
    installed: str, conn: psycopg.Connection, own_nats: OwnNats
) -> None:
    total = 20_000
    stream = "FAULTS"
    relay = RelayProcess(
        installed, "--to", own_nats.url, "--stream", stream, "--subject", "ev.{channel}", "orders"
    ).start()
    ids: list[int] = []
    publisher = threading.Thread(
        target=lambda: ids.extend(publish_paced(installed, "orders", total, 500, 0.05))
    )
    publisher.start()
    try:
        wait_until(lambda: stream_count(own_nats.url, stream) >= 3000, 20, "3,000 relayed")
        relay.kill()  # SIGKILL, mid-stream
        relay.start()
        wait_until(lambda: stream_count(own_nats.url, stream) >= 8000, 20, "8,000 relayed")
        own_nats.restart()  # the relay loses its connection and reconnects
        wait_until(lambda: stream_count(own_nats.url, stream) >= 12000, 20, "12,000 relayed")
        relay.kill()
        relay.start()
        publisher.join(60)
        assert len(ids) == total
        wait_until(lambda: uncovered(conn, "relay") == 0, 20, "the relay to catch up")
        assert relay.stop() == 0, relay.output()
    finally:
        relay.kill()
        publisher.join(60)
    msgs = messages(own_nats.url, stream)
    check_exactly_once_in_key_order(msgs, ids)
    # Three relay processes, and one connected again after the restart.
    assert relay.output().count("connected to JetStream") >= 4, relay.output()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_headers_subjects_and_a_stream_created_with_overrides(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    stream = unique.upper()
    first = pgherald.publish(conn, "orders", {"id": 1}, key="customer-7", headers={"h": 1})
    second = pgherald.publish(conn, "refunds", [1, "two"])
    # Not ASCII: the relay writes the log's JSON text as it is, the lengths are of its bytes.
    wide = {"name": 'Zoë ✓ "q"\n', "nested": {"a": [1, 2.5, None]}}
    third = pgherald.publish(conn, "orders", wide, key="clé-✓", headers={"h": "ü"})
    relay = pgherald.AsyncRelay(
        installed,
        to=nats_url,
        channels=["orders", "refunds"],
        stream=stream,
        subject=f"{unique}.{{channel}}",
        stream_config={"max_msgs": 1000, "duplicate_window": 60},
    )
    task = asyncio.create_task(relay.run())
    try:
        for _ in range(500):
            if relay.stats.relayed >= 3:
                break
            await asyncio.sleep(0.01)
        assert relay.stats.relayed == 3
    finally:
        relay.stop()
        await asyncio.wait_for(task, 10)
    try:
        msgs = await _messages(nats_url, stream)
        nc = await nats.connect(nats_url)
        info = await nc.jetstream().stream_info(stream)
        await nc.close()
        assert info.config.max_msgs == 1000
        assert info.config.duplicate_window == 60
        assert sorted(info.config.subjects or []) == [f"{unique}.orders", f"{unique}.refunds"]
        by_id = {int(m.headers["Nats-Msg-Id"]): m for m in msgs}
        m = by_id[first]
        assert m.subject == f"{unique}.orders"
        assert m.data == b'{"id": 1}'  # the payload's JSON text as the log holds it
        assert m.headers["Pgherald-Channel"] == "orders"
        assert m.headers["Pgherald-Key"] == "customer-7"
        assert m.headers["Pgherald-Event-Id"] == str(first)
        row = conn.execute("SELECT tx::text FROM pgherald.events_v1 WHERE id = %s", (first,))
        assert m.headers["Pgherald-Tx"] == row.fetchone()[0]  # type: ignore[index]
        assert json.loads(m.headers["Pgherald-Headers"]) == {"h": 1}
        assert m.headers["Pgherald-Created-At"].startswith("20")
        assert json.loads(by_id[second].data) == [1, "two"]
        assert "Pgherald-Key" not in (by_id[second].headers or {})
        m = by_id[third]
        assert json.loads(m.data) == wide
        assert m.headers["Pgherald-Key"] == "clé-✓"
        assert json.loads(m.headers["Pgherald-Headers"]) == {"h": "ü"}
    finally:
        await _delete_stream(nats_url, stream)
    assert uncovered(conn, "relay") == 0


def test_two_relays_share_the_partitions_and_a_stopped_one_hands_over(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    stream = unique.upper()
    options: dict[str, Any] = {
        "to": nats_url,
        "channels": ["orders"],
        "stream": stream,
        "subject": f"{unique}.{{channel}}",
    }
    a = pgherald.Relay(installed, **options)
    b = pgherald.Relay(installed, **options)
    threads = [threading.Thread(target=r.run) for r in (a, b)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(a.partitions) + len(b.partitions) == 16, 10, "16 partitions held")
        wait_until(lambda: a.partitions and b.partitions, 10, "both relays to hold partitions")
        ids = publish_paced(installed, "orders", 2000, 500, 0)
        wait_until(lambda: uncovered(conn, "relay") == 0, 10, "both relays to catch up")
        assert a.stats.relayed > 0
        assert b.stats.relayed > 0
        a.stop()
        threads[0].join(10)
        assert not threads[0].is_alive()
        wait_until(lambda: len(b.partitions) == 16, 10, "b to take a's partitions")
        ids += publish_paced(installed, "orders", 1000, 500, 0)
        wait_until(lambda: uncovered(conn, "relay") == 0, 10, "b to relay the rest")
    finally:
        a.stop()
        b.stop()
        for t in threads:
            t.join(10)
    try:
        check_exactly_once_in_key_order(messages(nats_url, stream), ids)
    finally:
        delete_stream(nats_url, stream)


def test_stop_before_run_returns_at_once(installed: str, nats_url: str) -> None:
    relay = pgherald.Relay(installed, to=nats_url, channels=["orders"], stream="UNUSED")
    relay.stop()
    relay.run()  # returns: nothing relayed, no stream created
    assert relay.stats.relayed == 0


def test_an_unreachable_broker_is_retried_until_stop(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.publish(conn, "orders", {"id": 1})
    relay = pgherald.Relay(
        installed,
        to="nats://127.0.0.1:1",
        channels=["orders"],
        retry_delay=0.01,
        retry_max_delay=0.05,
    )
    with relay_thread(relay) as t:
        wait_until(lambda: relay.stats.retries >= 3, 10, "three retries")
    assert not t.is_alive()
    assert uncovered(conn, "relay") == 1  # not acknowledged: it comes again


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_async_relay_on_trio_says_asyncio_only(installed: str, nats_url: str) -> None:
    relay = pgherald.AsyncRelay(installed, to=nats_url, channels=["orders"])
    with pytest.raises(pgherald.UsageError, match="asyncio only"):
        await relay.run()


def test_bad_targets_and_subjects_are_usage_errors(installed: str) -> None:
    with pytest.raises(pgherald.UsageError, match="Kafka is not supported"):
        pgherald.Relay(installed, to="kafka://127.0.0.1:9092", channels=["orders"])
    with pytest.raises(pgherald.UsageError, match="not a valid NATS subject"):
        pgherald.Relay(installed, to="nats://x", channels=["orders"], subject="a b.{channel}")
    with pytest.raises(pgherald.UsageError, match="at least one channel"):
        pgherald.Relay(installed, to="nats://x", channels=[])


def test_relay_and_async_relay_are_twins() -> None:
    import inspect

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(pgherald.Relay) == public(pgherald.AsyncRelay)
    assert inspect.signature(pgherald.Relay.__init__) == inspect.signature(
        pgherald.AsyncRelay.__init__
    )
    assert inspect.iscoroutinefunction(pgherald.AsyncRelay.run)
    assert not inspect.iscoroutinefunction(pgherald.Relay.run)


def test_a_redelivered_read_is_dropped_by_jetstream(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    """The group reset to the beginning: every event is sent again, none is stored twice."""
    stream = unique.upper()
    ids = publish_paced(installed, "orders", 300, 100, 0)
    options: dict[str, Any] = {
        "to": nats_url,
        "channels": ["orders"],
        "stream": stream,
        "subject": f"{unique}.{{channel}}",
    }
    try:
        for _ in range(2):
            relay = pgherald.Relay(installed, **options)
            with relay_thread(relay):
                wait_until(lambda relay=relay: relay.stats.relayed >= 300, 10, "300 relayed")
            pgherald.reset_group(conn, "relay", to="beginning")
        assert relay.stats.duplicates == 300  # the second run: every one a duplicate
        check_exactly_once_in_key_order(messages(nats_url, stream), ids)
    finally:
        delete_stream(nats_url, stream)


@pytest.mark.parametrize("scheme", ["nats", "redis"])
def test_stop_while_connecting_to_a_broker_that_never_answers(
    installed: str, conn: psycopg.Connection, silent_server: Any, scheme: str
) -> None:
    pgherald.publish(conn, "orders", {"id": 1})
    relay = pgherald.Relay(
        installed, to=f"{scheme}://127.0.0.1:{silent_server.port}", channels=["orders"]
    )
    with relay_thread(relay, join=2) as t:  # well before the 5 s connect timeout
        wait_until(lambda: silent_server.accepted, 10, "the relay inside its connection attempt")
    assert not t.is_alive()
    assert uncovered(conn, "relay") == 1  # not acknowledged: it comes again


class NatsWithoutJetStreamAnswers:
    """A NATS server that completes the client's handshake (INFO, PONG) and then answers
    nothing: JetStream's API requests go unanswered (a JetStream that hangs)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self.requests: list[bytes] = []  # lines the client sent to JetStream's API
        self._done = threading.Event()
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                client = self._server.accept()[0]
            except OSError:
                continue
            self._clients.append(client)
            threading.Thread(target=self._talk, args=(client,), daemon=True).start()

    def _talk(self, client: socket.socket) -> None:
        info = {
            "server_id": "x",
            "version": "2.10.0",
            "proto": 1,
            "headers": True,
            "max_payload": 1048576,
            "jetstream": True,
        }
        with contextlib.suppress(OSError):
            client.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
            buffered = b""
            while not self._done.is_set():
                data = client.recv(65536)
                if not data:
                    return
                buffered += data
                *lines, buffered = buffered.split(b"\r\n")
                for line in lines:
                    if line == b"PING":
                        client.sendall(b"PONG\r\n")
                    elif b"$JS.API" in line:
                        self.requests.append(line)

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        for c in self._clients:
            c.close()
        self._server.close()


def test_stop_while_jetstream_does_not_answer_the_stream_lookup(
    installed: str, conn: psycopg.Connection
) -> None:
    # The relay's start asks JetStream for its stream (waiting up to `timeout`): stop() ends
    # that wait at once.
    pgherald.publish(conn, "orders", {"id": 1})
    server = NatsWithoutJetStreamAnswers()
    try:
        relay = pgherald.Relay(
            installed, to=f"nats://127.0.0.1:{server.port}", channels=["orders"], timeout=30
        )
        with relay_thread(relay, join=2) as t:  # well before the 30 s timeout
            wait_until(lambda: server.requests, 10, "the relay asking JetStream for its stream")
        assert not t.is_alive()
    finally:
        server.close()
    assert uncovered(conn, "relay") == 1  # not acknowledged: it comes again


async def _edit_stream(url: str, name: str, **config: Any) -> None:
    """Create stream *name* with *config*, or update it to *config*."""
    from nats.js.api import StreamConfig
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=name, **config))
        else:
            await js.update_stream(StreamConfig(name=name, **config))
    finally:
        await nc.close()


def edit_stream(url: str, name: str, **config: Any) -> None:
    asyncio.run(_edit_stream(url, name, **config))


def test_a_redelivered_dead_letter_reaches_the_stream_late_and_once(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    """Refused (too large for the stream), dead-lettered, redelivered once the stream takes it:
    stored after the later event; the same redelivery sent again is dropped (Nats-Msg-Id)."""
    stream = unique.upper()
    subject = f"{unique}.orders"
    edit_stream(nats_url, stream, subjects=[subject], max_msg_size=256)
    relay = pgherald.Relay(
        installed,
        to=nats_url,
        channels=["orders"],
        stream=stream,
        subject=f"{unique}.{{channel}}",
        max_attempts=1,
    )
    try:
        with relay_thread(relay) as t:
            first = pgherald.publish(conn, "orders", {"pad": "x" * 1000}, key="k")
            wait_until(lambda: relay.stats.dead_lettered == 1, 10, "the event dead-lettered")
            second = pgherald.publish(conn, "orders", {"n": 2}, key="k")
            wait_until(lambda: relay.stats.relayed == 1, 10, "the second event relayed")
            edit_stream(nats_url, stream, subjects=[subject], max_msg_size=-1)
            assert pgherald.redeliver(conn, "relay", [first]) == [first]
            wait_until(lambda: relay.stats.relayed == 2, 10, "the dead letter redelivered")
            wait_until(
                lambda: pgherald.dead_letters(conn, "relay") == [], 10, "the dead letter gone"
            )
            assert relay.stats.duplicates == 0
            dead_again(conn, first)  # as if the relay died before deleting the dead letter
            wait_until(lambda: relay.stats.relayed == 3, 10, "the redelivery sent again")
            assert relay.stats.duplicates == 1
        assert not t.is_alive()
        ids = [int(m.headers["Pgherald-Event-Id"]) for m in messages(nats_url, stream)]
        assert ids == [second, first]  # late, out of order, once
        assert pgherald.dead_letters(conn, "relay") == []
    finally:
        delete_stream(nats_url, stream)


def test_no_responders_is_retried_until_the_stream_takes_the_subject_or_is_back(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str, caplog: Any
) -> None:
    """No stream takes the subject (JetStream: "no responders"): not the event's fault, so
    retried for ever, saying what to fix, never dead-lettered; a stream deleted meanwhile is
    created again."""
    stream = unique.upper()
    edit_stream(nats_url, stream, subjects=[f"{unique}.other"])
    relay = pgherald.Relay(
        installed,
        to=nats_url,
        channels=["orders"],
        stream=stream,
        subject=f"{unique}.{{channel}}",
        max_attempts=1,
        retry_delay=0.01,
        retry_max_delay=0.05,
    )
    try:
        with caplog.at_level(logging.INFO, "pgherald.relay"), relay_thread(relay) as t:
            first = pgherald.publish(conn, "orders", {"n": 1}, key="k")
            wait_until(lambda: relay.stats.retries >= 5, 10, "five retries")
            assert relay.stats.dead_lettered == 0
            assert f"stream {stream} takes {unique}.other; add {unique}.orders" in caplog.text
            edit_stream(nats_url, stream, subjects=[f"{unique}.other", f"{unique}.orders"])
            wait_until(lambda: relay.stats.relayed == 1, 10, "the event relayed")
            delete_stream(nats_url, stream)  # deleted mid-run
            second = pgherald.publish(conn, "orders", {"n": 2}, key="k")
            wait_until(lambda: relay.stats.relayed == 2, 10, "the stream created again")
        assert not t.is_alive()
        assert relay.stats.dead_lettered == 0
        assert uncovered(conn, "relay") == 0
        assert [int(m.headers["Pgherald-Event-Id"]) for m in messages(nats_url, stream)] == [second]
        assert first < second
    finally:
        delete_stream(nats_url, stream)


def test_events_stored_in_another_stream_stop_the_relay(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    """The relay's stream does not take the subject, another one does: JetStream stores the
    events there (and de-duplicates them there). The relay stops with a UsageError naming it,
    and the group does not move."""
    mine, other = f"{unique.upper()}_MINE", f"{unique.upper()}_OTHER"
    edit_stream(nats_url, mine, subjects=[f"{unique}.mine"])
    edit_stream(nats_url, other, subjects=[f"{unique}.orders"])
    pgherald.publish(conn, "orders", {"n": 1})
    relay = pgherald.Relay(
        installed, to=nats_url, channels=["orders"], stream=mine, subject=f"{unique}.{{channel}}"
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:  # kept for the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        t.join(10)
        assert not t.is_alive()
        [error] = errors
        assert isinstance(error, pgherald.UsageError)
        assert f"stored events in stream '{other}', not in '{mine}'" in str(error)
        assert relay.stats.dead_lettered == 0
        assert uncovered(conn, "relay") == 1  # not acknowledged: it comes again, once fixed
    finally:
        relay.stop()
        t.join(10)
        delete_stream(nats_url, mine)
        delete_stream(nats_url, other)


def test_a_stream_named_in_non_ascii_is_the_relays_own(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    """nats-server writes the stream's name in its acknowledgements as UTF-8, unescaped: the
    relay knows its own stream (it took it for another one, and stopped)."""
    stream = f"ÉVÉNEMENTS_{unique.upper()}"
    ids = [pgherald.publish(conn, "orders", {"n": n}) for n in range(3)]
    relay = pgherald.Relay(
        installed, to=nats_url, channels=["orders"], stream=stream, subject=f"{unique}.{{channel}}"
    )
    try:
        with relay_thread(relay):
            wait_until(lambda: relay.stats.relayed == 3, 10, "the events relayed")
        got = [int(m.headers["Pgherald-Event-Id"]) for m in messages(nats_url, stream)]
        assert got == ids
    finally:
        delete_stream(nats_url, stream)


def test_stop_is_prompt_while_jetstream_is_frozen(
    installed: str, conn: psycopg.Connection, own_nats: OwnNats
) -> None:
    """nats-server stopped (SIGSTOP) with a read in hand: stop() returns within a second, not
    after the flush's timeout."""
    relay = pgherald.Relay(installed, to=own_nats.url, channels=["orders"])
    sink: Any = relay._relay._sink
    # Past the first event's one message: the relay publishes the read to the frozen server.
    took = stop_while_frozen(conn, own_nats, relay, lambda: sink._seq > 1)
    assert took < 1.0, f"stop took {took:.2f}s"
    assert relay.stats.dead_lettered == 0


class _Watched:
    """A relay of channel ``orders`` into a stream of the test's own, and what a plain
    subscriber of its subject saw: the id of every event the relay published, whether
    JetStream refused it or not."""

    def __init__(self, relay: pgherald.AsyncRelay) -> None:
        self.relay = relay
        self.tries: list[int] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.relay.run())


@contextlib.asynccontextmanager
async def _watched_relay(
    installed: str, nats_url: str, unique: str, timeout: float = 10.0, **stream_config: Any
) -> AsyncIterator[_Watched]:
    """A `_Watched` relay (started by its `start`: publish first); stopped, and its stream
    deleted, on the way out."""
    stream = unique.upper()
    subject = f"{unique}.orders"
    await _edit_stream(nats_url, stream, subjects=[subject], **stream_config)
    relay = pgherald.AsyncRelay(
        installed,
        to=nats_url,
        channels=["orders"],
        stream=stream,
        subject=f"{unique}.{{channel}}",
        max_attempts=3,
        retry_delay=0.01,
        retry_max_delay=0.05,
        timeout=timeout,
    )
    watched = _Watched(relay)
    nc = await nats.connect(nats_url)

    async def seen(msg: Any) -> None:
        watched.tries.append(int(msg.headers["Pgherald-Event-Id"]))

    try:
        await nc.subscribe(subject, cb=seen)
        await nc.flush()
        yield watched
        # Each publish reached the subscriber before JetStream's answer reached the relay:
        # after a round trip every one of them is in.
        await nc.flush()
    finally:
        relay.stop()
        if watched.task is not None:
            await asyncio.wait_for(watched.task, 10)
        await nc.close()
        await _delete_stream(nats_url, stream)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_event_jetstream_refuses_is_tried_max_attempts_times_then_dead_lettered(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    async with _watched_relay(installed, nats_url, unique, max_msg_size=256) as watched:
        event = pgherald.publish(conn, "orders", {"pad": "x" * 1000})
        watched.start()
        relay = watched.relay
        await await_until(lambda: relay.stats.dead_lettered == 1, 10, "the event dead-lettered")
    assert watched.tries == [event] * 3
    assert relay.stats.retries == 2
    (dead,) = pgherald.dead_letters(conn, "relay")
    assert dead.event_id == event
    assert "JetStream refused it (3 attempts): message size exceeds maximum allowed" in dead.error
    assert relay.stats.relayed == 0
    assert uncovered(conn, "relay") == 0  # the group moved past it


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_event_over_max_payload_is_dead_lettered_at_once_and_the_rest_relayed(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    async with _watched_relay(installed, nats_url, unique, timeout=60.0) as watched:
        relay = watched.relay
        nc = await nats.connect(nats_url)
        max_payload = nc.max_payload
        await nc.close()
        sent: list[int] = []
        large: list[int] = []
        watched.start()
        # Rounds: whether JetStream's answers to the events before the large one come before
        # the relay starts to wait for them or after (when a wait for the unsent one would last
        # the whole `timeout`) is up to the server; each round is a chance of the latter.
        for _ in range(6):
            with conn.transaction():
                sent += pgherald.publish_many(conn, "orders", [{"n": n} for n in range(500)])
                large.append(pgherald.publish(conn, "orders", {"pad": "x" * max_payload}))
            # Well within the relay's `timeout`: the answers of those sent end the wait.
            await await_until(lambda: relay.stats.dead_lettered == len(large), 8, "at once")
        sent.append(pgherald.publish(conn, "orders", {"n": "after"}))
        await await_until(lambda: relay.stats.relayed == len(sent), 5, "the others relayed")
        stored = [m.headers["Pgherald-Event-Id"] for m in await _messages(nats_url, unique.upper())]
    assert watched.tries == sent  # the large ones were never sent
    assert stored == [str(i) for i in sent]
    assert relay.stats.retries == 0  # at once: no server takes it on another try
    dead = pgherald.dead_letters(conn, "relay")
    assert [d.event_id for d in dead] == large
    assert f"larger than the NATS server's max_payload ({max_payload} bytes)" in dead[0].error
    assert uncovered(conn, "relay") == 0


@pytest.mark.parametrize("to", ["nats://127.0.0.1:1", "redis://127.0.0.1:1"])
def test_a_broker_down_is_said_when_the_relay_starts_on_an_idle_log(
    installed: str, to: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One try when the relay starts, whether or not there is an event to relay: a broker down
    is in the log at once (not at the first event), and the relay goes on waiting for events."""
    caplog.set_level(logging.WARNING, logger="pgherald")
    relay = pgherald.Relay(installed, to=to, channels=["orders"], retry_delay=0.01)
    with relay_thread(relay) as t:
        wait_until(
            lambda: any(
                "trying again when there are events" in r.getMessage() for r in caplog.records
            ),
            10,
            "the warning",
        )
        assert t.is_alive()
    [said] = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert said.startswith(f"cannot reach {'JetStream' if to.startswith('nats') else 'Redis'} at")
    assert relay.stats.retries == 0  # one try, no backoff: nothing to send yet
    assert relay.stats.connects == 0
