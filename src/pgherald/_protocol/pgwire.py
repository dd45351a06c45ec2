"""
Connecting and running statements over libpq without blocking.

These generators drive a `psycopg.pq.PGconn` in non-blocking mode and yield what they wait for;
a runtime waiter resumes them. They mirror psycopg's own ``generators`` module but use only the
documented ``psycopg.pq`` API, so the same code serves threads, asyncio and trio.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable, Generator
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import ConnectError

# Requests a state machine yields to its runtime (tuples: no allocation beyond the tuple).
WAIT = 0  # (WAIT, fd, events, deadline) -> True if ready, False on timeout or wake-up
SLEEP = 1  # (SLEEP, deadline) -> None
DELIVER = 2  # (DELIVER,) -> None; the runtime pulls notifications until there are none
REPORT = 3  # (REPORT, event) -> None; the runtime hands the event to the application
RESOLVE = 9  # (RESOLVE, host, port, deadline) -> addresses (list of str); None if woken or
# timed out; the OSError (socket.gaierror) when the name does not resolve (returned, not raised)

READ = 1
WRITE = 2

Request: TypeAlias = tuple[Any, ...]
PQGen: TypeAlias = Generator[Request, Any, Any]
T = TypeVar("T")


class QueryTimeout(Exception):
    """A statement got no complete answer before its deadline (internal)."""


class QueryFailed(Exception):
    """The server answered a statement with an error (internal; carries the message)."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def error_text(pgconn: pq.abc.PGconn) -> str:
    """libpq's last error message as one clean line."""
    msg = pgconn.error_message.decode("utf-8", "replace").strip()
    return " ".join(msg.split()) or "unknown error"


def connect(conninfo: str, deadline: float) -> Generator[Request, Any, pq.abc.PGconn]:
    """Open a connection; raise `ConnectError` with libpq's message on failure."""
    conninfo = yield from resolved(conninfo, deadline)
    pgconn = pq.PGconn.connect_start(conninfo.encode("utf-8"))
    try:
        if pgconn.status == pq.ConnStatus.BAD:
            raise ConnectError(error_text(pgconn))
        while True:
            state = pgconn.connect_poll()
            if state == pq.PollingStatus.OK:
                break
            if state == pq.PollingStatus.FAILED:
                raise ConnectError(error_text(pgconn))
            events = READ if state == pq.PollingStatus.READING else WRITE
            ready = yield (WAIT, pgconn.socket, events, deadline)
            if not ready and time.monotonic() >= deadline:
                raise ConnectError("timed out while connecting")
        pgconn.nonblocking = 1
    except BaseException:
        pgconn.finish()
        raise
    return pgconn


def resolved(conninfo: str, deadline: float) -> Generator[Request, Any, str]:
    """
    *conninfo* with its host names looked up by the runtime (`RESOLVE`) and given to libpq as
    ``hostaddr``: libpq looks names up itself, blocking, inside its non-blocking connect (an
    event loop would stand still for as long as DNS takes: seconds when it is down). Each
    name keeps its place in the ``host`` list (libpq still checks TLS certificates against
    it), one entry per address, in the resolver's order. Left to libpq: socket directories,
    IP addresses, a ``hostaddr`` or a ``service`` given in the conninfo or the environment
    (a service file's host and port come before ``PGHOST`` and ``PGPORT``), and
    ``load_balance_hosts`` (one entry per address would weigh a name by its addresses).
    """
    params = conninfo_to_dict(conninfo)
    if (
        params.get("hostaddr")
        or params.get("service")
        or params.get("load_balance_hosts")
        or os.environ.get("PGHOSTADDR")
        or os.environ.get("PGSERVICE")
        or os.environ.get("PGLOADBALANCEHOSTS")
    ):
        return conninfo
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    hosts = host.split(",")
    port = str(params.get("port") or os.environ.get("PGPORT") or "")
    ports = port.split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    if not any(map(_needs_lookup, hosts)) or len(ports) != len(hosts):
        return conninfo  # nothing to look up; or a count mismatch, which libpq reports
    out: list[tuple[str, str, str]] = []  # (host, hostaddr, port)
    failures = []
    for name, number in zip(hosts, ports, strict=True):
        if not _needs_lookup(name):
            out.append((name, "", number))  # an empty hostaddr: libpq uses the host as it is
            continue
        while True:
            addresses = yield (RESOLVE, name, number or "5432", deadline)
            if isinstance(addresses, OSError):
                failures.append(f'could not translate host name "{name}" to address: {addresses}')
                break
            if addresses is not None:
                out.extend((name, address, number) for address in addresses)
                break
            if time.monotonic() >= deadline:
                raise ConnectError(f'timed out while looking up host name "{name}"')
    if not out:
        raise ConnectError("; ".join(failures))
    params["host"] = ",".join(h for h, _, _ in out)
    params["hostaddr"] = ",".join(a for _, a, _ in out)
    params["port"] = ",".join(p for _, _, p in out)
    return make_conninfo("", **params)


