"""Where the connection string comes from, and what pgherald adds to it."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias
from urllib.parse import parse_qsl, urlencode

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConnectError, TransactionStateError, UsageError

logger = logging.getLogger("pgherald")

ENV_DSN = "PGHERALD_DSN"

# Detect a half-open TCP connection in the kernel too, not only with our own probes: when it
# is idle (keepalives), and when what we sent is never acknowledged (tcp_user_timeout: else
# Linux retransmits for about 15 minutes). Our own statements have deadlines of their own; the
# kernel's bound is for those we do not drive, a transactional handler's (psycopg's waits).
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def resolve_dsn(dsn: str | None) -> str:
    """*dsn*, else ``$PGHERALD_DSN``, else "" (libpq then reads ``PGHOST``, ``PGUSER``...)."""
    if dsn is not None:
        return dsn
    return os.environ.get(ENV_DSN, "")


def listener_conninfo(dsn: str | None, *, application_name: str = "pgherald-listener") -> str:
    """
    The conninfo for a connection pgherald owns: named, with TCP keepalives and a TCP user
    timeout (what the DSN sets itself is kept), in UTF-8.

    ``client_encoding`` is always ``UTF8``: the engines encode channel names and statements,
    and decode notifications, rows and messages, as UTF-8 bytes; in a LATIN1 database, a
    connection in the server's encoding would LISTEN to another channel than the one named and
    garble every non-ASCII payload. A DSN's own ``client_encoding`` (or ``PGCLIENTENCODING``)
    is meant for the application's connections: pgherald's own use UTF8 whatever it says.
    """
    params = parse_dsn(resolve_dsn(dsn))
    name = str(params.get("application_name") or "")
    if not name.startswith("pgherald"):
        # Operators find our sessions in pg_stat_activity by this prefix.
        params["application_name"] = f"{application_name} {name}".strip()
    for key, value in _KEEPALIVES.items():
        params.setdefault(key, value)
    encoding = str(params.get("client_encoding") or "")
    if encoding and _encoding_key(encoding) not in {"utf8", "unicode"}:
        logger.debug("client_encoding=%s in the DSN: pgherald's own connections use UTF8", encoding)
    params["client_encoding"] = "UTF8"
    return make_conninfo(**params)


def _encoding_key(name: str) -> str:
    """An encoding name as PostgreSQL compares them: case, ``-`` and ``_`` ignored."""
    return re.sub(r"[-_]", "", name).lower()


CONNECT_TIMEOUT = 10
"""Seconds a connection may take to open when neither the DSN's ``connect_timeout`` nor
``$PGCONNECT_TIMEOUT`` says, as the listener's, consumer's and scheduler's ``connect_timeout``:
libpq alone waits as long as TCP does, forever on a server that accepts and never answers."""


def with_connect_timeout(conninfo: str, seconds: int = CONNECT_TIMEOUT) -> str:
    """*conninfo* with ``connect_timeout=seconds``, unless it or ``$PGCONNECT_TIMEOUT`` sets one
    (libpq takes whole seconds, 2 at least)."""
    params = parse_dsn(conninfo)
    if params.get("connect_timeout") is not None or os.environ.get("PGCONNECT_TIMEOUT"):
        return conninfo
    params["connect_timeout"] = str(seconds)
    return make_conninfo(**params)


def parse_dsn(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConnectError(
            f"invalid DSN ({_without_password(' '.join(str(exc).split()), dsn)}): use a URI like "
            "'postgresql://user@host:5432/dbname' or 'host=... dbname=...'"
        ) from None


_PASSWORDS = re.compile(
    r"^\s*postgres(?:ql)?://[^:@/?#\s]*:([^@/?#]*)@"  # URI: user:PASSWORD@
    r"|(?:^|\s)password\s*=\s*'((?:[^'\\]|\\.)*)'"  # keywords: password='...'
    r"|(?:^|[\s?&])password\s*=\s*([^\s'&#]+)",  # password=... (keywords, URI query)
    re.IGNORECASE,
)


def _without_password(message: str, dsn: str) -> str:
    """libpq's *message* about an unparsable *dsn*, which may quote any part of it, with the
    DSN's password (as written) replaced by ``***``: error messages never show it."""
    for match in _PASSWORDS.finditer(dsn):
        for secret in match.groups():
            if secret:
                message = message.replace(secret, "***")
    return message


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


# -- sources: what a listener or consumer can be given to connect with --


class _URL(Protocol):
    def render_as_string(self, hide_password: bool = ...) -> str: ...


class SQLAlchemyEngine(Protocol):
    """A SQLAlchemy ``Engine`` or ``AsyncEngine`` (anything with a ``url``)."""

    @property
    def url(self) -> _URL: ...


class SQLAlchemyConnection(Protocol):
    """A SQLAlchemy ``Connection`` or ``AsyncConnection`` (anything with an ``engine``)."""

    @property
    def engine(self) -> SQLAlchemyEngine: ...


class Psycopg2Connection(Protocol):
    """A psycopg2 connection."""

    def get_dsn_parameters(self) -> Mapping[str, str]: ...


Source: TypeAlias = (
    str
    | psycopg.Connection[Any]
    | psycopg.AsyncConnection[Any]
    | Psycopg2Connection
    | SQLAlchemyEngine
    | SQLAlchemyConnection
    | None
)
"""What `Listener`, `AsyncListener`, `Consumer` and `AsyncConsumer` connect with."""

