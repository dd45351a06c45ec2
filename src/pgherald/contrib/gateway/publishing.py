"""Publishing on behalf of a client: permission, then the log or NOTIFY."""

from __future__ import annotations

from typing import Any

from ...errors import DatabaseConnectionError, HeraldError, PayloadTooLarge
from .auth import Principal
from .db import OutcomeUnknown
from .fanout import Hub


class PublishRefused(HeraldError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def publish_checked(hub: Hub, principal: Principal, channel: str, payload: Any) -> int | None:
    """Publish *payload* if *principal* may write *channel*; the event id for durable ones."""
    principal.check_write(channel)  # AuthError 401/403
    try:
        return await hub.publish(channel, payload)
    except PayloadTooLarge as exc:
        raise PublishRefused(413, str(exc)) from None
    except OutcomeUnknown:
        raise PublishRefused(
            504,
            f"the database did not answer in time: the event may have been stored (or may be "
            f"yet); before publishing it again, read channel {channel!r} after the last id you "
            "have (an SSE or WebSocket resume) and look for it",
        ) from None
    except DatabaseConnectionError:
        raise PublishRefused(503, "the database is not available") from None
    except HeraldError as exc:
        raise PublishRefused(400, str(exc)) from None
