"""The pgoutput decoder on hand-made messages (no server)."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from pgherald._protocol.pgoutput import (
    Begin,
    ChangeEvent,
    Commit,
    DecodeError,
    Decoder,
    converter,
    decode_key,
    dumps_value,
    lsn_to_int,
    lsn_to_str,
    parse_array,
    pg_micros,
    pg_time,
)

WHEN = datetime(2026, 11, 25, 8, 0, 0, 123000, tzinfo=timezone.utc)


def relation(
    oid: int, schema: str, table: str, identity: str, cols: list[tuple[str, int, bool]]
) -> bytes:
    out = b"R" + struct.pack(">I", oid) + schema.encode() + b"\0" + table.encode() + b"\0"
    out += identity.encode() + struct.pack(">H", len(cols))
    for name, type_oid, key in cols:
        out += bytes([1 if key else 0]) + name.encode() + b"\0" + struct.pack(">Ii", type_oid, -1)
    return out


def tup(*values: bytes | str | None) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "u":
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack(">I", len(v)) + v
    return out


def begin(lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", lsn, pg_micros(WHEN), xid)


def commit(lsn: int, end: int) -> bytes:
    return b"C\0" + struct.pack(">QQq", lsn, end, pg_micros(WHEN))


COLS = [("id", 23, True), ("n", 1700, False), ("tags", 1009, False), ("at", 1184, False)]


@pytest.fixture
def dec() -> Decoder:
    d = Decoder()
    list(d.decode(relation(16400, "public", "orders", "d", COLS)))
    (b,) = d.decode(begin(0x1_0000_0010, 742))
    assert b == Begin(0x1_0000_0010, WHEN, 742)
    return d


def test_lsn_text_round_trip() -> None:
    assert lsn_to_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_to_str(lsn_to_int("16/B374D848")) == "16/B374D848"
    assert lsn_to_str(0) == "0/0"


def test_protocol_time() -> None:
    assert pg_time(pg_micros(WHEN)) == WHEN
    assert pg_time(0) == datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_insert(dec: Decoder) -> None:
    msg = b"I" + struct.pack(">I", 16400) + b"N"
    msg += tup(b"7", b"1.10", b'{a,"b c",NULL}', b"2026-11-25 08:00:00.123+00")
    (e,) = dec.decode(msg)
    assert e == ChangeEvent(
        "INSERT",
        "public",
        "orders",
        {
            "id": 7,
            "n": Decimal("1.10"),
            "tags": ["a", "b c", None],
            "at": "2026-11-25T08:00:00.123+00:00",
        },
        None,
        None,
        "7",
        "1/10",
        742,
        WHEN,
    )


def test_update_with_key_change_and_delete(dec: Decoder) -> None:
    msg = b"U" + struct.pack(">I", 16400) + b"K" + tup(b"7", None, None, None)
    msg += b"N" + tup(b"8", None, "u", None)
    (e,) = dec.decode(msg)
    assert e.op == "UPDATE"
    assert e.old == {"id": 7}
    assert e.key == "8"
    assert e.new == {"id": 8, "n": None, "at": None}  # the unchanged TOAST value is absent
    assert e.changed is None
    (d,) = dec.decode(b"D" + struct.pack(">I", 16400) + b"K" + tup(b"8", None, None, None))
    assert d.op == "DELETE"
    assert d.old == {"id": 8}
    assert d.new is None
    assert d.key == "8"


def test_update_full_identity_fills_toast_and_diffs() -> None:
    d = Decoder({1: ("id",)})
    list(
        d.decode(
            relation(
                1, "public", "orders", "f", [("id", 23, True), ("body", 25, True), ("q", 23, True)]
            )
        )
    )
    list(d.decode(begin(5, 1)))
    msg = (
        b"U" + struct.pack(">I", 1) + b"O" + tup(b"1", b"long", b"2") + b"N" + tup(b"1", "u", b"3")
    )
    (e,) = d.decode(msg)
    assert e.new == {"id": 1, "body": "long", "q": 3}
    assert e.changed == ["q"]
    assert e.key == "1"


def test_truncate_and_commit(dec: Decoder) -> None:
    list(dec.decode(relation(16401, "s", "other", "d", [("id", 23, True)])))
    events = list(dec.decode(b"T" + struct.pack(">IB", 2, 0) + struct.pack(">II", 16400, 16401)))
    assert [(e.op, e.table, e.key) for e in events] == [
        ("TRUNCATE", "orders", None),
        ("TRUNCATE", "other", None),
    ]
    (c,) = dec.decode(commit(0x1_0000_0010, 0x1_0000_0040))
    assert c == Commit(0x1_0000_0010, 0x1_0000_0040, WHEN)
    assert dec.begin is None


def test_relation_replaced_mid_stream(dec: Decoder) -> None:
    list(dec.decode(relation(16400, "public", "orders", "d", [*COLS, ("extra", 16, False)])))
    msg = b"I" + struct.pack(">I", 16400) + b"N" + tup(b"1", None, None, None, b"t")
    (e,) = dec.decode(msg)
    assert e.new is not None
    assert e.new["extra"] is True


def test_unknown_relation_and_message() -> None:
    d = Decoder()
    list(d.decode(begin(1, 1)))
    with pytest.raises(DecodeError, match="before its Relation"):
        list(d.decode(b"I" + struct.pack(">I", 99) + b"N" + tup(b"1")))
    with pytest.raises(DecodeError, match="unknown"):
        list(d.decode(b"Z"))
    assert list(d.decode(b"Y" + struct.pack(">I", 5) + b"public\0mood\0")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ("{1,2,NULL}", ["1", "2", None]),
        ('{"NULL",NULL," x "}', ["NULL", None, " x "]),
        ('{"a\\"b","c\\\\d"}', ['a"b', "c\\d"]),
        ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("[0:1]={5,6}", ["5", "6"]),
    ],
)
def test_parse_array(text: str, expected: list[object]) -> None:
    assert parse_array(text, bytes.decode) == expected


def test_dumps_value_keeps_numeric_digits() -> None:
    value = {"n": Decimal("12345678901234567890.000000001"), "f": 1.5, "s": "\\u0000n1\\u0000"}
    text = dumps_value(value)
    assert text == '{"n":12345678901234567890.000000001,"f":1.5,"s":"\\\\u0000n1\\\\u0000"}'
    assert json.loads(text, parse_float=Decimal)["n"] == value["n"]
    assert json.loads(dumps_value({"n": Decimal("NaN"), "f": float("inf")})) == {
        "n": "NaN",
        "f": "Infinity",
    }


def test_publication_statements_quote_every_name() -> None:
    from pgherald._protocol.replication import publication_statements

    assert publication_statements("pub", False, []) == []
    assert publication_statements("pub", False, [("sales", "Line Items")]) == [
        'CREATE PUBLICATION "pub" FOR TABLE "sales"."Line Items"'
    ]
    assert publication_statements("pub", True, [("public", "t")], ("id", "Name")) == [
        'ALTER PUBLICATION "pub" ADD TABLE "public"."t" ("id", "Name")'
    ]


@pytest.mark.parametrize("name", ["", "Upper", "a-b", "x" * 64, "a b", "é"])
def test_slot_names_are_checked(name: str) -> None:
    from pgherald import UsageError
    from pgherald._protocol.replication import check_name

    with pytest.raises(UsageError, match="invalid slot name"):
        check_name(name, "slot")


@pytest.mark.parametrize(
    ("text", "value", "key"),
    [
        # to_jsonb reads a float's text as a numeric: whole numbers exactly, as ints.
        (b"1e+20", 10**20, "100000000000000000000"),
        (b"1.2345678901234568e+20", 123456789012345680000, "123456789012345680000"),
        (b"3.4028235e+38", 340282350000000000000000000000000000000, None),  # real's max, exact
        (b"3", 3, "3"),
        (b"-0", 0, "0"),
        (b"0.1", 0.1, "0.1"),
        (b"1.5e-10", 1.5e-10, "0.00000000015"),
        (b"1e-05", 1e-05, "0.00001"),
        # Not JSON numbers: to_jsonb's strings; ->> gives them bare.
        (b"NaN", "NaN", "NaN"),
        (b"Infinity", "Infinity", "Infinity"),
        (b"-Infinity", "-Infinity", "-Infinity"),
    ],
)
def test_floats_as_to_jsonb_renders_them(text: bytes, value: object, key: str | None) -> None:
    for oid in (700, 701):
        got = converter(oid)(text)
        assert got == value
        assert type(got) is type(value)
    if key is not None:
        assert decode_key({"k": value}, ("k",)) == key
        assert dumps_value([value]) == f"[{json.dumps(key) if isinstance(value, str) else key}]"


def test_numeric_keys_and_json_have_no_exponent_and_nan_is_a_string() -> None:
    assert converter(1700)(b"NaN") == "NaN"
    assert converter(1700)(b"-Infinity") == "-Infinity"
    assert converter(1700)(b"0.00000001") == Decimal("0.00000001")
    assert decode_key({"k": Decimal("0.00000001")}, ("k",)) == "0.00000001"  # not 1E-8
    assert decode_key({"k": "NaN"}, ("k",)) == "NaN"  # as ->> writes it, unquoted
    assert dumps_value({"n": Decimal("0.00000001")}) == '{"n":0.00000001}'
    assert decode_key({"a": 1.5e-10, "b": Decimal("1E-8"), "c": "NaN"}, ("a", "b", "c")) == (
        '[0.00000000015, 0.00000001, "NaN"]'
    )
    # A float NaN beside an exact numeric: the numeric keeps its digits.
    value = {"n": Decimal("1.000000000000000001"), "f": float("nan")}
    assert dumps_value(value) == '{"n":1.000000000000000001,"f":"NaN"}'


def test_begin_widens_the_32_bit_xid_to_the_64_bit_one_across_the_wrap() -> None:
    # The server's next id was 2**32 - 5 (epoch 0) when the stream started: a transaction
    # decoded from before it stays in epoch 0, one after the 32-bit counter wrapped is in
    # epoch 1, and one older than that (still within 2**31) goes back to epoch 0.
    d = Decoder(next_xid=2**32 - 5)
    ids = [b.xid for x in (2**32 - 900, 2**32 - 1, 3, 2**31 + 10) for b in d.decode(begin(1, x))]
    assert ids == [2**32 - 900, 2**32 - 1, 2**32 + 3, 2**31 + 10]
    # Epoch 7, well inside it.
    d = Decoder(next_xid=(7 << 32) + 1000)
    (b,) = d.decode(begin(1, 990))
    assert b.xid == (7 << 32) + 990
    (b,) = d.decode(begin(1, 2**32 - 3))  # before the wrap into epoch 7
    assert b.xid == (7 << 32) - 3
    # Without next_xid (0), the stream's 32 bits as they come.
    (b,) = Decoder().decode(begin(1, 2**32 - 3))
    assert b.xid == 2**32 - 3
