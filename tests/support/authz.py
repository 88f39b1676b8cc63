"""A real authorization server for the access-token tests, and an API client for it.

The server is node ``oidc-provider`` (tests/oidc-provider/server.js), run as a process:
RFC 9068 JWT access tokens with ``acr``/``amr``/``auth_time``, opaque ones for
introspection, DPoP. Logins finish without a browser: the user performs the first
``acr_values`` the client asks for (or ``login_hint=acr=VALUE``).

In FAPI 2.0 mode (:func:`fapi_authz`) the same server registers the gateway as a FAPI 2.0
client (PAR required, ``private_key_jwt`` with two known keys, DPoP-bound tokens with
server nonces) for a gateway on a port chosen in advance.

The client walks the authorization code flow with PKCE hop by hop (RFC 6749 4.1,
RFC 7636), optionally DPoP-bound (RFC 9449 5), and makes DPoP proofs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import selectors
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SERVER_DIR = Path(__file__).resolve().parent.parent / "oidc-provider"
JWT_AUDIENCE = "https://bank.example.com/api"
OTHER_AUDIENCE = "https://other.example.com/api"
OPAQUE_AUDIENCE = "https://opaque.example.com/api"
CLIENT_ID = "api-client"
REDIRECT_URI = "http://127.0.0.1/cb"


@dataclass
class AuthorizationServer:
    issuer: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# server.js prints its issuer within a second or two; Node 20 has been seen to stall for
# good while loading the ESM modules (its main thread waiting on a futex), so a start
# that says nothing in this time is killed and tried again rather than waited on forever.
START_TIMEOUT_S = 20.0
START_ATTEMPTS = 3


def start_authorization_server(
    port: int | None = None,
    env: dict[str, str] | None = None,
    *,
    fapi_client: Path | None = None,
) -> AuthorizationServer:
    """Start server.js (on ``port``, or a free one; ``env`` added to its environment);
    fails (never skips) when node or its modules are missing, and after
    :data:`START_ATTEMPTS` starts that said nothing. ``fapi_client``: the FAPI 2.0 mode,
    with the gateway's registration from that file."""
    from tests.conftest import free_port

    if not (SERVER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(
            "tests/oidc-provider/node_modules is missing: run "
            "`npm ci --prefix tests/oidc-provider` (scripts/test does)"
        )
    for _ in range(START_ATTEMPTS):
        process = subprocess.Popen(
            ["node", str(SERVER_DIR / "server.js"), str(port or free_port())]
            + (["--fapi2", str(fapi_client)] if fapi_client is not None else []),
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("AUTHZ_DEBUG") else subprocess.DEVNULL,
            cwd=SERVER_DIR,
            env={**os.environ, "NODE_ENV": "test", **(env or {})},
        )
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=START_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""  # {"issuer": ...} once listening
        if line:
            return AuthorizationServer(json.loads(line)["issuer"], process)
        server = AuthorizationServer("", process)
        server.stop()
        port = None  # the next attempt takes a new port
    raise RuntimeError(
        f"the authorization server did not start in {START_ATTEMPTS} attempts "
        f"(last exit {process.returncode})"
    )


@pytest.fixture(scope="module")
def authz() -> Iterator[AuthorizationServer]:
    """The authorization server, one process per test module (import this fixture)."""
    server = start_authorization_server()
    yield server
    server.stop()


@dataclass
class FapiAuthorizationServer(AuthorizationServer):
    """The server in FAPI 2.0 mode, for a gateway listening on ``gateway_port``.

    ``keys`` are the gateway's client keys the server knows (PEM, an EC P-256 key that
    signs ES256, then an RSA key that signs PS256); ``unknown_key`` is one it does not."""

    gateway_port: int = 0
    keys: tuple[bytes, ...] = ()
    unknown_key: bytes = b""

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    async def record(self) -> dict[str, list[dict[str, Any]]]:
        """What the server saw: client assertions, pushed requests, tokens issued."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.issuer}/test/record") as resp,
        ):
            assert resp.status == 200
            record: dict[str, list[dict[str, Any]]] = await resp.json()
            return record


def private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_jwk(pem: bytes) -> dict[str, Any]:
    """The public JWK of a PEM private key, with its RFC 7638 thumbprint as ``kid``
    (what the gateway puts in its client assertions)."""
    from gateway.oidc import fapi

    (key,) = fapi.load_pem_keys(pem)
    return {**key.public_jwk, "kid": key.kid, "alg": key.alg, "use": "sig"}


def start_fapi_authorization_server(directory: Path) -> FapiAuthorizationServer:
    """The server in FAPI 2.0 mode, its client keys and registration written to
    ``directory``; the gateway's callback is on a port picked now."""
    from tests.conftest import free_port

    keys = (
        private_pem(ec.generate_private_key(ec.SECP256R1())),
        private_pem(rsa.generate_private_key(65537, 2048)),
    )
    gateway_port = free_port()
    client = directory / "fapi-client.json"
    client.write_text(
        json.dumps(
            {
                "jwks": {"keys": [public_jwk(pem) for pem in keys]},
                "redirect_uris": [f"http://127.0.0.1:{gateway_port}/_gateway/callback"],
            }
        )
    )
    server = start_authorization_server(fapi_client=client)
    return FapiAuthorizationServer(
        server.issuer,
        server.process,
        gateway_port=gateway_port,
        keys=keys,
        unknown_key=private_pem(ec.generate_private_key(ec.SECP256R1())),
    )


@pytest.fixture(scope="module")
def fapi_authz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FapiAuthorizationServer]:
    """The authorization server in FAPI 2.0 mode, one process per test module."""
    server = start_fapi_authorization_server(tmp_path_factory.mktemp("fapi"))
    yield server
    server.stop()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class DpopKey:
    """A client's DPoP key pair (P-256) and the proofs it signs."""

    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> DpopKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(
            jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key())
        )
        return jwk

    @property
    def thumbprint(self) -> str:
        jwk = self.public_jwk
        canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        payload: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(time.time()),
        }
        if access_token is not None:
            payload["ath"] = b64url(hashlib.sha256(access_token.encode()).digest())
        if nonce is not None:
            payload["nonce"] = nonce
        payload.update(claims)
        headers = {"typ": "dpop+jwt", "jwk": self.public_jwk, **(header or {})}
        return jwt.encode(payload, self.private, algorithm="ES256", headers=headers)


