"""The gateway's token checks: keys refused at start, never a 500 for a token (issue 16)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pgherald.contrib.gateway.auth import Authenticator, AuthError


def _public_pem(private: object) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_exp_as_a_digit_string_is_the_stream_deadline() -> None:
    secret = "s" * 32
    exp = int(time.time()) + 60
    token = jwt.encode({"channels": ["a"], "exp": str(exp)}, secret, algorithm="HS256")
    principal = Authenticator(jwt_secret=secret).authenticate(token)
    assert principal.exp == float(exp)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"not a key", "not a PEM public key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "public half"),
        (_public_pem(ed25519.Ed25519PrivateKey.generate()), "RS256 (RSA) or ES256"),
    ],
)
def test_a_key_that_is_not_usable_is_refused_at_construction(pem: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Authenticator(jwt_public_key=pem)


def test_a_token_for_another_algorithm_is_401_not_a_crash() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    auth = Authenticator(jwt_public_key=_public_pem(rsa_key))
    good = jwt.encode({"channels": ["a"]}, rsa_key, algorithm="RS256")
    assert auth.authenticate(good).can_read("a")
    other = jwt.encode({"channels": ["a"]}, ec_key, algorithm="ES256")
    with pytest.raises(AuthError) as refused:
        auth.authenticate(other)
    assert refused.value.status == 401
