"""
The real-time gateway (``pgherald serve``), over real HTTP against a real PostgreSQL.

Each test runs uvicorn in a background thread on a socket bound beforehand (connections wait in
its backlog until the app has started: no start-up polling), and talks to it with httpx,
websockets, raw sockets or a headless browser.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import jwt
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from starlette.applications import Starlette
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app, direct
from pgherald.contrib.gateway.fanout import Hub
from pgherald.contrib.gateway.frames import Frame
from pgherald.contrib.gateway.server import GatewayServer
from tests.fix_cli import cli_env, pgherald_cmd
from tests.fix_durable import wait_until
from tests.fix_faults import LogWatch, free_port, watching
from tests.fix_server import OwnServer, own_server

SECRET = "test-secret-not-for-production-0123456789"


def token(channels: list[str], mode: str = "r", *, ttl: float = 600.0) -> str:
    claims = {"channels": channels, "mode": mode, "exp": int(time.time() + ttl)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@contextlib.contextmanager
def serve(app: Starlette, **config: Any) -> Iterator[str]:
    """Run *app* under uvicorn in a thread; yield its base URL; shut it down cleanly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = GatewayServer(app, **({"log_level": "warning"} | config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert thread.is_alive(), "the gateway's server ended while in use"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the gateway did not shut down"


def hub_of(app: Starlette) -> Hub:
    hub: Hub = app.state.gateway.hub
    return hub


class Sse:
    """A minimal EventSource: parses frames from a streaming httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        self.comments: list[str] = []

    def ready(self) -> None:
        """Wait for the gateway's ': ready' comment: LISTEN is in effect from here on."""
        for line in self.lines:
            if line == ": ready":
                return
        raise AssertionError("stream ended before ': ready'")

    def next(self, within: float | None = None) -> dict[str, str] | None:
        """
        The next event (``event``, ``data``, ``id``), or None at the end of the stream; with
        *within*, an AssertionError once that many seconds pass first (checked at each line:
        the gateway's heartbeats keep lines coming).
        """
        deadline = None if within is None else time.monotonic() + within
        event: dict[str, str] = {}
        data: list[str] = []
        for line in self.lines:
            if deadline is not None and time.monotonic() > deadline:
                raise AssertionError(f"no event within {within:g}s")
            if line == "":
                if event or data:
                    event["data"] = "\n".join(data)
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            else:
                event[field] = value
        return None


@contextlib.contextmanager
def sse(
    base: str,
    *channels: str,
    tok: str | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> Iterator[Sse]:
    query = [("channel", c) for c in channels] + list((params or {}).items())
    hdrs = dict(headers or {})
    if tok:
        hdrs["Authorization"] = f"Bearer {tok}"
    with (
        httpx.Client(timeout=httpx.Timeout(5.0)) as client,
        client.stream("GET", f"{base}/sse", params=query, headers=hdrs) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield Sse(resp)


@pytest.mark.parametrize("inline_writes", [True, False], ids=["inline", "task-writes"])
def test_sse_receives_events(dsn: str, conn: psycopg.Connection[Any], inline_writes: bool) -> None:
    app = create_app(dsn, jwt_secret=SECRET, inline_writes=inline_writes)
    with (
        serve(app) as base,
        sse(base, "orders", "chat.lobby", tok=token(["orders", "chat.*"])) as s,
    ):
        s.ready()
        assert app.state.gateway.hub.inline is inline_writes  # uvicorn runs asyncio
        pgherald.notify(conn, "orders", {"id": 42})
        pgherald.notify(conn, "chat.lobby", "first line\nsecond line")
        pgherald.notify(conn, "unrelated", "not for us")
        pgherald.notify(conn, "orders", {"id": 43})
        assert s.next() == {"event": "orders", "data": '{"id":42}'}
        assert s.next() == {"event": "chat.lobby", "data": "first line\nsecond line"}
        assert s.next() == {"event": "orders", "data": '{"id":43}'}


def test_sse_heartbeat(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, allow_anonymous=["beat"], heartbeat=0.2)
    with serve(app) as base, sse(base, "beat") as s:
        s.ready()
        assert next(line for line in s.lines if line) == ": ping"
        pgherald.notify(conn, "beat", "x")
        assert s.next() == {"event": "beat", "data": "x"}


@pytest.mark.parametrize("inline_writes", [True, False], ids=["inline", "task-writes"])
def test_ws_subscribe_receive_publish(
    dsn: str, conn: psycopg.Connection[Any], inline_writes: bool
) -> None:
    app = create_app(dsn, jwt_secret=SECRET, inline_writes=inline_writes)
    with serve(app) as base:
        url = base.replace("http", "ws") + "/ws?token=" + token(["chat.*"], "rw")
        with ws_connect(url) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a", "chat.b"]}))
            assert json.loads(ws.recv(5)) == {
                "type": "subscribed",
                "channels": ["chat.a", "chat.b"],
            }
            pgherald.notify(conn, "chat.a", {"text": "hi"})
            assert json.loads(ws.recv(5)) == {
                "type": "event",
                "channel": "chat.a",
                "payload": {"text": "hi"},
            }
            ws.send(json.dumps({"type": "publish", "channel": "chat.b", "payload": [1, 2]}))
            replies = [json.loads(ws.recv(5)) for _ in range(2)]
            assert {"type": "published", "channel": "chat.b", "id": None} in replies
            assert {"type": "event", "channel": "chat.b", "payload": [1, 2]} in replies
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"]}))
            error = json.loads(ws.recv(5))
            assert error["type"] == "error"
            assert "orders" in error["message"]
            ws.send(json.dumps({"type": "unsubscribe", "channels": ["chat.a"]}))
            assert json.loads(ws.recv(5))["type"] == "unsubscribed"
            pgherald.notify(conn, "chat.a", "dropped")
            pgherald.notify(conn, "chat.b", "kept")
            assert json.loads(ws.recv(5))["payload"] == "kept"

        read_only = base.replace("http", "ws") + "/ws"
        with ws_connect(
            read_only, additional_headers={"Authorization": "Bearer " + token(["chat.*"])}
        ) as ws:
            ws.send(json.dumps({"type": "publish", "channel": "chat.a", "payload": 1}))
            error = json.loads(ws.recv(5))
            assert error["type"] == "error"
            assert "publishing" in error["message"]

        with pytest.raises(InvalidStatus) as denied:
            ws_connect(base.replace("http", "ws") + "/ws").close()
        assert denied.value.response.status_code == 401


def test_auth_denies_by_default(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, jwt_secret=SECRET)
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        assert http.get("/sse", params={"channel": "orders"}).status_code == 401
        bad = http.get("/sse", params={"channel": "orders", "token": "not-a-jwt"})
        assert bad.status_code == 401
        forged = jwt.encode({"channels": ["*"], "mode": "rw"}, "another-secret-of-32-bytes-length!")
        assert http.get("/sse", params={"channel": "orders", "token": forged}).status_code == 401
        expired = token(["orders"], ttl=-10)
        assert http.get("/sse", params={"channel": "orders", "token": expired}).status_code == 401
        outside = http.get("/sse", params={"channel": "orders", "token": token(["chat.*"])})
        assert outside.status_code == 403
        assert "orders" in outside.json()["error"]

        assert http.post("/publish/orders", json={"id": 1}).status_code == 401
        read_only = {"Authorization": "Bearer " + token(["orders"], "r")}
        assert http.post("/publish/orders", json={"id": 1}, headers=read_only).status_code == 403
        other = {"Authorization": "Bearer " + token(["chat.*"], "rw")}
        assert http.post("/publish/orders", json={"id": 1}, headers=other).status_code == 403

        with sse(base, "orders", tok=token(["orders"])) as s:
            s.ready()
            writer = {"Authorization": "Bearer " + token(["orders"], "w")}
            published = http.post("/publish/orders", json={"id": 7}, headers=writer)
            assert published.status_code == 200, published.text
            assert s.next() == {"event": "orders", "data": '{"id":7}'}


def test_stream_ends_at_token_expiry(dsn: str) -> None:
    app = create_app(dsn, jwt_secret=SECRET)
    with serve(app) as base:
        short = token(["orders"], ttl=1.5)
        started = time.monotonic()
        with sse(base, "orders", tok=short) as s:
            s.ready()
            assert s.next() == {"event": "error", "data": "token expired"}
            assert s.next() is None  # closed by the server
        assert time.monotonic() - started < 4.0

        url = base.replace("http", "ws") + "/ws?token=" + token(["orders"], ttl=1.5)
        with ws_connect(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "token expired"


def test_anonymous_channels(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, jwt_secret=SECRET, allow_anonymous=["public.*"])
    with serve(app) as base:
        with sse(base, "public.news") as s:
            s.ready()
            pgherald.notify(conn, "public.news", "hello")
            assert s.next() == {"event": "public.news", "data": "hello"}
        with httpx.Client(base_url=base, timeout=5.0) as http:
            assert http.get("/sse", params={"channel": "private"}).status_code == 401
            mixed = http.get("/sse", params=[("channel", "public.news"), ("channel", "private")])
            assert mixed.status_code == 401
            assert http.post("/publish/public.news", json=1).status_code == 401


def test_ws_resume_after_an_event_id(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pgherald.install(conn)
    app = create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    first = pgherald.publish(conn, "orders", {"n": 1})
    missed = [pgherald.publish(conn, "orders", {"n": n}) for n in (2, 3)]
    with serve(app) as base:
        url = base.replace("http", "ws") + "/ws?token=" + token(["orders", "chat"])
        with ws_connect(url) as ws:
            subscribe = {"type": "subscribe", "channels": ["orders", "chat"], "after": first}
            ws.send(json.dumps(subscribe))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["orders", "chat"]}
            got = [json.loads(ws.recv(5)) for _ in missed]
            assert [(e["id"], e["payload"]["n"]) for e in got] == [(missed[0], 2), (missed[1], 3)]
            live = pgherald.publish(conn, "orders", {"n": 4})
            assert json.loads(ws.recv(5)) == {
                "type": "event",
                "channel": "orders",
                "payload": {"n": 4},
                "id": live,
            }
            pgherald.notify(conn, "chat", "next")  # nothing repeated before it
            assert json.loads(ws.recv(5))["payload"] == "next"

            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": 10**12}))
            error = json.loads(ws.recv(5))
            assert error["type"] == "error"
            assert "not in the log" in error["message"]
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": "7"}))
            assert "'after' must be an event id" in json.loads(ws.recv(5))["message"]


BEYOND_BIGINT = 99999999999999999999999  # the probe's Last-Event-ID: no event id at all
LONG_CHANNEL = "c" * 64
TOO_LONG = (
    "channel name 'cccccccccccccccccccc'... is 64 bytes; PostgreSQL allows at most 63 bytes "
    "(it would silently truncate it): use a shorter name"
)


def test_a_resume_id_beyond_a_bigint_is_a_bad_request_not_a_database_failure(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    app = create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    first = pgherald.publish(conn, "orders", {"n": 1})
    tok = token(["orders"])

    def says(event_id: int) -> str:
        return (
            f"{event_id} is not an event id: event ids are integers up to "
            "9223372036854775807 (PostgreSQL bigint); resume after an id the gateway sent"
        )

    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        sse_params = {"channel": "orders", "token": tok}
        answer = http.get("/sse", params=sse_params, headers={"Last-Event-ID": str(BEYOND_BIGINT)})
        assert (answer.status_code, answer.json()) == (400, {"error": says(BEYOND_BIGINT)})
        answer = http.get("/sse", params=sse_params | {"last_event_id": str(-BEYOND_BIGINT)})
        assert (answer.status_code, answer.json()) == (400, {"error": says(-BEYOND_BIGINT)})
        url = base.replace("http", "ws") + "/ws?token=" + tok
        with ws_connect(url) as ws:
            for after in (BEYOND_BIGINT, 10**30):
                ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": after}))
                assert json.loads(ws.recv(5)) == {"type": "error", "message": says(after)}
            # The largest id there can be is an id: the log just lacks it.
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": 2**63 - 1}))
            assert "is not in the log" in json.loads(ws.recv(5))["message"]
            # Nothing failed: the database connection serves the next resume.
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": first}))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["orders"]}
        assert http.get("/healthz").json()["database"] is True


def test_a_channel_name_over_63_bytes_is_refused_alike_everywhere(dsn: str) -> None:
    """SSE, WebSocket subscribe and publish: the limit and the fix, as notify says them."""
    app = create_app(dsn, jwt_secret=SECRET)
    tok = token(["*"], "rw")
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        answer = http.get("/sse", params={"channel": LONG_CHANNEL, "token": tok})
        assert (answer.status_code, answer.json()) == (400, {"error": TOO_LONG})
        answer = http.post(
            f"/publish/{LONG_CHANNEL}", json=1, headers={"Authorization": f"Bearer {tok}"}
        )
        assert (answer.status_code, answer.json()) == (400, {"error": TOO_LONG})
        with ws_connect(base.replace("http", "ws") + "/ws?token=" + tok) as ws:
            for message in (
                {"type": "subscribe", "channels": [LONG_CHANNEL]},
                {"type": "unsubscribe", "channels": [LONG_CHANNEL]},
                {"type": "publish", "channel": LONG_CHANNEL, "payload": 1},
            ):
                ws.send(json.dumps(message))
                assert json.loads(ws.recv(5)) == {"type": "error", "message": TOO_LONG}
        # A line break cannot be an SSE event name: refused, saying so.
        answer = http.get("/sse", params={"channel": "a\nb", "token": tok})
        assert answer.status_code == 400
        assert "contains a line break" in answer.json()["error"]


def test_durable_resume_across_restart(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pgherald.install(conn)

    def app() -> Starlette:
        return create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)

    tok = token(["orders", "chat"])
    server = contextlib.ExitStack()
    base = server.enter_context(serve(app()))
    with server, sse(base, "orders", "chat", tok=tok) as s:
        s.ready()
        first = pgherald.publish(conn, "orders", {"n": 1})
        assert s.next() == {"event": "orders", "id": str(first), "data": '{"n": 1}'}
        pgherald.notify(conn, "chat", "plain and durable channels mix")
        assert s.next() == {"event": "chat", "data": "plain and durable channels mix"}
        server.close()  # the gateway stops while the stream is open: it is ended, with a reason
        assert s.next() == {"event": "error", "data": "server shutting down"}
        assert s.next() is None

    missed = [pgherald.publish(conn, "orders", {"n": n}) for n in (2, 3)]
    pgherald.publish(conn, "elsewhere", {"n": "not ours"})
    with serve(app()) as base:
        racing = pgherald.publish(conn, "orders", {"n": 4})  # tail or replay: either way, once
        with sse(base, "orders", tok=tok, headers={"Last-Event-ID": str(first)}) as s:
            s.ready()
            live = [pgherald.publish(conn, "orders", {"n": n}) for n in (5, 6)]
            got = [s.next() for _ in range(5)]
            assert [e["id"] for e in got if e] == [str(i) for i in [*missed, racing, *live]]
            assert [json.loads(e["data"])["n"] for e in got if e] == [2, 3, 4, 5, 6]
            last = pgherald.publish(conn, "orders", {"n": 7})
            assert s.next() == {"event": "orders", "id": str(last), "data": '{"n": 7}'}
        # The query-string form, as a page can send it on its first connection.
        with sse(base, "orders", tok=tok, params={"last_event_id": str(live[-1])}) as s:
            s.ready()
            assert s.next() == {"event": "orders", "id": str(last), "data": '{"n": 7}'}
        unknown = httpx.get(
            f"{base}/sse",
            params={"channel": "orders", "last_event_id": "999999999", "token": tok},
            timeout=5.0,
        )
        assert unknown.status_code == 400


def test_slow_client_is_cut_off(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, allow_anonymous=["feed"], client_buffer=64)
    hub = hub_of(app)
    with serve(app) as base:
        host, port = base.removeprefix("http://").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(5.0)
        slow.connect((host, int(port)))
        slow.sendall(b"GET /sse?channel=feed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = b""
        while b": ready" not in head:
            head += slow.recv(4096)
        with sse(base, "feed") as fast:
            fast.ready()
            filler = "x" * 6000
            sent = 0
            for _ in range(400):  # until the slow one is cut off (a few MB of socket buffers)
                started = time.monotonic()
                with conn.transaction():
                    for i in range(sent, sent + 16):
                        pgherald.notify(conn, "feed", f"{i} {filler}")
                for i in range(sent, sent + 16):
                    event = fast.next()
                    assert event is not None
                    assert event["data"].startswith(f"{i} ")
                assert time.monotonic() - started < 2.0, "the fast client was held up"
                sent += 16
                if hub.metrics.registry.get_sample_value("pgherald_gateway_drops_total"):
                    break
            else:
                raise AssertionError("the slow client was never cut off")
            pgherald.notify(conn, "feed", "still flowing")
            assert fast.next() == {"event": "feed", "data": "still flowing"}
            ended = [c.reason for c in hub.clients if c.reason]
            assert len(ended) == 1
            assert ended[0].startswith("too slow")

        received = bytearray()
        with slow:
            while chunk := slow.recv(65536):
                received += chunk
        tail = bytes(received[-400:])
        # What the slow client got before the cut is in order, with no gap and no repeat
        # (its writes went straight to the socket, then, once it stalled, through the server).
        got = [int(i) for i in re.findall(rb"data: (\d+) ", head + received)]
        assert got == list(range(len(got)))
        assert got, "the slow client got nothing before it was cut off"
        assert b"event: error\ndata: too slow" in tail
        assert tail.endswith(b"0\r\n\r\n")  # the response was ended properly, then closed


def test_one_listen_and_unlisten_after_last_client(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, allow_anonymous=["room", "other"])
    hub = hub_of(app)
    with serve(app) as base:
        with sse(base, "room") as a:
            a.ready()
            with sse(base, "room", "other") as b:
                b.ready()
                assert hub.listening == {"room", "other"}
                listeners = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'pgherald-gateway%%' "
                    "AND application_name NOT LIKE 'pgherald-gateway-%%'"
                ).fetchone()
                assert listeners == (1,)
            wait_until(lambda: hub.listening == {"room"})
            assert hub.listener.channels == ["room"]
            pgherald.notify(conn, "room", "still here")
            assert a.next() == {"event": "room", "data": "still here"}
        wait_until(lambda: hub.listening == set())
        assert hub.listener.channels == []
        assert hub.clients == set()


def test_healthz_and_metrics(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, allow_anonymous=["m"])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        health = http.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"database": True, "listener": True}
        with sse(base, "m") as s:
            s.ready()
            pgherald.notify(conn, "m", "1")
            assert s.next() is not None
            text = http.get("/metrics").text
        assert 'pgherald_gateway_clients{kind="sse"} 1.0' in text
        assert 'pgherald_gateway_clients{kind="ws"} 0.0' in text
        assert "pgherald_gateway_events_in_total 1.0" in text
        assert "pgherald_gateway_frames_out_total 1.0" in text
        assert "pgherald_gateway_drops_total 0.0" in text
        assert "pgherald_gateway_listener_reconnects_total 0.0" in text
        # Cluster-wide, and other tests fill the queue too: a reading, not a value.
        assert re.search(r"^pgherald_gateway_notify_queue_usage [0-9.e-]+$", text, re.MULTILINE)


def test_healthz_is_a_503_while_the_database_is_unreachable_and_a_200_once_back(
    dsn: str, fault_proxy: Any
) -> None:
    """A load balancer reads /healthz: 503 with the same keys while the gateway's path to the
    database is down (its connections cut, new ones refused), 200 again once it is back."""
    app = create_app(fault_proxy.dsn_for(dsn), allow_anonymous=["m"])
    hub = hub_of(app)
    with serve(app) as base, httpx.Client(base_url=base, timeout=10.0) as http:
        health = http.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"database": True, "listener": True})
        fault_proxy.refuse()
        fault_proxy.sever()
        # Waited for so that the answer is exact: the listener learns of the cut by itself.
        wait_until(lambda: not hub.healthy_listener, 10, "the listener to see the cut")
        started = time.monotonic()
        health = http.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"database": False, "listener": False})
        assert time.monotonic() - started < 4  # database_ok's bound: 3 s, not a hang
        fault_proxy.allow()
        # The listener reconnects after its back-off: no restart of the gateway needed.
        wait_until(lambda: http.get("/healthz").status_code == 200, 30, "/healthz to be 200")
        assert http.get("/healthz").json() == {"database": True, "listener": True}


@pytest.mark.anyio
async def test_a_gateway_with_durable_channels_does_not_start_without_the_schema(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """create_app mounted in an app of yours: its lifespan fails, naming the fix, and leaves
    no session of its own behind."""
    app = create_app(dsn, allow_anonymous=["orders"], durable_channels=["orders"])
    entered = False
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"), anyio.fail_after(10):
        async with app.router.lifespan_context(app):
            entered = True
    assert not entered

    def sessions() -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'pgherald-gateway%'"
        ).fetchall()

    # A backend goes from pg_stat_activity shortly after its client hangs up: polled.
    wait_until(lambda: not sessions(), 5, "the gateway's sessions to end")


def test_live_page_in_a_browser(dsn: str, tmp_path: Path) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):  # on CI a skipped test is a failure: scripts/dev.py installs them
            pytest.fail("chromium/chromedriver missing on CI: scripts/dev.py should install them")
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(dsn, jwt_secret=SECRET, allow_anonymous=["demo"])
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    with serve(app) as base:
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            browser.get(base + "/")
            wait = WebDriverWait(browser, 10)
            # Prefilled with the channels the server allows (here: anonymously).
            channels = browser.find_element(By.ID, "channels")
            wait.until(lambda b: channels.get_attribute("value") == "demo")
            browser.find_element(By.ID, "token").send_keys(token(["demo"], "rw"))
            browser.find_element(By.ID, "connect").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("connected"))
            payload = browser.find_element(By.ID, "pub-payload")
            payload.clear()
            payload.send_keys('{"from": "the browser"}')
            browser.find_element(By.ID, "publish").click()
            wait.until(lambda b: "the browser" in b.find_element(By.ID, "events").text)
            row = browser.find_element(By.CSS_SELECTOR, "#events li")
            assert "demo" in row.text
            assert browser.find_element(By.ID, "pub-result").text == "published"
            shot = tmp_path / "gateway-page.png"  # kept by pytest for a look after a failure
            assert browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 0
        finally:
            browser.quit()


