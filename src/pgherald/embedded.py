"""
An embedded PostgreSQL for demos and tests, from the ``pgserver`` wheel (``pgherald[embedded]``).

Why pgserver: it ships PostgreSQL 16 binaries inside a wheel, so a machine with only Python gets
a real server with ``pip install``; no system packages, no Docker. It also copes with running as
root (it creates an unprivileged system user for the server, as ``initdb`` requires).

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ConnectError

DEFAULT_DIR = Path(os.environ.get("PGHERALD_EMBEDDED_DIR", "~/.cache/pgherald/pgdata")).expanduser()


class EmbeddedPostgres:
    """
    Start (or reuse) a local server in *datadir*; stop it on exit.

    ``dsn`` is ready to use once entered::

        with EmbeddedPostgres() as pg:
            pgherald.Listener(pg.dsn)
    """

    def __init__(self, datadir: str | os.PathLike[str] | None = None) -> None:
        self.datadir = Path(datadir) if datadir is not None else DEFAULT_DIR
        self._server: Any = None
        self.dsn = ""

    def start(self) -> str:
        try:
            import pgserver
        except ImportError:
            raise ConnectError(
                "no DSN was given and the embedded PostgreSQL is not installed: pass --dsn "
                "(or set PGHERALD_DSN), or install it with: pip install 'pgherald[embedded]'"
            ) from None
        self.datadir.mkdir(parents=True, exist_ok=True)
        try:
            get_server = pgserver.get_server  # type: ignore[attr-defined]
            self._server = get_server(self.datadir, cleanup_mode="stop")
        except Exception as exc:
            raise ConnectError(f"the embedded PostgreSQL did not start: {exc}") from exc
        self.dsn = self._server.get_uri()
        return self.dsn

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
