from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def herald_dsn(server_dsn: str) -> str:
    """pgherald's own tests: the plugin's fixtures use the suite's server (tests/fix_db.py).

    Overriding ``herald_dsn`` is also how a project points the plugin at a server of its own.
    """
    return server_dsn
