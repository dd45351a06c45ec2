"""Small immutable values handed to applications."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple

from ._protocol.payload import JsonLoads
from .errors import PayloadNotJSON


class Notification(NamedTuple):
    """A notification received from PostgreSQL."""

    channel: str
    """The channel it was sent on, exactly as spelled by the sender."""
    payload: str
    """The payload text as sent (empty string when there was none)."""
    pid: int
    """Process id of the server backend that sent it."""

    def json(self, loads: JsonLoads = json.loads) -> Any:
        """
        Decode the payload as JSON.

        Raises `PayloadNotJSON` (naming the channel) when it is not JSON.
        """
        try:
            return loads(self[1])
        except ValueError as exc:
            raise PayloadNotJSON(
                f"payload on channel {self.channel!r} is not JSON ({exc}): "
                f"{self.payload[:60]!r}; read .payload for plain text"
            ) from exc


GapReason = Literal["reconnect", "queue_limit"]


@dataclass(frozen=True)
class Gap:
    """
    A period in which notifications may have been missed.

    Reported to the ``on_gap`` hook once the listener is listening again: anything sent on the
    listener's channels between `started` and `ended` may be gone: re-read the state you keep
    in sync (for example rows changed since `started`, or by id) to catch up.
    """

    reason: GapReason
    """``"reconnect"``: the connection was lost; ``"queue_limit"``: the listener fell so far
    behind that it gave up its place in PostgreSQL's notification queue to protect writers."""
    started: float
    """`time.time()` of the last sign of life from the server before the loss."""
    ended: float
    """`time.time()` when the listener was listening again."""
    error: str | None = None
    """What went wrong, if anything (the driver's message)."""
    attempts: int = 1
    """Connection attempts it took to come back."""


@dataclass
class Stats:
    """Counters a listener or consumer keeps; cheap to read at any time."""

    received: int = 0
    """Notifications handed to a handler or an iterator."""
    handler_errors: int = 0
    """Handler calls that raised (logged, not propagated)."""
    unhandled: int = 0
    """Notifications (or events) on a channel with no handler (run mode only)."""
    reconnects: int = 0
    """Times the connection was re-established."""
    connect_failures: int = 0
    """Connection attempts that failed while reconnecting (refused, timed out, ...)."""
    gaps: list[Gap] = field(default_factory=list)
    """Every gap so far, oldest first."""
    health_checks: int = 0
    """Liveness probes sent on an idle connection."""
    queue_checks: int = 0
    """Times `pg_notification_queue_usage()` was read while behind."""
    last_queue_usage: float | None = None
    """The last reading of `pg_notification_queue_usage()` (0.0 to 1.0)."""
    reads: int = 0
    """Consumers: reads of the durable log sent."""
    from_wakeups: int = 0
    """Consumers: events handed out straight from their wake-up, without a read (see
    ``docs/durable.md``, "Wake-ups that carry their event")."""
    acknowledged: int = 0
    """Consumers: events whose position was stored (handled, or not of the wanted channels)."""
    skipped: int = 0
    """Consumers: events given up after their handler failed ``max_attempts`` times."""
    dead_lettered: int = 0
    """Consumers: dead letters written (events undecodable, or given up; see `skipped`)."""
    redelivered: int = 0
    """Consumers: dead letters redelivered and handled (see `pgherald.redeliver`)."""
    invalid_payloads: int = 0
    """Payloads that did not validate as their handler's ``model=`` (handler not called)."""


ListenerStats = Stats
"""The name `Stats` had before consumers shared it (kept for compatibility)."""


class Event(NamedTuple):
    """An event read from the durable log (a small immutable value, like `Notification`)."""

    id: int
    """Its id (ascending with insertion, not with commit order)."""
    channel: str
    payload: Any
    """The JSON value published, decoded."""
    key: str | None
    headers: dict[str, Any] | None
    created_at: datetime
    """When the publishing transaction started."""
    partition: int
    tx: str
    """The publishing transaction's id (``xid8``, as text): with `id`, the log position."""
