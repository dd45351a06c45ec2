"""``python -m pgherald``: the ``pgherald`` command (needs the ``cli`` extra)."""

from __future__ import annotations

from .cli import main

main()
