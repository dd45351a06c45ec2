"""
A small TCP proxy in front of the test server, to make connections fail in realistic ways.

``freeze()`` stops forwarding on every current connection without closing anything: to both
ends it looks like a half-open connection (no FIN, no RST, no traffic), the failure that TCP
alone takes hours to notice. ``sever()`` closes current connections abruptly. New connections
are forwarded normally either way, so a client that reconnects gets through.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections.abc import Iterator
from typing import TypeVar

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_P = TypeVar("_P", bound="FreezingProxy")


class FreezingProxy:
    def __init__(self, target: str | tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._frozen: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._loop, name="freezing-proxy", daemon=True)
        self._thread.start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self._target, str):
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self._target)
        else:
            up = socket.create_connection(self._target)
        up.setblocking(False)
        return up

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                    continue
                with self._lock:
                    if sock in self._frozen or sock not in self._peers:
                        continue
                    peer = self._peers[sock]
                try:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionResetError
                    peer.setblocking(True)
                    peer.sendall(data)
                    peer.setblocking(False)
                except OSError:
                    self._close_pair(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        up = self._connect_upstream()
        with self._lock:  # registered before a sever() from another thread can close them
            self._sel.register(client, selectors.EVENT_READ, None)
            self._sel.register(up, selectors.EVENT_READ, None)
            self._peers[client] = up
            self._peers[up] = client
            self.accepted += 1

    def _close_pair(self, sock: socket.socket) -> None:
        with self._lock:
            peer = self._peers.pop(sock, None)
            if peer is not None:
                self._peers.pop(peer, None)
            pair = [s for s in (sock, peer) if s is not None]
            for s in pair:
                self._frozen.discard(s)
        for s in pair:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def freeze(self) -> int:
        """Stop forwarding on every current connection; returns how many were frozen."""
        with self._lock:
            self._frozen.update(self._peers)
            for s in self._peers:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(s)
            return len(self._peers) // 2

    def sever(self) -> None:
        """Close every current connection at once (with RST)."""
        with self._lock:
            socks = list(self._peers)
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self._close_pair(s)

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in list(self._peers):
            self._close_pair(s)
        with contextlib.suppress(KeyError):
            self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()

    def dsn_for(self, dsn: str) -> str:
        """*dsn* with host and port pointing at the proxy."""
        params = conninfo_to_dict(dsn)
        params.update(host="127.0.0.1", port=str(self.port), hostaddr="127.0.0.1")
        return make_conninfo(**params)


def _target_of(dsn: str) -> str | tuple[str, int]:
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql")
    port = int(str(params.get("port") or os.environ.get("PGPORT") or 5432))
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


@pytest.fixture
def proxy(dsn: str) -> Iterator[FreezingProxy]:
    """A `FreezingProxy` to this test's server; ``proxy.dsn_for(dsn)`` goes through it."""
    with FreezingProxy(_target_of(dsn)) as p:
        yield p
