"""Optional add-ons built on pgherald's public API (each needs its own extra)."""

from __future__ import annotations
