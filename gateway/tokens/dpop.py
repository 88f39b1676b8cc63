"""RFC 9449 DPoP proofs: checked without I/O. The ``jti`` replay record is the caller's
(:mod:`gateway.tokens.gate`, in the one-time record store shared by every worker).

A proof is a JWT the client signs with its own key for one request: ``typ``
``dpop+jwt``, the public key in the header, ``htm``/``htu`` naming the request,
``iat`` recent, ``jti`` unique, ``ath`` the hash of the access token it accompanies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from gateway.errors import BadRequest
from gateway.oidc.flow import key_fits_alg, usable_algs
from gateway.paths import canonical_host
from gateway.tokens.claims import TokenError

DPOP_TYPE = "dpop+jwt"  # RFC 9449 4.2
# A proof holds a public key (an RSA 4096 one is ~800 characters) and a few claims.
MAX_PROOF_CHARS = 8 * 1024
MAX_JTI_CHARS = 256
# RFC 7638 3.2: the members of each key type that make up its thumbprint.
THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}
# RFC 7517/7518: members that only a private (or symmetric) key has.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
NONCE_MAC_BYTES = 16


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A proof whose signature, type, request and time have been checked."""

    jkt: str  # RFC 7638 thumbprint of the proof's key
    jti: str
    iat: int
    nonce: str | None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, no whitespace."""
    members = THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or not all(isinstance(jwk.get(name), str) for name in members):
        raise TokenError("dpop_key")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(access_token: str) -> str:
    """``ath`` (RFC 9449 4.2): base64url of the SHA-256 of the token's ASCII bytes."""
    return b64url(hashlib.sha256(access_token.encode("ascii", "replace")).digest())


def request_url(scheme: str, host: str, path: str) -> str:
    """The ``htu`` a request is compared with: scheme, canonical host, normalised path."""
    return f"{scheme}://{host}{path}"


def normalised_htu(htu: str) -> str | None:
    """A proof's ``htu`` without query and fragment, scheme and host in canonical form
    (RFC 9449 4.3 step 9; RFC 3986 6.2.2, 6.2.3: case, default port); None if unusable."""
    try:
        parts = urlsplit(htu)
        scheme = parts.scheme.lower()
        host = canonical_host(parts.netloc, scheme) if scheme in ("http", "https") else None
    except (ValueError, BadRequest):
        return None
    if host is None or not host or "@" in parts.netloc:
        return None
    return request_url(scheme, host, parts.path or "/")


def verify_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str,
    now: float,
    max_age_s: int,
    allowed_algs: Sequence[str],
) -> DpopProof:
    """RFC 9449 4.3, steps 2-11 (the ``jti`` record and ``cnf.jkt`` are the caller's).

    ``url`` is :func:`request_url` of the request as judged. Raises :class:`TokenError`
    with a ``dpop_*`` reason on the first failed check.
    """
    if len(proof) > MAX_PROOF_CHARS or proof.count(".") != 2:
        raise TokenError("dpop_malformed")
    try:
        header = jwt.get_unverified_header(proof)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("dpop_malformed") from None
    if header.get("typ") != DPOP_TYPE:
        raise TokenError("dpop_typ")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in usable_algs(allowed_algs):
        raise TokenError("dpop_alg")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or PRIVATE_MEMBERS.intersection(jwk):
        raise TokenError("dpop_key")  # RFC 9449 4.3 step 7: no private key in the proof
    jkt = thumbprint(jwk)
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("dpop_key") from None
    if not key_fits_alg(key, alg):
        raise TokenError("dpop_key")
    try:
        decoded = jwt.PyJWS().decode_complete(proof, key=key, algorithms=[alg])
        payload = json.loads(decoded["payload"])
    except jwt.InvalidSignatureError:
        raise TokenError("dpop_signature") from None
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        raise TokenError("dpop_malformed") from None
    if not isinstance(payload, dict):
        raise TokenError("dpop_malformed")
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise TokenError("dpop_jti")
    if payload.get("htm") != method:
        raise TokenError("dpop_htm")
    htu = payload.get("htu")
    if not isinstance(htu, str) or normalised_htu(htu) != url:
        raise TokenError("dpop_htu")
    iat = payload.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or iat != iat:
        raise TokenError("dpop_iat")
    if abs(now - iat) > max_age_s:
        raise TokenError("dpop_iat")
    ath = payload.get("ath")
    if not isinstance(ath, str) or not hmac.compare_digest(ath, access_token_hash(access_token)):
        raise TokenError("dpop_ath")
    nonce = payload.get("nonce")
    if nonce is not None and not isinstance(nonce, str):
        raise TokenError("dpop_nonce")
    return DpopProof(jkt=jkt, jti=jti, iat=int(iat), nonce=nonce)


# --- server nonces (RFC 9449 9) --------------------------------------------------
#
# Stateless: a nonce is a time slot and its MAC, so every worker (and replica with the
# same session secret) issues and accepts the same ones without sharing state. One is
# good for the slot it was made in and the next, so for window_s to 2 * window_s.


def make_nonce(key: bytes, now: float, window_s: int) -> str:
    slot = struct.pack(">Q", int(now // window_s))
    return b64url(slot + hmac.new(key, slot, hashlib.sha256).digest()[:NONCE_MAC_BYTES])


def nonce_valid(key: bytes, nonce: str | None, now: float, window_s: int) -> bool:
    if nonce is None:
        return False
    current = int(now // window_s)
    return any(
        hmac.compare_digest(nonce, make_nonce(key, slot * window_s, window_s))
        for slot in (current, current - 1)
    )
