"""
`ShutOnStop` (how `stop()` reaches a sync transactional handler stuck in psycopg): it shuts
the socket it was given, even once that socket's number belongs to another socket. Real
sockets, no database.
"""

from __future__ import annotations

import socket

from pgherald._waiting import ShutOnStop


def test_it_shuts_its_socket_not_the_next_one_with_the_same_number() -> None:
    ours, peer = socket.socketpair()
    guard = ShutOnStop(ours.fileno(), 0.0)
    number = ours.fileno()
    ours.close()  # libpq closes its socket when it sees the connection fail
    other, other_peer = socket.socketpair()
    try:
        assert number in (other.fileno(), other_peer.fileno())  # the number, reused
        guard.arm()
        guard._timer.join(5)  # type: ignore[union-attr]  # its timer thread, done
        assert guard.fired
        assert peer.recv(1) == b""  # our connection's far end sees it end
        other.sendall(b"x")  # the socket that has the number now is untouched
        assert other_peer.recv(1) == b"x"
        other_peer.sendall(b"y")
        assert other.recv(1) == b"y"
    finally:
        guard.disarm()
        for s in (peer, other, other_peer):
            s.close()


def test_disarmed_first_it_does_nothing() -> None:
    ours, peer = socket.socketpair()
    try:
        guard = ShutOnStop(ours.fileno(), 0.0)
        guard.disarm()
        guard.arm()
        assert not guard.fired
        ours.sendall(b"x")
        assert peer.recv(1) == b"x"
    finally:
        ours.close()
        peer.close()
