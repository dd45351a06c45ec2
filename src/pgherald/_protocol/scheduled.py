"""
When a consumer moves due delayed events into the log (no I/O: the consumer engine runs the
statement, ``queries.sql`` release_scheduled, and hands its answer to `Releases`).

A delayed event waits in ``pgherald.scheduled_v1``, never in the log: a group's position passes
every transaction older than every running one, so an event stored before it is due would be
skipped. Every running consumer releases due events (the statement takes each one exactly once,
whoever runs it): it learns when the next one is due from the statement's answer and from the
'scheduled' wake-up that `publish(..., deliver_at=...)` sends, and caps its idle wait there.
"""

from __future__ import annotations

WAKE_PAYLOAD = b"scheduled"
"""The payload of the wake-up sent with a delayed event (and by `schedule add`)."""

RELEASE_LIMIT = 1000
"""Events moved per statement; a full batch means more are due: release again at once."""

RESCAN = 5.0
"""Seconds between checks when no delayed event is known: catches a wake-up missed (while
reconnecting, or not sent because the NOTIFY queue was half full)."""

EARLY = 0.001
"""Waking this much late: the server's clock, not ours, says what is due (never spin early)."""

CHASE = (0.002, 0.25)
"""After a release, until the log's read horizon passes it (a transaction older than the
release, anywhere on the server, holds it back), check again after this delay, doubling."""


class Releases:
    """When to run the release statement next."""

    def __init__(self) -> None:
        self.chasing: int | None = None  # the id of our release transaction not yet readable
        self.chase = CHASE[0]

    def next(self, now: float, row: list[bytes | None]) -> float:
        """The monotonic time of the next release, from the release statement's answer
        (released, seconds to the next due or NULL, its transaction id, the read horizon)."""
        released = int(row[0] or b"0")
        next_in = None if row[1] is None else float(row[1])
        horizon = int(row[3] or b"0")
        if self.chasing is not None and horizon > self.chasing:
            self.chasing = None  # the reads now see what we released
        if released:
            self.chasing, self.chase = int(row[2] or b"0"), CHASE[0]
        if released >= RELEASE_LIMIT:
            return now
        at = now + RESCAN if next_in is None else now + min(RESCAN, max(0.0, next_in) + EARLY)
        if self.chasing is not None:  # the next turn's read may then see the events
            at = min(at, now + self.chase)
            self.chase = min(CHASE[1], self.chase * 2)
        return at
