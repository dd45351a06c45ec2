"""
gateway.md, *Wildcard subscriptions*: a pattern matches the channels the gateway knows, among
them "channels a client subscribes to by name, or publishes to through the gateway (...); the
last 10,000 of them are remembered" (`fanout.MAX_LEARNED`).

Against a real PostgreSQL, through the hub's own calls (`Hub.add`, `Hub.publish`): 10,000
channels subscribed by name are all known; each new one (by name or by publishing) makes the
gateway forget the one used longest ago, never more than 10,000 are kept, a channel used again
counts as recent, and a pattern subscribed afterwards matches exactly what is remembered.
"""

from __future__ import annotations

import pytest

from pgherald.contrib.gateway.fanout import MAX_LEARNED, Hub

pytestmark = pytest.mark.anyio


async def test_the_gateway_remembers_the_last_10000_channels(installed: str) -> None:
    assert MAX_LEARNED == 10_000  # the number gateway.md gives
    hub = Hub(installed)
    first = [f"cap.{i:05d}" for i in range(MAX_LEARNED)]
    async with hub.running():
        named = hub.new_client("ws")
        await hub.add(named, first)  # returns once the server LISTENs to all of them
        assert hub.known == set(first)

        # Published to through the gateway: learned, and the oldest is forgotten.
        await hub.publish("cap.published", "x")
        assert len(hub.known) == MAX_LEARNED
        assert "cap.published" in hub.known
        assert first[0] not in hub.known
        assert first[1] in hub.known

        # Used again (published to, subscribed to by name): among the last ones now.
        await hub.publish(first[1], "again")
        other = hub.new_client("ws")
        await hub.add(other, [first[2]])
        await hub.add(other, ["cap.named", "cap.named2"])  # two new: two forgotten
        assert len(hub.known) == MAX_LEARNED
        assert first[1] in hub.known, "a channel published to again was forgotten"
        assert first[2] in hub.known, "a channel subscribed to again was forgotten"
        assert first[3] not in hub.known
        assert first[4] not in hub.known
        assert first[5] in hub.known

        # Many more at once: still 10,000, the latest ones.
        more = [f"cap.more{i:05d}" for i in range(MAX_LEARNED // 2)]
        await hub.add(other, more)
        assert len(hub.known) == MAX_LEARNED
        assert set(more) <= hub.known
        assert {"cap.published", "cap.named", "cap.named2", first[1], first[2]} <= hub.known

        # A pattern matches what is remembered, nothing forgotten.
        watcher = hub.new_client("ws")
        await hub.add(watcher, ["cap.*"])
        assert watcher.channels == hub.known
        remembered = hub.known
        forgotten = {first[0], first[3], first[4]}
        assert not forgotten & remembered
        # Still LISTENed to: the first client subscribed to them by name.
        assert forgotten <= hub.listening
