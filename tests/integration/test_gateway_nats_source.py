"""
``pgherald serve --source nats://``: the gateway takes durable channels' live events from the
JetStream stream that ``pgherald relay`` fills, against the machine's NATS and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_faults import wait_until
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


@pytest.fixture
def relayed(installed: str, nats_url: str, unique: str) -> Iterator[dict[str, str]]:
    """A relay of channel 'orders' into a stream of this test's own, running in a thread."""
    options = {"stream": unique.upper(), "subject": f"{unique}.{{channel}}"}
    # Made here: the relay makes it when it first has events, the gateway needs it first.
    asyncio.run(_stream(nats_url, options["stream"], f"{unique}.orders"))
    relay = pgherald.Relay(installed, to=nats_url, channels=["orders"], **options)
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        yield options
    finally:
        relay.stop()
        t.join(10)
        asyncio.run(_stream(nats_url, options["stream"], None))
    assert not t.is_alive()


def _event(s: Any) -> tuple[int, Any]:
    frame = s.next()
    assert frame is not None, "the stream ended"
    assert frame["event"] == "orders"
    return int(frame["id"]), json.loads(frame["data"])


def _ws_event(ws: Any) -> tuple[int, Any]:
    message = json.loads(ws.recv(5))
    assert message["type"] == "event", message
    assert message["channel"] == "orders"
    return int(message["id"]), message["payload"]


def test_sse_and_ws_stream_relayed_events_and_resume_from_the_log(
    installed: str,
    conn: psycopg.Connection,
    nats_url: str,
    relayed: dict[str, str],
) -> None:
    app = create_app(
        installed,
        jwt_secret=SECRET,
        durable_channels=["orders"],
        source=nats_url,
        source_stream=relayed["stream"],
        source_subject=relayed["subject"],
        queue_check_interval=0,
    )
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
