"""
Every error pgherald raises derives from :class:`HeraldError`.

::

    HeraldError
    ├── UsageError              the API was used in a way that cannot work
    ├── InvalidChannel          empty, too long (over 63 bytes) or not a str
    ├── PayloadError
    │   ├── PayloadTooLarge     8000 bytes or more for a plain NOTIFY
    │   ├── PayloadNotSerializable   the value cannot be encoded as JSON
    │   ├── PayloadNotJSON      Notification.json() on a payload that is not JSON
    │   └── PayloadInvalid      the payload does not validate as a handler's ``model=``
    ├── TransactionStateError   a lent connection is not idle in autocommit; a failed transaction
    ├── NotifyError             the database refused a NOTIFY (the driver error is chained)
    ├── ListenError             the database refused a LISTEN (for example on a standby)
    ├── SchemaMissing           the durable log is used before `pgherald install`
    ├── PrivilegeError          the role lacks a privilege (DDL event triggers need a superuser)
    ├── PublishError            the database refused a publish (the driver error is chained)
    └── DatabaseConnectionError
        ├── ConnectError        could not connect (bad DSN, server down, auth)
        │   └── PoolerError     notifications do not come back (a transaction-mode pooler)
        └── ConnectionLost      an established connection died and could not be recovered

Driver exceptions never escape: they are chained as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ConnectError",
    "ConnectionLost",
    "DatabaseConnectionError",
    "HeraldError",
    "InvalidChannel",
    "ListenError",
    "NotifyError",
    "PayloadError",
    "PayloadInvalid",
    "PayloadNotJSON",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PoolerError",
    "PrivilegeError",
    "PublishError",
    "SchemaMissing",
    "TransactionStateError",
    "UsageError",
]


class HeraldError(Exception):
    """A pgherald operation failed."""

    sqlstate: str | None = None
    """The error's SQLSTATE: the server's (``"40001"``...), or ``08003``/``08006`` for a
    connection the driver found closed or broken; None when there is none."""

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, so a bare ``raise X()`` still says something.
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(HeraldError):
    """pgherald was used in a way that cannot work."""


class InvalidChannel(HeraldError, ValueError):
    """The channel name is not usable with LISTEN/NOTIFY."""


class PayloadError(HeraldError, ValueError):
    """The payload cannot be sent or decoded."""


class PayloadTooLarge(PayloadError):
    """The payload is 8000 bytes or more, PostgreSQL's limit for NOTIFY."""


class PayloadNotSerializable(PayloadError, TypeError):
    """The payload is neither a str nor a JSON-serialisable value."""


class PayloadNotJSON(PayloadError):
    """The notification payload is not valid JSON."""


class PayloadInvalid(PayloadError):
    """
    The payload does not validate as the handler's ``model=``: the handler is not called. A
    listener counts it in ``stats.invalid_payloads`` and hands it to ``on_error``; a consumer
    dead-letters the event at once (no retries: the same payload would fail again).
    """


class TransactionStateError(HeraldError):
    """The connection's transaction state does not allow this (not idle, or failed)."""


class NotifyError(HeraldError):
    """The database refused the NOTIFY."""


class ListenError(HeraldError):
    """The database refused a LISTEN or UNLISTEN."""


class SchemaMissing(HeraldError):
    """pgherald's schema is not installed: run `pgherald install`."""


class PrivilegeError(HeraldError):
    """The current role lacks a privilege this needs."""


class PublishError(HeraldError):
    """The database refused to store the event."""


class DatabaseConnectionError(HeraldError):
    """A database connection problem."""


class ConnectError(DatabaseConnectionError):
    """Could not connect to PostgreSQL."""


class PoolerError(ConnectError):
    """
    A pooler stands between pgherald and PostgreSQL and cannot give it what it needs.
    Notifications sent to a listener's or consumer's connection never reach it: it goes
    through a transaction- or statement-mode pooler (such as PgBouncer
    ``pool_mode=transaction``); use a session-mode pool or a direct DSN. Or a change stream's
    replication connection is refused (PgBouncer before 1.23): use a direct DSN.
    """


class ConnectionLost(DatabaseConnectionError):
    """The connection to PostgreSQL was lost and could not be recovered."""
