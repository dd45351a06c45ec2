"""
A server of a test module's own, for tests that a transaction of another test can spoil.

Not a plugin: a module opts in by importing both fixtures, which then stand in for the
session's (`tests.fix_db`) in that module alone; each test still gets a database of its own.

Why: the log hands out an event once every transaction older than it has ended anywhere on the
server (docs/durable.md), and a wake-up's note lists every transaction running on the cluster.
On the shared server, another test's open transaction, in any database, holds events back and
leaves no note usable: a test of the wake-up path then tests nothing, and a bound on lateness
measures the other test (CI saw ``from_wakeups == 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgherald.testing import DatabaseDropper
from tests.fix_server import own_server


@pytest.fixture(scope="module")
def server_dsn() -> Iterator[str]:
    """An admin DSN of this module's own server (loadfile keeps a module on one worker)."""
    with own_server() as server:
        yield server.dsn


@pytest.fixture(scope="module")
def database_dropper(server_dsn: str) -> Iterator[DatabaseDropper]:
    """Drops this module's databases on its own server."""
    with DatabaseDropper.session(server_dsn) as dropper:
        yield dropper
