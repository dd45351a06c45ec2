"""
Which web pages may use the gateway: CORS for ``/publish`` and ``/sse``, ``Origin`` on ``/ws``.

Answered in the gateway's own handlers rather than by Starlette's ``CORSMiddleware``: middleware
wraps ``send``, which turns off the direct writes of the streams (see direct.py). Denied by
default: a request that carries an ``Origin`` header (a browser's) from another origin than the
gateway's own is refused unless the origin is allowed (``--cors-origin``). Requests without
``Origin`` (curl, services) are not browser requests, and CORS does not apply to them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

ALLOWED_HEADERS = ("authorization", "content-type", "last-event-id", "cache-control")
"""Request headers a page may send cross-origin (besides the CORS-safelisted ones)."""
MAX_AGE = 600
"""Seconds a browser may cache a preflight answer."""
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


class CorsPolicy:
    """The allowed origins: exact (``https://app.example.com``) or fnmatch patterns."""

    def __init__(self, origins: Iterable[str] = ()) -> None:
        cleaned: list[str] = []
        for origin in origins:
            origin = origin.strip().rstrip("/")
            if not origin:
                continue
            if origin != "null" and "://" not in origin and origin != "*":
                raise ValueError(
                    f"CORS origin {origin!r} has no scheme: write it as the browser sends it, "
                    "for example https://app.example.com (or a pattern: https://*.example.com)"
                )
            cleaned.append(origin.lower())
        self.origins = tuple(dict.fromkeys(cleaned))

    def __bool__(self) -> bool:
        return bool(self.origins)

    def allows(self, origin: str) -> bool:
        """Whether pages of *origin* may use the gateway (``null`` only when listed as such)."""
        origin = origin.lower()
        if origin == "null":  # sandboxed frames, file: pages: never by a pattern
            return "null" in self.origins
        return any(origin == o or fnmatch.fnmatchcase(origin, o) for o in self.origins)

    def check(self, headers: Mapping[str, str]) -> str | None:
        """
        None when the request may go on; else why it is refused (403).

        Same-origin requests (``Origin`` names the host the request was sent to) and requests
        without ``Origin`` always may.
        """
        origin = headers.get("origin")
        if origin is None or same_origin(origin, headers.get("host")) or self.allows(origin):
            return None
        return refusal(origin)

    def headers(self, request_headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """The CORS headers of a response to this request (none for a refused or plain one)."""
        origin = request_headers.get("origin")
        if origin is None or not self.allows(origin):
            return [("vary", "Origin")] if self.origins else []
        return [("access-control-allow-origin", origin), ("vary", "Origin")]

    def preflight(
        self, request_headers: Mapping[str, str], methods: tuple[str, ...]
    ) -> tuple[int, list[tuple[str, str]], str | None]:
        """
        The answer to ``OPTIONS``: status, headers and, when refused, why.

        Allowed: 204 with the ``Access-Control-Allow-*`` headers. A request without ``Origin``
        (not a preflight) gets 204 with ``Allow``.
        """
        allow = ", ".join((*methods, "OPTIONS"))
        origin = request_headers.get("origin")
        if origin is None:
            return 204, [("allow", allow)], None
        vary = ("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        if not (self.allows(origin) or same_origin(origin, request_headers.get("host"))):
            return 403, [vary], refusal(origin)
        method = request_headers.get("access-control-request-method", "").upper()
        if method and method not in methods:
            return (
                405,
                [vary, ("allow", allow)],
                f"method {method} is not allowed here: use {' or '.join(methods)}",
            )
        asked = [
            h.strip().lower()
            for h in request_headers.get("access-control-request-headers", "").split(",")
            if h.strip()
        ]
        unknown = [h for h in asked if h not in ALLOWED_HEADERS]
        if unknown:
            return (
                403,
                [vary],
                f"request header {unknown[0]!r} is not allowed: the gateway takes "
                f"{', '.join(ALLOWED_HEADERS)}",
            )
        return (
            204,
            [
                ("access-control-allow-origin", origin),
                ("access-control-allow-methods", allow),
                ("access-control-allow-headers", ", ".join(ALLOWED_HEADERS)),
                ("access-control-max-age", str(MAX_AGE)),
                vary,
            ],
            None,
        )


def refusal(origin: str) -> str:
    return (
        f"origin {origin[:100]!r} is not allowed to use this gateway: start it with "
        f"--cors-origin {origin[:100]} (or cors_origins=[...] in create_app)"
    )


def same_origin(origin: str, host: str | None) -> bool:
    """Whether *origin* names *host* (the ``Host`` header), default ports aside.

    The scheme is not compared: behind a TLS-terminating proxy the gateway sees ``http``
    where the page was ``https``.
    """
    if not host or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if not parts.hostname:
        return False
    default = _DEFAULT_PORTS.get(parts.scheme, "")
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = name + ("" if origin_port is None else f":{origin_port}")
    host = host.lower()
    return _strip(netloc, default) == _strip(host, default)


def _strip(netloc: str, default_port: str) -> str:
    if default_port and netloc.endswith(":" + default_port) and not netloc.endswith("]"):
        return netloc[: -len(default_port) - 1]
    return netloc
