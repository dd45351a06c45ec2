"""
What a relay and its sinks share: the `Sink` protocol, `Refused`, the relay's counters
(`RelayStats`) and its state as sinks see it (stop, backoff), and `safe_url`. The sinks
(``_relay_nats``, ``_relay_redis``, ``_relay_webhook``) build on this module; `AsyncRelay`
(``_relay``) on them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

from ._models import Event
from ._protocol.backoff import backoff_delay
from .errors import UsageError

logger = logging.getLogger("pgherald.relay")

T = TypeVar("T")


@dataclass
class RelayStats:
    """Counters a relay keeps; cheap to read at any time (also from another thread)."""

    relayed: int = 0
    """Events the broker acknowledged (de-duplicated re-sends included)."""
    duplicates: int = 0
    """Of those, re-sends the broker already had and dropped (JetStream, Redis)."""
    batches: int = 0
    """Reads handed to the sink and fully acknowledged."""
    retries: int = 0
    """Times a batch (or its rest) was sent again: broker unreachable or refusing."""
    dead_lettered: int = 0
    """Events given up (refused by the broker ``max_attempts`` times): see dead letters."""
    connects: int = 0
    """Connections made to the broker."""
    started_at: float = 0.0
    """When `run` started (``time.time()``)."""
    last_relayed_at: float | None = None
    """When the last batch was acknowledged (``time.time()``)."""
    rate: float = 0.0
    """Events per second, smoothed over about the last 10 seconds."""
    lag_seconds: float = 0.0
    """Age of the last event relayed when it was acknowledged (0 once the relay waits for
    events: it has caught up)."""

    def _count(self, n: int) -> None:
        now = time.time()
        last = self.last_relayed_at or self.started_at
        self.relayed += n
        self.batches += 1
        dt = max(now - last, 1e-3)
        weight = min(dt / 10.0, 1.0)
        self.rate = (1 - weight) * self.rate + weight * (n / dt)
        self.last_relayed_at = now


class Refused(Exception):
    """A sink gives up an event for good (too large, refused too often): it is dead-lettered."""

    def __init__(self, done: int, message: str) -> None:
        super().__init__(message)
        self.done = done
        """How many events before it were published (see `AsyncConsumer.add_batch_handler`)."""


class Sink(Protocol):
    """What a relay publishes through: one broker connection, tried once when the relay starts
    (`open`) and opened again whenever a send needs it."""

    target: str
    anyio: bool
    """True: the client runs on any anyio backend (asyncio and trio); False: asyncio only."""
    raw: bool
    """True: the sink takes each event's payload and headers as the log's JSON text (str, and
    None for no headers), which it forwards as they are; False: decoded, as consumers get them."""

    async def send(
        self, events: list[Event], relay: _RelayState, *, redelivery: bool = False
    ) -> int | None:
        """Publish *events* in order; return None when all are acknowledged, or how many are
        when stopping; raise `Refused` for an event the broker will never take, `UsageError`
        for a configuration the relay cannot work with (it stops).

        *redelivery*: the events are dead letters redelivered (`pgherald.redeliver`): the
        broker must take them although they lie behind what it has (JetStream and the Redis
        script would drop them as re-sends otherwise), yet drop a second copy of them."""
        ...

    async def open(self, relay: _RelayState) -> None:
        """Connect once, when the relay starts: a broker down is said at once (and tried again
        when there are events to send), a configuration it cannot work with raises
        `UsageError` at once. Nothing to do for a sink without a connection."""
        ...

    async def aclose(self) -> None: ...


class _RelayState:
    """What sinks share with their relay: the stop flag, the counters, the backoff."""

    def __init__(self, stats: RelayStats, *, retry_delay: float, retry_max_delay: float) -> None:
        self.stats = stats
        self.stopping = anyio.Event()
        self.retry_delay = retry_delay
        self.retry_max_delay = retry_max_delay
        self._scopes: set[anyio.CancelScope] = set()

    def stop(self) -> None:
        """Set `stopping` and cancel what `unless_stopped` awaits (on the event loop's thread)."""
        self.stopping.set()
        for scope in self._scopes:
            scope.cancel()

    async def unless_stopped(self, coro: Awaitable[T]) -> T | None:
        """Await *coro*, or cancel it when the relay stops first (then None)."""
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.stopping.is_set():
                    scope.cancel()  # stopped already: *coro* is cancelled at its first wait
                return await coro
            finally:
                self._scopes.discard(scope)
        return None

    async def pause(self, attempt: int, why: str, *, at_least: float = 0.0) -> bool:
        """Wait the backoff of *attempt* (1-based); False when stopped meanwhile."""
        delay = max(
            at_least,
            backoff_delay(attempt, initial=self.retry_delay, cap=self.retry_max_delay),
        )
        self.stats.retries += 1
        log = logger.warning if attempt == 1 or attempt % 10 == 0 else logger.info
        log("%s; retrying in %.2fs (attempt %d)", why, delay, attempt)
        with anyio.move_on_after(delay):
            await self.stopping.wait()
            return False
        return True

    async def connect(
        self, attempt: Callable[[], Awaitable[bool]], broker: str, target: str, *, once: bool
    ) -> bool:
        """Call *attempt* (True: connected, False: stopped meanwhile) until it connects, with
        the backoff between failures; False when stopped first. *once* (the relay's start):
        a failure is said and not waited out; the first read with events tries again.
        `UsageError` (a configuration the broker refuses) propagates: the relay stops."""
        tries = 0
        while not self.stopping.is_set():
            tries += 1
            try:
                return await attempt()
            except UsageError:
                raise
            except Exception as exc:
                why = f"cannot reach {broker} at {target} ({type(exc).__name__}: {exc})"
                if once:
                    logger.warning("%s; trying again when there are events to relay", why)
                    return False
                if not await self.pause(tries, why):
                    return False
        return False


_SECRET_WORDS = frozenset(
    [
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "sig",
        "signature",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "apikey",
        "accesstoken",
        "authtoken",
        "jwt",
        "session",
        "sessionid",
    ]
)
"""Query parameter names (or words of them: ``access_token``, ``X-Amz-Signature``) whose
values `safe_url` masks."""
_MASK = "***"


def _secret_name(name: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and (
        any(w in _SECRET_WORDS for w in words) or "".join(words) in _SECRET_WORDS
    )


def attempts(n: int) -> str:
    """How often a broker refused an event, for its dead letter: "1 attempt", "3 attempts"."""
    return f"{n} attempt{'' if n == 1 else 's'}"


def readable_url(url: str) -> bool:
    """urllib can read *url*'s parts: no unbalanced "[", a port that is a number (one that is
    not is often a password with "/", "?" or "#" in it, which ends the host part early)."""
    try:
        urlsplit(url).port  # noqa: B018 - a port that is not a number raises
    except ValueError:
        return False
    return True


def safe_url(url: str) -> str:
    """*url* without its secrets, for logs, `target` and ``pgherald status``: the password of
    ``user:password@`` (``user:***@``), a NATS token (``nats://TOKEN@host``: ``***@``), and the
    values of query parameters named like a secret (``?password=``, ``token``, ``key``,
    ``sig``, ``access_token``, ``api_key``, ...: ``?password=***``)."""
    if not readable_url(url):  # nothing shown after the scheme: any of it may be the password
        head, sep, _ = url.partition("://")
        return f"{head}{sep}{_MASK}" if sep else _MASK
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{_MASK}@{host}"
        elif parts.scheme.lower() in ("nats", "tls"):  # userinfo alone: a token
            netloc = f"{_MASK}@{host}"
    if query:
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            if eq and value and _secret_name(name):
                pair = f"{name}={_MASK}"
            pairs.append(pair)
        query = "&".join(pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
