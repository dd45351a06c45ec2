"""Commands: ``listen``, ``notify``, ``demo``. Every option has a ``PGHERALD_*`` twin."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .._listener import Listener
from .._models import Gap, Notification
from ..errors import HeraldError

if TYPE_CHECKING:
    import psycopg

F = TypeVar("F", bound=Callable[..., Any])

dsn_option = click.option(
    "--dsn",
    envvar="PGHERALD_DSN",
    show_envvar=True,
    default=None,
    help="PostgreSQL connection string; default: libpq's own environment (PGHOST, ...).",
)


def json_option(help: str) -> Callable[[F], F]:
    """``--json`` (or ``PGHERALD_JSON``): print one JSON object per line."""
    return click.option(
        "--json", "as_json", is_flag=True, envvar="PGHERALD_JSON", show_envvar=True, help=help
    )


@contextlib.contextmanager
def connection(dsn: str | None, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    import psycopg

    from .._conninfo import connect_error, listener_conninfo

    conninfo = listener_conninfo(dsn, application_name="pgherald-cli")
    try:
        conn = psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise connect_error(conninfo, " ".join(str(exc).split())) from None
    with conn:
        yield conn


def fail(message: str, code: int = 1) -> None:
    click.echo(f"pgherald: error: {message}", err=True)
    sys.exit(code)


def friendly(func: F) -> F:
    """Turn pgherald errors into one line on stderr and a non-zero exit: no traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HeraldError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            sys.exit(0)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM stop the listener cleanly (exit status 0)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "PGHERALD"}
)
@click.version_option(package_name="pgherald")
def cli() -> None:
    """pgherald: PostgreSQL LISTEN/NOTIFY as a dependable real-time event system."""
    logging.basicConfig(level=logging.WARNING, format="pgherald: %(message)s")


@cli.command()
@dsn_option
@json_option("One JSON object per line: channel, payload, pid.")
@click.argument("channels", nargs=-1, required=True)
@friendly
def listen(dsn: str | None, as_json: bool, channels: tuple[str, ...]) -> None:
    """Print notifications on CHANNELS as they arrive, until Ctrl-C or SIGTERM.

    Reconnects by itself; a gap (when notifications may have been missed) is reported on stderr.
    """
    out = sys.stdout

    def on_gap(gap: Gap) -> None:
        click.echo(
            click.style(
                f"-- listening again after {gap.ended - gap.started:.2f}s ({gap.reason}: "
                f"{gap.error}); notifications sent meanwhile were missed",
                fg="yellow",
            ),
            err=True,
        )

    listener = Listener(dsn, channels=list(channels), on_gap=on_gap)
    with listener, stop_on_signals(listener.stop):
        for n in listener:
            if as_json:
                out.write(
                    json.dumps({"channel": n.channel, "payload": n.payload, "pid": n.pid}) + "\n"
                )
                out.flush()
            else:
                click.echo(format_notification(n))
                out.flush()


def format_notification(n: Notification) -> str:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    return (
        f"{click.style(stamp, dim=True)} {click.style(n.channel, fg='cyan', bold=True)} "
        f"{n.payload} {click.style(f'(pid {n.pid})', dim=True)}"
    )


@cli.command()
@dsn_option
@click.argument("channel")
@click.argument("payload", default="")
@friendly
def notify(dsn: str | None, channel: str, payload: str) -> None:
    """Send PAYLOAD (text as given; '-' reads stdin) on CHANNEL."""
    from .._notify import notify as do_notify

    if payload == "-":
        payload = sys.stdin.read()
    with connection(dsn) as conn:
        do_notify(conn, channel, payload)


@cli.command()
@dsn_option
@click.option(
    "--pause",
    default=0.4,
    show_default=True,
    envvar="PGHERALD_DEMO_PAUSE",
    show_envvar=True,
    help="Seconds between demo steps.",
)
@friendly
def demo(dsn: str | None, pause: float) -> None:
    """A live tour: listener, transactional notifications, errors and a reconnect.

    With no DSN (no --dsn, PGHERALD_DSN or PGHOST) it starts an embedded PostgreSQL.
    """
    from ._demo import run_demo

    # The demo narrates reconnects itself; the library's own warnings would repeat them.
    logging.getLogger("pgherald").setLevel(logging.ERROR)
    run_demo(dsn, pause=pause, echo=click.echo, style=click.style)
