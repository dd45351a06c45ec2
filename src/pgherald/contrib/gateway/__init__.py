"""
The real-time gateway: browsers and services get pgherald events over SSE and WebSocket.

``pgherald serve`` runs it; `create_app` returns the Starlette app to mount in your own.
Needs the ``gateway`` extra: ``pip install 'pgherald[gateway]'``. See docs/gateway.md.
"""

from __future__ import annotations

from .app import Gateway, create_app
from .auth import Authenticator, AuthError, Principal

__all__ = ["AuthError", "Authenticator", "Gateway", "Principal", "create_app"]
