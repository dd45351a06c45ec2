"""docs/cli.md: "Every other option can be set as `PGHERALD_<COMMAND>_<OPTION>` too", for every
option of every command, named after its flag (``--json`` of `status` is
``PGHERALD_STATUS_JSON``, whatever the parameter is called in the code)."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from pgherald.cli import command_tree


def options() -> Iterator[tuple[str, click.Command, click.Option]]:
    def walk(group: click.Group, path: str) -> Iterator[tuple[str, click.Command, click.Option]]:
        for name, command in group.commands.items():
            here = f"{path}_{name.upper().replace('-', '_')}"
            for param in command.params:
                if isinstance(param, click.Option):
                    yield here, command, param
            if isinstance(command, click.Group):
                yield from walk(command, here)

    yield from walk(command_tree(), "PGHERALD")


def test_every_option_answers_to_its_documented_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for path, command, option in options():
        if option.envvar is not None and not str(option.envvar).startswith(path):
            continue  # a variable of its own, in docs/cli.md's table (PGHERALD_DSN, ...)
        flag = max(option.opts, key=len).lstrip("-").upper().replace("-", "_")
        variable = f"{path}_{flag}"
        monkeypatch.setenv(variable, "x")
        ctx = click.Context(command, auto_envvar_prefix=path)
        assert option.resolve_envvar_value(ctx) == "x", f"{variable} is not read"
        monkeypatch.delenv(variable)
        checked += 1
    assert checked > 50  # every command's options, not a few


def test_status_json_from_its_variable() -> None:
    status = command_tree().commands["status"]
    (json_option,) = [p for p in status.params if p.name == "as_json"]
    assert json_option.envvar == "PGHERALD_STATUS_JSON"
