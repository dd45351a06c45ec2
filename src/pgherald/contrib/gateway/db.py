"""One database connection used from a worker thread, one call at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import psycopg

from ..._conninfo import listener_conninfo

T = TypeVar("T")


class Db:
    """A lazily (re)connected autocommit connection; calls run in a thread, serialised."""

    def __init__(self, dsn: str, *, application_name: str, connect_timeout: float = 5.0) -> None:
        self._conninfo = listener_conninfo(dsn, application_name=application_name)
        self._timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = anyio.Lock()

    async def call(self, func: Callable[[psycopg.Connection[Any]], T]) -> T:
        async with self._lock:
            return await anyio.to_thread.run_sync(self._call, func)

    def _call(self, func: Callable[[psycopg.Connection[Any]], T]) -> T:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = None
            conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=int(self._timeout)
            )
            self._conn = conn
        try:
            return func(conn)
        except psycopg.OperationalError:
            conn.close()
            self._conn = None
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
