"""Who may read and write which channel: JWT bearer tokens, denied by default."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from ...errors import HeraldError


class AuthError(HeraldError):
    """A request is refused: *status* is 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Principal:
    """What one client may do, from its token (or from the anonymous allowance)."""

    read: tuple[str, ...]
    """Channel patterns it may read (fnmatch-style: ``chat.*``)."""
    write: tuple[str, ...]
    """Channel patterns it may publish to."""
    exp: float | None
    """`time.time()` at which the token expires (None: no expiry, or anonymous)."""
    anonymous: bool

    def can_read(self, channel: str) -> bool:
        return _matches(channel, self.read)

    def can_write(self, channel: str) -> bool:
        return _matches(channel, self.write)

    def check_read(self, channels: Iterable[str]) -> None:
        for ch in channels:
            if not self.can_read(ch):
                if self.anonymous:
                    raise AuthError(401, f"a token is needed to read channel {ch!r}")
                raise AuthError(403, f"the token does not allow reading channel {ch!r}")

    def check_write(self, channel: str) -> None:
        if not self.can_write(channel):
            if self.anonymous:
                raise AuthError(401, f"a token is needed to publish to channel {channel!r}")
            raise AuthError(403, f"the token does not allow publishing to channel {channel!r}")


def _matches(channel: str, patterns: tuple[str, ...]) -> bool:
    """Whether a claim pattern covers *channel*, or *channel* as a pattern (``chat.*``): as a
    name (its ``*`` only matches a claim's wildcard), or being the claim itself."""
    return channel in patterns or any(fnmatch.fnmatchcase(channel, p) for p in patterns)


class Authenticator:
    """Checks tokens: HS256 with a shared secret, or RS256/ES256 with a PEM public key."""

    def __init__(
        self,
        *,
        jwt_secret: str | None = None,
        jwt_public_key: str | bytes | None = None,
        allow_anonymous: Iterable[str] = (),
    ) -> None:
        if jwt_secret and jwt_public_key:
            raise ValueError("give jwt_secret or jwt_public_key, not both")
        self._key: Any = None
        self._algorithms: list[str] = []
        if jwt_secret:
            self._key, self._algorithms = jwt_secret, ["HS256"]
        elif jwt_public_key:
            self._key, self._algorithms = _public_key(jwt_public_key)
        self.anonymous = tuple(allow_anonymous)

    def __repr__(self) -> str:  # never show the key
        return f"<Authenticator algorithms={self._algorithms} anonymous={self.anonymous}>"

    def authenticate(self, token: str | None) -> Principal:
        """The `Principal` for *token* (None: anonymous); `AuthError` 401 when it is bad."""
        if not token:
            return Principal(read=self.anonymous, write=(), exp=None, anonymous=True)
        if self._key is None:
            raise AuthError(401, "this gateway accepts no tokens (no JWT key configured)")
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms)
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.PyJWTError as exc:  # InvalidKeyError too: a token's problem, never a 500
            raise AuthError(401, f"invalid token ({type(exc).__name__})") from None
        channels = claims.get("channels")
        mode = claims.get("mode", "r")
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise AuthError(401, "invalid token: 'channels' must be a list of channel patterns")
        if mode not in ("r", "w", "rw"):
            raise AuthError(401, "invalid token: 'mode' must be 'r', 'w' or 'rw'")
        patterns = tuple(channels)
        return Principal(
            read=(patterns + self.anonymous) if "r" in mode else self.anonymous,
            write=patterns if "w" in mode else (),
            exp=_expiry(claims.get("exp")),
            anonymous=False,
        )


def _expiry(exp: Any) -> float | None:
    """The ``exp`` claim as PyJWT validated it: a number, or a string of digits (``int(exp)``)."""
    if isinstance(exp, bool) or exp is None:
        return None
    if isinstance(exp, int | float):
        return float(exp)
    try:
        return float(int(exp))  # PyJWT accepted it via int(): so must the stream's deadline
    except (TypeError, ValueError):
        return None


def _public_key(pem: str | bytes) -> tuple[Any, list[str]]:
    """The loaded key and its one algorithm; `ValueError` (naming the fix) if it is not one."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        hint = " (this is a private key: give its public half)" if b"PRIVATE KEY" in data else ""
        raise ValueError(
            f"the JWT public key is not a PEM public key{hint} ({exc}): give a file that starts "
            "with '-----BEGIN PUBLIC KEY-----' (openssl pkey -in private.pem -pubout)"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, ["ES256"]
    raise ValueError(
        f"the JWT public key is a {type(key).__name__}: the gateway verifies RS256 (RSA) or "
        "ES256 (EC P-256) tokens; give an RSA or EC public key"
    )


def bearer_token(headers: Any, query: Any) -> str | None:
    """The token from ``Authorization: Bearer ...`` or ``?token=``."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    token = query.get("token")
    return str(token) if token else None
