from __future__ import annotations

import types

import pgherald


def test_all_is_sorted_and_complete() -> None:
    assert pgherald.__all__ == sorted(pgherald.__all__)
    public = {
        name
        for name in dir(pgherald)
        # Submodules (errors, sql, contrib...) show up once imported; they are not re-exports.
        if not name.startswith("_") and not isinstance(getattr(pgherald, name), types.ModuleType)
    } - {"annotations"}
    assert public == set(pgherald.__all__)


def test_public_names_belong_to_pgherald() -> None:
    for name in pgherald.__all__:
        obj = getattr(pgherald, name)
        assert obj.__module__ == "pgherald", name
