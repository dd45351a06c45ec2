"""
Decoding PostgreSQL's built-in ``pgoutput`` logical decoding messages (protocol version 1).

Pure: bytes in, `ChangeEvent` values out. Values come in pgoutput's text format and are
converted the way ``to_jsonb`` renders them (the trigger events' shape): integers as numbers,
``real`` and ``double precision`` as ``to_jsonb`` writes them (a whole number as `int`, others as
`float`, NaN and the infinities as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``),
``numeric`` as `decimal.Decimal` (exact; NaN and the infinities as those strings), booleans,
``json``/``jsonb`` parsed, arrays as lists, timestamps as ISO 8601 text
(``2026-11-25T08:00:00.123+00:00``), ``bytea`` as ``\\x...`` text, everything else as its text.
See docs/cdc.md.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

# -- LSNs --


def lsn_to_int(text: str) -> int:
    """``'16/B374D848'`` -> an integer (PostgreSQL's pg_lsn text form)."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_to_str(lsn: int) -> str:
    """An integer LSN as PostgreSQL writes it, ``'16/B374D848'``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)  # PostgreSQL's timestamps count from here


def pg_time(micros: int) -> datetime:
    """Microseconds since 2000-01-01 UTC (the protocol's timestamps) as an aware datetime."""
    return _EPOCH + timedelta(microseconds=micros)


def pg_micros(when: datetime) -> int:
    """An aware datetime as the protocol's microseconds since 2000-01-01 UTC."""
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


# -- the events --


class ChangeEvent(NamedTuple):
    """
    One row change (or one table's TRUNCATE, or one row of a backfill) read from the WAL.

    The fields of a trigger event, plus where the change is in the WAL.

    .. versionadded:: 0.1
    """

    op: str
    """``INSERT``, ``UPDATE``, ``DELETE``, ``TRUNCATE``, or ``READ`` (a row of the backfill)."""
    schema: str
    table: str
    new: dict[str, Any] | None
    """The row after the change (INSERT, UPDATE, READ); None for DELETE and TRUNCATE. A
    TOASTed value an UPDATE left unchanged is absent unless the old row has it (REPLICA
    IDENTITY FULL)."""
    old: dict[str, Any] | None
    """The row before: all columns with REPLICA IDENTITY FULL; the key columns for a DELETE, or
    an UPDATE that changed the key, with the default identity; else None."""
    changed: list[str] | None
    """UPDATE: the columns whose value changed, when the old row is known (REPLICA IDENTITY
    FULL); else None."""
    key: str | None
    """The primary key as text, as a trigger event's key: one column: its value as text;
    several: the JSON array of their values. None for TRUNCATE and tables without one."""
    lsn: str
    """The commit LSN of the transaction (``'0/1517350'``); for READ, the slot's start."""
    xid: int
    """The transaction id, 64 bits (with its epoch), as ``pg_current_xact_id()`` gives it in
    the writing transaction and a trigger event's ``tx`` holds it (0 for READ events)."""
    commit_time: datetime
    """When the transaction committed (READ: when the snapshot was taken)."""

    def as_dict(self) -> dict[str, Any]:
        """The event as a trigger event's JSON object, plus ``lsn``."""
        return {
            "op": self.op,
            "schema": self.schema,
            "table": self.table,
            "new": self.new,
            "old": self.old,
            "changed": self.changed,
            "tx": str(self.xid),
            "ts": self.commit_time.isoformat(),
            "lsn": self.lsn,
        }


class Begin(NamedTuple):
    final_lsn: int
    commit_time: datetime
    xid: int


class Commit(NamedTuple):
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


# -- values --

Converter = Callable[[bytes], Any]


_text: Converter = bytes.decode  # no Python frame: most columns are text


def _bool(raw: bytes) -> Any:
    return raw == b"t"


_NOT_NUMBERS = {b"NaN": "NaN", b"Infinity": "Infinity", b"-Infinity": "-Infinity"}


def _float(raw: bytes) -> Any:
    """
    A ``real`` or ``double precision`` as ``to_jsonb`` renders it: its text read as a
    ``numeric`` (``1e+20`` is 100000000000000000000, ``-0`` is 0), so a whole number is an
    `int`, exactly, and any other a `float` (the same double: PostgreSQL writes the shortest text
    that reads back as it); NaN and the infinities, not JSON numbers, as to_jsonb's strings.
    """
    try:
        return int(raw)  # '3', '-0': the usual whole numbers, without a Decimal
    except ValueError:
        pass
    if b"e" in raw:  # 1e+20, 1.5e-10: whole or not, as numeric_in reads it
        exact = Decimal(raw.decode())
        if exact == exact.to_integral_value():
            return int(exact)
        return float(raw)
    word = _NOT_NUMBERS.get(raw)
    return float(raw) if word is None else word


def _numeric(raw: bytes) -> Any:
    word = _NOT_NUMBERS.get(raw)
    return Decimal(raw.decode()) if word is None else word  # NaN, ±Infinity: to_jsonb's strings


def _timestamp(raw: bytes) -> Any:
    # '2026-11-25 08:00:00.123+00' -> '2026-11-25T08:00:00.123+00:00', as to_jsonb writes it.
    s = raw.decode()
    if len(s) > 10 and s[10] == " ":
        s = s[:10] + "T" + s[11:]
        if len(s) > 3 and s[-3] in "+-" and s[-2:].isdigit():
            s += ":00"
    return s


def _time(raw: bytes) -> Any:
    s = raw.decode()
    if len(s) > 3 and s[-3] in "+-" and s[-2:].isdigit():
        s += ":00"
    return s


_SCALARS: dict[int, Converter] = {
    16: _bool,
    20: int,
    21: int,
    23: int,
    26: int,
    700: _float,
    701: _float,
    1700: _numeric,
    114: json.loads,
    3802: json.loads,
    1114: _timestamp,
    1184: _timestamp,
    1266: _time,
}

# Array type OID -> element type OID (the built-in ones; others come through as text).
_ARRAYS: dict[int, int] = {
    1000: 16,
    1016: 20,
    1005: 21,
    1007: 23,
    1028: 26,
    1021: 700,
    1022: 701,
    1231: 1700,
    199: 114,
    3807: 3802,
    1115: 1114,
    1185: 1184,
    1270: 1266,
    1009: 25,
    1015: 1043,
    1014: 1042,
    1001: 17,
    2951: 2950,
    1182: 1082,
    1183: 1083,
    1187: 1186,
    1040: 829,
    1041: 869,
    651: 650,
    1019: 19,
}

_ARRAY_BOUNDS = re.compile(r"^(\[[-0-9:]+\])+=")


def parse_array(text: str, element: Converter) -> list[Any]:
    """A PostgreSQL array literal (``{1,2,NULL}``, nested, quoted) as nested lists."""
    m = _ARRAY_BOUNDS.match(text)
    if m:
        text = text[m.end() :]
    pos = 0
    n = len(text)

    def parse_level() -> list[Any]:
        nonlocal pos
        assert text[pos] == "{"
        pos += 1
        out: list[Any] = []
        if text[pos] == "}":
            pos += 1
            return out
        while True:
            c = text[pos]
            if c == "{":
                out.append(parse_level())
            elif c == '"':
                pos += 1
                buf = []
                while True:
                    c = text[pos]
                    if c == "\\":
                        buf.append(text[pos + 1])
                        pos += 2
                    elif c == '"':
                        pos += 1
                        break
                    else:
                        buf.append(c)
                        pos += 1
                out.append(element("".join(buf).encode()))
            else:
                start = pos
                while pos < n and text[pos] not in ",}":
                    pos += 1
                item = text[start:pos].strip()
                out.append(None if item == "NULL" else element(item.encode()))
            if text[pos] == ",":
                pos += 1
                continue
            pos += 1  # "}"
            return out

    return parse_level()


def converter(type_oid: int) -> Converter:
    """How a column's text value becomes the event's value."""
    scalar = _SCALARS.get(type_oid)
    if scalar is not None:
        return scalar
    element_oid = _ARRAYS.get(type_oid)
    if element_oid is not None:
        element = _SCALARS.get(element_oid, _text)
        return lambda raw: parse_array(raw.decode(), element)
    return _text


# -- relations --


@dataclass
class Relation:
    """A table as the last Relation message described it."""

    oid: int
    schema: str
    table: str
    identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: list[str]
    types: list[int]
    converters: list[Converter]
    key_columns: tuple[str, ...]
    """The primary key (from the catalog when known, else the replica identity's columns)."""
    key_index: tuple[int, ...] = field(default=())


def decode_key(values: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The key text of a row, as the trigger function writes it."""
    if not names:
        return None
    if len(names) == 1:
        value = values.get(names[0])
        if value is None:
            return None
        kind = type(value)
        if kind is str:
            return value  # type: ignore[no-any-return]
        if kind is int:
            return str(value)  # as ->> writes it; the common key, without a JSON encoder
        if kind is Decimal or kind is float:
            number = _jsonb_number(value)
            return number if isinstance(number, str) else _plain(number)
        return dumps_value(value)
    if any(n not in values for n in names):
        return None
    return jsonb_text([values[n] for n in names])


def _jsonb_number(value: float | Decimal) -> Decimal | str:
    """A float or Decimal as jsonb holds it: a numeric, or for NaN and the infinities a string."""
    if not isinstance(value, Decimal):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        value = Decimal(repr(value))  # the shortest text that reads back as it, as PostgreSQL's
        return Decimal(0) if value == 0 else value  # numeric has no -0
    if not value.is_finite():
        return "NaN" if value.is_nan() else ("Infinity" if value > 0 else "-Infinity")
    return value


def _plain(value: Decimal) -> str:
    """A finite Decimal as numeric_out writes it: no exponent (1E-8 is 0.00000001)."""
    return format(value, "f")


# -- JSON with exact numerics --

# PostgreSQL text never holds a NUL character, so a NUL-delimited marker cannot meet user data.
_NUM_MARK = re.compile(r'"\\u0000n(-?[0-9.eE+-]+)\\u0000"')


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        if value.is_finite():
            return f"\0n{_plain(value)}\0"  # numeric's digits, never an exponent
        return str(value)  # 'NaN', 'Infinity': to_jsonb writes them as strings
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _as_jsonb(value: Any) -> Any:
    """*value* with every float as jsonb holds it (a Decimal, or the string of NaN, Infinity)."""
    kind = type(value)
    if kind is float:
        return _jsonb_number(value)
    if kind is dict:
        return {k: _as_jsonb(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_as_jsonb(v) for v in value]
    return value


# A float that Python writes with an exponent, or NaN and the infinities (jsonb writes neither):
# the same text inside a string matches too, which only costs a second encoding.
_FLOAT_SIGN = re.compile(r"[0-9]e[-+][0-9]|NaN|Infinity")


_encoder = json.JSONEncoder(separators=(",", ":"), default=_json_default, allow_nan=True)


_jsonb_encoder = json.JSONEncoder(
    separators=(", ", ": "), ensure_ascii=False, default=_json_default, allow_nan=True
)


def jsonb_text(value: Any) -> str:
    """
    *value* as jsonb prints it, as the trigger function writes a key of several columns
    (``to_jsonb(ARRAY[...])::text``): ", " and ": " between items, characters beyond ASCII as
    they are, only quotes, backslashes and control characters escaped. The same row then has
    the same key, and so the same partition of the log, whichever way it came.
    """
    text = _jsonb_encoder.encode(value)
    if _FLOAT_SIGN.search(text):
        text = _jsonb_encoder.encode(_as_jsonb(value))
    if "\\u0000n" in text:
        text = _NUM_MARK.sub(r"\1", text)
    return text


def dumps_value(value: Any) -> str:
    """
    *value* as JSON text; a `Decimal` as a JSON number with exactly its digits, a float as
    jsonb writes it (``1.5e-10`` as 0.00000000015; NaN and the infinities, not JSON, as strings).
    """
    text = _encoder.encode(value)
    if _FLOAT_SIGN.search(text):
        text = _encoder.encode(_as_jsonb(value))
    if "\\u0000n" in text:
        text = _NUM_MARK.sub(r"\1", text)
    return text


# -- the decoder --


_U32 = struct.Struct(">I").unpack_from
_new_event = tuple.__new__  # a NamedTuple without its Python-level __new__ (one per change)


class DecodeError(Exception):
    """A pgoutput message this decoder cannot read (internal)."""


class Decoder:
    """
    Turns pgoutput messages into `Begin`, `Commit` and `ChangeEvent` values.

    Keeps the relations (tables) the stream described, and the current transaction's
    begin. *primary_keys* maps a table's oid to its primary key columns (in the key's order),
    read from the catalog (shared with the caller, which may learn more while streaming); a
    table missing from it, or whose key the stream now describes with other columns (with the
    default replica identity), is keyed by its replica identity (the primary key in the
    table's column order, unless the identity is FULL or an index).

    *next_xid*: the server's next transaction id with its epoch (64 bits) when the stream
    started; a Begin's 32-bit id is widened to the 64-bit id nearest it, then to the one
    nearest the last (0: left at 32 bits).
    """

    def __init__(
        self,
        primary_keys: dict[int, tuple[str, ...]] | None = None,
        *,
        next_xid: int = 0,
    ) -> None:
        self.relations: dict[int, Relation] = {}
        self._xid = next_xid
        # Shared, not copied: what the stream learns of a key (`_learn_key`) serves here.
        self.primary_keys = primary_keys if primary_keys is not None else {}
        self.begin: Begin | None = None
        self._lsn_text = ""
        self._ts = 0  # the last Begin's commit time, as sent and as a datetime
        self._when = pg_time(0)

    def decode(self, msg: bytes | memoryview) -> Iterator[Any]:
        """The values one message gives (none for Relation, Type, Origin, Message)."""
        if type(msg) is not bytes:
            msg = bytes(msg)
        kind = msg[0]
        if kind in (0x49, 0x55, 0x44):  # I, U, D
            yield self.change(msg)
        elif kind == 0x42:  # B
            yield self.begin_of(msg)
        elif kind == 0x43:  # C
            yield self.commit_of(msg)
        elif kind == 0x52:  # R
            self.relation(msg)
        elif kind == 0x54:  # T
            yield from self._truncate(msg)
        elif kind in (0x59, 0x4F, 0x4D):  # Y(type), O(origin), M(message): nothing to deliver
            return
        else:
            raise DecodeError(f"unknown pgoutput message {chr(kind)!r}")

    # The stream's common messages, without `decode`'s generator (it reads one per change).

    def begin_of(self, msg: bytes) -> Begin:
        """A Begin message."""
        final_lsn = int.from_bytes(msg[1:9], "big")
        self._ts = ts = int.from_bytes(msg[9:17], "big", signed=True)
        self._when = pg_time(ts)
        xid = int.from_bytes(msg[17:21], "big")
        if self._xid:
            # Every transaction the server still decodes lies within 2**31 of the next id (its
            # wraparound guard), and of the one before it: the nearest 64-bit id is the one.
            self._xid = xid = self._xid + ((xid - self._xid + 2**31) % 2**32 - 2**31)
        self.begin = begin = Begin(final_lsn, self._when, xid)
        self._lsn_text = lsn_to_str(final_lsn)
        return begin

    def commit_of(self, msg: bytes) -> Commit:
        """A Commit message."""
        ts = int.from_bytes(msg[18:26], "big", signed=True)
        # The Begin carried the same timestamp: its datetime serves (one conversion per tx).
        when = self._when if ts == self._ts else pg_time(ts)
        self.begin = None
        return Commit(int.from_bytes(msg[2:10], "big"), int.from_bytes(msg[10:18], "big"), when)

    def change(self, msg: bytes) -> ChangeEvent:
        """An Insert, Update or Delete message (``msg[0]`` is ``I``, ``U`` or ``D``)."""
        kind = msg[0]
        if kind == 0x49:
            return self._insert(msg)
        if kind == 0x55:
            return self._update(msg)
        return self._delete(msg)

    # -- messages --

    def relation(self, msg: bytes) -> Relation:
        """A Relation message: the table it describes, kept for the changes that follow."""
        oid = int.from_bytes(msg[1:5], "big")
        pos = 5
        end = msg.index(b"\0", pos)
        schema = msg[pos:end].decode() or "pg_catalog"
        pos = end + 1
        end = msg.index(b"\0", pos)
        table = msg[pos:end].decode()
        pos = end + 1
        identity = chr(msg[pos])
        ncols = int.from_bytes(msg[pos + 1 : pos + 3], "big")
        pos += 3
        columns: list[str] = []
        types: list[int] = []
        flagged: list[str] = []
        for _ in range(ncols):
            flags = msg[pos]
            end = msg.index(b"\0", pos + 1)
            name = msg[pos + 1 : end].decode()
            type_oid = int.from_bytes(msg[end + 1 : end + 5], "big")
            pos = end + 9  # the type's oid and typmod
            columns.append(name)
            types.append(type_oid)
            if flags & 1:
                flagged.append(name)
        key = self.primary_keys.get(oid)
        if key is None or (identity == "d" and sorted(key) != sorted(flagged)):
            key = tuple(flagged) if identity in ("d", "i") else ()
        self.relations[oid] = rel = Relation(
            oid, schema, table, identity, columns, types, [converter(t) for t in types], key
        )
        return rel

    def _tuple(self, rel: Relation, msg: bytes, pos: int) -> tuple[dict[str, Any], int]:
        """One TupleData at *pos*: the row (unchanged TOAST values left out) and the next pos."""
        ncols = (msg[pos] << 8) | msg[pos + 1]
        columns = rel.columns
        if ncols != len(columns):
            if ncols > len(columns):
                raise DecodeError(f"a row of {ncols} columns for {rel.table!r} of {len(columns)}")
            columns = columns[:ncols]
        pos += 2
        row: dict[str, Any] = {}
        for name, conv in zip(columns, rel.converters, strict=False):
            kind = msg[pos]
            if kind == 0x74:  # t: text
                end = pos + 5 + _U32(msg, pos + 1)[0]
                row[name] = conv(msg[pos + 5 : end])
                pos = end
            elif kind == 0x6E:  # n: NULL
                row[name] = None
                pos += 1
            elif kind == 0x75:  # u: unchanged TOASTed value, not in the WAL
                pos += 1
            else:  # b: binary, only sent when asked for
                raise DecodeError(f"unexpected tuple value kind {chr(kind)!r}")
        return row, pos

    def _relation_of(self, msg: bytes) -> Relation:
        oid = _U32(msg, 1)[0]
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"a change to relation {oid} before its Relation message") from None

    def _event(
        self,
        op: str,
        rel: Relation,
        new: dict[str, Any] | None,
        old: dict[str, Any] | None,
        changed: list[str] | None,
        key: str | None,
    ) -> ChangeEvent:
        begin = self.begin
        if begin is None:
            raise DecodeError("a change outside a transaction")
        return _new_event(
            ChangeEvent,
            (
                op,
                rel.schema,
                rel.table,
                new,
                old,
                changed,
                key,
                self._lsn_text,
                begin.xid,
                begin.commit_time,
            ),
        )

    def _insert(self, msg: bytes) -> ChangeEvent:
        rel = self._relation_of(msg)
        new, _ = self._tuple(rel, msg, 6)
        return self._event("INSERT", rel, new, None, None, decode_key(new, rel.key_columns))

    def _update(self, msg: bytes) -> ChangeEvent:
        rel = self._relation_of(msg)
        pos = 5
        old: dict[str, Any] | None = None
        if msg[pos] in (0x4B, 0x4F):  # K (key columns) or O (old row)
            old, pos = self._tuple(rel, msg, pos + 1)
        new, _ = self._tuple(rel, msg, pos + 1)
        changed: list[str] | None = None
        if old is not None and len(old) > 0 and rel.identity == "f":
            for name, value in old.items():
                if name not in new:
                    new[name] = value  # an unchanged TOASTed value: the old row has it
            changed = [c for c in rel.columns if c in new and c in old and new[c] != old[c]]
        elif old is not None:
            old = {k: v for k, v in old.items() if k in rel.key_columns or v is not None}
        return self._event("UPDATE", rel, new, old, changed, decode_key(new, rel.key_columns))

    def _delete(self, msg: bytes) -> ChangeEvent:
        rel = self._relation_of(msg)
        old, _ = self._tuple(rel, msg, 6)
        if rel.identity != "f":  # only the identity's columns are sent; the rest are NULLs
            flagged = set(rel.key_columns)
            old = {k: v for k, v in old.items() if k in flagged or v is not None}
        return self._event("DELETE", rel, None, old, None, decode_key(old, rel.key_columns))

    def _truncate(self, msg: bytes) -> Iterator[ChangeEvent]:
        count = int.from_bytes(msg[1:5], "big")
        pos = 6
        for _ in range(count):
            oid = int.from_bytes(msg[pos : pos + 4], "big")
            pos += 4
            rel = self.relations.get(oid)
            if rel is not None:
                yield self._event("TRUNCATE", rel, None, None, None, None)


def read_row(names: list[str], types: list[int], values: list[bytes | None]) -> dict[str, Any]:
    """A row read by SQL in text format (the backfill), converted as the stream's rows are."""
    return {
        name: None if raw is None else converter(oid)(raw)
        for name, oid, raw in zip(names, types, values, strict=True)
    }
