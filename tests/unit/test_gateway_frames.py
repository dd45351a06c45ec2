"""An event's shared encodings: the SSE chunk and the WebSocket frame written as they are."""

from __future__ import annotations

import json

import pytest
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.streams import StreamReader

from pgherald.contrib.gateway.frames import MAX_JSON_DEPTH, Frame, json_or_text

_OVERHEAD = len(Frame("chan", json.dumps({"x": ""}), (7, 42)).ws.encode())


# Encoded lengths at the edges of WebSocket's three length encodings (7, 16 and 64 bits).
@pytest.mark.parametrize("length", [_OVERHEAD, 125, 126, 127, 65535, 65536, 200_000])
def test_ws_frame_is_a_valid_unmasked_text_frame(length: int) -> None:
    size = length - _OVERHEAD
    frame = Frame("chan", json.dumps({"x": "y" * size}), (7, 42))
    assert len(frame.ws.encode()) == length
    reader = StreamReader()
    reader.feed_data(frame.ws_frame)
    reader.feed_eof()
    parser = WsFrame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    parsed: WsFrame = done.value.value
    assert parsed.opcode is Opcode.TEXT
    assert parsed.fin
    assert parsed.data.decode() == frame.ws
    assert json.loads(parsed.data) == {
        "type": "event",
        "channel": "chan",
        "payload": {"x": "y" * size},
        "id": 42,
    }
    assert reader.at_eof()  # nothing after the frame


def test_sse_chunk_is_one_http_chunk_of_the_sse_frame() -> None:
    frame = Frame("orders", "line one\nline two ünï")
    size, _, rest = frame.sse_chunk.partition(b"\r\n")
    assert int(size, 16) == len(frame.sse)
    assert rest == frame.sse + b"\r\n"
    assert frame.sse == "event: orders\ndata: line one\ndata: line two ünï\n\n".encode()


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("payload", "kept_as_json"),
    [
        ('{"a": [1, 2.5e3, "x"]}', True),
        ("1e999", True),  # strict JSON; its value is the reader's business
        ('"text"', True),
        (" [1] ", True),
        ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, True),
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), False),
        ("[" * 3999 + "]" * 3999, False),  # a RecursionError for a naive json.loads
        ('["' + "[" * 3000 + '"]', True),  # brackets inside a string do not nest
        ("NaN", False),
        ("-Infinity", False),
        ('{"a": Infinity}', False),
        ("{'a': 1}", False),
        ("plain text", False),
        ("", False),
    ],
)
def test_every_payload_becomes_strict_json(payload: str, kept_as_json: bool) -> None:
    frame = Frame("ch", payload)
    message = _strict(frame.ws)  # never raises, and a browser's JSON.parse reads it
    assert isinstance(message, dict)
    if kept_as_json:
        assert frame.ws == f'{{"type":"event","channel":"ch","payload":{payload}}}'
    else:
        assert message["payload"] == payload  # as text


def test_json_or_text_is_cheap_for_ordinary_payloads() -> None:
    assert json_or_text('{"id": 42}') == '{"id": 42}'
    assert json_or_text("NaN") == '"NaN"'
