"""The ``pgherald`` command (needs the ``cli`` extra: ``pip install 'pgherald[cli]'``)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from . import _durable, _serve, _triggers_cmd  # register their commands
        from ._commands import cli
    except ImportError as exc:  # click missing: say how to get it, no traceback
        if getattr(exc, "name", None) != "click":
            raise
        sys.stderr.write(
            "pgherald: the command line needs the 'cli' extra: pip install 'pgherald[cli]'\n"
        )
        raise SystemExit(2) from None
    _ = _durable, _serve, _triggers_cmd
    cli(prog_name="pgherald")
