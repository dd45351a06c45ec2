"""
``pgherald serve --source nats://``: the gateway takes durable channels' live events from the
JetStream stream that ``pgherald relay`` fills, against the machine's NATS and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Message
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_brokers import OwnNats, relay_thread
from tests.fix_faults import free_port, wait_until, watching
from tests.integration.test_gateway import SECRET, hub_of, serve, sse, token

nats = pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")


def _gateway_sessions(conn: psycopg.Connection, name: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s",
        (name,),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def _stream(url: str, stream: str, subject: str | None) -> None:
    """Create *stream* taking *subject*, or (None) delete it."""
    nc = await nats.connect(url)
    try:
        if subject is None:
            await nc.jetstream().delete_stream(stream)
        else:
            await nc.jetstream().add_stream(name=stream, subjects=[subject])
    finally:
        await nc.close()


@contextlib.contextmanager
def _relaying(installed: str, url: str, unique: str) -> Iterator[dict[str, str]]:
    """A relay of channel 'orders' into a stream of this test's own at *url*, in a thread."""
    options = {"stream": unique.upper(), "subject": f"{unique}.{{channel}}"}
    # Made here: the relay makes it when it first has events, the gateway needs it first.
    asyncio.run(_stream(url, options["stream"], f"{unique}.orders"))
    relay = pgherald.Relay(installed, to=url, channels=["orders"], **options)
    with relay_thread(relay) as t:
        yield options
    assert not t.is_alive(), "the relay did not stop"


@pytest.fixture
def relayed(installed: str, nats_url: str, unique: str) -> Iterator[dict[str, str]]:
    """A relay into the machine's nats-server; its stream deleted afterwards."""
    with _relaying(installed, nats_url, unique) as options:
        yield options
    asyncio.run(_stream(nats_url, options["stream"], None))


def _event(s: Any) -> tuple[int, Any]:
    frame = s.next()
    assert frame is not None, "the stream ended"
    assert frame["event"] == "orders"
    return int(frame["id"]), json.loads(frame["data"])


def _ws_event(ws: Any, within: float = 5.0) -> tuple[int, Any]:
    message = json.loads(ws.recv(within))
    assert message["type"] == "event", message
    assert message["channel"] == "orders"
    return int(message["id"]), message["payload"]


def test_sse_and_ws_stream_relayed_events_and_resume_from_the_log(
    installed: str,
    conn: psycopg.Connection,
    nats_url: str,
    relayed: dict[str, str],
) -> None:
    app = _gateway(installed, nats_url, relayed)
    tok = token(["orders"])
    with serve(app) as base:
        hub = hub_of(app)
        wait_until(lambda: hub.source_ok, 10, "the gateway's JetStream consumer")
        assert httpx.get(f"{base}/healthz").json() == {
            "database": True,
            "listener": True,
            "source": True,
        }
        with sse(base, "orders", tok=tok) as live:
            live.ready()
            ids = [pgherald.publish(conn, "orders", {"n": n}, key=f"k{n}") for n in range(3)]
            got = [_event(live) for _ in range(3)]
            assert got == [(ids[n], {"n": n}) for n in range(3)]
            # Resuming after the first: the next two from the log, then live ones, none twice.
            with sse(base, "orders", tok=tok, headers={"Last-Event-ID": str(ids[0])}) as again:
                again.ready()
                assert [_event(again) for _ in range(2)] == got[1:]
                ids.append(pgherald.publish(conn, "orders", {"n": 3}))
                assert _event(again) == (ids[3], {"n": 3})
                assert _event(live) == (ids[3], {"n": 3})
        # WebSocket: the same, resuming after the third.
        url = base.replace("http", "ws") + "/ws"
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {tok}"}) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": ids[2]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            assert _ws_event(ws) == (ids[3], {"n": 3})  # from the log
            ids.append(pgherald.publish(conn, "orders", {"n": 4}))
            assert _ws_event(ws) == (ids[4], {"n": 4})  # live, from NATS
            ids.append(pgherald.publish(conn, "orders", {"n": 5}))
            assert _ws_event(ws) == (ids[5], {"n": 5})  # nothing twice in between
        # The live events came from NATS: the gateway has no log tail session (which polls
        # the log and holds the wake-up lock that makes every publish send a wake-up).
        assert _gateway_sessions(conn, "pgherald-gateway-tail") == 0
        assert _gateway_sessions(conn, "pgherald-gateway") == 1  # LISTEN, for plain channels


