"""The log reader's pure parts: parameters, decoding, where a tail goes next (no I/O)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pgherald._protocol import channels, logread

CREATED = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)


class _Result:
    """Enough of a PGresult for the decoders: rows of binary values."""

    def __init__(self, rows: list[list[bytes | None]]) -> None:
        self.rows = rows
        self.ntuples = len(rows)

    def get_value(self, row: int, col: int) -> bytes | None:
        return self.rows[row][col]


def _row(event_id: int, tx: int, channel: str, payload: str) -> list[bytes | None]:
    micros = (CREATED - logread._EPOCH) // timedelta(microseconds=1)
    return [
        b"100",
        event_id.to_bytes(8, "big"),
        str(tx).encode(),
        channel.encode(),
        b"k",
        payload.encode(),
        None,
        micros.to_bytes(8, "big", signed=True),
        (3).to_bytes(2, "big"),
    ]


def _read(rows: list[list[bytes | None]], horizon: int = 100) -> logread.LogRead:
    parts = ((_Result(rows), len(rows)),) if rows else ()
    return logread.LogRead(parts, len(rows), horizon, True)  # type: ignore[arg-type]


def test_channel_names_are_quoted_in_the_array_literal() -> None:
    assert channels.text_array(["a", 'b"c', "d\\e", "x,y", "{z}"]) == (
        '{"a","b\\"c","d\\\\e","x,y","{z}"}'
    )


def test_events_are_decoded_from_binary_rows() -> None:
    read = _read([_row(7, 42, "orders", '{"n": 1}'), _row(9, 43, "orders", "[1, 2]")])
    first, second = logread.events(read)
    assert (first.id, first.tx, first.channel, first.payload, first.key) == (
        7,
        "42",
        "orders",
        {"n": 1},
        "k",
    )
    assert first.headers is None
    assert first.partition == 3
    assert first.created_at == CREATED
    assert second.payload == [1, 2]
    assert logread.frame_rows(read) == [(42, 7, "orders", '{"n": 1}'), (43, 9, "orders", "[1, 2]")]


def test_a_tail_moves_to_the_horizon_only_when_caught_up() -> None:
    rows = [_row(7, 42, "orders", "1"), _row(9, 43, "orders", "2")]
    assert logread.next_position(_read(rows, horizon=50), limit=2, current=(1, 1)) == (43, 9)
    assert logread.next_position(_read(rows, horizon=50), limit=3, current=(1, 1)) == (50, 0)
    assert logread.next_position(_read([], horizon=50), limit=3, current=(1, 1)) == (50, 0)
    # The horizon never moves a position back.
    assert logread.next_position(_read([], horizon=5), limit=3, current=(7, 3)) == (7, 3)
    assert logread.events(logread.NOT_FOUND) == []
    assert logread.frame_rows(logread.NOT_FOUND) == []


def test_a_read_stops_at_the_first_partition_cut_short() -> None:
    def rows(*partitions: int) -> _Result:
        return _Result(
            [
                [None, b"\0" * 7 + b"\1", b"1"] + [None] * 5 + [p.to_bytes(2, "big")]
                for p in partitions
            ]
        )

    res = rows(0, 1, 0, 2, 1)
    # Partitions 0 and 1 gave their whole share (2): 0 may have more before row 3.
    assert logread._complete(res, 2) == (3, True)  # type: ignore[arg-type]
    assert logread._complete(res, 3) == (5, False)  # type: ignore[arg-type]
    assert logread._complete(rows(4), 1) == (1, True)  # type: ignore[arg-type]
