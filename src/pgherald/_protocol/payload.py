"""Payload encoding (str or JSON) and the NOTIFY size limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import PayloadNotSerializable, PayloadTooLarge

#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more ("payload string too long").
MAX_PAYLOAD_BYTES = 7999

JsonDumps = Callable[[Any], str]
JsonLoads = Callable[[str | bytes], Any]


# One encoder, made once: json.dumps with options builds a new one on every call.
_compact_dumps: JsonDumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_payload(payload: object, *, dumps: JsonDumps | None = None) -> str:
    """
    Turn *payload* into the text NOTIFY will carry.

    A `str` is sent as it is; anything else is encoded as JSON (compact). The result must fit
    PostgreSQL's limit, else `PayloadTooLarge`.
    """
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text = (dumps or _compact_dumps)(payload)
        except Exception as exc:  # a custom dumps may raise anything
            raise PayloadNotSerializable(
                f"payload of type {type(payload).__name__} cannot be encoded as JSON ({exc!r}): "
                "send a str, or a value made of dict/list/str/int/float/bool/None"
            ) from exc
        if type(text) is not str:
            raise PayloadNotSerializable(
                f"dumps returned {type(text).__name__}, not str: a NOTIFY payload is text "
                "(for orjson, pass dumps=lambda v: orjson.dumps(v).decode())"
            )
    check_payload_size(text)
    return text


def check_payload_size(text: str) -> None:
    """Refuse a payload PostgreSQL would refuse, with the reason and the fix."""
    # Cheap bound first: a str of n characters encodes to at most 4n UTF-8 bytes.
    if text.isascii():
        if len(text) <= MAX_PAYLOAD_BYTES:
            return
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise PayloadNotSerializable(
                "payload holds a lone surrogate (text that is not Unicode, such as a file name "
                "decoded with errors='surrogateescape'), which cannot be sent: decode it "
                "properly, or replace it"
            ) from None
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload is {size} bytes; NOTIFY payloads must be under 8000 bytes: send a "
            "reference (a row id) and read the data from a table instead"
        )
