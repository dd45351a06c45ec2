"""When a consumer runs the release of delayed events next (`_protocol.scheduled.Releases`)."""

from __future__ import annotations

import pytest

from pgherald._protocol.scheduled import BUSY, CHASE, EARLY, RELEASE_LIMIT, RESCAN, Releases


def row(
    released: int, next_in: float | None, tx: int = 100, horizon: int = 90
) -> list[bytes | None]:
    return [
        str(released).encode(),
        None if next_in is None else repr(next_in).encode(),
        str(tx).encode(),
        str(horizon).encode(),
    ]


def test_nothing_waiting_rescans_later() -> None:
    assert Releases().next(10.0, row(0, None)) == 10.0 + RESCAN


def test_next_due_caps_the_wait_never_early() -> None:
    assert Releases().next(10.0, row(0, 0.25)) == pytest.approx(10.25 + EARLY)
    assert Releases().next(10.0, row(0, 3600.0)) == 10.0 + RESCAN
    assert Releases().next(10.0, row(0, 0.0001)) == pytest.approx(10.0001 + EARLY)


def test_a_full_release_goes_again_at_once() -> None:
    assert Releases().next(10.0, row(RELEASE_LIMIT, 60.0)) == 10.0


def test_after_a_release_chase_until_the_horizon_passes_it() -> None:
    r = Releases()
    assert r.next(10.0, row(3, None, tx=100, horizon=90)) == 10.0 + CHASE[0]
    assert r.next(11.0, row(0, None, tx=101, horizon=95)) == 11.0 + CHASE[0] * 2  # held back
    assert r.next(12.0, row(0, None, tx=102, horizon=101)) == 12.0 + RESCAN  # readable now
    assert r.chasing is None


def test_the_chase_backs_off_to_its_cap() -> None:
    r = Releases()
    r.next(0.0, row(1, None, tx=100, horizon=1))
    delays = [r.next(0.0, row(0, None, tx=200, horizon=1)) for _ in range(12)]
    assert delays == sorted(delays)
    assert delays[-1] == CHASE[1]


def test_locked_out_by_another_releaser_try_again_backing_off() -> None:
    # None moved and one due already: another releaser holds the lock (its transaction may
    # stay open a while): again soon, then less and less often, afresh once it is free.
    r = Releases()
    delays = [r.next(0.0, row(0, -0.5)) for _ in range(12)]
    assert delays[0] == BUSY[0]
    assert delays == sorted(delays)
    assert delays[-1] == BUSY[1]
    assert r.next(0.0, row(0, 2.0)) == pytest.approx(2.0 + EARLY)
    assert r.next(0.0, row(0, 0.0)) == BUSY[0]
