"""The ``pgherald`` command (needs the ``cli`` extra: ``pip install 'pgherald[cli]'``)."""

from __future__ import annotations

import sys
from typing import Any


def command_tree() -> Any:
    """The ``pgherald`` click group with every command registered (what `main` runs; the
    tests walk it)."""
    from . import (  # register their commands
        _dead,
        _dev,
        _durable,
        _groups,
        _relay,
        _schedule,
        _serve,
        _triggers_cmd,
        cdc,
    )
    from ._commands import cli, name_envvars

    _ = _dead, _dev, _durable, _groups, _relay, _schedule, _serve, _triggers_cmd, cdc
    name_envvars(cli)
    return cli


def main() -> None:
    try:
        import click

        from ._commands import EXIT_USAGE, fail

        cli = command_tree()
    except ImportError as exc:  # click missing: say how to get it, no traceback
        if getattr(exc, "name", None) != "click":
            raise
        sys.stderr.write(
            "pgherald: the command line needs the 'cli' extra: pip install 'pgherald[cli]'\n"
        )
        raise SystemExit(2) from None
    # click 8.2+: a bare group shows its help through this UsageError (absent in 8.1).
    no_args: type[click.UsageError] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())
    try:
        status = cli.main(prog_name="pgherald", standalone_mode=False)
    except no_args as exc:  # bare `pgherald` or `pgherald sql`: the help, as click prints it
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:  # bad option or argument: one line, like every other error
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        fail(f"{exc.format_message().rstrip('.')}{where}", EXIT_USAGE)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:  # Ctrl-C or end of input at a prompt
        fail("aborted: nothing was changed")
    sys.exit(status if isinstance(status, int) else 0)
