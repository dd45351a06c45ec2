"""
One connected client: a bounded list of pending frames and how they reach the socket.

The fan-out's cost is paid per subscriber, so the path from a notification to a client's
socket is kept short. The hub appends each frame to the subscribers' `pending` lists and, once
the notification batch is dispatched, calls `flush` on every client that gained frames. On
asyncio, `flush` starts the endpoint's write right there, by hand: an ASGI ``send`` to a
socket that can take the bytes completes without ever suspending, so a burst costs each
subscriber one write and no task switch. Only a write that must wait (the client reads too
slowly) is handed to the client's own task, `pump`, which finishes it and writes whatever
queued meanwhile; while it is busy, frames wait in `pending`, bounded by the client buffer.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import anyio

from .frames import Frame
from .wakeup import new_signal

if TYPE_CHECKING:
    from .fanout import Hub
    from .filters import Filter

Write = Callable[[list[Frame]], Coroutine[Any, Any, None]]
"""The endpoint's way to write frames to its client (an SSE chunk, WebSocket messages)."""

DirectWrite = Callable[[list[Frame]], bool]
"""Write frames at once, synchronously, or return False to leave them to `Write`."""


class Client:
    __slots__ = (
        "_busy",
        "_direct",
        "_failure",
        "_in_task",
        "_ready",
        "_suspended",
        "_write",
        "can_read",
        "channels",
        "close_code",
        "expires",
        "hub",
        "kind",
        "last_write",
        "named",
        "patterns",
        "pending",
        "reason",
        "scope",
    )

    def __init__(self, hub: Hub, kind: str, expires: float | None = None) -> None:
        self.hub = hub
        self.kind = kind
        self.channels: set[str] = set()
        """The channels it gets events of (named, or matched by one of its patterns)."""
        self.named: set[str] = set()
        """The channels it subscribed to by name."""
        self.patterns: dict[str, Filter | None] = {}
        """Its wildcard subscriptions (``public.*``), each with its filter."""
        self.can_read: Callable[[str], bool] = _anything
        """Whether its token lets it read a channel (what a pattern may match)."""
        self.pending: list[Frame] = []
        self.reason: str | None = None
        """Why the gateway ends this client's stream (None while it is not ending)."""
        self.close_code = 1000
        self.scope: anyio.CancelScope | None = None
        """The writer's scope: given a deadline when the client is ended."""
        self.expires = expires
        """`time.time()` at which the client's token expires: the hub ends it then."""
        self.last_write = time.monotonic()
        self._ready = new_signal()
        self._write: Write | None = None
        self._direct: DirectWrite | None = None
        # True while the client's own task writes (before `pump`, and while it finishes a
        # write that had to wait): `flush` then leaves the frames to it, keeping the order.
        self._busy = True
        self._suspended: tuple[Coroutine[Any, Any, None], Any] | None = None
        self._failure: BaseException | None = None
        self._in_task = False

    def offer(self, frame: Frame, *, in_task: bool = False) -> None:
        """
        Queue *frame* without waiting; a full buffer ends the client (it is too slow).

        *in_task*: the write of this frame needs the client's own task (it reads the database,
        say), so it is never started by hand.
        """
        self._in_task |= in_task
        pending = self.pending
        if len(pending) >= self.hub.client_buffer or self.reason is not None:
            if self.reason is None:
                self.hub.metrics.drops.inc()
                self.end(
                    f"too slow: more than {self.hub.client_buffer} events waiting to be sent; "
                    "disconnected (reconnect to continue; durable channels resume by "
                    "Last-Event-ID)",
                    1013,
                )
            return
        pending.append(frame)
        if len(pending) == 1:
            self.hub.dirty(self)

    def flush(self) -> None:
        """Write what is pending now, by hand where the loop allows (see the module doc)."""
        if self._busy or not self.pending or self.reason is not None or self._write is None:
            return
        if not self.hub.inline or self._in_task:
            self._busy = True
            self._ready.set()  # `pump` writes them
            return
        frames, self.pending = self.pending, []
        direct = self._direct
        self._busy = True
        try:
            if direct is not None and direct(frames):
                self._busy = False
                return
            coro = self._write(frames)
            waiting_on = coro.send(None)
        except StopIteration:
            self._busy = False
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # e.g. the socket is gone: the client's task raises it
            # (whatever it is, it must not escape into the hub, which serves every client)
            self._failure = exc
        else:
            self._suspended = (coro, waiting_on)
        self._ready.set()

    async def pump(self, write: Write, direct: DirectWrite | None = None) -> None:
        """
        The client's own writing task: returns when the client is ended.

        Writes what queued before it started, then finishes writes that `flush` could not
        complete at once (and what queued meanwhile), until `end`. *direct*, when given, is
        tried first by `flush` (see `DirectWrite`).
        """
        self._write = write
        self._direct = direct
        try:
            while True:
                while self.pending and self.reason is None:
                    frames, self.pending = self.pending, []
                    self._in_task = False
                    await write(frames)
                if self.reason is not None:
                    return
                self._busy = False
                await self._ready.wait()
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if self._suspended is not None:
                    coro, waiting_on = self._suspended
                    self._suspended = None
                    await _resume(coro, waiting_on)
        finally:
            self._busy = True  # nothing is written by hand once the task has left
            if self._suspended is not None:
                self._suspended[0].close()
                self._suspended = None

    def sent(self, count: int) -> None:
        """The endpoint wrote *count* event frames (for heartbeats and metrics)."""
        self.last_write = time.monotonic()
        self.hub.frames_out += count

    def end(self, reason: str, code: int = 1000) -> None:
        """Stop feeding this client; its writer sends *reason* and closes (within a grace)."""
        if self.reason is not None:
            return
        self.reason, self.close_code = reason, code
        self.pending = []
        self._ready.set()
        if self.scope is not None:
            # A writer stuck on a client that does not read gets a little time, then goes.
            self.scope.deadline = min(self.scope.deadline, anyio.current_time() + self.hub.grace)


def _anything(channel: str) -> bool:
    return True


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> Generator[Any, Any, None]:
    """Run the rest of *coro*, which was started by hand and suspended on *waiting_on*.

    What ``await`` does for a coroutine (``yield from``), from the point where it suspended:
    the awaiting task waits on what *coro* waits on and passes results and exceptions in.
    """
    try:
        while True:
            try:
                value = yield waiting_on
            except BaseException as exc:  # cancellation too: *coro* must see it
                waiting_on = coro.throw(exc)
            else:
                waiting_on = coro.send(value)
    except StopIteration:
        return
