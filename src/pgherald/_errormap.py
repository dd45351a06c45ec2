"""
The one place where database errors become `HeraldError` subclasses.

`from_driver` takes a psycopg 3, psycopg2 or SQLAlchemy exception (the caller chains it as
``__cause__``); `from_sqlstate` takes what the sans-I/O engines see in a raw libpq result. Both
classify by SQLSTATE first, so every front end gives the same class and the same fix for the
same server answer. Only called on failure: the success path of notify and publish pays
nothing for it.
"""

from __future__ import annotations

import re

from ._schema import MISSING
from .errors import (
    ConnectError,
    ConnectionLost,
    HeraldError,
    ListenError,
    NotifyError,
    PrivilegeError,
    PublishError,
    SchemaMissing,
    TransactionStateError,
)

_DRIVERS = ("psycopg", "psycopg2", "sqlalchemy", "asyncpg")

# The first word of *doing* picks the class when nothing more specific applies.
_DEFAULTS: dict[str, type[HeraldError]] = {
    "notify": NotifyError,
    "publish": PublishError,
    "listen": ListenError,
    "unlisten": ListenError,
}

# Undefined table, function, schema or type: with "pgherald" in the message, our schema is
# missing or older than this version.
_UNDEFINED = frozenset({"42P01", "42883", "3F000", "42704"})
# The server cannot take a connection (yet): starting up, too many clients, refused.
_CANNOT_CONNECT = frozenset({"08001", "08004", "57P03", "53300"})
# An established connection ended: the server shut down or crashed, or the link broke.
_LOST = frozenset({"57P01", "57P02"})

_PERMISSION = re.compile(r"permission denied for (schema|table|sequence|function) (\S+)")
# What each of our objects needs, by the operation (a missing entry: name the object only).
_GRANTS = {
    ("table", "events_v1", "publish"): "SELECT, INSERT",  # INSERT ... RETURNING id reads
    ("table", "events_v1", None): "SELECT",
    ("table", "positions_v2", None): "SELECT, INSERT, UPDATE, DELETE",
    ("sequence", "events_v1_id_seq", None): "USAGE",
    # `status` reads the relays' rows; a relay writes its own (a consumer's "consume").
    ("table", "settings_v1", "list"): "SELECT",
    ("table", "settings_v1", None): "SELECT, INSERT, UPDATE, DELETE",
}


def from_driver(exc: BaseException, *, doing: str) -> HeraldError:
    """
    *exc*, raised by a database driver while *doing* (``"publish"``, ``"NOTIFY on channel
    'x'"``, ``"read the log"``...), as the `HeraldError` that names the problem and the fix.

    The first word of *doing* picks the class used when the error is nothing more specific:
    notify -> `NotifyError`, publish -> `PublishError`, (un)listen -> `ListenError`, else
    `HeraldError`. The caller raises it ``from exc``.
    """
    sqlstate, message = _sqlstate_and_message(exc)
    if sqlstate is None:
        names = {c.__name__ for c in type(exc).__mro__}
        if "PendingRollbackError" in names:  # SQLAlchemy: the session's transaction failed
            sqlstate = "25P02"
        elif getattr(exc, "connection_invalidated", False) or (
            names & {"OperationalError", "InterfaceError", "ResourceClosedError"}
            and "closed" in message.lower()
        ):
            # No answer from the server: the driver found the connection closed or broken.
            sqlstate = "08003"
    return from_sqlstate(sqlstate, message, doing=doing)


def from_sqlstate(sqlstate: str | None, message: str, *, doing: str) -> HeraldError:
    """The `HeraldError` for a server error *sqlstate* with *message*, met while *doing*; its
    ``sqlstate`` attribute keeps the code."""
    error = _from_sqlstate(sqlstate, message, doing=doing)
    error.sqlstate = sqlstate
    return error


def is_transient(sqlstate: str | None) -> bool:
    """
    A server error that the same statement may not meet again: a serialization failure or
    deadlock, a cancelled statement (``pg_cancel_backend``, ``statement_timeout``), a lock not
    available in time, or resources short for now (out of memory, disk full, too many
    connections). For the loops that run by themselves (the scheduler): retry, do not stop.
    """
    return sqlstate is not None and (
        sqlstate[:2] in ("40", "53") or sqlstate in ("57014", "55P03", "55006")
    )


def _from_sqlstate(sqlstate: str | None, message: str, *, doing: str) -> HeraldError:
    message = " ".join(message.split()).rstrip(".") or "unknown error"
    what = f"{doing} failed ({message})"
    if sqlstate in _UNDEFINED and "pgherald" in message:
        return SchemaMissing(f"{what}: {MISSING}")
    if sqlstate == "42501":
        return PrivilegeError(f"{what}: {_grant_hint(message, doing)}")
    if sqlstate == "25006":
        return _default(doing)(
            f"{what}: this connection is read-only (a hot standby in recovery, or "
            "default_transaction_read_only): point pgherald at the primary (a read-write "
            "server, e.g. target_session_attrs=read-write in the DSN)"
        )
    if sqlstate == "25P02":
        return TransactionStateError(
            f"{what}: an earlier statement of this transaction failed, so the server refuses "
            "everything until it ends: roll it back, then redo its work"
        )
    connection_class = sqlstate is not None and sqlstate.startswith("08")
    if sqlstate in _CANNOT_CONNECT or (connection_class and doing.startswith("connect")):
        return ConnectError(
            f"{what}: check that the server is running, accepts connections and is "
            "reachable, then retry"
        )
    if connection_class or sqlstate in _LOST:
        return ConnectionLost(
            f"{what}: the connection to PostgreSQL is closed or broken: open a new one "
            "(or let the pool replace it) and retry the transaction"
        )
    return _default(doing)(what)


def is_driver_error(exc: BaseException) -> bool:
    """Whether *exc* comes from a database driver (and so must not reach users unmapped)."""
    return type(exc).__module__.split(".", 1)[0] in _DRIVERS


def _default(doing: str) -> type[HeraldError]:
    first = doing.split(None, 1)[0].lower() if doing.strip() else ""
    return _DEFAULTS.get(first, HeraldError)


def _sqlstate_and_message(exc: BaseException) -> tuple[str | None, str]:
    """SQLSTATE and server message of *exc*, through SQLAlchemy's wrapper when there is one."""
    inner = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
    if isinstance(inner, BaseException):
        state, message = _sqlstate_and_message(inner)
        if state is None and inner.__cause__ is not None:  # SQLAlchemy's asyncpg adapter
            state = _sqlstate_of(inner.__cause__)
        return state, message
    return _sqlstate_of(exc), str(exc) or type(exc).__name__


def _sqlstate_of(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):  # psycopg 3 and asyncpg; psycopg2
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _grant_hint(message: str, doing: str) -> str:
    m = _PERMISSION.search(message)
    if m is None:
        return "grant the role this connects as the privilege named above (as a superuser)"
    kind, name = m.group(1), m.group(2).strip('"')
    if kind == "schema":
        return f"as a superuser, run GRANT USAGE ON SCHEMA {name} TO <role>"
    if kind == "function":
        return f"as a superuser, run GRANT EXECUTE ON FUNCTION {name} TO <role>"
    op = doing.split(None, 1)[0].lower() if doing.strip() else ""
    privilege = _GRANTS.get((kind, name, op)) or _GRANTS.get((kind, name, None))
    qualified = f"pgherald.{name}" if privilege and "." not in name else name
    if privilege is None:
        return f"as a superuser, grant the role this connects as what it needs on {kind} {name}"
    return f"as a superuser, run GRANT {privilege} ON {kind.upper()} {qualified} TO <role>"
