"""
Liveness that proves delivery: a NOTIFY to a private channel that must come back.

``SELECT 1`` only proves that *something* answers; it passes behind a transaction-mode pooler
that never delivers a notification. Here the proof is a notification making the trip:

- `probe` (the periodic health check) NOTIFYs the connection's own ping channel from the
  connection itself and waits for it. A half-open connection times out.
- `check_delivery` (at start) sends the NOTIFY from a *second* connection. A self-NOTIFY comes
  back even through PgBouncer in transaction mode (PostgreSQL sends it before ReadyForQuery,
  while the pooler still has the client attached), but a NOTIFY from elsewhere reaches a pooled
  client only if its LISTEN stays in effect, which needs a session-mode pool or a direct DSN.

Both are pgwire-style generators: they yield WAIT requests and never block. Every other
notification libpq hands over meanwhile goes to *keep*, so nothing is dropped.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Generator

from psycopg import OperationalError, pq, sql

from ..errors import ConnectError, PoolerError
from . import pgwire
from .pgwire import READ, WAIT, PQGen, Request

__all__ = ["PING_PREFIX", "check_delivery", "new_ping_channel", "probe"]

PING_PREFIX = "pgherald_ping_"

# Each probe carries its own payload, so a late answer to an earlier probe is never mistaken
# for this one's. (next() on a count is atomic under the GIL.)
_tokens = itertools.count(1)


def new_ping_channel() -> str:
    """
    A private channel for one connection's liveness probes. Only that exact name is ours: an
    application may well LISTEN to channels that begin with `PING_PREFIX`.
    """
    return PING_PREFIX + secrets.token_hex(8)


def _notify_query(channel: str, token: bytes) -> bytes:
    return sql.SQL("NOTIFY {}, ").format(sql.Identifier(channel)).as_bytes(None) + (
        b"'" + token + b"'"
    )


def _new_token() -> bytes:
    return b"%d.%s" % (next(_tokens), secrets.token_hex(4).encode())


def probe(
    pgconn: pq.abc.PGconn,
    channel: str,
    deadline: float,
    keep: Callable[[pq.PGnotify], None],
) -> PQGen:
    """
    NOTIFY *channel* on *pgconn* and wait until that notification comes back.

    The caller already LISTENs on *channel*. Raises `pgwire.QueryTimeout` past *deadline*,
    `pgwire.QueryFailed` if the server refuses the NOTIFY; connection failures surface as
    `psycopg.OperationalError`. Other notifications read meanwhile go to *keep*, in order.
    """
    token = _new_token()
    yield from pgwire.execute(pgconn, _notify_query(channel, token), deadline)
    if not (yield from _await_ping(pgconn, channel.encode(), token, deadline, keep)):
        raise pgwire.QueryTimeout()


def check_delivery(
    conninfo: str,
    pgconn: pq.abc.PGconn,
    channel: str,
    deadline: float,
    keep: Callable[[pq.PGnotify], None],
) -> PQGen:
    """
    Prove that a NOTIFY from another session reaches *pgconn* (idle, LISTENing on *channel*).

    Opens a short-lived second connection with *conninfo*, NOTIFYs from it and waits on
    *pgconn*. Raises `PoolerError` if nothing arrives by *deadline*, `ConnectError` if the
    second connection fails; failures of *pgconn* surface as `psycopg.OperationalError`.
    Other notifications read meanwhile go to *keep*, in order.
    """
    started = time.monotonic()
    token = _new_token()
    other = yield from pgwire.connect(conninfo, deadline)
    try:
        yield from pgwire.execute(other, _notify_query(channel, token), deadline)
    except pgwire.QueryTimeout:
        raise ConnectError(
            "the start-up delivery check timed out sending its NOTIFY; is the server or "
            "pooler overloaded?"
        ) from None
    except pgwire.QueryFailed as exc:
        raise ConnectError(f"the start-up delivery check could not NOTIFY: {exc}") from None
    except OperationalError as exc:
        raise ConnectError(f"the start-up delivery check lost its connection: {exc}") from None
    finally:
        other.finish()
    if not (yield from _await_ping(pgconn, channel.encode(), token, deadline, keep)):
        waited = time.monotonic() - started
        raise PoolerError(
            f"notifications do not reach this connection: a NOTIFY from another session got "
            f"no answer within {waited:.1f}s. The DSN most likely points at a transaction- or "
            "statement-mode pooler such as PgBouncer pool_mode=transaction, where LISTEN does "
            "not stay in effect. Fix: listen through a session-mode pool "
            "(pool_mode=session) or a direct DSN to PostgreSQL."
        )


def _await_ping(
    pgconn: pq.abc.PGconn,
    relname: bytes,
    token: bytes,
    deadline: float,
    keep: Callable[[pq.PGnotify], None],
) -> Generator[Request, bool, bool]:
    """Read until the ping (*relname*, *token*) arrives (True) or *deadline* passes (False)."""
    notifies = pgconn.notifies
    while True:
        while (n := notifies()) is not None:
            if n.relname == relname:
                if n.extra == token:
                    # Stop here: what follows stays in libpq's queue, still in order.
                    return True
                continue  # an earlier probe's late answer: ours, not the application's
            keep(n)
        ready = yield (WAIT, pgconn.socket, READ, deadline)
        if ready:
            pgconn.consume_input()  # raises OperationalError when the connection is gone
            if pgconn.status == pq.ConnStatus.BAD:
                raise OperationalError(pgwire.error_text(pgconn))
        elif time.monotonic() >= deadline:
            return False
