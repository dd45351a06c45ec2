"""Commands: ``listen``, ``notify``, ``demo``. Every option has a ``PGHERALD_*`` twin."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from .._errormap import from_driver
from .._listener import Listener
from .._models import Gap
from ..errors import HeraldError
from ._format import format_notification

F = TypeVar("F", bound=Callable[..., Any])


def dsn_or_dev_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """No --dsn, $PGHERALD_DSN, $PGHOST or $PGSERVICE: the `pgherald dev start` server if it runs."""
    import os

    if value is not None or os.environ.get("PGHOST") or os.environ.get("PGSERVICE"):
        return value
    from ..embedded import running_dsn

    return running_dsn()


dsn_option = click.option(
    "--dsn",
    envvar="PGHERALD_DSN",
    show_envvar=True,
    default=None,
    callback=dsn_or_dev_server,
    help="PostgreSQL connection string; default: the `pgherald dev` server when it runs, "
    "else libpq's own environment (PGHOST, ...).",
)


def finite_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Callback of a ``FloatRange`` seconds option: nan and inf (which FloatRange lets
    through) are a usage error too."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


def json_option(help: str) -> Callable[[F], F]:
    """``--json`` (or ``PGHERALD_JSON``): print one JSON object per line."""
    return click.option(
        "--json", "as_json", is_flag=True, envvar="PGHERALD_JSON", show_envvar=True, help=help
    )


@contextlib.contextmanager
def connection(
    dsn: str | None, *, autocommit: bool = True, application_name: str = "pgherald-cli"
) -> Iterator[psycopg.Connection[Any]]:
    """
    The connection of a CLI command (every command connects here). It takes at most
    ``connect_timeout`` seconds to open (the DSN's, ``$PGCONNECT_TIMEOUT``, else
    `CONNECT_TIMEOUT`): then, as when it is refused, a `ConnectError` names the server and the
    fix. SIGINT or SIGTERM meanwhile ends the command at once (`interrupted`).
    """
    from .._conninfo import connect_error, describe, listener_conninfo, with_connect_timeout

    conninfo = with_connect_timeout(listener_conninfo(dsn, application_name=application_name))
    started = time.monotonic()
    try:
        with interruptible(f"connecting to PostgreSQL at {describe(conninfo)}"):
            conn = psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.errors.ConnectionTimeout:
        waited = time.monotonic() - started
        raise connect_error(
            conninfo,
            f"no answer within {waited:.0f} s (set connect_timeout in the DSN to wait longer)",
        ) from None
    except psycopg.OperationalError as exc:
        raise connect_error(conninfo, " ".join(str(exc).split())) from None
    with conn:
        yield conn


EXIT_ERROR = 1
"""A pgherald error: the database refused or cannot be reached, bad input, and so on."""
EXIT_USAGE = 2
"""Wrong usage, a missing extra, or a destructive command without --yes and no terminal."""


EXIT_INTERRUPTED = 128
"""Plus the signal's number (130 for SIGINT, 143 for SIGTERM): stopped while connecting."""


class _Signalled(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def interruptible(doing: str) -> Iterator[None]:
    """
    SIGINT and SIGTERM end the command while the block runs (*doing*: what it waits for), with
    one line and status 128 + the signal's number; even when SIGINT was ignored (a background
    job), as `stop_on_signals` does for the commands that run until stopped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (CliRunner may run elsewhere)
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_signalled)
    try:
        yield
    except _Signalled as exc:
        name = signal.Signals(exc.signum).name
        fail(f"interrupted ({name}) while {doing}", EXIT_INTERRUPTED + exc.signum)
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM as Ctrl-C while the block runs (KeyboardInterrupt), so that every ``finally``
    runs: a command that cleans up after itself (the demo) does so when stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (CliRunner may run elsewhere)
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"pgherald: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def confirm_destructive(question: str, *, yes: bool, what: str) -> None:
    """Ask on a terminal; without one, refuse unless ``--yes`` was given (never read a pipe)."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(
            f"refusing to {what} without confirmation, and stdin is not a terminal to ask on: "
            "nothing was changed; pass --yes to confirm",
            EXIT_USAGE,
        )
    if not click.confirm(question, default=False):
        fail("not confirmed: nothing was changed", EXIT_ERROR)


