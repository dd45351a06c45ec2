"""
Promises of docs/gateway.md that no other test checked, over real HTTP and WebSocket against a
real PostgreSQL (uvicorn in a thread, as in test_gateway.py).

- "Access control (denied by default)": a token reads only with ``r`` in its mode (a write-only
  token is refused a stream, a subscribe and the read list of ``/channels``); a malformed token
  (claims of the wrong shape) is a 401 on every endpoint, the WebSocket handshake included
  ("WebSocket handshakes are refused with the same HTTP status"), as are forged and expired
  ones; "Publishing always needs a token with ``w``", over the WebSocket too.
- "WebSocket protocol": "a later subscribe naming a channel again replaces its filter", and
  "unsubscribing a pattern drops the channels it matched (but those named ... of the same
  client)".
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jwt
import psycopg
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.integration.test_gateway import SECRET, serve, token


def claims_token(claims: dict[str, Any]) -> str:
    """A token signed with the gateway's secret, with exactly these claims (and an exp)."""
    return jwt.encode({"exp": int(time.time() + 600)} | claims, SECRET, algorithm="HS256")


def handshake_status(base: str, tok: str | None) -> int:
    """The HTTP status a ``/ws`` handshake with *tok* gets (101 when accepted)."""
    url = base.replace("http", "ws") + "/ws" + (f"?token={tok}" if tok else "")
    try:
        with ws_connect(url, open_timeout=5):
            pass
    except InvalidStatus as refused:
        return int(refused.response.status_code)
    return 101


def sse_status(http: httpx.Client, channel: str, **options: Any) -> int:
    """The status of ``GET /sse?channel=...``, without reading a stream that was granted."""
    with http.stream("GET", "/sse", params={"channel": channel}, **options) as answer:
        return answer.status_code


def ask(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send *message*; the next message of the server (a reply: nothing else is subscribed)."""
    ws.send(json.dumps(message))
    reply: dict[str, Any] = json.loads(ws.recv(5))
    return reply


def test_tokens_grant_only_what_their_claims_say_everywhere(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET, allow_anonymous=["public.*"], channels=["orders"])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        # A write-only token may publish to its channels but not read them.
        writer = token(["orders"], "w")
        assert sse_status(http, "orders", headers={"Authorization": f"Bearer {writer}"}) == 403
        refused = http.get("/sse", params={"channel": "orders", "token": writer})
        assert "does not allow reading channel 'orders'" in refused.json()["error"]
        listed = http.get("/channels", params={"token": writer}).json()
        assert listed["write"] == ["orders"]
        assert listed["read"] == ["public.*"]  # the anonymous allowance only
        assert "orders" not in listed["channels"]
        with ws_connect(base.replace("http", "ws") + f"/ws?token={writer}") as ws:
            error = ask(ws, {"type": "subscribe", "channels": ["orders"]})
            assert error["type"] == "error"
            assert "does not allow reading channel 'orders'" in error["message"]
            error = ask(ws, {"type": "subscribe", "channels": ["ord*"]})  # nor by a pattern
            assert error["type"] == "error"
            published = ask(ws, {"type": "publish", "channel": "orders", "payload": 1})
            assert published == {"type": "published", "channel": "orders", "id": None}

        # Claims of the wrong shape are a malformed token: 401, never a grant. A string of
        # channels would otherwise be read character by character ("*": every channel).
        malformed = {
            "channels as a string": claims_token({"channels": "*", "mode": "rw"}),
            "no channels": claims_token({"mode": "rw"}),
            "a list of non-strings": claims_token({"channels": [["*"]], "mode": "rw"}),
            "an unknown mode": claims_token({"channels": ["*"], "mode": "admin"}),
        }
        forged = jwt.encode({"channels": ["*"], "mode": "rw"}, "another-secret-of-32-bytes!!!!!!!")
        expired = token(["*"], "rw", ttl=-10)
        for what, tok in (malformed | {"forged": forged, "expired": expired}).items():
            auth = {"Authorization": f"Bearer {tok}"}
            assert sse_status(http, "orders", headers=auth) == 401, what
            answer = http.post("/publish/orders", json={"n": 1}, headers=auth)
            assert answer.status_code == 401, what
            assert http.get("/channels", headers=auth).status_code == 401, what
            assert handshake_status(base, tok) == 401, what

        # Anonymous clients read the allowed channels, over the WebSocket too, and never
        # publish: not even to a channel they may read.
        with ws_connect(base.replace("http", "ws") + "/ws") as ws:
            assert ask(ws, {"type": "subscribe", "channels": ["public.news"]})["type"] == (
                "subscribed"
            )
            error = ask(ws, {"type": "publish", "channel": "public.news", "payload": "x"})
            assert error["type"] == "error"
            assert "a token is needed to publish" in error["message"]
            error = ask(ws, {"type": "subscribe", "channels": ["orders"]})
            assert error["type"] == "error"
            pgherald.notify(conn, "public.news", "only this")
            assert json.loads(ws.recv(5)) == {
                "type": "event",
                "channel": "public.news",
                "payload": "only this",
            }


def test_ws_resubscribe_replaces_the_filter_and_a_pattern_leaves_named_channels(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET, channels=["shop.a", "shop.b"])
    url = f"/ws?token={token(['shop.*'])}"
    with serve(app) as base, ws_connect(base.replace("http", "ws") + url) as ws:
        subscribe = {"type": "subscribe", "channels": ["shop.a"], "filter": "status=eq.paid"}
        assert ask(ws, subscribe)["type"] == "subscribed"
        # Named again with another filter: the new one replaces it (not both, not either).
        subscribe = {"type": "subscribe", "channels": ["shop.a"], "filter": "status=eq.void"}
        assert ask(ws, subscribe)["type"] == "subscribed"
        for status in ("paid", "void"):
            pgherald.notify(conn, "shop.a", {"status": status})
        pgherald.notify(conn, "shop.a", {"status": "void", "last": True})
        got = [json.loads(ws.recv(5))["payload"] for _ in range(2)]
        assert got == [{"status": "void"}, {"status": "void", "last": True}]

        # A pattern over a channel named before: unsubscribing the pattern keeps the named one
        # (without a filter now: named again, plainly) and drops what only the pattern matched.
        assert ask(ws, {"type": "subscribe", "channels": ["shop.a"]})["type"] == "subscribed"
        assert ask(ws, {"type": "subscribe", "channels": ["shop.*"]})["type"] == "subscribed"
        assert ask(ws, {"type": "unsubscribe", "channels": ["shop.*"]})["type"] == "unsubscribed"
        pgherald.notify(conn, "shop.b", "matched by the pattern only")
        pgherald.notify(conn, "shop.a", "named")
        assert json.loads(ws.recv(5)) == {"type": "event", "channel": "shop.a", "payload": "named"}
        # And the other way round: a channel named by no one, matched by two patterns, stays
        # while one of them does.
        assert ask(ws, {"type": "subscribe", "channels": ["shop.*", "shop.[b]"]})["type"] == (
            "subscribed"
        )
        assert ask(ws, {"type": "unsubscribe", "channels": ["shop.*"]})["type"] == "unsubscribed"
        pgherald.notify(conn, "shop.b", "still matched")
        assert json.loads(ws.recv(5))["payload"] == "still matched"
