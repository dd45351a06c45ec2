"""What a listener or consumer can connect with: resolve_source on strings and engines (no I/O)."""

from __future__ import annotations

import inspect
import logging

import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict

import pgherald
from pgherald._conninfo import resolve_source


def params(source: object) -> dict[str, object]:
    conninfo, lent = resolve_source(source, application_name="pgherald-test")  # type: ignore[arg-type]
    assert lent is None
    return conninfo_to_dict(conninfo)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://app:s%40cret@db.example:6432/shop",
        "postgresql+psycopg://app:s%40cret@db.example:6432/shop",
        "postgresql+asyncpg://app:s%40cret@db.example:6432/shop",
        "postgres://app:s%40cret@db.example:6432/shop",
        "postgresql://app:s%40cret@db.example:6432/shop",
        "host=db.example port=6432 dbname=shop user=app password=s@cret",
    ],
)
def test_dsn_and_sqlalchemy_urls_give_the_same_parameters(url: str) -> None:
    p = params(url)
    assert {k: p[k] for k in ("host", "port", "dbname", "user", "password")} == {
        "host": "db.example",
        "port": "6432",
        "dbname": "shop",
        "user": "app",
        "password": "s@cret",
    }
    assert p["application_name"] == "pgherald-test"
    assert p["keepalives"] == "1"
    # What we send and is never acknowledged fails in 10 s, not after Linux's 15 minutes.
    assert p["tcp_user_timeout"] == "10000"


def test_a_dsn_keeps_its_own_tcp_settings() -> None:
    p = params("host=h dbname=d keepalives_idle=30 tcp_user_timeout=2500")
    assert (p["keepalives_idle"], p["tcp_user_timeout"]) == ("30", "2500")
    assert p["keepalives_count"] == "3"  # the rest: ours


def test_driver_only_url_options_are_dropped_by_name_and_ssl_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="pgherald"):
        p = params(
            "postgresql+asyncpg://app:hunter2@h/db?ssl=require&prepared_statement_cache_size=0"
            "&connect_timeout=3"
        )
    assert p["sslmode"] == "require"  # asyncpg's ?ssl= is libpq's sslmode
    assert p["connect_timeout"] == "3"
    assert "prepared_statement_cache_size" not in p
    assert "prepared_statement_cache_size" in caplog.text
    assert "hunter2" not in caplog.text


def test_a_plain_url_keeps_libpq_checking_its_options() -> None:
    with pytest.raises(pgherald.ConnectError, match="invalid DSN") as info:
        params("postgresql://app:hunter2@h/db?no_such_option=1")
    assert "hunter2" not in str(info.value)


def test_none_reads_pgherald_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHERALD_DSN", "postgresql+psycopg2://envuser@envhost/envdb")
    p = params(None)
    assert (p["user"], p["host"], p["dbname"]) == ("envuser", "envhost", "envdb")


def test_sqlalchemy_engine_url_with_password() -> None:
    engine = sa.create_engine(
        sa.URL.create(
            "postgresql+psycopg2",
            username="app",
            password="p@ss/w:rd",
            host="db.example",
            port=5433,
            database="shop",
            query={"sslmode": "disable"},
        )
    )
    p = params(engine)
    assert (p["user"], p["password"], p["host"], p["port"], p["dbname"], p["sslmode"]) == (
        "app",
        "p@ss/w:rd",
        "db.example",
        "5433",
        "shop",
        "disable",
    )


def test_a_sqlalchemy_engine_for_another_database_is_refused() -> None:
    with pytest.raises(pgherald.UsageError, match="sqlite, not PostgreSQL"):
        params(sa.create_engine("sqlite://"))


@pytest.mark.parametrize("source", [object(), 5432, b"postgresql://h/db"])
def test_anything_else_is_a_usage_error_naming_what_works(source: object) -> None:
    with pytest.raises(pgherald.UsageError) as info:
        params(source)
    message = str(info.value)
    for kind in ("DSN or URL string", "psycopg 3", "psycopg2", "SQLAlchemy Engine"):
        assert kind in message
    with pytest.raises(pgherald.UsageError):
        pgherald.Listener(source)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [pgherald.Listener, pgherald.AsyncListener])
def test_listener_signatures_show_the_typed_options(cls: type) -> None:
    # help(), IDEs and type checkers see the options, not (dsn, **kwargs).

    params = inspect.signature(cls).parameters
    assert next(iter(params)) == "dsn"
    assert params["channels"].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cret@[db.internal/shop",  # the URI's password
        "postgresql://app@[db.internal/shop?password=s3cret",  # a query parameter
        "postgresql://app:s3cr%ZZet@db.internal/shop",  # libpq quotes the bad token itself
    ],
)
def test_an_unparsable_dsn_is_an_error_without_its_password(dsn: str) -> None:
    from pgherald._conninfo import parse_dsn

    with pytest.raises(pgherald.ConnectError, match=r"^invalid DSN \(") as info:
        parse_dsn(dsn)
    assert "s3cr" not in str(info.value)
    assert "***" in str(info.value)