_ACCEPTED = (
    "pass a DSN or URL string ('postgresql://user@host/db', 'postgresql+psycopg2://...', "
    "'host=... dbname=...'), a psycopg 3 connection, a psycopg2 connection, a SQLAlchemy "
    f"Engine/AsyncEngine/Connection, or None to read ${ENV_DSN}"
)

# postgres:// and postgresql:// URLs, with SQLAlchemy's +driver suffix (which libpq refuses).
_URL_SCHEME = re.compile(r"^(postgres(?:ql)?)(\+[A-Za-z0-9_]+)?://", re.IGNORECASE)


def resolve_source(
    source: Source, *, application_name: str, lend: bool = True
) -> tuple[str, pq.abc.PGconn | None]:
    """
    The conninfo for the connections pgherald opens itself (see `listener_conninfo`), and the
    psycopg 3 connection to lend, if *source* is one and *lend* (else None).

    Only a psycopg 3 connection is lent: from psycopg2 and SQLAlchemy objects pgherald takes
    the connection parameters (password included) and opens a connection of its own; so it
    does from a psycopg 3 connection when not *lend* (a consumer, which must own its session).
    """
    lent: pq.abc.PGconn | None = None
    if source is None or isinstance(source, str):
        dsn = _libpq_dsn(resolve_dsn(source))
    elif isinstance(source, psycopg.Connection | psycopg.AsyncConnection) and not lend:
        if source.closed:
            raise UsageError("the connection is closed: pass an open connection, or a DSN")
        dsn = _params_dsn(source)
    elif isinstance(source, psycopg.Connection | psycopg.AsyncConnection):
        lent, dsn = source.pgconn, _lendable_dsn(source)
    else:
        dsn = _foreign_dsn(source)
    return listener_conninfo(dsn, application_name=application_name), lent


def _libpq_dsn(dsn: str) -> str:
    """*dsn* as libpq takes it: a SQLAlchemy URL loses its ``+driver`` and driver-only options."""
    m = _URL_SCHEME.match(dsn)
    if m is None or m.group(2) is None:
        return dsn
    scheme, rest = "postgresql://", dsn[m.end() :]
    base, sep, query = rest.partition("?")
    if not sep:
        return scheme + base
    kept: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "ssl" and value in _SSLMODES:  # asyncpg's spelling of sslmode
            name = "sslmode"
        (kept if name in _libpq_keywords() else dropped).append((name, value))
    if dropped:
        # Options of the Python driver (prepared_statement_cache_size...), not of the server.
        logger.info(
            "ignoring URL options libpq does not know: %s", ", ".join(n for n, _ in dropped)
        )
    return scheme + base + (f"?{urlencode(kept)}" if kept else "")


_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _foreign_dsn(source: object) -> str:
    """The parameters of a psycopg2 connection or a SQLAlchemy engine/connection, as a DSN."""
    package = type(source).__module__.split(".", 1)[0]
    if package == "psycopg2" and hasattr(source, "get_dsn_parameters"):
        if getattr(source, "closed", 0):
            raise UsageError("the psycopg2 connection is closed: pass an open one, or a DSN")
        # get_dsn_parameters() leaves the password out; conn.info has it (psycopg2 >= 2.8).
        params: dict[str, Any] = dict(source.get_dsn_parameters())
        params["password"] = getattr(getattr(source, "info", None), "password", None)
        # psycopg2 may link another libpq: keep what ours knows, and what is set.
        known = _libpq_keywords()
        return make_conninfo(**{k: v for k, v in params.items() if v and k in known})
    if package == "sqlalchemy":
        engine = getattr(source, "engine", source)  # Connection.engine; an Engine is its own
        url = getattr(engine, "url", None)
        if url is not None and hasattr(url, "render_as_string"):
            dsn = str(url.render_as_string(hide_password=False))
            if _URL_SCHEME.match(dsn) is None:
                raise UsageError(
                    f"this SQLAlchemy engine is for {getattr(url, 'drivername', 'another database')}"
                    ", not PostgreSQL: pass a PostgreSQL engine or a DSN"
                )
            return _libpq_dsn(dsn)
    kind = f"{type(source).__module__}.{type(source).__qualname__}"
    raise UsageError(f"cannot connect with a {kind}: {_ACCEPTED}")


def _lendable_dsn(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """
    Check that *conn* can listen right now, and return a DSN to reconnect with after a loss.

    LISTEN inside a transaction only takes effect at COMMIT, and a listening connection must
    stay idle: so the connection must be in autocommit mode and not in a transaction.
    """
    status = conn.info.transaction_status
    if conn.closed:
        raise UsageError("the connection is closed: pass an open connection, or a DSN")
    if not conn.autocommit or status != pq.TransactionStatus.IDLE:
        state = "not in autocommit mode" if conn.autocommit is False else ""
        if status != pq.TransactionStatus.IDLE:
            state = f"in a transaction ({status.name})"
        raise TransactionStateError(
            f"the connection is {state}: a listener needs an idle connection in autocommit "
            "mode (commit or roll back, then set conn.autocommit = True), or pass a DSN and "
            "let pgherald open a dedicated connection"
        )
    return _params_dsn(conn)


def _params_dsn(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    # pgconn.info, unlike conn.info.dsn, keeps the password: needed to reconnect on our own.
    params = {
        o.keyword.decode(): o.val.decode()
        for o in conn.pgconn.info
        if o.val is not None and o.keyword.decode() not in {"application_name"}
    }
    return make_conninfo(**params)
