"""The pure parts: channel rules, payload encoding, backoff, routing. No I/O."""

from __future__ import annotations

import random

import pytest

import pgherald
from pgherald._protocol.backoff import backoff_delay
from pgherald._protocol.channels import check_channel, listen_query, unlisten_query
from pgherald._protocol.payload import encode_payload
from pgherald._protocol.routing import HandlerRegistry


@pytest.mark.parametrize(
    ("channel", "sql"),
    [
        ("orders", b'LISTEN "orders"'),
        ("MyChan", b'LISTEN "MyChan"'),
        ('we"ird', b'LISTEN "we""ird"'),
        ("a;DROP TABLE x", b'LISTEN "a;DROP TABLE x"'),
        ("ünïcode", 'LISTEN "ünïcode"'.encode()),
    ],
)
def test_listen_is_always_quoted(channel: str, sql: bytes) -> None:
    assert listen_query(check_channel(channel)) == sql
    assert unlisten_query(channel) == b"UN" + sql


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "empty"),
        ("x" * 64, "64 bytes"),
        ("é" * 32, "64 bytes"),  # 32 characters, 64 bytes: the limit is in bytes
        ("a\x00b", "NUL"),
        (42, "must be a str"),
    ],
)
def test_bad_channels_are_refused_with_the_fix(bad: object, message: str) -> None:
    with pytest.raises(pgherald.InvalidChannel, match=message):
        check_channel(bad)


def test_63_bytes_is_the_longest_channel() -> None:
    assert check_channel("x" * 63) == "x" * 63
    assert check_channel("é" * 31 + "x") == "é" * 31 + "x"


def test_payload_encoding() -> None:
    assert encode_payload("as is") == "as is"
    assert encode_payload({"a": [1, "ü"]}) == '{"a":[1,"ü"]}'
    assert encode_payload(None) == "null"
    assert encode_payload([1], dumps=lambda v: "custom") == "custom"
    assert len(encode_payload("é" * 3999)) == 3999  # 7998 bytes: fits
    with pytest.raises(pgherald.PayloadTooLarge, match="8000 bytes"):
        encode_payload("é" * 4000)
    with pytest.raises(pgherald.PayloadNotSerializable, match="set"):
        encode_payload({1, 2})


def test_notification_json() -> None:
    n = pgherald.Notification("c", '{"a": 1}', 42)
    assert n.json() == {"a": 1}
    assert n.json(loads=lambda s: "mine") == "mine"
    with pytest.raises(pgherald.PayloadNotJSON, match=r"'c'.*read .payload"):
        pgherald.Notification("c", "plain", 1).json()


def test_backoff_grows_with_jitter_and_caps() -> None:
    rand = random.Random(1)
    delays = [backoff_delay(a, initial=0.1, cap=5.0, rand=rand) for a in range(1, 12)]
    for attempt, d in enumerate(delays, start=1):
        base = min(5.0, 0.1 * 2 ** (attempt - 1))
        assert base / 2 <= d <= base
    assert max(delays) <= 5.0
    assert len(set(delays)) == len(delays)  # jitter: no two the same


def test_routing_merges_specific_and_catch_all() -> None:
    reg = HandlerRegistry(allow_async=True)

    def a(n: object) -> None: ...
    def b(n: object) -> None: ...
    async def c(n: object) -> None: ...

    reg.add("x", a)
    reg.add(None, b)
    reg.add("x", c)
    assert reg.lookup("x") == ((a, False), (c, True), (b, False))
    assert reg.lookup("y") == ((b, False),)
    reg.remove("x", a)
    assert reg.lookup("x") == ((c, True), (b, False))
    assert reg.channels() == ["x"]


def test_sync_registry_refuses_async_handlers() -> None:
    async def c(n: object) -> None: ...

    with pytest.raises(pgherald.UsageError, match="AsyncListener"):
        HandlerRegistry(allow_async=False).add("x", c)


def test_errors_have_one_root_and_default_messages() -> None:
    for name in pgherald.errors.__all__:
        cls = getattr(pgherald.errors, name)
        assert issubclass(cls, pgherald.HeraldError)
        assert str(cls()), f"{name} has no default message"
