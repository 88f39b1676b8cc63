"""The FAPI 2.0 client parts that need no network: the ``private_key_jwt`` client
assertion, the DPoP proof, and the pushed authorization request.

FAPI 2.0 Security Profile 5.3 (client): pushed authorization requests (RFC 9126),
``private_key_jwt`` (RFC 7523, OIDC Core 9) or mTLS client authentication,
sender-constrained tokens (DPoP, RFC 9449, or mTLS), PKCE S256 and the RFC 9207 ``iss``
check. Keys are read by :mod:`gateway.oidc.client_keys`; requests are sent by
:mod:`gateway.oidc.provider`. Everything here takes ``now`` from the caller.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import errors

# RFC 7523 2.2.
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RFC 7523 3 leaves the lifetime to the client; the assertion is used at once, so a
# minute bounds what a captured one is worth (and the provider's jti cache).
CLIENT_ASSERTION_TTL_S = 60
# FAPI 2.0 Security Profile 5.4: PS256, ES256 or EdDSA; RSA keys at least 2048 bits.
MIN_RSA_BITS = 2048
# A request_uri is a short URN (RFC 9126 2.2); a long one is not from a provider.
MAX_REQUEST_URI_CHARS = 512


class ClientKeyError(ValueError):
    """The client key file holds no key the gateway can sign with."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its JOSE algorithm and RFC 7638 thumbprint as ``kid``."""

    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    alg: str
    kid: str
    public_jwk: Mapping[str, Any]


def signing_key(private_key: object) -> SigningKey:
    """Wrap a loaded private key: EC P-256 signs ES256, RSA (>= 2048 bits) PS256."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ClientKeyError("an EC key must be on P-256 (ES256)")
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
        alg = "ES256"
    elif isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            raise ClientKeyError(f"an RSA key needs at least {MIN_RSA_BITS} bits")
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
        alg = "PS256"
    else:
        raise ClientKeyError("only EC P-256 and RSA private keys are supported")
    public = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    return SigningKey(private_key, alg, jwk_thumbprint(public), public)


def load_pem_keys(data: bytes) -> tuple[SigningKey, ...]:
    """Every private key in a PEM file, in order; the first one signs.

    Several keys let an operator stage a rotation in one file; only the first is used
    to sign, the rest are kept for the operator's own bookkeeping and checked too, so a
    broken key is found before it is moved to the front.
    """
    marker = b"-----BEGIN "
    blocks = [marker + part for part in data.split(marker)[1:]]
    if not blocks:
        raise ClientKeyError("no PEM private key found")
    keys = []
    for block in blocks:
        try:
            loaded = serialization.load_pem_private_key(block, password=None)
        except (ValueError, TypeError) as exc:
            raise ClientKeyError(f"not an unencrypted PEM private key ({exc})") from None
        keys.append(signing_key(loaded))
    return tuple(keys)


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members, sorted, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def client_assertion(
    key: SigningKey, *, client_id: str, audience: str, now: float, jti: str | None = None
) -> str:
    """The ``private_key_jwt`` assertion (RFC 7523 3, OIDC Core 9): ``iss`` = ``sub`` =
    the client, ``aud`` the provider, a fresh ``jti`` and a short ``exp``."""
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti or secrets.token_urlsafe(24),
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + CLIENT_ASSERTION_TTL_S,
    }
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid})


def client_assertion_fields(
    key: SigningKey, *, client_id: str, audience: str, now: float
) -> dict[str, str]:
    """The form fields that authenticate the client with ``private_key_jwt``."""
    return {
        "client_id": client_id,
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": client_assertion(key, client_id=client_id, audience=audience, now=now),
    }


def new_dpop_key() -> SigningKey:
    """The gateway's own DPoP key pair (RFC 9449 2): one per process, never stored."""
    return signing_key(ec.generate_private_key(ec.SECP256R1()))


def dpop_proof(
    key: SigningKey, *, method: str, url: str, now: float, nonce: str | None = None
) -> str:
    """A DPoP proof JWT for one request (RFC 9449 4.2): ``typ`` dpop+jwt, the public
    key in ``jwk``, ``htm``, ``htu`` (no query or fragment), ``iat``, a unique ``jti``
    and the server's ``nonce`` when it asked for one (RFC 9449 8)."""
    parts = urlsplit(url)
    claims: dict[str, Any] = {
        "htm": method,
        "htu": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "iat": int(now),
        "jti": secrets.token_urlsafe(24),
    }
    if nonce is not None:
        claims["nonce"] = nonce
    headers = {"typ": "dpop+jwt", "jwk": dict(key.public_jwk)}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)


def par_request(authorization_url: str) -> dict[str, str]:
    """The parameters of a built authorization request, to push instead (RFC 9126 2.1:
    the same parameters an authorization request would carry, as a form)."""
    return dict(parse_qsl(urlsplit(authorization_url).query, keep_blank_values=True))


def pushed_authorization_url(authorization_endpoint: str, client_id: str, request_uri: str) -> str:
    """The redirect after a push: only ``client_id`` and ``request_uri`` (RFC 9126 4), so
    ``acr_values`` and ``max_age`` are out of the user's reach."""
    parts = urlsplit(authorization_endpoint)
    query = urlencode({"client_id": client_id, "request_uri": request_uri})
    if parts.query:
        query = f"{parts.query}&{query}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def parse_par_response(status: int, body: object) -> str:
    """The ``request_uri`` of a pushed authorization response (RFC 9126 2.2: 201 with
    ``request_uri`` and ``expires_in``). Raises :class:`errors.ProviderError`."""
    if status != 201 or not isinstance(body, Mapping):
        code = body.get("error") if isinstance(body, Mapping) else None
        reason = f"par_{code}" if isinstance(code, str) and code.isidentifier() else "par_status"
        raise errors.ProviderError(
            "The identity provider refused the pushed authorization request.", reason=reason
        )
    request_uri = body.get("request_uri")
    if (
        not isinstance(request_uri, str)
        or not request_uri
        or len(request_uri) > MAX_REQUEST_URI_CHARS
    ):
        raise errors.ProviderError(
            "The identity provider's pushed authorization response has no request_uri.",
            reason="par_invalid",
        )
    return request_uri
