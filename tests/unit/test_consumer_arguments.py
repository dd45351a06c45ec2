"""A consumer's arguments are checked when it is made: a clear `UsageError` naming the
argument, not a server's "out of range" at the first read or a handler failing every event."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import pytest

import pgherald

DSN = "host=127.0.0.1 dbname=never_connected"  # made, never connected


@pytest.mark.parametrize("cls", [pgherald.Consumer, pgherald.AsyncConsumer])
@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("batch_size", 10**12, "batch_size must be an int from 1 to 2,147,483,647"),
        ("max_batch_size", 10**12, "max_batch_size must be an int from batch_size"),
        ("max_attempts", 0, "max_attempts must be an int from 1"),
        ("start", 10**30, "start (an event id) must be an int from 0"),
        ("start", -1, "start (an event id) must be an int from 0"),
        ("start", datetime(2026, 1, 1), "start must be a datetime with a time zone"),
        ("poll_interval", 0, "poll_interval must be a number of seconds above 0"),
        ("connect_timeout", -1, "connect_timeout must be a number of seconds above 0"),
        ("health_check_timeout", 0, "health_check_timeout must be a number of seconds"),
        ("health_check_interval", math.nan, "health_check_interval must be a number"),
        ("rebalance_interval", math.inf, "rebalance_interval must be a number"),
        ("maintain_interval", 0, "maintain_interval must be a number of seconds above 0"),
        ("linger", -0.1, "linger must be a number of seconds >= 0"),
        ("retry_delay", "1s", "retry_delay must be a number of seconds >= 0"),
        ("reconnect_max_attempts", -1, "reconnect_max_attempts must be an int from 0"),
        ("model", "Order", "model='Order' is a name, not a model: pass the class itself"),
    ],
)
def test_bad_option_is_a_usage_error_at_once(
    cls: type[Any], option: str, value: object, words: str
) -> None:
    with pytest.raises(pgherald.UsageError) as info:
        cls(DSN, group="g", channels=["ch"], **{option: value})
    assert str(info.value).startswith(words), str(info.value)


@pytest.mark.parametrize("cls", [pgherald.Consumer, pgherald.AsyncConsumer])
def test_good_edges_are_taken(cls: type[Any]) -> None:
    cls(DSN, group="g", start=0, linger=0, retry_delay=0, maintain_interval=None)
    cls(DSN, group="g", batch_size=2**31 - 1, reconnect_max_attempts=0)


@pytest.mark.parametrize("cls", [pgherald.Consumer, pgherald.AsyncConsumer])
def test_handlers_and_their_channels_are_checked(cls: type[Any]) -> None:
    consumer = cls(DSN, group="g")
    with pytest.raises(pgherald.UsageError, match="channels must be channel names"):
        consumer.add_handler(5, lambda e: None)
    with pytest.raises(pgherald.UsageError, match="a handler must be a function"):
        consumer.on("orders")(5)
