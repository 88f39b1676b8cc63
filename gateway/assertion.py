"""``X-Auth-Assertion``: a short-lived ES256 JWT the upstream can verify.

The header values the gateway sets are trustworthy only if nothing between the
gateway and the upstream can add its own; the signed assertion lets an upstream
check that independently, against ``{internal_prefix}/jwks.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.model import MAX_ASSERTION_TTL_S

MAX_TTL_S = MAX_ASSERTION_TTL_S
# A token is reused while at least this share of its lifetime is left, so that signing
# (an ECDSA operation, the costliest step of a forwarded request) happens about once
# per session and rule per half-TTL instead of on every request.
REUSE_WHILE_LEFT = 0.5
CACHE_SIZE = 4096


class AssertionKeyError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_or_generate_key(key_file: str | None) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """Return (key, generated). A key file must hold a P-256 private key in PEM."""
    if key_file is None:
        return ec.generate_private_key(ec.SECP256R1()), True
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AssertionKeyError(f"cannot read assertion key {key_file}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise AssertionKeyError(f"assertion key {key_file} is not a P-256 (ES256) private key")
    return key, False


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    reuse_until: float


class AssertionSigner:
    def __init__(self, key: ec.EllipticCurvePrivateKey, issuer: str, ttl_s: int = MAX_TTL_S):
        self._key = key
        self._issuer = issuer
        self._ttl_s = min(ttl_s, MAX_TTL_S)
        numbers = key.public_key().public_numbers()
        self._public_jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638 thumbprint: members in lexicographic order, no white space.
        canonical = json.dumps(self._public_jwk, sort_keys=True, separators=(",", ":"))
        self.kid = _b64(hashlib.sha256(canonical.encode()).digest())
        self._cache: OrderedDict[tuple[Any, ...], _Cached] = OrderedDict()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**self._public_jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    def sign(self, claims: dict[str, Any], *, audience: str, now: float) -> str:
        """Sign ``claims`` for ``audience``; reuse a recent identical token."""
        return self.sign_reusable(claims, audience=audience, now=now)[0]

    def sign_reusable(
        self, claims: dict[str, Any], *, audience: str, now: float
    ) -> tuple[str, float]:
        """:meth:`sign`, and until when the same token may be sent again."""
        # Each value with its type (True, 1 and 1.0 sign differently); claims are
        # str, int, None or lists of str. The order is app.py's, always the same.
        cache_key = (
            audience,
            *[(k, v.__class__, tuple(v) if v.__class__ is list else v) for k, v in claims.items()],
        )
        cached = self._cache.get(cache_key)
        if cached is not None and now < cached.reuse_until:
            self._cache.move_to_end(cache_key)
            return cached.token, cached.reuse_until
        iat = int(now)
        payload = {
            **claims,
            "iss": self._issuer,
            "aud": audience,
            "iat": iat,
            "exp": iat + self._ttl_s,
        }
        token = jwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})
        reuse_until = iat + self._ttl_s * REUSE_WHILE_LEFT
        self._cache[cache_key] = _Cached(token, reuse_until)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return token, reuse_until
