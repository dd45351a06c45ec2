from __future__ import annotations

import pgherald


def test_all_is_sorted_and_complete() -> None:
    assert pgherald.__all__ == sorted(pgherald.__all__)
    public = {n for n in dir(pgherald) if not n.startswith("_")} - {
        "errors",
        "sql",
        "embedded",
        "cli",
        "annotations",
    }
    assert public == set(pgherald.__all__)


def test_public_names_belong_to_pgherald() -> None:
    for name in pgherald.__all__:
        obj = getattr(pgherald, name)
        assert obj.__module__ == "pgherald", name