def test_tokens_are_redacted_from_access_logs() -> None:
    import logging

    from pgherald.contrib.gateway.server import RedactTokens

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/sse?channel=a&token=eyJhbGciOi.secret.sig", "1.1", 200),
        None,
    )
    assert RedactTokens().filter(record)
    assert record.args is not None
    assert record.args[2] == "/sse?channel=a&token=[redacted]"
    # A line formatted before it is logged (no args): its message is redacted.
    line = '127.0.0.1:1 - "WebSocket /ws?token=eyJhbGciOi.secret.sig" [accepted]'
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, line, None, None)
    assert RedactTokens().filter(record)
    assert record.getMessage() == '127.0.0.1:1 - "WebSocket /ws?token=[redacted]" [accepted]'


def test_serve_logs_no_token_of_websockets_or_sse(dsn: str) -> None:
    """`pgherald serve`'s own output: uvicorn logs WebSocket handshakes (accepted or refused)
    on its error logger, not on the access logger; neither may show a token."""
    port = free_port()
    good, expired = token(["orders"]), token(["orders"], ttl=-60)
    server = subprocess.Popen(
        pgherald_cmd("serve", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(dsn) | {"PGHERALD_JWT_SECRET": SECRET},
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert "pgherald gateway on" in first, first
        base = f"http://127.0.0.1:{port}"
        ws_base = f"ws://127.0.0.1:{port}/ws?token="
        with ws_connect(ws_base + good) as ws:  # uvicorn logs "[accepted]" before answering
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
        with pytest.raises(InvalidStatus):  # logged as '"WebSocket /ws?token=..." 401'
            ws_connect(ws_base + expired).close()
        with httpx.Client(timeout=5.0) as http:  # an HTTP access line
            answer = http.get(f"{base}/sse", params={"channel": "orders", "token": expired})
            assert answer.status_code == 401
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=15)
    assert "WebSocket /ws?token=[redacted]" in output, output
    assert "GET /sse?channel=orders&token=[redacted]" in output, output
    for secret in (good, expired, good.rsplit(".", 1)[1], expired.rsplit(".", 1)[1]):
        assert secret not in output, output


def test_public_key_tokens(dsn: str, conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "gateway.pub.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signed = jwt.encode({"channels": ["orders"], "mode": "r"}, key, algorithm="ES256")
    hs256 = token(["orders"])  # a shared-secret token is not accepted by a public-key gateway
    app = create_app(dsn, jwt_public_key=pem)
    with serve(app) as base:
        assert httpx.get(f"{base}/sse?channel=orders&token={hs256}", timeout=5).status_code == 401
        with sse(base, "orders", tok=signed) as s:
            s.ready()
            pgherald.notify(conn, "orders", "signed")
            assert s.next() == {"event": "orders", "data": "signed"}


class _CountingSet(set[Any]):
    """`Hub.clients`, counting the passes over it (the housekeeping makes one per round)."""

    passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        return super().__iter__()


def _fill_until_stuck(conn: psycopg.Connection[Any], hub: Hub, channel: str) -> None:
    """Notify big payloads until a client that does not read has frames waiting (stuck)."""
    filler = "x" * 6000
    for n in range(400):
        with conn.transaction():
            for i in range(16):
                pgherald.notify(conn, channel, f"{n} {i} {filler}")
        with contextlib.suppress(RuntimeError):  # the set changed size: look again
            if any(len(c.pending) > 64 for c in list(hub.clients)):  # several bursts: stuck
                return
    raise AssertionError("the client's socket never filled up")


@contextlib.contextmanager
def _unread_sse(base: str, target: str) -> Iterator[socket.socket]:
    """An SSE client with a tiny receive buffer that reads nothing after ``: ready``."""
    host, port = base.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(5.0)
    slow.connect((host, int(port)))
    with slow:
        slow.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b": ready" not in head:
            head += slow.recv(4096)
        yield slow


def test_an_expired_client_that_does_not_read_does_not_spin_the_housekeeping(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET, client_buffer=100_000)
    hub = hub_of(app)
    hub.grace = 1.0
    hub.clients = clients = _CountingSet()
    target = f"/sse?channel=feed&token={token(['feed'], ttl=4.0)}"
    with serve(app) as base, _unread_sse(base, target):
        _fill_until_stuck(conn, hub, "feed")
        wait_until(lambda: any(c.reason == "token expired" for c in list(clients)), 10.0)
        before = clients.passes
        wait_until(lambda: not clients, 10.0)  # it leaves after the grace
        # One pass per housekeeping round (at most a second apart), not a busy loop.
        assert clients.passes - before < 50


def test_ws_resume_while_the_database_is_unavailable_is_an_error_message(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    app = create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    first = pgherald.publish(conn, "orders", {"n": 1})
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        assert http.get("/healthz").status_code == 200  # the gateway's database connection is up
        url = base.replace("http", "ws") + "/ws?token=" + token(["orders"])
        with ws_connect(url) as ws:
            # The connection breaks under the gateway: its next statement fails.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'pgherald-gateway-db'"
            )
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": first}))
            error = json.loads(ws.recv(5))
            assert error == {"type": "error", "message": "the database is not available; try again"}
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": first}))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["orders"]}
            live = pgherald.publish(conn, "orders", {"n": 2})
            assert json.loads(ws.recv(5))["id"] == live


# The gateway's own connection finds this pg_current_snapshot() first on its search_path (the
# DSN's options): the replay's read of the log (queries.sql read_log) calls it, and waits here
# while the test holds advisory lock 4242; nothing else the gateway-db connection runs does.
_REPLAY_BLOCKER = """
CREATE SCHEMA blocker;
CREATE FUNCTION blocker.pg_current_snapshot() RETURNS pg_snapshot LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') = 'pgherald-gateway-db' THEN
        PERFORM pg_catalog.pg_advisory_lock_shared(4242);
        PERFORM pg_catalog.pg_advisory_unlock_shared(4242);
    END IF;
    RETURN pg_catalog.pg_current_snapshot();
END
$$;
"""


def _replay_waiting(conn: psycopg.Connection[Any], but: Iterable[int] = ()) -> list[int]:
    """The gateway-db sessions whose replay waits for lock 4242 (but not those in *but*)."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'pgherald-gateway-db' AND wait_event = 'advisory'"
    ).fetchall()
    return [r[0] for r in rows if r[0] not in but]


def _gateway_sessions(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """For a failure's message: the gateway's sessions, what they wait for and run."""
    return conn.execute(
        "SELECT pid, application_name, state, wait_event, left(query, 60) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'pgherald-gateway%'"
    ).fetchall()


@pytest.fixture(scope="module")
def quiet_server() -> Iterator[OwnServer]:
    """
    A private server for the replay tests. The gateway's log tail starts at the cluster's
    oldest running transaction: another test's long one, in any database, would keep it
    before the test's events, so that a resume has nothing to replay (failed so in the suite).
    """
    with own_server() as s:
        yield s


@pytest.fixture
def quiet_db(quiet_server: OwnServer) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """A new database on `quiet_server`: its DSN and an autocommit connection to it."""
    name = f"replay_{os.urandom(4).hex()}"
    with psycopg.connect(quiet_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(quiet_server.dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield dsn, conn


class _Resumed:
    """A client of `_resuming`: SSE or WebSocket, resumed after an event id."""

    def __init__(
        self, kind: str, base: str, tok: str, stack: contextlib.ExitStack, published: list[int]
    ) -> None:
        self.kind, self.base, self.tok, self.stack = kind, base, tok, stack
        self.url = base.replace("http", "ws") + "/ws?token=" + tok
        self.published = published

    def resume(self, after: int) -> Any:
        if self.kind == "sse":
            s = self.stack.enter_context(
                sse(self.base, "orders", tok=self.tok, headers={"Last-Event-ID": str(after)})
            )
            s.ready()
            return s
        w = self.stack.enter_context(ws_connect(self.url))
        w.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": after}))
        assert json.loads(w.recv(5)) == {"type": "subscribed", "channels": ["orders"]}
        return w

    @staticmethod
    def ids(client: Any, n: int) -> list[int]:
        """The ids of the next *n* events."""
        if isinstance(client, Sse):
            got = [client.next(within=10) for _ in range(n)]
            return [int(e["id"]) for e in got if e]
        return [json.loads(client.recv(10))["id"] for _ in range(n)]


@contextlib.contextmanager
def _resuming(
    kind: str, dsn: str, conn: psycopg.Connection[Any], events: int
) -> Iterator[_Resumed]:
    """
    A gateway with durable channel ``orders`` whose replays' reads wait at lock 4242, held
    until the test lets it go (``pg_advisory_unlock(4242)``); afterwards, nothing may have
    been logged at ERROR (uvicorn's "Exception in ASGI application"). *events* are published
    before it starts (`_Resumed.published`): its log tail starts after them, so a client that
    resumes after the first gets the others from a replay. (Published once it runs, the tail
    could hand them out live first, leaving the replay nothing to read.)
    """
    pgherald.install(conn)
    conn.execute(_REPLAY_BLOCKER)
    published = [pgherald.publish(conn, "orders", {"n": n}) for n in range(events)]
    blocked = dsn + " options='-c search_path=blocker,pg_catalog,public'"
    app = create_app(blocked, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    errors = _RecordErrors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    conn.execute("SELECT pg_advisory_lock(4242)")
    try:
        with serve(app) as base, contextlib.ExitStack() as stack:
            yield _Resumed(kind, base, token(["orders"]), stack, published)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock_all()")
    assert not [r.getMessage() for r in errors.records]


@pytest.mark.parametrize("kind", ["sse", "ws"])
def test_a_replay_whose_connection_breaks_reads_again_on_a_new_one(
    kind: str, quiet_db: tuple[str, psycopg.Connection[Any]]
) -> None:
    """
    A client resumes; the replay's read of the log is on its way when the gateway's session is
    ended (a real fault, at that exact point): the read is tried again on a new connection and
    the client gets every event once, in order, then live ones; nothing is logged as an error.
    (It used to escape the endpoint: uvicorn logged "Exception in ASGI application" and cut
    the stream.)
    """
    dsn, conn = quiet_db
    with _resuming(kind, dsn, conn, events=3) as gateway:
        first, *missed = gateway.published
        client = gateway.resume(after=first)
        wait_until(lambda: _replay_waiting(conn), 10, "the replay's read to wait")
        (pid,) = _replay_waiting(conn)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Read again, on a new session (which waits at the same place).
        wait_until(lambda: _replay_waiting(conn, but=[pid]), 10, "a new read")
        conn.execute("SELECT pg_advisory_unlock(4242)")
        live = pgherald.publish(conn, "orders", {"n": 4})
        assert gateway.ids(client, 3) == [*missed, live]


@pytest.mark.parametrize("kind", ["sse", "ws"])
def test_a_replay_that_cannot_read_the_log_ends_the_client_to_resume_later(
    kind: str, quiet_db: tuple[str, psycopg.Connection[Any]]
) -> None:
    """Each of the replay's `REPLAY_ATTEMPTS` reads fails: the client is ended with a reason
    (SSE: an ``error`` event; WebSocket: close code 1013, try again later), and resumes."""
    from pgherald.contrib.gateway.fanout import REPLAY_ATTEMPTS, REPLAY_FAILED

    dsn, conn = quiet_db
    with _resuming(kind, dsn, conn, events=2) as gateway:
        first, missed = gateway.published
        client = gateway.resume(after=first)
        ended: list[int] = []
        for _ in range(REPLAY_ATTEMPTS):
            deadline = time.monotonic() + 10
            while not _replay_waiting(conn, but=ended):
                if time.monotonic() > deadline:
                    pytest.fail(f"read {len(ended) + 1} never waited: {_gateway_sessions(conn)}")
                time.sleep(0.02)  # polling, bounded by the deadline
            (pid,) = _replay_waiting(conn, but=ended)
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            ended.append(pid)
        if kind == "sse":
            assert client.next(within=10) == {"event": "error", "data": REPLAY_FAILED}
            assert client.next(within=10) is None
        else:
            with pytest.raises(ConnectionClosed) as closed:
                client.recv(10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1013, REPLAY_FAILED)
        conn.execute("SELECT pg_advisory_unlock(4242)")
        # The events are still there: resuming again gets them.
        assert gateway.ids(gateway.resume(after=first), 1) == [missed]


def test_heartbeats_do_not_pile_up_for_a_client_that_does_not_read(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    from pgherald.contrib.gateway.frames import PING

    app = create_app(dsn, allow_anonymous=["feed"], heartbeat=0.1, client_buffer=100_000)
    hub = hub_of(app)
    hub.clients = clients = _CountingSet()
    with serve(app) as base, _unread_sse(base, "/sse?channel=feed"):
        _fill_until_stuck(conn, hub, "feed")
        before = clients.passes
        wait_until(lambda: clients.passes > before + 40)  # 20 rounds, 0.05 s apart
        (client,) = list(clients)
        # Its stream is not idle, it is blocked: no ping is owed, let alone 20.
        assert client.pending.count(PING) <= 1


class _RecordErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _ws_that_never_pongs(base: str, channel: str) -> socket.socket:
    """A raw WebSocket client: handshake, subscribe, then it reads but never answers pings."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5.0)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    seen = b""
    while b"\r\n\r\n" not in seen:  # the subscribe goes after the handshake's answer
        data = sock.recv(65536)
        assert data, f"closed during the handshake: {seen!r}"
        seen += data
    text = json.dumps({"type": "subscribe", "channels": [channel]}).encode()
    mask = os.urandom(4)
    sock.sendall(
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )
    while b'"subscribed"' not in seen:
        data = sock.recv(65536)
        assert data, f"closed before the subscribe was confirmed: {seen!r}"
        seen += data
    return sock


def test_ws_closed_by_the_servers_keepalive_ends_quietly(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """
    uvicorn closes a WebSocket whose client leaves its pings unanswered, without telling the
    app first: the hub must drop those clients, with no error logged. (A write that comes
    before the disconnect is refused by uvicorn with a RuntimeError: see
    tests/unit/test_gateway_ws.py; under load it ended every benchmark client with a
    traceback.)
    """
    app = create_app(dsn, allow_anonymous=["feed"])
    hub = hub_of(app)
    errors = _RecordErrors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    clients: list[socket.socket] = []
    try:
        with serve(app, ws_ping_interval=1.0, ws_ping_timeout=0.5) as base:
            clients += [_ws_that_never_pongs(base, "feed") for _ in range(20)]
            assert len(hub.clients) == 20

            def drain(c: socket.socket) -> None:  # reads everything, answers nothing
                with contextlib.suppress(OSError):
                    while c.recv(65536):
                        pass

            readers = [threading.Thread(target=drain, args=(c,), daemon=True) for c in clients]
            for r in readers:
                r.start()
            with psycopg.connect(dsn, autocommit=True) as sender:
                deadline = time.monotonic() + 10.0
                while hub.clients and time.monotonic() < deadline:
                    pgherald.notify(sender, "feed", "x" * 200)  # keeps the writers busy
            assert not hub.clients, "the keepalive closed every client: the hub drops them"
            for r in readers:
                r.join(5.0)
            assert [r.is_alive() for r in readers] == [False] * 20  # every socket closed
    finally:
        for c in clients:
            c.close()
        logging.getLogger("uvicorn.error").removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []


class _CountDirect:
    """Counts the writes that went straight to uvicorn's transport (see gateway/direct.py)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes = 0
        for cls in (direct.DirectBody, direct.DirectWebSocket):
            monkeypatch.setattr(cls, "write", self._counting(cls.write))

    def _counting(self, write: Any) -> Any:
        def counted(obj: Any, data: bytes) -> bool:
            done: bool = write(obj, data)
            self.writes += done
            return done

        return counted


def test_sse_events_go_straight_to_the_socket_under_uvicorn(
    dsn: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = _CountDirect(monkeypatch)
    app = create_app(dsn, allow_anonymous=["feed"])
    with serve(app) as base, sse(base, "feed") as s:
        s.ready()
        for i in range(50):
            pgherald.notify(conn, "feed", f"{i}\nline two of {i}")
        assert [s.next() for _ in range(50)] == [
            {"event": "feed", "data": f"{i}\nline two of {i}"} for i in range(50)
        ]
    assert count.writes >= 1  # the fast path is in use (a uvicorn upgrade can break it)


class _SeesEveryByte:
    """Middleware that wraps ``send``: the gateway must not write past it."""

    def __init__(self, app: Any, seen: list[bytes]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def spy(message: Any) -> None:
            if message["type"] == "http.response.body":
                self.seen.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, spy)


def test_middleware_that_wraps_send_sees_every_event(
    dsn: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = _CountDirect(monkeypatch)
    seen: list[bytes] = []
    app = create_app(dsn, allow_anonymous=["feed"])
    app.add_middleware(_SeesEveryByte, seen=seen)
    with serve(app) as base, sse(base, "feed") as s:
        s.ready()
        for i in range(5):
            pgherald.notify(conn, "feed", str(i))
        assert [s.next() for _ in range(5)] == [{"event": "feed", "data": str(i)} for i in range(5)]
    assert count.writes == 0
    assert b"".join(seen).count(b"event: feed\n") == 5


@pytest.mark.parametrize("server_deflate", [False, True], ids=["serve-default", "deflate"])
def test_ws_events_go_straight_to_the_socket_unless_compressed(
    dsn: str,
    conn: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    server_deflate: bool,
) -> None:
    count = _CountDirect(monkeypatch)
    app = create_app(dsn, allow_anonymous=["feed"])
    sizes = [1, 200, 7000]  # two of the WebSocket length encodings (7 and 16 bits; < 8000 B)
    config = {"ws_per_message_deflate": True} if server_deflate else {}
    # The client offers permessage-deflate (as browsers do); `pgherald serve` declines it.
    with serve(app, **config) as base, ws_connect(base.replace("http", "ws") + "/ws") as ws:
        assert bool(ws.protocol.extensions) is server_deflate
        ws.send(json.dumps({"type": "subscribe", "channels": ["feed"]}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        for n in sizes * 10:
            pgherald.notify(conn, "feed", "x" * n)
        got = [json.loads(ws.recv(5)) for _ in range(len(sizes) * 10)]
        assert got == [{"type": "event", "channel": "feed", "payload": "x" * n} for n in sizes * 10]
    if server_deflate:  # every client has its own compressor: frames cannot be shared
        assert count.writes == 0
    else:
        assert count.writes >= 1


def test_resume_from_an_event_the_tail_has_not_reached_is_not_repeated(
    dsn: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A client resumes after an event that the log tail will only reach later (an open
    transaction holds the tail back): when the tail does reach it, it is live for the others,
    but this client has it already, and the direct writes must skip it too.
    """
    pgherald.install(conn)
    count = _CountDirect(monkeypatch)
    app = create_app(
        dsn, allow_anonymous=["orders"], durable_channels=["orders"], poll_interval=0.1
    )
    with serve(app) as base, psycopg.connect(dsn) as blocker:
        blocker.execute("SELECT pg_current_xact_id()")  # an open transaction: the tail waits
        seen = pgherald.publish(conn, "orders", {"n": 1})
        with sse(base, "orders", params={"last_event_id": str(seen)}) as s:
            s.ready()
            blocker.commit()  # the tail now reads `seen`, then `after`
            after = pgherald.publish(conn, "orders", {"n": 2})
            got = s.next()
            assert got is not None
            assert got["id"] == str(after)

        blocker.execute("SELECT pg_current_xact_id()")
        seen = pgherald.publish(conn, "orders", {"n": 3})
        with ws_connect(base.replace("http", "ws") + "/ws") as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": seen}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            blocker.commit()
            after = pgherald.publish(conn, "orders", {"n": 4})
            assert json.loads(ws.recv(5))["id"] == after
    assert count.writes >= 2  # both went through the direct path


@pytest.mark.anyio
async def test_a_hub_run_again_delivers_despite_frames_left_by_the_last_run(dsn: str) -> None:
    """(A lifespan entered twice, e.g. a test client used twice on one app.)"""
    hub = Hub(dsn)
    async with hub.running():
        pass
    hub.new_client("ws").offer(Frame("", "a reply racing the shutdown"))  # left dirty
    async with hub.running(), anyio.create_task_group() as tg:
        client = hub.new_client("sse")
        written = anyio.Event()

        async def write(frames: list[Frame]) -> None:
            assert [f.payload for f in frames] == ["second run"]
            written.set()

        tg.start_soon(client.pump, write)
        await anyio.lowlevel.checkpoint()
        client.offer(Frame("x", "second run"))
        with anyio.fail_after(5):
            await written.wait()
        client.end("bye")


@pytest.mark.anyio
async def test_the_log_tail_reads_on_the_event_loop_and_passes_other_channels_once(
    dsn: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The tail, the replays and the other statements run on the loop itself (asyncio and trio:
    never in a worker thread); a caught-up tail moves past events of channels it does not
    serve, so they are not read again at every poll.
    """
    pgherald.install(conn)

    def no_worker_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gateway ran something in a worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_worker_threads)
    hub = Hub(dsn, durable_channels=["orders"], poll_interval=0.05)
    async with hub.running(), anyio.create_task_group() as tg:
        client = hub.new_client("sse")
        start = await hub.add(client, ["orders"])
        got: list[Frame] = []
        arrived = anyio.Event()

        async def write(frames: list[Frame]) -> None:
            got.extend(frames)
            arrived.set()

        tg.start_soon(client.pump, write)
        mine = pgherald.publish(conn, "orders", {"n": 1})
        other = pgherald.publish(conn, "elsewhere", {"n": 2})
        with anyio.fail_after(30):  # (the horizon is server-wide: other sessions may hold it)
            await arrived.wait()
        assert [(f.channel, f.id, f.payload) for f in got] == [("orders", mine, '{"n": 1}')]
        row = conn.execute("SELECT tx::text FROM pgherald.events_v1 WHERE id = %s", (other,))
        other_pos = (int(row.fetchone()[0]), other)  # type: ignore[index]
        with anyio.fail_after(30):
            while True:  # bounded polling: the tail has no hook to wait on
                if hub.position > other_pos:
                    break
                await anyio.sleep(0.02)
        replayed = [f.id async for f in hub.replay(["orders"], start, hub.position)]
        assert replayed == [mine]
        assert [f.id async for f in hub.replay(["elsewhere"], start, hub.position)] == [other]
        assert await hub.resume_from(mine) == got[0].pos
        assert await hub.database_ok()
        assert await hub.publish("orders", {"n": 3}) == other + 1
        client.end("bye")


@pytest.mark.anyio
async def test_the_gateway_reconnects_its_own_connections_after_they_are_killed(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    hub = Hub(dsn, durable_channels=["orders"], poll_interval=0.05)
    async with hub.running(), anyio.create_task_group() as tg:
        client = hub.new_client("sse")
        await hub.add(client, ["orders"])
        got: list[Frame] = []
        arrived = anyio.Event()

        async def write(frames: list[Frame]) -> None:
            got.extend(frames)
            arrived.set()

        tg.start_soon(client.pump, write)
        assert await hub.database_ok()
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND application_name IN ('pgherald-gateway-tail', 'pgherald-gateway-db')"
        ).fetchone()
        assert killed == (2,)
        assert await hub.database_ok()  # a connection found broken is replaced at once
        with anyio.fail_after(30):  # the tail's new connection asks for wake-ups again
            while not conn.execute(  # noqa: ASYNC110 (the server's lock table: no event)
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.objid = 1 AND l.mode = 'ShareLock'"
                " AND a.application_name = 'pgherald-gateway-tail'"
                " AND a.datname = current_database()"
            ).fetchone()[0]:  # type: ignore[index]
                await anyio.sleep(0.05)
        with psycopg.connect(dsn, autocommit=True) as listen:
            listen.execute("LISTEN pgherald_wake_v1")
            event = pgherald.publish(conn, "orders", {"n": 1})  # so it sends one
            assert len(list(listen.notifies(timeout=2.0, stop_after=1))) == 1
        with anyio.fail_after(30):  # the tail retries after a second (and the horizon)
            await arrived.wait()
        assert [f.id for f in got] == [event]
        assert await hub.publish("orders", {"n": 2}) == event + 1
        client.end("bye")


def test_ws_message_nested_too_deep_is_an_error_message(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET)
    with serve(app) as base:
        url = base.replace("http", "ws") + "/ws?token=" + token(["chat.*"], "rw")
        with ws_connect(url) as ws:
            ws.send("[" * 100_000 + "]" * 100_000)  # past Python's parser: a RecursionError
            error = json.loads(ws.recv(5))
            assert error == {"type": "error", "message": "the message is JSON nested too deeply"}
            deep = "[" * 900 + "]" * 900  # parses: published, or refused, as any payload
            ws.send('{"type": "publish", "channel": "chat.a", "payload": ' + deep + "}")
            assert json.loads(ws.recv(5))["type"] in ("published", "error")
            # The connection is still served.
            ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            pgherald.notify(conn, "chat.a", "still here")
            assert json.loads(ws.recv(5))["payload"] == "still here"


def test_shutdown_while_the_database_is_down_is_quick_and_quiet(
    dsn: str, fault_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Streams that end while the listener cannot reach the database do not wait for it."""
    app = create_app(fault_proxy.dsn_for(dsn), allow_anonymous=["news"])
    hub = hub_of(app)
    with caplog.at_level(logging.ERROR), serve(app) as base:
        with sse(base, "news") as stream:
            stream.ready()
            fault_proxy.refuse()
            fault_proxy.sever()
            started = time.monotonic()
        # The client left: its stream ends without waiting for the UNLISTEN.
        wait_until(lambda: hub.clients == set(), what="the stream to end")
        assert time.monotonic() - started < 2
        started = time.monotonic()
    assert time.monotonic() - started < 3  # uvicorn's graceful timeout is 5 s
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [e for e in errors if "ASGI" in e or "graceful" in e], errors


def stored(conn: psycopg.Connection[Any], payload: dict[str, Any]) -> int:
    """How many events of ``orders`` hold *payload*."""
    row = conn.execute(
        "SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'orders' AND payload = %s::jsonb",
        (json.dumps(payload),),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_publish_cancelled_at_its_deadline_is_a_503_and_stores_nothing(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """A durable publish that waits past its deadline (the log locked) is cancelled on the
    server before the 503: a client that publishes again does not store the event twice."""
    pgherald.install(conn)
    app = create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    hub_of(app).db.statement_timeout = 0.5
    auth = {"Authorization": "Bearer " + token(["orders"], "rw")}
    with serve(app) as base, httpx.Client(base_url=base, timeout=10.0, headers=auth) as http:
        assert http.post("/publish/orders", json={"n": 1}).status_code == 200
        with psycopg.connect(dsn) as locker:  # a transaction: the lock is held until its end
            locker.execute("LOCK TABLE pgherald.events_v1 IN ACCESS EXCLUSIVE MODE")
            answer = http.post("/publish/orders", json={"n": 2})
            assert answer.status_code == 503, answer.text
            assert answer.json() == {"error": "the database is not available"}
        # The lock is released (committed): the cancelled INSERT is not waiting behind it.
        assert stored(conn, {"n": 2}) == 0
        again = http.post("/publish/orders", json={"n": 2})
        assert again.status_code == 200, again.text
        assert stored(conn, {"n": 2}) == 1


def test_a_publish_whose_cancel_gets_no_answer_is_a_504_that_says_it_may_be_stored(
    dsn: str, conn: psycopg.Connection[Any], fault_proxy: Any
) -> None:
    """When the cancel cannot reach the server, the publish's outcome is unknown: a 504 that
    says so (the event may be stored), not a 503 that invites a blind retry."""
    pgherald.install(conn)
    app = create_app(
        fault_proxy.dsn_for(dsn), jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1
    )
    hub_of(app).db.statement_timeout = 0.5
    auth = {"Authorization": "Bearer " + token(["orders"], "rw")}
    with serve(app) as base, httpx.Client(base_url=base, timeout=10.0, headers=auth) as http:
        assert http.post("/publish/orders", json={"n": 1}).status_code == 200
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE pgherald.events_v1 IN ACCESS EXCLUSIVE MODE")
            fault_proxy.refuse()  # the cancel request's new connection is refused
            answer = http.post("/publish/orders", json={"n": 2})
            assert answer.status_code == 504, answer.text
            message = answer.json()["error"]
            assert "may have been stored" in message
            assert "after the last id" in message
        # The statement was not cancelled: it completes once the lock is released.
        wait_until(lambda: stored(conn, {"n": 2}) == 1, what="the publish to complete")


def test_ws_binary_frame_is_an_error_message_and_the_socket_stays_open(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET)
    # uvicorn's loggers do not propagate to pytest's capture: watched directly, after uvicorn
    # configured its logging.
    with serve(app) as base, watching("uvicorn.error") as log:
        url = base.replace("http", "ws") + "/ws?token=" + token(["chat.*"], "rw")
        with ws_connect(url) as ws:
            ws.send(b'{"type": "subscribe", "channels": ["chat.a"]}')  # a binary frame
            error = json.loads(ws.recv(5))
            assert error == {
                "type": "error",
                "message": "messages are JSON text: a binary frame is not read",
            }
            ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            pgherald.notify(conn, "chat.a", "still here")
            assert json.loads(ws.recv(5))["payload"] == "still here"
    errors = [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def test_ws_text_that_is_not_utf8_is_closed_1007_without_an_error_logged(dsn: str) -> None:
    # A client's mistake: closed with 1007 (uvicorn's doing), logged as one INFO line, not an
    # ERROR with a traceback.
    seen = _send_text_that_is_not_utf8(create_app(dsn, jwt_secret=SECRET))
    mine = [r for r in seen.records if "Invalid UTF-8" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in mine] == [(logging.INFO, None)]
    assert not [r.getMessage() for r in seen.records if r.levelno >= logging.ERROR]


def _send_text_that_is_not_utf8(app: Any) -> LogWatch:
    """Send a WebSocket text frame of invalid UTF-8; what ``uvicorn.error`` emitted meanwhile."""
    import base64
    import os
    import socket
    import struct
    from urllib.parse import urlsplit

    # (uvicorn's loggers do not propagate: watched directly, after uvicorn configured them)
    with serve(app) as base, watching("uvicorn.error") as seen:
        where = urlsplit(base)
        path = "/ws?token=" + token(["chat.*"], "rw")
        with socket.create_connection((where.hostname, where.port), timeout=5) as s:
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {where.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            mask = os.urandom(4)
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(b"\xff\xfe"))
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + payload)  # text, masked
            answer = b""
            while len(answer) < 4:  # the close frame: 0x88, length, then the code
                chunk = s.recv(64)
                if not chunk:
                    break
                answer += chunk
            assert answer[:1] == b"\x88", answer
            assert struct.unpack(">H", answer[2:4]) == (1007,)
    return seen


def test_tokens_under_a_percent_encoded_key_are_redacted(dsn: str) -> None:
    """The server decodes ``%74oken`` to ``token`` (and accepts the token): logs redact it too."""
    from pgherald.contrib.gateway.server import RedactTokens

    secret = "eyJhbGciOi.secret.sig"
    for key in ("%74oken", "t%6Fken", "%74%6F%6B%65%6E", "TOK%45N", "token"):
        path = f"/sse?channel=a&{key}={secret}&x=1"
        record = logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            "",
            0,
            '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:1", "GET", path, "1.1", 200),
            None,
        )
        assert RedactTokens().filter(record)
        assert record.args is not None
        assert record.args[2] == f"/sse?channel=a&{key}=[redacted]&x=1"
        line = f'127.0.0.1:1 - "WebSocket /ws?{key}={secret}" [accepted]'
        record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, line, None, None)
        assert RedactTokens().filter(record)
        assert record.getMessage() == f'127.0.0.1:1 - "WebSocket /ws?{key}=[redacted]" [accepted]'
    # Other keys that merely contain the word are left alone.
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "/x?mytoken=1", None, None)
    assert RedactTokens().filter(record)
    assert record.getMessage() == "/x?mytoken=1"

    # Through the real server: the token is accepted under the encoded key, and not logged.
    good = token(["orders"])
    app = create_app(dsn, jwt_secret=SECRET)
    # (uvicorn's loggers do not propagate: watched directly, after uvicorn configured them)
    with (
        serve(app, log_level="info") as base,
        watching("uvicorn.access") as log,
        httpx.Client(timeout=5.0) as http,
    ):
        answer = http.get(f"{base}/channels?%74oken={good}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["read"] == ["orders"]
    logged = "\n".join(r.getMessage() for r in log.records)
    assert "/channels?%74oken=[redacted]" in logged, logged
    assert good.rsplit(".", 1)[1] not in logged, logged  # (not even the signature)
