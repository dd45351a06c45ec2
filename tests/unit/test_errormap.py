"""The error seam: each server answer gives one HeraldError class with its fix (no I/O)."""

from __future__ import annotations

import pytest

import pgherald
from pgherald._errormap import from_driver, from_sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "message", "doing", "cls", "fix"),
    [
        ('42P01', 'relation "pgherald.events_v1" does not exist', "publish",
         pgherald.SchemaMissing, "pgherald install"),
        ("42883", "function pgherald.publish_v1(text, jsonb, text, jsonb) does not exist",
         "consume", pgherald.SchemaMissing, "pgherald install"),
        ('3F000', 'schema "pgherald" does not exist', "read the log",
         pgherald.SchemaMissing, "pgherald install"),
        ("42501", "permission denied for table events_v1", "publish",
         pgherald.PrivilegeError, "GRANT SELECT, INSERT ON TABLE pgherald.events_v1 TO <role>"),
        ("42501", "permission denied for table events_v1", "read the log",
         pgherald.PrivilegeError, "GRANT SELECT ON TABLE pgherald.events_v1 TO <role>"),
        ("42501", "permission denied for schema pgherald", "publish",
         pgherald.PrivilegeError, "GRANT USAGE ON SCHEMA pgherald TO <role>"),
        ("42501", "permission denied for sequence events_v1_id_seq", "publish",
         pgherald.PrivilegeError, "GRANT USAGE ON SEQUENCE pgherald.events_v1_id_seq"),
        ("25006", "cannot execute INSERT in a read-only transaction", "publish",
         pgherald.PublishError, "point pgherald at the primary"),
        ("25006", "cannot execute LISTEN during recovery", "LISTEN",
         pgherald.ListenError, "point pgherald at the primary"),
        ("25006", "cannot execute NOTIFY during recovery", "NOTIFY on channel 'x'",
         pgherald.NotifyError, "point pgherald at the primary"),
        ("25P02", "current transaction is aborted", "NOTIFY on channel 'x'",
         pgherald.TransactionStateError, "roll it back"),
        ("57P01", "terminating connection due to administrator command", "consume",
         pgherald.ConnectionLost, "open a new one"),
        ("08006", "server closed the connection unexpectedly", "publish",
         pgherald.ConnectionLost, "open a new one"),
        ("57P03", "the database system is starting up", "consume",
         pgherald.ConnectError, "server is running"),
        ("08001", "could not connect", "connect", pgherald.ConnectError, "server is running"),
        ("22P02", "invalid input syntax for type json", "publish",
         pgherald.PublishError, "publish failed (invalid input syntax for type json)"),
        ("22P02", "invalid input syntax", "NOTIFY on channel 'x'",
         pgherald.NotifyError, "NOTIFY on channel 'x' failed"),
        (None, "something odd", "read the log", pgherald.HeraldError, "read the log failed"),
    ],
)  # fmt: skip
def test_sqlstate_gives_class_and_fix(
    sqlstate: str | None, message: str, doing: str, cls: type[Exception], fix: str
) -> None:
    err = from_sqlstate(sqlstate, message, doing=doing)
    assert type(err) is cls
    assert fix in str(err)


def test_undefined_objects_outside_our_schema_are_not_schema_missing() -> None:
    err = from_sqlstate("42P01", 'relation "orders" does not exist', doing="publish")
    assert type(err) is pgherald.PublishError
    assert "orders" in str(err)


def test_sqlalchemy_pending_rollback_is_a_transaction_state_error() -> None:
    import sqlalchemy.exc

    exc = sqlalchemy.exc.PendingRollbackError("This Session's transaction has been rolled back")
    err = from_driver(exc, doing="publish")
    assert type(err) is pgherald.TransactionStateError
    assert "roll it back" in str(err)
