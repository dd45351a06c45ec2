"""
The gateway's limits (``pgherald serve``): header and idle time, header and body size,
connections per client address, and a flood of idle sockets that locks nobody out.

All load is bounded and on loopback only: at most 300 sockets, all closed at the end. Floods
come from 127.0.0.2 (Linux routes all of 127/8 to the loopback interface), legitimate clients
from 127.0.0.1, so that the per-address limit tells them apart.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_cli import cli_env, pgherald_cmd
from tests.fix_durable import wait_until
from tests.fix_faults import free_port
from tests.integration.test_gateway import SECRET, serve, sse, token

FLOOD = 300
ATTACKER = "127.0.0.2"


def _address(base: str) -> tuple[str, int]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    return host, int(port)


@contextlib.contextmanager
def idle_sockets(base: str, count: int, *, partial: bool = False) -> Iterator[list[socket.socket]]:
    """*count* connections from `ATTACKER` that never finish a request; closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(_address(base), timeout=5, source_address=(ATTACKER, 0))
            if partial:  # slowloris: a request line and half a header, then nothing
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed *s* (everything it sent is read and discarded)."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def raw_response(s: socket.socket) -> bytes:
    """Everything the server sends on *s* until it closes it."""
    s.settimeout(5)
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_idle_sockets_are_closed_after_the_header_timeout_and_lock_nobody_out(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with (
        serve(app, header_timeout=1.0, max_connections_per_client=0) as base,
        httpx.Client(base_url=base, timeout=5.0) as http,
        sse(base, "news") as stream,
        ws_connect(base.replace("http", "ws") + "/ws") as ws,
    ):
        stream.ready()
        ws.send(json.dumps({"type": "subscribe", "channels": ["news"]}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        with (
            idle_sockets(base, FLOOD // 2) as idle,
            idle_sockets(base, FLOOD // 2, partial=True) as slow,
        ):
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            with sse(base, "news") as other:
                other.ready()
            wait_until(
                lambda: all(closed_by_server(s) for s in idle + slow),
                timeout=10,
                what="the server to close every idle socket",
            )
            took = time.monotonic() - started
        assert took < 6, took
        # The streams opened before the idle sockets, more than the header timeout ago, are
        # not subject to it: their requests were complete.
        pgherald.notify(conn, "news", "still here")
        assert stream.next() == {"event": "news", "data": "still here"}
        assert json.loads(ws.recv(5))["payload"] == "still here"


def test_the_per_client_limit_refuses_the_next_stream_and_frees_on_close(dsn: str) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with serve(app, max_connections_per_client=3) as base:
        ws_url = base.replace("http", "ws") + "/ws"
        with sse(base, "news") as a, sse(base, "news") as b, ws_connect(ws_url):
            a.ready()
            b.ready()
            with httpx.Client(timeout=5.0) as http:
                refused = http.get(f"{base}/sse", params={"channel": "news"})
            assert refused.status_code == 429
            assert "--max-connections-per-client" in refused.json()["error"]
            with pytest.raises(InvalidStatus) as denied:
                ws_connect(ws_url).close()
            assert denied.value.response.status_code == 429
            # Another address is not affected.
            with socket.create_connection(_address(base), source_address=(ATTACKER, 0)) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert raw_response(s).startswith(b"HTTP/1.1 200")

        # Closed streams (WebSocket included) give their places back.
        def three_more() -> bool:
            with contextlib.ExitStack() as stack:
                for _ in range(2):
                    stack.enter_context(sse(base, "news"))
                try:
                    stack.enter_context(ws_connect(ws_url))
                except InvalidStatus:
                    return False
            return True

        wait_until(three_more, timeout=5, what="the closed connections to be released")


def test_a_flood_from_one_address_takes_only_its_share(dsn: str) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with (
        serve(app, max_connections_per_client=50) as base,
        idle_sockets(base, FLOOD) as flood,
        httpx.Client(base_url=base, timeout=5.0) as http,
    ):
        # All but 50 are closed within a second (a 429 once a request comes: none does).
        wait_until(
            lambda: sum(closed_by_server(s) for s in flood) >= FLOOD - 50,
            timeout=10,
            what="the connections over the limit to be closed",
        )
        assert http.get("/healthz").status_code == 200
        with sse(base, "news") as stream:
            stream.ready()


def test_serve_with_a_small_file_limit_is_not_locked_out_by_idle_sockets(
    dsn: str, tmp_path: Any
) -> None:
    """The report's case: idle sockets up to the file limit; here 256 files, 300 sockets."""
    port = free_port()

    def small_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    server = subprocess.Popen(
        pgherald_cmd(
            "serve", "--port", str(port), "--allow-anonymous", "news", "--header-timeout", "2"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=small_file_limit,
        env=cli_env(dsn),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert "pgherald gateway on" in line, line
        with (
            httpx.Client(base_url=base, timeout=5.0) as http,
            idle_sockets(base, FLOOD),
        ):
            wait_until(lambda: _healthy(http), timeout=5, what="GET /healthz to answer")
            with sse(base, "news") as stream:
                stream.ready()
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def _healthy(http: httpx.Client) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return http.get("/healthz").status_code == 200
    return False


def send_then_receive(ws: Any, message: str) -> Any:
    ws.send(message)
    return ws.recv(5)


def test_a_publish_body_over_the_limit_is_a_413(dsn: str) -> None:
    app = create_app(dsn, jwt_secret=SECRET, max_body=1024 * 1024)
    auth = {"Authorization": "Bearer " + token(["chat.*"], "w")}
    big = json.dumps({"blob": "x" * (2 * 1024 * 1024)}).encode()
    with serve(app) as base, httpx.Client(base_url=base, timeout=10.0, headers=auth) as http:
        answer = http.post("/publish/chat.a", content=big)
        assert answer.status_code == 413
        assert "1048576 bytes" in answer.json()["error"]
        # Without a Content-Length (chunked), counted as it arrives.
        answer = http.post("/publish/chat.a", content=iter([big[:600_000], big[600_000:]]))
        assert answer.status_code == 413
        assert http.post("/publish/chat.a", json={"ok": 1}).status_code == 200
        # JSON nested past what Python's parser takes: a 400, not a server error.
        deep = b"[" * 100_000 + b"]" * 100_000
        answer = http.post("/publish/chat.a", content=deep)
        assert answer.status_code == 400, answer.text
        assert answer.json() == {"error": "the body must be JSON"}
        answer = http.post("/publish/chat.a", content=b"[" * 5000 + b"]" * 5000)
        assert answer.status_code == 400, answer.text
        # A WebSocket message: uvicorn's ws_max_size, from the same limit.
        url = base.replace("http", "ws") + "/ws?token=" + token(["chat.*"], "w")
        with ws_connect(url, max_size=None) as ws:
            # The server may close (1009) before the whole message is sent: then send raises.
            with pytest.raises(ConnectionClosed) as closed:
                send_then_receive(ws, big.decode())
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009


NOTIFY_LIMIT = (
    "payload is 8000 bytes; NOTIFY payloads must be under 8000 bytes: send a reference "
    "(a row id) and read the data from a table instead"
)


def test_a_plain_publish_of_8000_bytes_is_a_413_and_delivers_nothing(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """PostgreSQL refuses NOTIFY payloads of 8000 bytes or more: HTTP says 413, WebSocket an
    error message, both naming the limit; a durable channel (the log) takes them."""
    pgherald.install(conn)
    app = create_app(dsn, jwt_secret=SECRET, durable_channels=["orders"], poll_interval=0.1)
    tok = token(["chat.*", "orders"], "rw")
    auth = {"Authorization": f"Bearer {tok}"}
    with (
        serve(app) as base,
        httpx.Client(base_url=base, timeout=10.0, headers=auth) as http,
        sse(base, "chat.a", tok=tok) as stream,
        ws_connect(base.replace("http", "ws") + "/ws?token=" + tok) as ws,
    ):
        stream.ready()
        ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a"]}))
        assert json.loads(ws.recv(5))["type"] == "subscribed"
        answer = http.post("/publish/chat.a", json="x" * 8000)  # a JSON string: sent as is
        assert (answer.status_code, answer.json()) == (413, {"error": NOTIFY_LIMIT})
        # Bytes of UTF-8, not characters: 4000 of 'é' are 8000 bytes.
        ws.send(json.dumps({"type": "publish", "channel": "chat.a", "payload": "é" * 4000}))
        assert json.loads(ws.recv(5)) == {"type": "error", "message": NOTIFY_LIMIT}
        # One byte under the limit goes through; being the next event each client gets, it
        # shows that neither refused payload was delivered (NOTIFYs arrive in order).
        answer = http.post("/publish/chat.a", json="y" * 7999)
        assert (answer.status_code, answer.json()) == (200, {"ok": True})
        assert stream.next(within=5) == {"event": "chat.a", "data": "y" * 7999}
        assert json.loads(ws.recv(5)) == {
            "type": "event",
            "channel": "chat.a",
            "payload": "y" * 7999,
        }
        durable = http.post("/publish/orders", json="x" * 8000)
        assert durable.status_code == 200, durable.text
        row = conn.execute(
            "SELECT length(payload #>> '{}') FROM pgherald.events_v1 WHERE id = %s",
            (durable.json()["id"],),
        ).fetchone()
        assert row == (8000,)


def test_a_publish_body_that_never_ends_is_a_408(dsn: str) -> None:
    app = create_app(dsn, jwt_secret=SECRET, body_timeout=0.5)
    tok = token(["chat.*"], "w")
    with serve(app) as base, socket.create_connection(_address(base)) as s:
        s.sendall(
            b"POST /publish/chat.a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + tok.encode() + b'\r\n\r\n{"a":'
        )
        answer = raw_response(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 0.5 s" in answer


def test_headers_over_the_limit_are_a_431(dsn: str) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with serve(app, max_header_bytes=16 * 1024) as base:
        with socket.create_connection(_address(base)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 20_000)
            assert raw_response(s).startswith(b"HTTP/1.1 431")
        with httpx.Client(base_url=base, timeout=5.0) as http:
            assert http.get("/healthz", headers={"X-Ok": "y" * 8000}).status_code == 200


def test_an_idle_keep_alive_connection_is_closed(dsn: str) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with serve(app, timeout_keep_alive=0.3, header_timeout=0.6) as base:
        with socket.create_connection(_address(base)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            assert raw_response(s) == b""  # closed by the server after 0.3 s idle
        with socket.create_connection(_address(base)) as s:
            # A next request that starts, then stalls: uvicorn drops its keep-alive timer at
            # the first byte; the header timeout bounds it instead.
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /heal")
            assert raw_response(s) == b""


@pytest.mark.parametrize("size", [70_000, 100_000])
def test_headers_over_the_limit_that_arrive_whole_are_a_431(dsn: str, size: int) -> None:
    """The whole head in one send (its end included) is held to the limit too."""
    app = create_app(dsn, allow_anonymous=["news"])
    with serve(app) as base:  # the default limit: 64 KiB
        with socket.create_connection(_address(base)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * size + b"\r\n\r\n")
            assert raw_response(s).startswith(b"HTTP/1.1 431")
        with socket.create_connection(_address(base)) as s:  # just under it: served
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"y" * 60_000 + b"\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
