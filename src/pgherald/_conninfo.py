"""Where the connection string comes from, and what pgherald adds to it."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConnectError

ENV_DSN = "PGHERALD_DSN"

# Detect a half-open TCP connection in the kernel too, not only with our own probes.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def resolve_dsn(dsn: str | None) -> str:
    """*dsn*, else ``$PGHERALD_DSN``, else "" (libpq then reads ``PGHOST``, ``PGUSER``...)."""
    if dsn is not None:
        return dsn
    return os.environ.get(ENV_DSN, "")


def listener_conninfo(dsn: str | None, *, application_name: str = "pgherald-listener") -> str:
    """The conninfo for a connection pgherald owns: named, with TCP keepalives."""
    params = parse_dsn(resolve_dsn(dsn))
    name = str(params.get("application_name") or "")
    if not name.startswith("pgherald"):
        # Operators find our sessions in pg_stat_activity by this prefix.
        params["application_name"] = f"{application_name} {name}".strip()
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    return make_conninfo(**params)


def parse_dsn(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConnectError(
            f"invalid DSN ({' '.join(str(exc).split())}): use a URI like "
            "'postgresql://user@host:5432/dbname' or 'host=... dbname=...'"
        ) from None


def describe(conninfo: str) -> str:
    """``user@host:port/dbname`` for messages: never the password."""
    try:
        p = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "the given DSN"
    host = str(p.get("host") or os.environ.get("PGHOST") or "local socket")
    port = str(p.get("port") or os.environ.get("PGPORT") or "5432")
    user = str(p.get("user") or os.environ.get("PGUSER") or "")
    db = str(p.get("dbname") or os.environ.get("PGDATABASE") or user or "postgres")
    return f"{user + '@' if user else ''}{host}:{port}/{db}"


def connect_error(conninfo: str, message: str) -> ConnectError:
    """A `ConnectError` that names the target and the fix."""
    return ConnectError(
        f"cannot connect to PostgreSQL at {describe(conninfo)}: {message.rstrip('.?! ')}. "
        "Check the DSN "
        f"(--dsn or ${ENV_DSN}) and that the server is running and reachable"
    )