_EXTRAS = {
    "starlette": "gateway",
    "uvicorn": "gateway",
    "jwt": "gateway",
    "prometheus_client": "gateway",
    "websockets": "gateway",
    "pgserver": "embedded",
}


def _doing() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.command_path if ctx is not None else "pgherald"


def friendly(func: F) -> F:
    """Turn every failure a user can cause into one line on stderr and a documented exit status."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HeraldError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            sys.exit(0)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").partition(".")[0]
            extra = _EXTRAS.get(root)
            if extra is None:
                raise
            fail(
                f"{_doing()} needs the '{extra}' extra ({root} is not installed): "
                f"pip install 'pgherald[{extra}]'",
                EXIT_USAGE,
            )
        except UnicodeError as exc:
            fail(
                f"{_doing()}: the input is not valid UTF-8 ({exc}): PostgreSQL channels "
                "and payloads are UTF-8 text; convert it first (for example with iconv)"
            )
        except psycopg.Error as exc:
            fail(str(from_driver(exc, doing=_doing())))
        except RecursionError:  # json on a hostile payload (any role can write one)
            fail(
                f"{_doing()}: a JSON value is nested too deeply for Python to decode or encode "
                "(about 1,000 levels): flatten it, or remove the event that holds it"
            )

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def read_stdin() -> str:
    """All of stdin as UTF-8 text; invalid bytes are a `UnicodeError` (one line, via friendly)."""
    return sys.stdin.buffer.read().decode("utf-8")


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


def name_envvars(group: click.Group, prefix: str = "PGHERALD") -> None:
    """
    Make every option of *group*'s commands answer to ``PGHERALD_<COMMAND>_<OPTION>`` named
    after its flag (docs/cli.md): click's automatic name comes from the parameter instead, and
    ``--json`` is ``as_json`` in some commands. Options with a variable of their own keep it.
    """
    for name, command in group.commands.items():
        path = f"{prefix}_{name.upper().replace('-', '_')}"
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None:
                flag = max(param.opts, key=len).lstrip("-").upper().replace("-", "_")
                if flag != (param.name or "").upper():
                    param.envvar = f"{path}_{flag}"
        if isinstance(command, click.Group):
            name_envvars(command, path)


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

    from .._conninfo import describe, listener_conninfo

    listener = Listener(dsn, channels=list(channels), on_gap=on_gap)
    with stop_on_signals(listener.stop), listener:  # handler first: no SIGTERM race
        # stderr: says where it listens (nothing else shows until a notification) and keeps
        # stdout for the notifications alone.
        click.echo(
            f"listening on {', '.join(map(repr, channels))} at "
            f"{describe(listener_conninfo(dsn))} (Ctrl-C to stop)",
            err=True,
        )
        for n in listener:
            if as_json:
                out.write(
                    json.dumps({"channel": n.channel, "payload": n.payload, "pid": n.pid}) + "\n"
                )
                out.flush()
            else:
                click.echo(format_notification(n))
                out.flush()


@cli.command()
@dsn_option
@click.argument("channel")
@click.argument("payload", default="")
@friendly
def notify(dsn: str | None, channel: str, payload: str) -> None:
    """Send PAYLOAD (text as given; '-' reads stdin) on CHANNEL."""
    from .._notify import notify as do_notify

    if payload == "-":
        payload = read_stdin()
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
    with sigterm_as_ctrl_c():  # either way, it leaves the database (and server) as it found it
        run_demo(dsn, pause=pause, echo=click.echo, style=click.style)
