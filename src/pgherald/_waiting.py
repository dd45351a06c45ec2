"""The blocking runtime: carries out the engine's requests with ``poll()`` on a thread."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from ._protocol.pgwire import READ, RESOLVE, SLEEP, WAIT, WRITE, Request, addresses

T = TypeVar("T")


class _Lookup:
    """A `getaddrinfo` on a daemon thread; its socket turns readable when the answer is in."""

    FRESH_FOR = 5.0  # seconds an answer nobody took yet stays good for the next attempt

    def __init__(self, host: str, port: str) -> None:
        self._done_r, self._done_w = socket.socketpair()
        self.answer: list[str] | OSError = OSError("no answer")
        self._at: float | None = None  # when the answer came
        thread = threading.Thread(target=self._run, args=(host, port), daemon=True)
        thread.name = f"pgherald-lookup-{host}"
        thread.start()

    def _run(self, host: str, port: str) -> None:
        try:
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            self.answer = addresses(infos)
        except Exception as exc:  # a name IDNA cannot encode raises UnicodeError
            self.answer = exc if isinstance(exc, OSError) else OSError(str(exc))
        finally:
            self._at = time.monotonic()
            with contextlib.suppress(OSError):  # closed: nobody waits any more
                self._done_w.send(b"\0")

    def fileno(self) -> int:
        return self._done_r.fileno()

    def stale(self) -> bool:
        return self._at is not None and time.monotonic() - self._at > self.FRESH_FOR

    def close(self) -> None:
        self._done_r.close()
        self._done_w.close()

    __del__ = close  # one given up and never closed (its waiter was not): when its thread ends


class ShutOnStop:
    """
    Shuts socket *fd* *timeout* seconds after `arm` (None: never), or *limit* seconds after it
    is made (None: never), unless `disarm` came first: how `stop()` (and a consumer's
    ``transaction_timeout``) ends a transactional handler that a frozen connection holds in
    psycopg's wait on the consumer's thread (nothing else wakes that thread). Its statement
    fails as if the connection dropped. `arm` is safe from any thread and a signal handler.
    """

    def __init__(self, fd: int, timeout: float | None, limit: float | None = None) -> None:
        # A duplicate, taken now: it keeps the connection's socket itself, so the shutdown
        # reaches it even after libpq closed its own number and another socket got it.
        self._sock: socket.socket | None = (
            None if timeout is None and limit is None else socket.socket(fileno=os.dup(fd))
        )
        self._timeout = timeout
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the shutdown and `disarm`: one or the other
        self._done = False
        self.fired = False
        self.timed_out = False
        """Fired by *limit*, not by `arm`."""
        self._limit: threading.Timer | None = None
        if limit is not None:
            self._limit = threading.Timer(limit, self._fire, (True,))
            self._limit.daemon = True
            self._limit.start()

    def arm(self) -> None:
        if self._timeout is None or self._timer is not None or self._done:
            return
        self._timer = threading.Timer(self._timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, limit: bool = False) -> None:
        with self._lock:
            if self._done or self._sock is None or self.fired:
                return
            self.fired, self.timed_out = True, limit
            with contextlib.suppress(OSError):  # shutdown() ends the socket, for libpq too
                self._sock.shutdown(socket.SHUT_RDWR)

    def disarm(self) -> None:
        with self._lock:
            self._done = True
            sock, self._sock = self._sock, None
        for timer in (self._timer, self._limit):
            if timer is not None:
                timer.cancel()
        if sock is not None:
            sock.close()


class Waiter:
    """
    Waits on a connection socket, and on a wake-up socket that `wake` pokes.

    `wake` only writes a byte, so it is safe from any thread and from a signal handler.
    """

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._lookups: dict[tuple[str, str], _Lookup] = {}  # host name look-ups under way

    def open(self) -> None:
        """Create the wake-up socket now, so that no `wake` from another thread can be lost."""
        self._wake_socket()

    def _wake_socket(self) -> socket.socket:
        # Made on first use and closed by close(): a listener never used holds no sockets.
        if self._pair is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._pair = (r, w)
        return self._pair[0]

    def close(self) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            pair[0].close()
            pair[1].close()
        lookups, self._lookups = self._lookups, {}
        for lookup in lookups.values():  # given up (their threads end on their own)
            lookup.close()

    def wake(self) -> None:
        pair = self._pair
        if pair is None:
            return  # not waiting, so nothing to interrupt; flags are read before any wait
        # A full buffer means a wake-up is already pending; a closed one means we are done.
        with contextlib.suppress(OSError):
            pair[1].send(b"\0")

    def _drain_wake(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass

    def wait(self, fd: int, events: int, deadline: float | None) -> bool:
        """True when *fd* is ready; False on timeout or wake-up."""
        wake = self._wake_socket()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if fd < 1000:  # select() is the cheapest call here, but limited to FD_SETSIZE (1024)
            rl: list[Any] = [fd, wake] if events & READ else [wake]
            wl: list[Any] = [fd] if events & WRITE else []
            try:
                r, w, _ = select.select(rl, wl, (), timeout)
            except (OSError, ValueError):
                # A socket closed under us: close() from another thread while we wait. Not
                # ready; the engine looks at its stop flag (or finds the connection gone).
                return False
            if wake in r:
                self._drain_wake(wake)
            return fd in r or fd in w
        poller = select.poll()
        try:
            poller.register(
                fd,
                (select.POLLIN if events & READ else 0) | (select.POLLOUT if events & WRITE else 0),
            )
            poller.register(wake, select.POLLIN)
        except (OSError, ValueError):  # closed under us, as above
            return False
        ready = False
        for rfd, flags in poller.poll(None if timeout is None else int(timeout * 1000) + 1):
            if flags & select.POLLNVAL:  # closed under us, as above
                return False
            if rfd == wake.fileno():
                self._drain_wake(wake)
            else:
                ready = True
        return ready

    def resolve(self, host: str, port: str, deadline: float | None) -> Any:
        """
        Look *host* up (`RESOLVE`) on a thread of its own, waited for as `wait` waits (a wake-up
        or *deadline* ends it: getaddrinfo itself cannot be interrupted or given a timeout):
        its addresses; None on a wake-up or at *deadline* (the next call for the name takes
        the look-up's answer if it came meanwhile); the OSError when the name does not resolve.
        """
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None or lookup.stale():
            if lookup is not None:
                lookup.close()
            lookup = self._lookups[key] = _Lookup(host, port)
        if not self.wait(lookup.fileno(), READ, deadline):
            if deadline is not None and time.monotonic() >= deadline:
                del self._lookups[key]  # given up: its thread ends on its own
                lookup.close()
            return None
        del self._lookups[key]
        lookup.close()
        return lookup.answer

    def sleep(self, deadline: float) -> None:
        """Sleep until *deadline* or a wake-up."""
        self.wait(self._wake_socket().fileno(), 0, deadline)

    def run(
        self, gen: Generator[Request, Any, T], on_request: Callable[[Request], Any] | None = None
    ) -> T:
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
            elif kind == RESOLVE:
                send = self.resolve(req[1], req[2], req[3])
            elif on_request is not None:
                send = on_request(req)
            else:  # pragma: no cover - a programming error in the engine
                raise RuntimeError(f"unexpected request {req!r}")