def test_source_needs_a_nats_url(installed: str) -> None:
    with pytest.raises(pgherald.UsageError, match="nats://"):
        create_app(installed, durable_channels=["orders"], source="redis://127.0.0.1:6379")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--source", "redis://127.0.0.1:6379", "--durable-channel", "o"], "nats://HOST:PORT"),
        (["--source", "nats://127.0.0.1:4222"], "--durable-channel"),
    ],
)
def test_serve_source_refusals_are_usage_errors(args: list[str], says: str) -> None:
    from click.testing import CliRunner

    from pgherald.cli import _serve  # noqa: F401  (registers serve)
    from pgherald.cli._commands import cli

    result = CliRunner().invoke(cli, ["serve", "--allow-anonymous", "o", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output


# -- NATS going down while the gateway runs (and coming back) --


@pytest.fixture
def own_relayed(installed: str, own_nats: OwnNats, unique: str) -> Iterator[dict[str, str]]:
    """`relayed`, into a private nats-server (JetStream store on disk) the test may kill."""
    with _relaying(installed, own_nats.url, unique) as options:
        yield options


def _wait_stored(url: str, stream: str, count: int, within: float) -> None:
    """Wait until *stream* holds *count* messages (one connection, polled every 20 ms)."""

    async def wait() -> None:
        nc = await nats.connect(url)
        try:
            with anyio.fail_after(within):
                while True:
                    if (await nc.jetstream().stream_info(stream)).state.messages >= count:
                        return
                    await anyio.sleep(0.02)
        finally:
            await nc.close()

    asyncio.run(wait())


def _next_event(s: Any, within: float) -> tuple[int, Any]:
    """The next ``orders`` event of *s* within *within* s (heartbeats keep the read going)."""
    event = s.next(within)
    if event is None:
        raise AssertionError("the stream ended")
    assert event.get("event") == "orders", event
    return int(event["id"]), json.loads(event["data"])


def _gateway(installed: str, url: str, relayed: dict[str, str], **options: Any) -> Any:
    """A gateway taking channel 'orders' from the relay's stream at *url*."""
    return create_app(
        installed,
        jwt_secret=SECRET,
        durable_channels=["orders"],
        source=url,
        source_stream=relayed["stream"],
        source_subject=relayed["subject"],
        queue_check_interval=0,
        **options,
    )


@contextlib.contextmanager
def _no_errors_logged() -> Iterator[None]:
    """Fail if the gateway, uvicorn or asyncio log an error or a traceback meanwhile."""
    names = ["pgherald", "uvicorn.error", "asyncio", "nats"]
    with contextlib.ExitStack() as stack:
        watches = [stack.enter_context(watching(name)) for name in names]
        yield
    bad = [
        f"{r.name}: {r.getMessage()}"
        for w in watches
        for r in w.records
        if r.levelno >= logging.ERROR or r.exc_info
    ]
    assert bad == []


def _health(base: str) -> tuple[int, Any]:
    r = httpx.get(f"{base}/healthz", timeout=5)
    return r.status_code, r.json()


def test_nats_killed_and_restarted_under_streaming_clients_loses_and_repeats_nothing(
    installed: str,
    conn: psycopg.Connection,
    own_nats: OwnNats,
    own_relayed: dict[str, str],
) -> None:
    """
    NATS is SIGKILLed under a streaming SSE and WebSocket client and comes back (same port,
    same JetStream store): events published meanwhile wait in the log, then every client
    gets each of them once, in order; the gateway warns, says so on /healthz, and keeps
    running. (Events already in the stream before the gateway started are not sent again:
    nats-py's ordered consumer that delivered nothing yet starts again from the stream's
    first message.)
    """
    before = [pgherald.publish(conn, "orders", {"before": n}) for n in range(2)]
    _wait_stored(own_nats.url, own_relayed["stream"], 2, 20)
    # Pings keep the clients' reads going while NATS is down.
    app = _gateway(installed, own_nats.url, own_relayed, heartbeat=0.5)
    tok = token(["orders"])
    with (
        _no_errors_logged(),
        watching("pgherald.gateway") as log,
        serve(app) as base,
        sse(base, "orders", tok=tok) as live,
        ws_connect(
            base.replace("http", "ws") + "/ws",
            additional_headers={"Authorization": f"Bearer {tok}"},
        ) as ws,
    ):
        hub = hub_of(app)
        wait_until(lambda: hub.source_ok, 10, "the gateway's JetStream consumer")
        live.ready()
        ws.send(json.dumps({"type": "subscribe", "channels": ["orders"]}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        ids = [pgherald.publish(conn, "orders", {"n": n}) for n in range(3)]
        got = [_next_event(live, 10) for _ in range(3)]
        got_ws = [_ws_event(ws, 10) for _ in range(3)]

        own_nats.kill()
        warned = log.wait_for("disconnected", 1, 10)
        assert warned[0].levelno == logging.WARNING
        assert "wait until it is back" in warned[0].getMessage()
        assert _health(base) == (503, {"database": True, "listener": True, "source": False})
        ids += [pgherald.publish(conn, "orders", {"n": n}) for n in range(3, 10)]

        own_nats.start()  # same port, same JetStream store directory
        # Within seconds: the consumers are made again at the reconnect (nats-py alone would
        # wait for two missed heartbeats: 5 to 20 s after the kill, /healthz saying all is well).
        got += [_next_event(live, 4)]
        got += [_next_event(live, 30) for _ in range(6)]
        got_ws += [_ws_event(ws, 30) for _ in range(7)]
        log.wait_for("connected again", 1, 10)
        assert _health(base) == (200, {"database": True, "listener": True, "source": True})
        # One more: the next thing each client gets (nothing repeated before it).
        ids.append(pgherald.publish(conn, "orders", {"n": 10}))
        got.append(_next_event(live, 10))
        got_ws.append(_ws_event(ws, 10))
        expected = [(ids[n], {"n": n}) for n in range(11)]
        assert got == expected
        assert got_ws == expected
        assert not set(before) & {i for i, _ in got}
        assert hub._running


def test_clients_connecting_while_nats_is_down_are_served_and_get_what_follows(
    installed: str,
    conn: psycopg.Connection,
    own_nats: OwnNats,
    own_relayed: dict[str, str],
) -> None:
    """
    While NATS is down, a new client is served at once (``: ready``, ``subscribed``; a resume
    from the log), neither refused nor left hanging, and gets the live events once NATS is
    back: those published meanwhile, once each, in order. The gateway had delivered nothing
    before the outage: the events in the stream before it started are not sent (nats-py's
    ordered consumer starts again from the stream's first message then).
    """
    before = [pgherald.publish(conn, "orders", {"before": n}) for n in range(2)]
    _wait_stored(own_nats.url, own_relayed["stream"], 2, 20)
    # Pings keep the clients' reads going while NATS is down.
    app = _gateway(installed, own_nats.url, own_relayed, heartbeat=0.5)
    tok = token(["orders"])
    with _no_errors_logged(), watching("pgherald.gateway") as log, serve(app) as base:
        hub = hub_of(app)
        wait_until(lambda: hub.source_ok, 10, "the gateway's JetStream consumer")
        own_nats.kill()
        log.wait_for("disconnected", 1, 10)
        assert _health(base) == (503, {"database": True, "listener": True, "source": False})
        with (
            sse(base, "orders", tok=tok) as fresh,
            sse(base, "orders", tok=tok, headers={"Last-Event-ID": str(before[0])}) as resumed,
            ws_connect(
                base.replace("http", "ws") + "/ws",
                additional_headers={"Authorization": f"Bearer {tok}"},
            ) as ws,
        ):
            fresh.ready()  # (sse() fails on a status other than 200; reads time out after 5 s)
            resumed.ready()
            assert _next_event(resumed, 5) == (before[1], {"before": 1})  # from the log
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": before[0]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            assert _ws_event(ws, 5) == (before[1], {"before": 1})
            ids = [pgherald.publish(conn, "orders", {"n": n}) for n in range(3)]
            assert not hub.source_ok

            own_nats.start()
            expected = [(ids[n], {"n": n}) for n in range(3)]
            assert [_next_event(fresh, 30) for _ in range(3)] == expected
            assert [_next_event(resumed, 30) for _ in range(3)] == expected
            assert [_ws_event(ws, 30) for _ in range(3)] == expected
            last = pgherald.publish(conn, "orders", {"n": 3})  # next for each: nothing repeated
            assert _next_event(fresh, 10) == (last, {"n": 3})
            assert _next_event(resumed, 10) == (last, {"n": 3})
            assert _ws_event(ws, 10) == (last, {"n": 3})
        assert _health(base) == (200, {"database": True, "listener": True, "source": True})


# -- what the source refuses --


async def _publish_raw(
    url: str, subject: str, messages: list[tuple[bytes, dict[str, str]]]
) -> None:
    """Store *messages* (data, headers) on *subject* in JetStream, as something else than the
    relay would."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for data, headers in messages:
            await js.publish(subject, data, headers=headers or None)
    finally:
        await nc.close()


def test_a_message_without_the_relays_headers_is_skipped_with_a_warning(
    installed: str,
    conn: psycopg.Connection,
    nats_url: str,
    relayed: dict[str, str],
) -> None:
    """
    docs/gateway.md: "A message on the subject without the relay's headers is skipped with a
    warning". Stored on the relay's subject by another publisher: one with no headers at all,
    one whose ``Pgherald-Tx`` is no position. Neither reaches a client nor stops the stream:
    the next event the client gets is the relay's, the source stays healthy.
    """
    app = _gateway(installed, nats_url, relayed)
    subject = relayed["subject"].replace("{channel}", "orders")
    with (
        watching("pgherald.gateway") as log,
        serve(app) as base,
        sse(base, "orders", tok=token(["orders"])) as live,
    ):
        hub = hub_of(app)
        wait_until(lambda: hub.source_ok, 10, "the gateway's JetStream consumer")
        live.ready()
        bad_tx = {"Pgherald-Channel": "orders", "Pgherald-Tx": "x", "Pgherald-Event-Id": "1"}
        asyncio.run(
            _publish_raw(nats_url, subject, [(b'{"n": "bare"}', {}), (b'{"n": "bad"}', bad_tx)])
        )
        skipped = log.wait_for("is not an event relayed by pgherald relay", 2, 10)
        assert {r.levelno for r in skipped} == {logging.WARNING}
        assert all(subject in r.getMessage() for r in skipped), [r.getMessage() for r in skipped]
        relayed_id = pgherald.publish(conn, "orders", {"n": 1})
        assert _next_event(live, 10) == (relayed_id, {"n": 1})  # stored after both skipped ones
        assert hub.source_ok
        assert _health(base) == (200, {"database": True, "listener": True, "source": True})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_gateway_with_a_nats_source_mounted_under_trio_refuses_to_start(
    installed: str, conn: psycopg.Connection
) -> None:
    """
    docs/gateway.md: "a `create_app(source=...)` mounted under trio refuses to start
    (`UsageError`)" (nats-py is asyncio's). Mounted as the docs show, the outer app's ASGI
    lifespan, as a trio server drives it, fails at startup naming why, and the gateway leaves
    no session behind.
    """
    # Refused before any connection: no NATS server needs to answer there.
    source = f"nats://127.0.0.1:{free_port()}"
    gateway = create_app(installed, durable_channels=["orders"], source=source)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.router.lifespan_context(gateway):
            yield

    outer = Starlette(routes=[Mount("/events", gateway)], lifespan=lifespan)
    sent: list[Message] = []
    started = False

    async def receive() -> Message:
        nonlocal started
        if not started:
            started = True
            return {"type": "lifespan.startup"}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with pytest.raises(pgherald.UsageError, match="asyncio only"), anyio.fail_after(10):
        await outer(scope, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "UsageError" in sent[0]["message"]
    assert "runs on asyncio only" in sent[0]["message"]
    assert _gateway_sessions(conn, "pgherald-gateway") == 0
    assert _gateway_sessions(conn, "pgherald-gateway-db") == 0
