"""
`pgwire.resolved`: which hosts of a conninfo are looked up (`RESOLVE`), and the conninfo libpq
then gets. No I/O: the test answers the requests itself, as a runtime would.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgherald._protocol import pgwire
from pgherald.errors import ConnectError


def drive(
    conninfo: str, answers: Mapping[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Run `resolved`, answering each RESOLVE from *answers*; (the result's params, asked)."""
    asked: list[tuple[str, str]] = []
    gen = pgwire.resolved(conninfo, time.monotonic() + 5)
    send: Any = None
    while True:
        try:
            req = gen.send(send)
        except StopIteration as done:
            return conninfo_to_dict(done.value), asked
        assert req[0] == pgwire.RESOLVE
        asked.append((req[1], req[2]))
        send = answers[req[1]]


@pytest.fixture(autouse=True)
def _no_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGSERVICE", "PGLOADBALANCEHOSTS"):
        monkeypatch.delenv(name, raising=False)


def test_a_name_becomes_its_addresses_beside_it() -> None:
    params, asked = drive(
        "host=db.example port=5433 dbname=x", {"db.example": ["10.0.0.1", "10.0.0.2"]}
    )
    assert asked == [("db.example", "5433")]
    assert params["host"] == "db.example,db.example"  # kept: TLS checks the name
    assert params["hostaddr"] == "10.0.0.1,10.0.0.2"
    assert params["port"] == "5433,5433"
    assert params["dbname"] == "x"


def test_several_hosts_keep_their_order_and_ports() -> None:
    params, asked = drive(
        "host=a.example,10.1.1.1,/run/pg,b.example port=1,2,3,4",
        {"a.example": ["10.0.0.1"], "b.example": ["10.0.0.2", "::1"]},
    )
    assert asked == [("a.example", "1"), ("b.example", "4")]
    assert params["host"] == "a.example,10.1.1.1,/run/pg,b.example,b.example"
    # an empty hostaddr: libpq takes that host as it is (an address, a socket directory)
    assert params["hostaddr"] == "10.0.0.1,,,10.0.0.2,::1"
    assert params["port"] == "1,2,3,4,4"


@pytest.mark.parametrize(
    "conninfo",
    [
        "dbname=x",  # no host: libpq's default socket
        "host=/var/run/postgresql dbname=x",
        "host=127.0.0.1 dbname=x",
        "host=::1 dbname=x",
        "host=db.example hostaddr=10.0.0.1 dbname=x",  # the user's own address
        "service=mine",  # the host may come from the service file
        "host=a.example,b.example load_balance_hosts=random",  # weights stay per name
        "host=a.example,b.example port=1,2,3",  # a count mismatch: libpq says so
    ],
)
def test_left_to_libpq_as_it_is(conninfo: str) -> None:
    gen = pgwire.resolved(conninfo, time.monotonic() + 5)
    with pytest.raises(StopIteration) as done:
        gen.send(None)
    assert done.value.value == conninfo


def test_the_environment_host_is_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "env.example")
    monkeypatch.setenv("PGPORT", "6000")
    params, asked = drive("dbname=x", {"env.example": ["10.0.0.9"]})
    assert asked == [("env.example", "6000")]
    assert (params["host"], params["hostaddr"], params["port"]) == (
        "env.example",
        "10.0.0.9",
        "6000",
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PGHOSTADDR", "10.0.0.1"),
        ("PGSERVICE", "mine"),  # its file's host and port come before PGHOST and PGPORT
        ("PGLOADBALANCEHOSTS", "random"),
    ],
)
def test_left_to_libpq_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("PGHOST", "db.example")
    gen = pgwire.resolved("dbname=x", time.monotonic() + 5)
    with pytest.raises(StopIteration) as done:
        gen.send(None)
    assert done.value.value == "dbname=x"


def test_a_name_that_does_not_resolve_is_skipped_while_others_do() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    params, _ = drive(
        "host=gone.example,ok.example", {"gone.example": error, "ok.example": ["10.0.0.3"]}
    )
    assert (params["host"], params["hostaddr"]) == ("ok.example", "10.0.0.3")


def test_no_name_resolves() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(
        ConnectError, match=re.escape('could not translate host name "gone.example"')
    ):
        drive("host=gone.example", {"gone.example": error})


def test_asked_again_after_a_wake_up_until_the_deadline() -> None:
    gen = pgwire.resolved("host=slow.example", time.monotonic() + 0.05)
    req = gen.send(None)
    assert req[:3] == (pgwire.RESOLVE, "slow.example", "5432")
    again = gen.send(None)  # woken: not done, the deadline not past
    assert again[:2] == (pgwire.RESOLVE, "slow.example")
    time.sleep(0.06)  # past the deadline: the generator reads the clock (no event to wait on)
    with pytest.raises(
        ConnectError, match=re.escape('timed out while looking up host name "slow.example"')
    ):
        gen.send(None)