def identity(pgconn: pq.abc.PGconn) -> tuple[int, str]:
    """
    The connection's session as the server knows it: (backend pid, application name). Taken
    at connection: once libpq has seen the connection fail, its backend pid reads 0, and that
    is when a half-open session still on the server must be found (queries.sql
    ``end_previous_session``).
    """
    name = pgconn.parameter_status(b"application_name") or b""
    return pgconn.backend_pid, name.decode("utf-8", "replace")


def addresses(infos: list[Any]) -> list[str]:
    """The addresses of a `getaddrinfo` answer, in its order, each once."""
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _needs_lookup(host: str) -> bool:
    """A host name (not empty, not a socket directory, not an IP address)."""
    if not host or host.startswith(("/", "@")) or host[1:2] == ":":  # C:\... on Windows
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def execute(
    pgconn: pq.abc.PGconn, query: bytes, deadline: float
) -> Generator[Request, bool, list[pq.abc.PGresult]]:
    """
    Send *query* (one or more statements) and collect every result.

    Notifications that arrive meanwhile stay in libpq's queue for the caller to drain.
    Raises `QueryFailed` for an error result and `QueryTimeout` past *deadline*; connection
    failures surface as `psycopg.OperationalError`.
    """
    pgconn.send_query(query)
    return (yield from finish(pgconn, deadline))


def execute_params(
    pgconn: pq.abc.PGconn,
    query: bytes,
    params: list[bytes | None],
    deadline: float,
    *,
    binary: bool = False,
) -> Generator[Request, bool, list[pq.abc.PGresult]]:
    """
    Send one statement with ``$n`` parameters (text values, None for NULL) and collect its
    results; results in binary when *binary*. Same errors as `execute`.
    """
    pgconn.send_query_params(
        query, params, result_format=pq.Format.BINARY if binary else pq.Format.TEXT
    )
    return (yield from finish(pgconn, deadline))


def finish(
    pgconn: pq.abc.PGconn, deadline: float
) -> Generator[Request, bool, list[pq.abc.PGresult]]:
    """Flush what was sent and collect every result of the statement in flight."""
    while pgconn.flush():
        ready = yield (WAIT, pgconn.socket, WRITE, deadline)
        if not ready and time.monotonic() >= deadline:
            raise QueryTimeout()
    results: list[pq.abc.PGresult] = []
    error: QueryFailed | None = None
    while True:
        while pgconn.is_busy():
            ready = yield (WAIT, pgconn.socket, READ, deadline)
            if ready:
                pgconn.consume_input()
            elif time.monotonic() >= deadline:
                raise QueryTimeout()
        res = pgconn.get_result()
        if res is None:
            break
        if res.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = result_error(res)
        results.append(res)
    if error is not None:
        raise error
    if not results and pgconn.status == pq.ConnStatus.BAD:
        # Closed under the statement (an aclose() from another task finished it): no answer,
        # which must not read as an empty one.
        raise psycopg.OperationalError("the connection was closed before the statement's answer")
    return results


STOP_GRACE = 0.5
"""Seconds a statement may still take once its engine is stopping, before it is abandoned:
`stop()` must end `run()` within a second in every state (a frozen connection included)."""


class Abandoned(BaseException):
    """
    A statement abandoned by `until_stopped` (internal). A BaseException, so that no
    ``except Exception`` on the way swallows it; the connection's state is unknown after it.
    """


def until_stopped(gen: PQGen, stopping: Callable[[], bool]) -> PQGen:
    """
    Drive statement generator *gen*; once *stopping()* is true, cut its waits (and host name
    look-ups) to `STOP_GRACE` seconds from then, and past that close it and raise `Abandoned`.
    Statement waits only: an engine's idle wait needs no guard (`stop()` wakes it, and the
    loop looks first).
    """
    send: Any = None
    limit: float | None = None
    while True:
        try:
            req = gen.send(send)
        except StopIteration as done:
            return done.value
        if (req[0] == WAIT or req[0] == RESOLVE) and stopping():
            now = time.monotonic()
            if limit is None:
                limit = now + STOP_GRACE
            if now >= limit:
                gen.close()
                raise Abandoned()
            deadline = req[3]
            req = (req[0], req[1], req[2], limit if deadline is None else min(deadline, limit))
        try:
            send = yield req
        except GeneratorExit:
            gen.close()
            raise


