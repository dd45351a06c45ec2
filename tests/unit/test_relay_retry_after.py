"""The webhook relay's reading of a receiver's ``Retry-After`` header (no I/O)."""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Iterator

import pytest

from pgherald._relay_webhook import MAX_RETRY_AFTER, retry_after

NOW = 1_700_000_000.0  # a fixed clock: HTTP dates are read against it


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)  # "Tue, 14 Nov 2023 22:13:20 GMT"


def test_seconds() -> None:
    assert retry_after("1", NOW) == 1.0
    assert retry_after(" 120 ", NOW) == 120.0
    assert retry_after("0", NOW) == 0.0


def test_an_http_date_is_the_time_left_until_it() -> None:
    assert retry_after(http_date(NOW + 90), NOW) == pytest.approx(90.0)
    # The obsolete forms RFC 9110 tells recipients to accept too.
    assert retry_after("Tuesday, 14-Nov-23 22:14:50 GMT", NOW) == pytest.approx(90.0)
    assert retry_after("Tue Nov 14 22:14:50 2023", NOW) == pytest.approx(90.0)


def test_a_date_in_the_past_is_no_wait() -> None:
    assert retry_after(http_date(NOW - 3600), NOW) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "-5", "1.5", "1e3", "Tue, 99 Foo 2023 25:61:00 GMT"]
)
def test_absent_or_garbage_is_no_wait(value: str | None) -> None:
    assert retry_after(value, NOW) == 0.0


def test_capped_at_ten_minutes() -> None:
    assert MAX_RETRY_AFTER == 600.0
    assert retry_after("600", NOW) == 600.0
    assert retry_after("601", NOW) == 600.0
    assert retry_after("99999999999999999999", NOW) == 600.0
    assert retry_after(http_date(NOW + 86_400), NOW) == 600.0


@pytest.fixture
def local_time_zone_utc_minus_5() -> Iterator[None]:
    """The process's local time zone 5 hours behind UTC (a POSIX TZ: no zone files needed)."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() is Unix only")
    old = os.environ.get("TZ")
    os.environ["TZ"] = "EST5"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("local_time_zone_utc_minus_5")
@pytest.mark.parametrize(
    "value",
    [
        "Tue, 14 Nov 2023 22:14:50 GMT",
        "Tue Nov 14 22:14:50 2023",
        "Tue, 14 Nov 2023 22:14:50 -0000",
    ],
)
def test_an_http_date_is_gmt_whatever_the_local_time_zone(value: str) -> None:
    # Forms without an explicit zone were read as local time: 5 hours off here.
    assert time.timezone == 5 * 3600
    assert retry_after(value, NOW) == pytest.approx(90.0)
