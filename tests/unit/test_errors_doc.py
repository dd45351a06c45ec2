"""docs/errors.md documents every exception pgherald exports (a new class fails until it does)."""

from __future__ import annotations

import re
from pathlib import Path

import pgherald
import pgherald.errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def exported_exceptions() -> set[str]:
    names = set(pgherald.errors.__all__)
    names |= {
        name
        for name in pgherald.__all__
        if isinstance(getattr(pgherald, name), type)
        and issubclass(getattr(pgherald, name), BaseException)
    }
    return names


def test_every_exported_exception_has_a_section_in_errors_md() -> None:
    headings = set(re.findall(r"^#+ `(\w+)`", DOC.read_text(), re.MULTILINE))
    missing = sorted(exported_exceptions() - headings)
    assert not missing, f"docs/errors.md has no section for: {', '.join(missing)}"


def test_the_tree_in_errors_md_and_in_the_module_docstring_is_complete() -> None:
    text = DOC.read_text()
    start = text.index("```text\nHeraldError")
    tree = text[start : text.index("```", start + 3)]
    drawn = {"HeraldError", *re.findall(r"[├└]── (\w+)", tree)}
    assert sorted(exported_exceptions() - drawn) == [], "missing from the tree in docs/errors.md"
    assert sorted(drawn - exported_exceptions()) == [], "drawn in docs/errors.md, not exported"
    doc = pgherald.errors.__doc__ or ""
    undrawn = sorted(n for n in exported_exceptions() if not re.search(rf"\b{n}\b", doc))
    assert not undrawn, f"missing from the tree in pgherald/errors.py's docstring: {undrawn}"


def test_every_exported_exception_is_a_herald_error() -> None:
    for name in exported_exceptions():
        assert issubclass(getattr(pgherald, name), pgherald.HeraldError), name


def test_gateway_exceptions_are_herald_errors_and_documented() -> None:
    from pgherald.contrib.gateway.auth import AuthError
    from pgherald.contrib.gateway.fanout import UnknownEventId
    from pgherald.contrib.gateway.publishing import PublishRefused
    from pgherald.contrib.gateway.sse import BadRequest

    text = DOC.read_text()
    for cls in (AuthError, BadRequest, PublishRefused, UnknownEventId):
        assert issubclass(cls, pgherald.HeraldError), cls
        assert f"`{cls.__name__}`" in text, f"docs/errors.md does not mention {cls.__name__}"