class Cancelling:
    """What `cancel_at` did at the statement's deadline."""

    def __init__(self) -> None:
        self.cancelled = False  # a cancel was sent (or tried)


def cancel_at(
    pgconn: pq.abc.PGconn,
    gen: Generator[Request, bool, T],
    deadline: float,
    grace: float,
    state: Cancelling,
) -> Generator[Request, bool, T]:
    """
    Drive statement generator *gen* (made with a deadline *grace* past *deadline*); at
    *deadline*, cancel its statement on the server, then let *gen* take the answer: an error
    (57014 when the cancel took), or the statement's result when it completed meanwhile.
    """
    send: Any = None
    while True:
        try:
            req = gen.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        if req[0] != WAIT or state.cancelled:
            send = yield req
            continue
        ready = yield (WAIT, req[1], req[2], deadline if req[3] is None else min(req[3], deadline))
        if (
            not ready
            and time.monotonic() >= deadline
            and pgconn.transaction_status == pq.TransactionStatus.ACTIVE
        ):
            state.cancelled = True
            yield from cancel(pgconn, deadline + grace)
        send = ready


def cancel(pgconn: pq.abc.PGconn, deadline: float) -> Generator[Request, bool, bool]:
    """Ask the server to cancel *pgconn*'s statement, by *deadline*: whether it was asked."""
    try:
        cancel = pgconn.cancel_conn()
    except psycopg.Error:
        return False
    try:
        cancel.start()
        while True:
            status = cancel.poll()
            if status == pq.PollingStatus.OK:
                return True
            if status not in (pq.PollingStatus.READING, pq.PollingStatus.WRITING):
                return False
            events = READ if status == pq.PollingStatus.READING else WRITE
            ready = yield (WAIT, cancel.socket, events, deadline)
            if not ready and time.monotonic() >= deadline:
                return False
    except psycopg.Error:
        return False
    finally:
        cancel.finish()


def result_error(res: pq.abc.PGresult) -> QueryFailed:
    """The server's error in *res* as `QueryFailed` (its primary message and SQLSTATE)."""
    raw = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    return QueryFailed(raw.decode("utf-8", "replace"), state.decode() if state else None)


def one_line(exc: BaseException | None) -> str:
    """An exception's message on one line (its type's name when it has none, or when its
    ``__str__`` fails: a handler's exception is anyone's code)."""
    if exc is None:
        return ""
    try:
        text = str(exc)
    except Exception:
        return f"{type(exc).__name__} (its message could not be read)"
    text = " ".join(text.split()) or type(exc).__name__
    if not text.isprintable():  # a NUL, a lone surrogate: escaped, printable and storable
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text


def is_connection_error(exc: BaseException) -> bool:
    """True for the driver errors that mean the connection itself is gone."""
    return isinstance(exc, pg_errors.OperationalError)


# Connection failures that retrying cannot fix (libpq gives no SQLSTATE for them: its message).
_PERMANENT_MARKERS = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # the role or the database
    "invalid connection option",
    "invalid dsn",
    "unsupported startup parameter",  # a pooler's (PgBouncer: replication, options...)
)
POOLER_REFUSES_REPLICATION = "unsupported startup parameter: replication"
"""PgBouncer's answer (before 1.23) to a replication connection."""
PERMANENT_CONNECT_TRIES = 3
"""Reconnecting gives up after this many such failures in a row."""


def is_permanent_connect_error(message: str) -> bool:
    """True when a failed connection attempt says something a retry will not change."""
    lowered = message.lower()
    return any(marker in lowered for marker in _PERMANENT_MARKERS)


class PermanentFailures:
    """
    Connection failures in a row that a retry will not fix (a dropped database, a wrong
    password): the engines' reconnection loops give up at `PERMANENT_CONNECT_TRIES`.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def give_up(self, message: str) -> bool:
        """Count a failed attempt with *message*; True once retrying is no use."""
        self.count = self.count + 1 if is_permanent_connect_error(message) else 0
        return self.count >= PERMANENT_CONNECT_TRIES
