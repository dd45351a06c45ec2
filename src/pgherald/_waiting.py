"""The blocking runtime: carries out the engine's requests with ``poll()`` on a thread."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from ._protocol.pgwire import READ, SLEEP, WAIT, WRITE, Request

T = TypeVar("T")


class Waiter:
    """
    Waits on a connection socket, and on a wake-up socket that `wake` pokes.

    `wake` only writes a byte, so it is safe from any thread and from a signal handler.
    """

    def __init__(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed: either way, fine
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def wait(self, fd: int, events: int, deadline: float | None) -> bool:
        """True when *fd* is ready; False on timeout or wake-up."""
        poller = select.poll()
        mask = (select.POLLIN if events & READ else 0) | (select.POLLOUT if events & WRITE else 0)
        poller.register(fd, mask)
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, select.POLLIN)
        timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        ready = False
        for rfd, _ in poller.poll(timeout):
            if rfd == wake_fd:
                self._drain_wake()
            else:
                ready = True
        return ready

    def sleep(self, deadline: float) -> None:
        """Sleep until *deadline* or a wake-up."""
        self.wait(self._wake_r.fileno(), 0, deadline)

    def run(self, gen: Generator[Request, Any, T], on_request: Callable[[Request], Any] | None = None) -> T:
        """Drive *gen* to completion; requests other than WAIT/SLEEP go to *on_request*."""
        send: Any = None
        while True:
            try:
                req = gen.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            kind = req[0]
            if kind == WAIT:
                send = self.wait(req[1], req[2], req[3])
            elif kind == SLEEP:
                self.sleep(req[1])
                send = None
            elif on_request is not None:
                send = on_request(req)
            else:  # pragma: no cover - a programming error in the engine
                raise RuntimeError(f"unexpected request {req!r}")
