from __future__ import annotations

# Fixtures live in plugins (tests/fix_*.py); fix_db is loaded from pyproject's addopts so that
# its --test-dsn option is known before collection.
pytest_plugins = (
    "tests.fix_proxy",
    "tests.fix_faults",
    "tests.fix_durable",
    "tests.fix_server",
    "tests.fix_brokers",
)
