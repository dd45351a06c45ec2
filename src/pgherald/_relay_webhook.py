"""
The webhook sink of `AsyncRelay`: one POST per event (or per ``webhook_batch`` events), signed.

Body: the event as a JSON object ``{"id", "channel", "key", "payload", "headers",
"created_at"}``, or a JSON array of them when ``webhook_batch`` > 1. Headers:
``Pgherald-Event-Id`` (the first event's id for a batch; ``Pgherald-Event-Ids`` lists them all),
``Pgherald-Channel``, ``Pgherald-Timestamp`` (Unix seconds) and, with a secret,
``Pgherald-Signature: t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``.

Any answer but 2xx, a timeout or a connection error is retried with exponential backoff and
jitter (``retry_delay`` doubling up to ``retry_max_delay``), never sooner than a ``Retry-After``
says (seconds or an HTTP date, capped at 10 minutes); after ``max_attempts`` a single event is
dead-lettered; a batch is sent again one event per POST, so that only the event that keeps
failing is. Requests go one after another, in log order:
events with one key arrive in order, and an endpoint sees at most one request at a time per
relay. Delivery is at least once: receivers de-duplicate on ``Pgherald-Event-Id``.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from ._models import Event
from ._relay_sink import Refused, _RelayState, safe_url
from .errors import UsageError

logger = logging.getLogger("pgherald.relay")

MAX_RETRY_AFTER = 600.0
_STOPPED = "stopped"  # compared by identity


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``Pgherald-Signature`` value of *body* sent at *timestamp*."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def retry_after(value: str | None, now: float) -> float:
    """Seconds a ``Retry-After`` header asks to wait (0 when absent or unreadable)."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:  # asctime form or "-0000": HTTP dates are GMT, not local time
        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)


class WebhookSink:
    anyio = True  # httpx runs on asyncio and trio
    raw = False  # the body embeds the payload as a JSON value: decoded events

    def __init__(
        self, url: str, *, secret: str | None, batch: int, max_attempts: int, timeout: float
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme == "http" and not _loopback(parts.hostname or ""):
            raise UsageError(
                f"webhook {safe_url(url)} is plain http on another host: use https:// (http:// "
                "is allowed on loopback only, for local receivers)"
            )
        try:
            import httpx  # noqa: F401 - a missing extra is a clear error at once
        except ImportError:
            raise UsageError(
                "relaying to webhooks needs httpx: pip install 'pgherald[relay]'"
            ) from None
        self.url = url
        self.target = safe_url(url)
        self.secret = secret
        self.batch = batch
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.client: Any = None
        self.requests = 0
        if not secret:
            logger.warning("webhooks to %s are not signed: pass a secret", self.target)

    def _body(self, events: list[Event]) -> bytes:
        items = [
            {
                "id": e.id,
                "channel": e.channel,
                "key": e.key,
                "payload": e.payload,
                "headers": e.headers,
                "created_at": e.created_at.isoformat(),
            }
            for e in events
        ]
        value: Any = items[0] if self.batch == 1 else items
        return json.dumps(value, separators=(",", ":")).encode()

    def _headers(self, events: list[Event], body: bytes) -> dict[str, str]:
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "pgherald-relay",
            "Pgherald-Event-Id": str(events[0].id),
            "Pgherald-Channel": events[0].channel,
            "Pgherald-Timestamp": stamp,
        }
        if self.batch > 1:
            headers["Pgherald-Event-Ids"] = ",".join(str(e.id) for e in events)
        if self.secret:
            headers["Pgherald-Signature"] = signature(self.secret, stamp, body)
        return headers

    async def send(
        self, events: list[Event], relay: _RelayState, *, redelivery: bool = False
    ) -> int | None:
        # A redelivery is POSTed as any event: receivers de-duplicate on Pgherald-Event-Id.
        import httpx

        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout)
        for start in range(0, len(events), self.batch):
            part = events[start : start + self.batch]
            failed = await self._post(part, relay)
            if failed is _STOPPED:
                return start
            if failed is None:
                continue
            # The batch kept failing: find the event that does, one POST per event, so that
            # only it is dead-lettered.
            for i, event in enumerate(part):
                failed = await self._post([event], relay) if len(part) > 1 else failed
                if failed is _STOPPED:
                    return start + i
                if failed is None:
                    continue
                raise Refused(  # the relay logs it
                    start + i, f"webhook {self.target} failed {self.max_attempts} times: {failed}"
                )
        return None

    async def _post(self, part: list[Event], relay: _RelayState) -> str | None:
        """POST *part* until 2xx (None), ``max_attempts`` failures (the last reason) or stop."""
        import httpx

        body = self._body(part)
        attempt = 0
        while True:
            if relay.stopping.is_set():
                return _STOPPED
            headers = self._headers(part, body)
            wait = 0.0
            try:
                self.requests += 1
                response = await relay.unless_stopped(
                    self.client.post(self.url, content=body, headers=headers)
                )
                if response is None:
                    return _STOPPED
                if 200 <= response.status_code < 300:
                    return None
                wait = retry_after(response.headers.get("Retry-After"), time.time())
                why = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if attempt >= self.max_attempts:
                return why
            message = f"webhook {self.target} failed for event {part[0].id} ({why})"
            if not await relay.pause(attempt, message, at_least=wait):
                return _STOPPED

    async def open(self, relay: _RelayState) -> None:
        pass  # a request at a time: nothing to hold open (httpx pools what it can)

    async def aclose(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()