@dataclass
class Tokens:
    access_token: str
    token_type: str
    id_token: str | None
    expires_in: int


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(32)
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


async def authorize(
    issuer: str,
    *,
    acr_values: str | None = None,
    max_age: int | None = None,
    resource: str = JWT_AUDIENCE,
    dpop: DpopKey | None = None,
    login_hint: str | None = None,
) -> Tokens:
    """Run the authorization code flow with PKCE (a new login every time: no cookies
    are kept between calls) and redeem the code; DPoP-bound with ``dpop``."""
    verifier, challenge = pkce_pair()
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": "openid api",
        "state": secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
    }
    if acr_values is not None:
        params["acr_values"] = acr_values
    if max_age is not None:
        params["max_age"] = str(max_age)
    if login_hint is not None:
        params["login_hint"] = login_hint
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        url = f"{issuer}/auth?{urlencode(params)}"
        for _ in range(10):
            async with http.get(url, allow_redirects=False) as resp:
                assert resp.status in (302, 303), (resp.status, await resp.text())
                url = urljoin(url, resp.headers["Location"])
            if url.startswith(REDIRECT_URI):
                break
        else:
            raise AssertionError("the authorization server never redirected back")
        query = parse_qs(urlsplit(url).query)
        assert "code" in query, query
        form = {
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": CLIENT_ID,
            "resource": resource,
        }
        headers = {}
        if dpop is not None:
            headers["DPoP"] = dpop.proof("POST", f"{issuer}/token")
        async with http.post(f"{issuer}/token", data=form, headers=headers) as resp:
            body = await resp.json()
            assert resp.status == 200, body
    return Tokens(
        body["access_token"], body["token_type"], body.get("id_token"), body["expires_in"]
    )


async def sign(issuer: str, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A JWT signed with the authorization server's own ES256 key (test endpoint)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{issuer}/test/sign", json={"header": header, "payload": payload}) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JWT's header and payload, unverified (the test's own reading)."""
    head, body, _sig = token.split(".")
    decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
    return decode(head), decode(body)


def challenge_params(value: str) -> dict[str, str]:
    """The auth-params of a WWW-Authenticate challenge (quoted strings or tokens)."""
    import re

    return {
        m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([a-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', value)
    }
