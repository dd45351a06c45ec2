"""
Server-side filters on a subscription: PostgREST-style ``FIELD=OP.VALUE`` on top-level fields.

``status=eq.paid``, ``amount=gte.100``, ``kind=in.(a,b,"c,d")``, ``deleted_at=is.null``,
``status=not.eq.paid``. Several filters on one subscription must all hold. Only JSON objects
pass filters. As in SQL (and PostgREST), a field that is null or missing is neither equal nor
unequal to anything: only ``is.null`` (and ``not.is.null``) tests it; ``not.`` negates the rest
for fields that have a value. See docs/gateway.md#filters.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

from ...errors import HeraldError

OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "is")
"""The operators a filter takes (and ``not.`` before any of them)."""

MAX_FILTERS = 20
"""Filters on one subscription, at most."""

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
_IS = {"null": None, "true": True, "false": False}


class FilterError(HeraldError):
    """A filter that cannot be read (the gateway answers 400, or an ``error`` message)."""


Test = Callable[[Any], bool]
"""One condition on a field's value (None when the payload has no such field)."""


class Filter:
    """The filters of one subscription; call it with the decoded payload."""

    __slots__ = ("_tests", "text")

    def __init__(self, tests: list[tuple[str, Test]], text: tuple[str, ...]) -> None:
        self._tests = tests
        self.text = text
        """The filters as given (for messages)."""

    def __call__(self, payload: Any) -> bool:
        if isinstance(payload, dict):
            return all(test(payload.get(field)) for field, test in self._tests)
        return False  # only an object has fields

    def __repr__(self) -> str:
        return f"Filter({'&'.join(self.text)})"


def decode(payload: str) -> Any:
    """A payload as a filter sees it: the JSON value, or no fields at all (not JSON)."""
    if payload.lstrip()[:1] != "{":
        return None  # only an object has fields
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def parse_filters(values: Iterable[str]) -> Filter | None:
    """The `Filter` for ``FIELD=OP.VALUE`` strings (None when there are none); `FilterError`."""
    texts = tuple(v for v in values if v != "")
    if not texts:
        return None
    if len(texts) > MAX_FILTERS:
        raise FilterError(f"at most {MAX_FILTERS} filters on one subscription")
    return Filter([_parse(text) for text in texts], texts)


def _parse(text: str) -> tuple[str, Test]:
    field, eq, condition = text.partition("=")
    if not eq or not field:
        raise FilterError(
            f"invalid filter {text[:80]!r}: write FIELD=OP.VALUE, for example status=eq.paid"
        )
    negate = condition.startswith("not.")
    if negate:
        condition = condition[4:]
    op, dot, value = condition.partition(".")
    if op not in OPERATORS or not dot:
        raise FilterError(
            f"invalid filter {text[:80]!r}: the operator must be one of "
            f"{', '.join(OPERATORS)} followed by a dot and the value (status=eq.paid)"
        )
    test = _test(text, op, value)
    if negate:
        return field, _negated(test, op == "is")
    return field, test


def _negated(test: Test, is_op: bool) -> Test:
    if is_op:
        return lambda v: not test(v)
    return lambda v: v is not None and not test(v)  # NOT (null = x) is null: no match


def _test(text: str, op: str, value: str) -> Test:
    if op == "is":
        if value.lower() not in _IS:
            raise FilterError(
                f"invalid filter {text[:80]!r}: 'is' takes null, true or false (deleted=is.null)"
            )
        wanted = _IS[value.lower()]
        return lambda v: v is wanted
    if op == "in":
        if not (value.startswith("(") and value.endswith(")")):
            raise FilterError(
                f"invalid filter {text[:80]!r}: 'in' takes a list in parentheses "
                '(kind=in.(a,b,"c,d"))'
            )
        items = _items(text, value[1:-1])
        return lambda v: any(_equal(v, item) for item in items)
    if op == "eq":
        return lambda v: _equal(v, value)
    if op == "neq":
        return lambda v: v is not None and not _equal(v, value)
    compare = _ORDER[op]
    number = _number(value)
    if number is not None:
        return lambda v: _is_number(v) and compare(v, number)
    return lambda v: isinstance(v, str) and compare(v, value)


def _equal(v: Any, text: str) -> bool:
    """A field's value compared with the text of a filter: as the field's type reads it."""
    if isinstance(v, str):
        return v == text
    if isinstance(v, bool):
        return text == ("true" if v else "false")
    if _is_number(v):
        number = _number(text)
        return number is not None and v == number
    return False  # null (see is.null), missing, arrays and objects


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _items(text: str, body: str) -> tuple[str, ...]:
    """``a,b,"c,d","say \\"hi\\""``: PostgREST's list, double quotes around items with commas."""
    items: list[str] = []
    i, n = 0, len(body)
    while i <= n:
        if i < n and body[i] == '"':
            j, chars = i + 1, []
            while j < n and body[j] != '"':
                if body[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(body[j])
                j += 1
            if j >= n:
                raise FilterError(f"invalid filter {text[:80]!r}: a quote is not closed")
            items.append("".join(chars))
            i = j + 1
            if i < n and body[i] != ",":
                raise FilterError(f"invalid filter {text[:80]!r}: a comma must follow a quote")
            i += 1
        else:
            j = body.find(",", i)
            j = n if j < 0 else j
            items.append(body[i:j].strip())
            i = j + 1
    return tuple(items)
