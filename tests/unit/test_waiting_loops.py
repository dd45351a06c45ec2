"""
The async waiter's socket watching on each asyncio event loop (the standard one and uvloop,
which `pgherald serve` runs when installed), with real sockets and real resets.

uvloop (libuv) differs from the selector loop in two ways that broke the waiter, found by the
gateway's storm test: it reports a reset to a reader once and closes the socket number's
watcher, and it runs a woken task in the same turn of the loop.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from pgherald._protocol.pgwire import READ, WRITE
from pgherald._waiting_async import AsyncWaiter

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


@pytest.fixture
def pair() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """Connected TCP pairs (ours non-blocking, the peer's), closed at the end."""
    server = socket.create_server(("127.0.0.1", 0))
    made: list[socket.socket] = [server]

    def connect() -> tuple[socket.socket, socket.socket]:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        ours.setblocking(False)
        made.extend((ours, peer))
        return ours, peer

    yield connect
    for s in made:
        s.close()


def reset(peer: socket.socket) -> None:
    """Close with RST, as a cut connection does."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reset_after_a_read_wakes_a_kept_reader_at_once(
    loop: str, pair: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    # A listener's wait: data, read; then its connection is reset. The wait after the read
    # must end at once (readable: the end), not at its deadline (the health check's).
    async def main() -> None:
        ours, peer = pair()
        waiter = AsyncWaiter(keep_reader=True)
        waiter.bind()
        peer.send(b"x")
        assert await waiter.wait(ours.fileno(), READ, time.monotonic() + 5)
        assert ours.recv(10) == b"x"
        reset(peer)
        started = time.monotonic()
        assert await waiter.wait(ours.fileno(), READ, time.monotonic() + 5)
        assert time.monotonic() - started < 1.0
        waiter.release()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_socket_number_a_reset_socket_had_can_be_watched_again(
    loop: str, pair: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    # A kept reader's socket is reset and closed (libpq's finish) before its waiter releases
    # it; the next socket gets the same number, and another waiter (a gateway's log tail, a
    # second consumer) must be able to watch it, for writing and for reading.
    async def main() -> None:
        ours, peer = pair()
        old = AsyncWaiter(keep_reader=True)
        old.bind()
        reset(peer)
        assert await old.wait(ours.fileno(), READ, time.monotonic() + 5)
        number = ours.fileno()
        ours.close()
        again, peer2 = pair()
        assert again.fileno() == number  # the lowest free number: the same one
        new = AsyncWaiter()
        assert await new.wait(again.fileno(), WRITE, time.monotonic() + 5)
        peer2.send(b"y")
        assert await new.wait(again.fileno(), READ, time.monotonic() + 5)
        assert again.recv(10) == b"y"
        old.release()  # late: it must not take the new socket's reader away
        peer2.send(b"z")
        assert await new.wait(again.fileno(), READ, time.monotonic() + 5)

    run(loop, main)
