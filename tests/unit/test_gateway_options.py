"""`create_app(listener_options=...)`: what reaches the gateway's listener, what is refused."""

from __future__ import annotations

from typing import Any

import pytest

import pgherald
from pgherald.contrib.gateway import create_app

DSN = "host=127.0.0.1 dbname=nowhere"  # never connected: the app is not started


def test_listener_options_reach_the_gateways_listener() -> None:
    app = create_app(DSN, listener_options={"queue_max_usage": 0.5, "health_check_timeout": 2.0})
    config = app.state.gateway.hub.listener._engine.config
    assert (config.queue_max_usage, config.health_check_timeout) == (0.5, 2.0)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"on_gap": print}, "may not set on_gap: the gateway sets those itself"),
        ({"application_name": "x", "channels": ["a"]}, "may not set application_name, channels"),
        ({"queue_max_use": 0.5}, "listener_options: "),
    ],
)
def test_listener_options_the_gateway_cannot_take_are_usage_errors(
    options: dict[str, Any], says: str
) -> None:
    with pytest.raises(pgherald.UsageError, match=says):
        create_app(DSN, listener_options=options)
