"""
The gateway for web apps: CORS and Origin, wildcard subscriptions, filters, gap messages.

Real uvicorn, real PostgreSQL (the helpers of test_gateway.py); each test takes about a second.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from pgherald.contrib.gateway.filters import FilterError, parse_filters
from tests.fix_cli import cli_env, pgherald_cmd
from tests.integration.test_gateway import SECRET, hub_of, serve, sse, token

APP = "http://app.example.test:3000"
"""The origin of the web app that the tests' gateway allows."""


def preflight(http: httpx.Client, path: str, origin: str, **headers: str) -> httpx.Response:
    return http.options(path, headers={"Origin": origin, **headers})


# -- CORS --------------------------------------------------------------------------------------


def test_preflight_answers(dsn: str) -> None:
    app = create_app(dsn, jwt_secret=SECRET, cors_origins=[APP, "https://*.example.org"])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        ok = preflight(
            http,
            "/publish/orders",
            APP,
            **{
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert ok.status_code == 204, ok.text
        assert ok.headers["access-control-allow-origin"] == APP
        assert ok.headers["access-control-allow-methods"] == "POST, OPTIONS"
        allowed = {h.strip() for h in ok.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert int(ok.headers["access-control-max-age"]) > 0
        assert "Origin" in ok.headers["vary"]

        stream = preflight(
            http,
            "/sse",
            "https://shop.example.org",
            **{
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
        assert stream.status_code == 204, stream.text
        assert stream.headers["access-control-allow-origin"] == "https://shop.example.org"
        assert stream.headers["access-control-allow-methods"] == "GET, OPTIONS"

        other = preflight(
            http,
            "/publish/orders",
            "https://evil.test",
            **{"Access-Control-Request-Method": "POST"},
        )
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers
        assert "--cors-origin https://evil.test" in other.json()["error"]
        # A pattern covers the hosts under it, not a look-alike suffix.
        assert preflight(http, "/sse", "https://example.org.evil.test").status_code == 403
        assert preflight(http, "/sse", "null").status_code == 403  # sandboxed: never by pattern

        wrong_method = preflight(
            http, "/publish/orders", APP, **{"Access-Control-Request-Method": "DELETE"}
        )
        assert wrong_method.status_code == 405
        unknown_header = preflight(
            http,
            "/publish/orders",
            APP,
            **{"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-evil"},
        )
        assert unknown_header.status_code == 403
        assert "x-evil" in unknown_header.json()["error"]


def test_cross_origin_requests_carry_cors_headers_and_others_are_refused(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    app = create_app(dsn, jwt_secret=SECRET, allow_anonymous=["news"], cors_origins=[APP])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        writer = {"Authorization": "Bearer " + token(["news"], "rw"), "Origin": APP}
        with sse(base, "news", headers={"Origin": APP}) as s:
            assert s.response.headers["access-control-allow-origin"] == APP
            s.ready()
            published = http.post("/publish/news", json={"n": 1}, headers=writer)
            assert published.status_code == 200, published.text
            assert published.headers["access-control-allow-origin"] == APP
            assert s.next() == {"event": "news", "data": '{"n":1}'}
        # A refusal's reason is readable by the page: the CORS headers are on errors too.
        refused = http.post("/publish/news", json=1, headers={"Origin": APP})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == APP
        bad = http.get("/sse", params={"channel": "news", "filter": "x"}, headers={"Origin": APP})
        assert bad.status_code == 400
        assert bad.headers["access-control-allow-origin"] == APP

        evil = {"Origin": "https://evil.test"}
        assert http.get("/sse", params={"channel": "news"}, headers=evil).status_code == 403
        stolen = http.post("/publish/news", json=1, headers=writer | evil)
        assert stolen.status_code == 403
        assert "https://evil.test" in stolen.json()["error"]


def test_no_cors_origin_refuses_other_origins_and_serves_its_own(dsn: str) -> None:
    app = create_app(dsn, allow_anonymous=["news"])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        own = base  # the origin of the page the gateway serves itself
        assert preflight(http, "/publish/news", APP).status_code == 403
        assert (
            http.get("/sse", params={"channel": "news"}, headers={"Origin": APP}).status_code == 403
        )
        with sse(base, "news", headers={"Origin": own}) as s:
            s.ready()  # same origin: served
            assert "access-control-allow-origin" not in s.response.headers
        with sse(base, "news") as s:
            s.ready()  # no Origin (not a browser): served


def test_origin_is_checked_on_websocket_handshakes(dsn: str) -> None:
    url_for = lambda base: base.replace("http", "ws") + "/ws?token=" + token(["chat.*"])  # noqa: E731
    for origins in ([], [APP]):
        app = create_app(dsn, jwt_secret=SECRET, cors_origins=origins)
        with serve(app) as base:
            url = url_for(base)
            with pytest.raises(InvalidStatus) as denied:
                ws_connect(url, origin="https://evil.test").close()  # type: ignore[arg-type]
            assert denied.value.response.status_code == 403
            assert b"https://evil.test" in denied.value.response.body
            for origin in (base, None):  # its own page; not a browser
                with ws_connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                    ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a"]}))
                    assert json.loads(ws.recv(5))["type"] == "subscribed"
            if origins:
                with ws_connect(url, origin=APP) as ws:  # type: ignore[arg-type]
                    ws.send(json.dumps({"type": "subscribe", "channels": ["chat.a"]}))
                    assert json.loads(ws.recv(5))["type"] == "subscribed"
            else:
                with pytest.raises(InvalidStatus) as denied:
                    ws_connect(url, origin=APP).close()  # type: ignore[arg-type]
                assert denied.value.response.status_code == 403


# -- wildcards ---------------------------------------------------------------------------------


def test_wildcard_subscriptions_match_known_channels(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, status text)")
    pgherald.install(conn)
    pgherald.add_table_trigger(conn, "items")  # notifies on public.items
    app = create_app(
        dsn,
        jwt_secret=SECRET,
        allow_anonymous=["shop.*", "public.*"],
        channels=["shop.orders", "shop.refunds", "other.thing"],
    )
    hub = hub_of(app)
    with serve(app) as base, sse(base, "shop.*", "public.*") as s:
        s.ready()
        announced = s.next()
        assert announced is not None
        assert announced["event"] == "subscribed"
        assert json.loads(announced["data"])["channels"] == [
            "public.items",
            "shop.orders",
            "shop.refunds",
        ]
        assert {"shop.orders", "shop.refunds", "public.items"} <= hub.listening
        assert "shop.*" not in hub.listening  # never LISTENed to literally
        pgherald.notify(conn, "other.thing", "not matched")
        pgherald.notify(conn, "shop.orders", {"n": 1})
        conn.execute("INSERT INTO items VALUES (1, 'new')")
        pgherald.notify(conn, "shop.refunds", {"n": 2})
        assert s.next() == {"event": "shop.orders", "data": '{"n":1}'}
        change = s.next()
        assert change is not None
        assert change["event"] == "public.items"
        assert json.loads(change["data"])["new"] == {"id": 1, "status": "new"}
        assert s.next() == {"event": "shop.refunds", "data": '{"n":2}'}

        # A channel new to the gateway joins the pattern once someone names it ...
        with sse(base, "shop.returns") as named:
            named.ready()
            assert s.next() == {
                "event": "subscribed",
                "data": '{"channels":["shop.returns"],"pattern":"shop.*"}',
            }
            pgherald.notify(conn, "shop.returns", "r")
            assert named.next() == {"event": "shop.returns", "data": "r"}
            assert s.next() == {"event": "shop.returns", "data": "r"}
        # ... or publishes to it through the gateway (listening before it is sent).
        with httpx.Client(base_url=base, timeout=5.0) as http:
            writer = {"Authorization": "Bearer " + token(["shop.*"], "w")}
            assert http.post("/publish/shop.gifts", json=7, headers=writer).status_code == 200
        assert json.loads(s.next()["data"])["channels"] == ["shop.gifts"]  # type: ignore[index]
        assert s.next() == {"event": "shop.gifts", "data": "7"}


def test_wildcards_are_matched_like_token_claims(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, jwt_secret=SECRET, channels=["chat.a", "chat.b", "chat.secret"])
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        narrow = token(["chat.a"])
        refused = http.get("/sse", params={"channel": "chat.*", "token": narrow})
        assert refused.status_code == 403  # the pattern reaches past the token's claims
        url = base.replace("http", "ws") + "/ws?token=" + token(["chat.[ab]*"])
        with ws_connect(url) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["chat.[ab]*"]}))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["chat.[ab]*"]}
            for ch in ("chat.secret", "chat.a", "chat.b"):
                pgherald.notify(conn, ch, ch)
            got = [json.loads(ws.recv(5))["channel"] for _ in range(2)]
            assert got == ["chat.a", "chat.b"]
            ws.send(json.dumps({"type": "unsubscribe", "channels": ["chat.[ab]*"]}))
            assert json.loads(ws.recv(5))["type"] == "unsubscribed"
            ws.send(json.dumps({"type": "subscribe", "channels": ["chat.b"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            pgherald.notify(conn, "chat.a", "gone")
            pgherald.notify(conn, "chat.b", "kept")
            assert json.loads(ws.recv(5))["payload"] == "kept"


# -- filters -----------------------------------------------------------------------------------

PAYLOADS = [
    {"n": 1, "status": "paid", "amount": 50, "flag": True, "gone": None},
    {"n": 2, "status": "pending", "amount": 150, "flag": False},
    {"n": 3, "status": "paid", "amount": 100.0, "kind": "a,b"},
    {"n": 4, "status": "refunded", "amount": "much"},
    [1, 2],
    "plain text",
]

CASES = {
    "status=eq.paid": [1, 3],
    "status=neq.paid": [2, 4],
    "amount=gt.100": [2],
    "amount=gte.100": [2, 3],
    "amount=lt.100": [1],
    "amount=lte.100": [1, 3],
    'kind=in.(x,"a,b")': [3],
    "status=in.(pending,refunded)": [2, 4],
    "gone=is.null": [1, 2, 3, 4],  # (a field absent is null too; non-objects have none)
    "flag=is.true": [1],
    "flag=is.false": [2],
    "status=not.eq.paid": [2, 4],
    "amount=eq.100": [3],  # numbers compare as numbers: 100.0 == 100
}


def test_each_filter_operator(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, jwt_secret=SECRET)
    cases = list(CASES.items())
    with serve(app) as base:
        url = base.replace("http", "ws") + "/ws?token=" + token(["f.*"])
        with ws_connect(url) as ws:
            for i, (text, _) in enumerate(cases):
                ws.send(json.dumps({"type": "subscribe", "channels": [f"f.{i}"], "filter": text}))
                assert json.loads(ws.recv(5))["type"] == "subscribed", text
            ws.send(json.dumps({"type": "subscribe", "channels": ["f.end"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            for i in range(len(cases)):
                for payload in PAYLOADS:
                    pgherald.notify(conn, f"f.{i}", payload)
            pgherald.notify(conn, "f.end", "end")
            got: dict[str, list[int]] = {text: [] for text, _ in cases}
            while (msg := json.loads(ws.recv(5)))["channel"] != "f.end":
                got[cases[int(msg["channel"][2:])][0]].append(msg["payload"]["n"])
    assert got == CASES


def test_sse_filter_and_invalid_filters(dsn: str, conn: psycopg.Connection[Any]) -> None:
    app = create_app(dsn, allow_anonymous=["orders"])
    with serve(app) as base:
        with sse(base, "orders", params={"filter": "status=eq.paid"}) as s:
            s.ready()
            for payload in PAYLOADS:
                pgherald.notify(conn, "orders", payload)
            assert json.loads(s.next()["data"])["n"] == 1  # type: ignore[index]
            assert json.loads(s.next()["data"])["n"] == 3  # type: ignore[index]
        with httpx.Client(base_url=base, timeout=5.0) as http:
            for bad, says in [
                ("status", "FIELD=OP.VALUE"),
                ("status=like.paid", "one of eq, neq"),
                ("deleted=is.maybe", "null, true or false"),
                ("kind=in.a,b", "parentheses"),
            ]:
                answer = http.get("/sse", params={"channel": "orders", "filter": bad})
                assert answer.status_code == 400, bad
                assert says in answer.json()["error"], answer.json()
        url = base.replace("http", "ws") + "/ws"
        with ws_connect(url) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "filter": "a=b"}))
            error = json.loads(ws.recv(5))
            assert error["type"] == "error"
            assert "a=b" in error["message"]


def test_parse_filters_refuses_what_it_cannot_read() -> None:
    assert parse_filters([]) is None
    with pytest.raises(FilterError, match="quote is not closed"):
        parse_filters(['k=in.("a,b)'])
    with pytest.raises(FilterError, match="at most"):
        parse_filters(["a=eq.1"] * 21)
    both = parse_filters(["status=eq.paid", "amount=gt.10"])
    assert both is not None
    assert both({"status": "paid", "amount": 11})
    assert not both({"status": "paid", "amount": 10})


# -- gaps --------------------------------------------------------------------------------------


def _kill(conn: psycopg.Connection[Any], application_name: str) -> None:
    killed = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s",
        (application_name,),
    ).fetchone()
    assert killed == (1,)


def test_gap_on_sse_and_ws_when_the_listener_reconnects(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    app = create_app(dsn, allow_anonymous=["news", "orders"], durable_channels=["orders"])
    with serve(app) as base:
        url = base.replace("http", "ws") + "/ws"
        with (
            sse(base, "news") as s,
            sse(base, "orders") as durable_only,
            ws_connect(url) as ws,
        ):
            s.ready()
            durable_only.ready()
            ws.send(json.dumps({"type": "subscribe", "channels": ["news"]}))
            assert json.loads(ws.recv(5))["type"] == "subscribed"
            _kill(conn, "pgherald-gateway")
            gap = s.next()
            assert gap is not None
            assert gap["event"] == "gap", gap
            fields = json.loads(gap["data"])
            assert fields["reason"] == "reconnect"
            assert fields["channels"] == ["news"]
            assert fields["started"] <= fields["ended"]
            message = json.loads(ws.recv(10))
            assert message["type"] == "gap"
            assert message["reason"] == "reconnect"
            assert message["channels"] == ["news"]
            # Listening again: events flow after the gap.
            pgherald.notify(conn, "news", "again")
            assert s.next() == {"event": "news", "data": "again"}
            assert json.loads(ws.recv(5))["payload"] == "again"
            # The durable-only stream misses nothing (it reads the log): no gap there.
            event = pgherald.publish(conn, "orders", {"n": 1})
            assert durable_only.next() == {"event": "orders", "id": str(event), "data": '{"n": 1}'}
    assert (
        'pgherald_gateway_gaps_total{reason="reconnect"} 1.0'
        in hub_of(app).metrics.render().decode()
    )


def test_gap_while_the_change_triggers_queue_guard_skips_notifications(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    # The guard's threshold at 0: every change trigger skips (the queue is at 0 at least);
    # the gateway's sessions read the same setting, as the writers' do.
    database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    set_guard = "ALTER DATABASE {} SET pgherald.change_max_queue_usage = {}"
    conn.execute(
        psycopg.sql.SQL(set_guard).format(psycopg.sql.Identifier(database), psycopg.sql.Literal(0))
    )
    app = create_app(dsn, allow_anonymous=["public.*"], queue_check_interval=0.05)
    with serve(app) as base, sse(base, "public.items") as s:
        s.ready()
        gap = s.next()
        assert gap is not None
        assert gap["event"] == "gap", gap
        fields = json.loads(gap["data"])
        assert fields["reason"] == "queue_guard"
        assert fields["ended"] is None  # still skipping
        conn.execute(
            psycopg.sql.SQL(set_guard).format(
                psycopg.sql.Identifier(database), psycopg.sql.Literal(0.9)
            )
        )
        _kill(conn, "pgherald-gateway-db")  # its next session reads the new setting
        end = s.next()
        assert end is not None
        assert end["event"] == "gap", end
        ended = json.loads(end["data"])
        assert ended["reason"] == "queue_guard"
        assert ended["started"] == fields["started"]
        assert ended["ended"] is not None
        assert ended["ended"] >= ended["started"]


def test_channels_lists_what_the_caller_may_read(dsn: str) -> None:
    app = create_app(
        dsn,
        jwt_secret=SECRET,
        allow_anonymous=["public.*"],
        channels=["public.news", "private.x"],
        cors_origins=[APP],
    )
    with serve(app) as base, httpx.Client(base_url=base, timeout=5.0) as http:
        anonymous = http.get("/channels", headers={"Origin": APP})
        assert anonymous.headers["access-control-allow-origin"] == APP
        assert anonymous.json() == {
            "read": ["public.*"],
            "write": [],
            "durable": [],
            "channels": ["public.news"],
        }
        mine = http.get("/channels", params={"token": token(["private.*"], "rw")}).json()
        assert mine["write"] == ["private.*"]
        assert mine["channels"] == ["private.x", "public.news"]
        assert http.get("/channels", params={"token": "bad"}).status_code == 401


def test_a_pattern_and_a_filter_on_a_durable_resume(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    first = pgherald.publish(conn, "orders", {"status": "paid", "n": 0})
    ids = [
        pgherald.publish(conn, "orders", {"status": s, "n": i})
        for i, s in enumerate(["paid", "void", "paid"], 1)
    ]
    app = create_app(dsn, allow_anonymous=["ord*"], durable_channels=["orders"])
    with serve(app) as base:
        params = {"filter": "status=eq.paid", "last_event_id": str(first)}
        with sse(base, "ord*", params=params) as s:
            s.ready()
            announced = s.next()
            assert announced == {"event": "subscribed", "data": '{"channels":["orders"]}'}
            # From the log: after the resume point, filtered; the pattern reached the log too.
            assert s.next() == {
                "event": "orders",
                "id": str(ids[0]),
                "data": '{"n": 1, "status": "paid"}',
            }
            assert s.next() == {
                "event": "orders",
                "id": str(ids[2]),
                "data": '{"n": 3, "status": "paid"}',
            }
            live = [
                pgherald.publish(conn, "orders", {"status": s, "n": i})
                for i, s in [(4, "void"), (5, "paid")]
            ]
            assert s.next() == {
                "event": "orders",
                "id": str(live[1]),
                "data": '{"n": 5, "status": "paid"}',
            }


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cors-origin", "app.example.com"], "https://app.example.com"),
        (["--channel", "shop.*"], "is a pattern"),
    ],
)
def test_serve_refuses_bad_web_options_in_one_line(args: list[str], says: str) -> None:
    import subprocess

    done = subprocess.run(
        pgherald_cmd("serve", "--port", "1", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env("host=127.0.0.1 port=1"),  # never reached
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_same_origin_is_the_host_the_request_was_sent_to() -> None:
    from pgherald.contrib.gateway.cors import CorsPolicy, same_origin

    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://events.example.com", "events.example.com")  # TLS at a proxy
    assert same_origin("https://events.example.com", "events.example.com:443")
    assert same_origin("http://[::1]:8080", "[::1]:8080")
    assert not same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not same_origin("http://evil.test", "events.example.com")
    assert not same_origin("null", "events.example.com")
    assert not same_origin("http://127.0.0.1:8080", None)
    with pytest.raises(ValueError, match="no scheme"):
        CorsPolicy(["app.example.com"])
    anyone = CorsPolicy(["*"])
    assert anyone.allows("https://x.test")
    assert not anyone.allows("null")  # never by a pattern


@pytest.mark.anyio
async def test_the_hub_matches_patterns_filters_and_tells_gaps_on_any_runtime(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """The hub itself (asyncio and trio): a pattern with a filter, then a gap."""
    import anyio

    from pgherald.contrib.gateway.fanout import Hub
    from pgherald.contrib.gateway.frames import Frame

    hub = Hub(dsn, channels=["shop.orders", "news"])
    async with hub.running(), anyio.create_task_group() as tg:
        client = hub.new_client("ws")
        got: list[str] = []
        more = anyio.Event()

        async def write(frames: list[Frame]) -> None:
            got.extend(f.ws for f in frames)
            more.set()

        async def next_message() -> Any:
            nonlocal more
            with anyio.fail_after(10):
                while not got:
                    await more.wait()
                    more = anyio.Event()
            return json.loads(got.pop(0))

        tg.start_soon(client.pump, write)
        await hub.add(client, ["shop.*"], parse_filters(["status=eq.paid"]))
        assert "shop.orders" in hub.listening
        assert "news" not in hub.listening  # known, but matched by no pattern
        await anyio.to_thread.run_sync(pgherald.notify, conn, "shop.orders", {"status": "new"})
        await anyio.to_thread.run_sync(pgherald.notify, conn, "shop.orders", {"status": "paid"})
        event = await next_message()
        assert event == {"type": "event", "channel": "shop.orders", "payload": {"status": "paid"}}
        await anyio.to_thread.run_sync(_kill, conn, "pgherald-gateway")
        gap = await next_message()
        assert gap["type"] == "gap"
        assert gap["reason"] == "reconnect"
        assert gap["channels"] == ["shop.orders", "shop.*"]
        client.end("bye")
