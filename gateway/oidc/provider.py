"""Talking to the OpenID Provider: discovery, the JWKS cache and the code exchange.

This is the only module of :mod:`gateway.oidc` that does I/O. What it fetches is
checked by the pure functions in :mod:`gateway.oidc.flow`. Network failures
become :class:`errors.ProviderUnavailable`; answers we cannot use become
:class:`errors.ProviderError`. Neither ever carries a secret, a code or a token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import jwt
import structlog

from gateway import errors, model
from gateway.model import Level
from gateway.oidc import fapi, profiles
from gateway.oidc.client_keys import ClientKeyFile
from gateway.oidc.flow import (
    IdTokenClaims,
    IdTokenError,
    LogoutClaims,
    ProviderMetadata,
    key_fits_alg,
    parse_jwks,
    parse_metadata,
    parse_token_response,
    token_request_auth,
    unverified_header,
    usable_algs,
    verify_id_token,
    verify_logout_token,
)

__all__ = ["ProviderClient", "ProviderMetadata"]

T = TypeVar("T")

log = structlog.get_logger(__name__)

# Discovery 4 does not say how long metadata may be cached; an hour picks up a
# provider's changes the same day without a request per sign-in.
METADATA_MAX_AGE_S = 60 * 60
# Keys also get a routine refresh, so a key the provider withdrew stops being
# trusted within the hour even if no token ever names a new one.
JWKS_MAX_AGE_S = 60 * 60
# OIDC Core 10.1.1: on rotation the provider publishes a new key and tokens name it
# by kid, so an unknown kid triggers a refetch. But the kid is chosen by whoever
# sent the token (a back-channel logout token can come from anyone): a stream of
# random kids must not make us hammer the provider. So at most one fetch per this
# interval, whatever the outcome; concurrent requests share one fetch; and a request
# that arrives within the interval waits for the next allowed fetch (at most this
# long) instead of failing a sign-in right after a routine rotation.
JWKS_REFETCH_INTERVAL_S = 5
# After a failed refresh we keep serving the last good copy and try again this
# much later, rather than on every request while the provider is down.
RETRY_AFTER_FAILURE_S = 10
# Discovery documents and key sets are a few KiB; the cap stops a broken or
# hostile provider from filling our memory.
MAX_RESPONSE_BYTES = 1024 * 1024
# RFC 9449 8: a nonce is an opaque short string; a long one is not worth keeping.
MAX_DPOP_NONCE_CHARS = 256


class ProviderClient:
    """Cached view of one OpenID Provider, plus the token request.

    ``clock`` only times the caches (monotonic) and ``sleep`` waits on it; token
    checks take ``now`` from the caller. ``on_error(kind)`` is called once per
    provider failure, with a short ``{endpoint}_{problem}`` kind (``jwks_timeout``),
    for metrics.
    """

    def __init__(
        self,
        cfg: model.OidcConfig,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_error: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        self._http = http
        self._clock = clock
        self._sleep = sleep
        self._on_error = on_error
        self._timeout = aiohttp.ClientTimeout(total=cfg.http_timeout_s)
        self._meta: ProviderMetadata | None = None
        self._meta_next_fetch = float("-inf")
        self._meta_error: errors.ProviderError | None = None
        self._meta_lock = asyncio.Lock()
        self._jwks: tuple[dict[str, Any], ...] = ()
        self._jwks_loaded = False
        self._jwks_next_fetch = float("-inf")
        self._jwks_last_attempt = float("-inf")
        self._jwks_attempts = 0  # fetches started, so a waiter can tell a newer one ran
        self._jwks_error: errors.ProviderError | None = None
        self._jwks_lock = asyncio.Lock()
        # FAPI 2.0 client parts (gateway.oidc.fapi): the private_key_jwt key file, the
        # gateway's own DPoP key pair and the last DPoP nonce the provider sent.
        self._client_key = (
            ClientKeyFile(cfg.client_key_file)
            if cfg.client_auth == "private_key_jwt" and cfg.client_key_file
            else None
        )
        self._dpop_key = fapi.new_dpop_key() if cfg.dpop else None
        self._dpop_nonce: str | None = None
        self._wall_clock = wall_clock

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> model.OidcConfig:
        return self._cfg

    @property
    def ready(self) -> bool:
        """True once metadata and keys have been loaded at least once."""
        return self._meta is not None and self._jwks_loaded

    async def load(self, *, force: bool = False) -> None:
        """Fetch metadata and keys (start-up, readiness). Raises if either fails;
        previously loaded copies are kept either way."""
        await self._refresh_metadata(force=force)
        await self._refresh_jwks(force=force)

    async def metadata(self) -> ProviderMetadata:
        """The discovery document: cached, refreshed hourly, last good copy kept."""
        await self._refresh_metadata(force=False)
        if self._meta is None:  # unreachable: _refresh_metadata raises instead
            raise _copy(self._meta_error)
        return self._meta

    async def key_for(self, kid: str | None, alg: str, *, wait: bool = True) -> jwt.PyJWK:
        """The provider's key for a token header, bound to ``alg``.

        An unknown kid refetches the JWKS: at most one fetch per
        :data:`JWKS_REFETCH_INTERVAL_S`, shared by every request waiting for it, and
        waited for (at most that long) when the last one was too recent. Still
        unknown after a fetch that started after this call -> ``IdTokenError("kid")``.
        ``wait=False`` (access tokens, which any request may carry): when the last fetch
        was too recent, fail at once instead of holding the request for the next one.
        """
        if alg not in usable_algs(self._cfg.algorithms):
            raise IdTokenError("alg")  # before any fetch: the header is attacker-chosen
        await self._refresh_jwks(force=False)
        key = self._find_key(kid, alg)
        if key is not None:
            return key
        key = await self._refetch_for_unknown_kid(kid, alg, wait=wait)
        if key is None:
            raise IdTokenError("kid")
        return key

    async def _refetch_for_unknown_kid(
        self, kid: str | None, alg: str, *, wait: bool = True
    ) -> jwt.PyJWK | None:
        """The key after a JWKS fetch that was in flight or started after this call,
        or None.

        One fetch per :data:`JWKS_REFETCH_INTERVAL_S` at most. A fetch in flight or
        one that another request started after ours is shared; when the last fetch
        was too recent, wait for the next allowed one, once and at most one
        interval, rather than fail.
        """
        # A fetch in flight counts as ours: requests that pile up behind one fetch
        # share it (a key published in the milliseconds since it started is picked
        # up by the next one).
        asked = self._jwks_attempts - (1 if self._jwks_lock.locked() else 0)
        waited = False
        while True:
            async with self._jwks_lock:
                key = self._find_key(kid, alg)
                if key is not None or self._jwks_attempts != asked:
                    return key
                wait_s = self._jwks_last_attempt + JWKS_REFETCH_INTERVAL_S - self._clock()
                if wait_s <= 0:
                    log.info("jwks_refetch_unknown_kid", kid_present=kid is not None)
                    # A failure here propagates (old keys stay): the token may be fine.
                    await self._fetch_jwks_locked(raise_errors=True)
                    return self._find_key(kid, alg)
            if waited or not wait:
                return None
            waited = True
            await self._sleep(min(wait_s, JWKS_REFETCH_INTERVAL_S))

    async def exchange_code(
        self, *, code: str, redirect_uri: str, code_verifier: str
    ) -> Mapping[str, object]:
        """Redeem an authorization code (RFC 6749 4.1.3 with RFC 7636 4.5).

        Returns the token response, which is known to hold an ``id_token`` string.
        A refusal raises :class:`errors.ProviderError` with the provider's error
        code (``invalid_grant`` ...) as ``reason``.
        """
        meta = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        url = meta.token_endpoint
        status, body = await self._authenticated_post("token", meta, url, form)
        if self._dpop_key is not None and _asks_for_dpop_nonce(status, body):
            # RFC 9449 8: the provider wants its nonce in the proof; one retry with it
            # (a fresh client assertion too: its jti must not be used twice).
            status, body = await self._authenticated_post("token", meta, url, form)
        if status in (502, 503, 504):
            raise self._status_error("token", status)
        try:
            tokens = parse_token_response(status, body, profile=self._cfg.profile)
        except errors.ProviderError as exc:
            problem = "invalid" if exc.reason.startswith("token_response") else "rejected"
            self._report("token", problem, exc)
            raise
        if self._dpop_key is not None and str(tokens.get("token_type", "")).lower() != "dpop":
            # RFC 9449 5: a DPoP-bound token comes with token_type DPoP. A provider that
            # ignored the proof issued a bearer token: refused, the binding was asked for.
            error = errors.ProviderError(
                "The identity provider did not bind the tokens to the gateway's key.",
                reason="token_not_dpop_bound",
            )
            self._report("token", "invalid", error)
            raise error
        return tokens

    async def push_authorization(self, authorization_url: str) -> str:
        """With ``oidc.par``: push the request's parameters to the provider (RFC 9126 2)
        and return the redirect that carries only ``client_id`` and ``request_uri``.
        Without it, ``authorization_url`` unchanged."""
        if not self._cfg.par:
            return authorization_url
        meta = await self.metadata()
        endpoint = meta.raw.get("pushed_authorization_request_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            error = errors.ProviderError(
                "The identity provider offers no pushed authorization requests.",
                reason="par_not_offered",
            )
            self._report("par", "invalid", error)
            raise error
        form = fapi.par_request(authorization_url)
        status, body = await self._authenticated_post("par", meta, endpoint, form, dpop=False)
        if status in (502, 503, 504):
            raise self._status_error("par", status)
        try:
            request_uri = fapi.parse_par_response(status, body)
        except errors.ProviderError as exc:
            self._report("par", "rejected", exc)
            raise
        return fapi.pushed_authorization_url(
            meta.authorization_endpoint, self._cfg.client_id, request_uri
        )

    async def _authenticated_post(
        self,
        endpoint: str,
        meta: ProviderMetadata,
        url: str,
        form: Mapping[str, str],
        *,
        dpop: bool = True,
    ) -> tuple[int, object]:
        """POST ``form`` to ``url`` with client authentication (and a DPoP proof)."""
        now = self._wall_clock()
        if self._client_key is not None:
            # FAPI 2.0 5.3.2.1: the audience is the issuer; elsewhere the endpoint, which
            # is what Okta and Entra require (and RFC 9126 2 accepts either).
            audience = meta.issuer if self._cfg.profile == "fapi2" else url
            try:
                key = self._client_key.current()
            except fapi.ClientKeyError:
                # Unreachable after start-up (the last good key is kept); no path shown.
                raise errors.ProviderError(
                    "The gateway's client key cannot be used.", reason="client_key_unusable"
                ) from None
            headers: dict[str, str] = {}
            fields = fapi.client_assertion_fields(
                key, client_id=self._cfg.client_id, audience=audience, now=now
            )
        else:
            headers, fields = token_request_auth(self._cfg)
        headers["Accept"] = "application/json"
        if dpop and self._dpop_key is not None:
            headers["DPoP"] = fapi.dpop_proof(
                self._dpop_key, method="POST", url=url, now=now, nonce=self._dpop_nonce
            )
        return await self._request(endpoint, "POST", url, {**form, **fields}, headers)

    async def introspect(self, token: str) -> tuple[int, object]:
        """Ask the introspection endpoint about ``token`` (RFC 7662 2.1), authenticated as
        the gateway's client exactly as at the token endpoint. Returns (status, JSON body);
        a provider without the endpoint, or one that cannot be reached, raises."""
        meta = await self.metadata()
        if meta.introspection_endpoint is None:
            raise errors.ProviderUnavailable(
                "The token service offers no introspection.", reason="introspection_missing"
            )
        headers, fields = token_request_auth(self._cfg)
        form = {"token": token, "token_type_hint": "access_token", **fields}
        headers["Accept"] = "application/json"
        return await self._request(
            "introspection", "POST", meta.introspection_endpoint, form, headers
        )

    async def verify(
        self,
        id_token: str,
        *,
        nonce: str,
        now: float,
        require_auth_time: bool = False,
        levels: Sequence[Level] = (),
    ) -> IdTokenClaims:
        """Verify an ID token: pick the key by its header, then run every check
        (``require_auth_time`` when the request carried ``max_age``). Its ``acr`` is
        then the one the provider profile reads from it against ``levels`` (Entra:
        the strongest ``acrs`` context a level names)."""
        claims = verify_id_token(
            id_token,
            await self._key_of(id_token),
            issuer=self._cfg.issuer,
            client_id=self._cfg.client_id,
            nonce=nonce,
            now=now,
            skew_s=self._cfg.clock_skew_s,
            allowed_algs=self._cfg.algorithms,
            require_auth_time=require_auth_time,
        )
        acr = profiles.asserted_acr(
            profiles.get(self._cfg.profile), claims.acr, claims.acrs, levels
        )
        return claims if acr == claims.acr else dataclasses.replace(claims, acr=acr)

    async def _key_of(self, token: str) -> jwt.PyJWK:
        """The provider key a signed token names in its header (nothing trusted yet)."""
        header = unverified_header(token)
        return await self.key_for(header.get("kid"), header["alg"])

    async def verify_logout(self, logout_token: str, *, now: float) -> LogoutClaims:
        """Verify a back-channel logout token with the provider's keys."""
        return verify_logout_token(
            logout_token,
            await self._key_of(logout_token),
            issuer=self._cfg.issuer,
            client_id=self._cfg.client_id,
            now=now,
            skew_s=self._cfg.clock_skew_s,
            allowed_algs=self._cfg.algorithms,
        )

    async def _fetch(self, endpoint: str, url: str, parse: Callable[[object], T]) -> T:
        """GET ``url`` and parse its 200 JSON answer; failures are reported and raised."""
        status, body = await self._request(endpoint, "GET", url)
        if status != 200:
            raise self._status_error(endpoint, status)
        try:
            return parse(body)
        except errors.ProviderError as exc:
            self._report(endpoint, "invalid", exc)
            raise

    # -------------------------------------------------------------------- metadata

    async def _refresh_metadata(self, *, force: bool) -> None:
        if not force and self._clock() < self._meta_next_fetch:
            if self._meta is None:
                raise _copy(self._meta_error)
            return
        async with self._meta_lock:
            if not force and self._clock() < self._meta_next_fetch:
                if self._meta is None:
                    raise _copy(self._meta_error)
                return
            url = self._cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                meta = await self._fetch(
                    "discovery", url, lambda body: parse_metadata(body, issuer=self._cfg.issuer)
                )
            except errors.ProviderError as exc:
                self._meta_next_fetch = self._clock() + RETRY_AFTER_FAILURE_S
                self._meta_error = exc
                log.warning(
                    "provider_metadata_refresh_failed",
                    reason=exc.reason,
                    kept_last_good=self._meta is not None,
                )
                if self._meta is None or force:
                    raise
                return
            if self._meta is None:
                _warn_about_mismatches(meta, self._cfg)
            self._meta = meta
            self._meta_error = None
            self._meta_next_fetch = self._clock() + METADATA_MAX_AGE_S

    # ------------------------------------------------------------------------ JWKS

    async def _refresh_jwks(self, *, force: bool) -> None:
        if not force and self._clock() < self._jwks_next_fetch:
            if not self._jwks_loaded:
                raise _copy(self._jwks_error)
            return
        async with self._jwks_lock:
            if not force and self._clock() < self._jwks_next_fetch:
                if not self._jwks_loaded:
                    raise _copy(self._jwks_error)
                return
            await self._fetch_jwks_locked(raise_errors=force)

    async def _fetch_jwks_locked(self, *, raise_errors: bool) -> None:
        """Fetch the key set; the caller holds ``_jwks_lock``. On failure the last
        good keys stay; the error is raised if there are none or ``raise_errors``."""
        self._jwks_last_attempt = self._clock()
        self._jwks_attempts += 1
        try:
            meta = await self.metadata()
            keys = await self._fetch("jwks", meta.jwks_uri, parse_jwks)
        except errors.ProviderError as exc:
            self._jwks_next_fetch = self._clock() + RETRY_AFTER_FAILURE_S
            self._jwks_error = exc
            log.warning(
                "provider_jwks_refresh_failed", reason=exc.reason, kept_last_good=self._jwks_loaded
            )
            if not self._jwks_loaded or raise_errors:
                raise
            return
        self._jwks = keys
        self._jwks_loaded = True
        self._jwks_error = None
        self._jwks_next_fetch = self._clock() + JWKS_MAX_AGE_S
        log.info("provider_jwks_loaded", keys=len(keys))

    def _find_key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        candidates: list[jwt.PyJWK] = []
        for jwk in self._jwks:
            if kid is not None and jwk.get("kid") != kid:
                continue
            if jwk.get("use", "sig") != "sig" or jwk.get("alg", alg) != alg:
                continue  # RFC 7517 4.2, 4.4: a key meant for something else
            try:
                key = jwt.PyJWK(jwk, algorithm=alg)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            if key_fits_alg(key, alg):
                candidates.append(key)
        # OIDC Core 10.1: without a kid the choice must be unambiguous.
        if kid is None and len(candidates) != 1:
            return None
        return candidates[0] if candidates else None

    # ------------------------------------------------------------------------ HTTP

    async def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, object]:
        """One request; returns (status, parsed JSON, or None if it is not JSON).
        Redirects are not followed: a 307 would resend the client secret elsewhere."""
        try:
            async with self._http.request(
                method,
                url,
                data=form,
                headers=headers,
                timeout=self._timeout,
                trace_request_ctx=endpoint,  # the span's name, with tracing on
                allow_redirects=False,
            ) as response:
                raw = await _read_capped(response)
                status = response.status
                nonce = response.headers.get("DPoP-Nonce")
                if nonce is not None and len(nonce) <= MAX_DPOP_NONCE_CHARS:
                    self._dpop_nonce = nonce  # RFC 9449 8: use it in the next proof
        except TimeoutError as exc:
            error: errors.ProviderError = errors.ProviderUnavailable(
                "The identity provider did not answer in time.", reason=f"{endpoint}_timeout"
            )
            self._report(endpoint, "timeout", error)
            raise error from exc
        except _TooLarge as exc:
            error = errors.ProviderError(
                "The identity provider sent an oversized answer.", reason=f"{endpoint}_invalid"
            )
            self._report(endpoint, "invalid", error)
            raise error from exc
        except (aiohttp.ClientError, OSError) as exc:
            # Only the exception's type: its text can contain the URL we posted to.
            error = errors.ProviderUnavailable(
                "The identity provider cannot be reached.", reason=f"{endpoint}_unreachable"
            )
            self._report(endpoint, "unreachable", error, cause=type(exc).__name__)
            raise error from None
        try:
            body: object = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None  # the callers' parsers refuse a missing body with their own reason
        return status, body

    def _status_error(self, endpoint: str, status: int) -> errors.ProviderError:
        error: errors.ProviderError
        if status in (502, 503, 504):
            error = errors.ProviderUnavailable(
                "The identity provider is unavailable.", reason=f"{endpoint}_status"
            )
        else:
            error = errors.ProviderError(
                "The identity provider answered with an error.", reason=f"{endpoint}_status"
            )
        self._report(endpoint, "status", error, status=status)
        return error

    def _report(
        self, endpoint: str, problem: str, error: errors.ProviderError, **fields: object
    ) -> None:
        log.warning(
            "provider_error", endpoint=endpoint, problem=problem, reason=error.reason, **fields
        )
        if self._on_error is not None:
            self._on_error(f"{endpoint}_{problem}")


def _warn_about_mismatches(meta: ProviderMetadata, cfg: model.OidcConfig) -> None:
    """Say at start-up what will otherwise fail at the first sign-in."""
    if cfg.client_auth not in meta.token_endpoint_auth_methods:
        log.warning(
            "provider_client_auth_not_advertised",
            configured=cfg.client_auth,
            advertised=list(meta.token_endpoint_auth_methods),
        )
    if meta.id_token_signing_algs and not set(meta.id_token_signing_algs) & set(
        usable_algs(cfg.algorithms)
    ):
        log.warning(
            "provider_algs_not_allowed",
            advertised=list(meta.id_token_signing_algs),
            allowed=list(usable_algs(cfg.algorithms)),
        )
    if meta.code_challenge_methods and "S256" not in meta.code_challenge_methods:
        log.warning("provider_pkce_s256_not_advertised")
    has_par = isinstance(meta.raw.get("pushed_authorization_request_endpoint"), str)
    if cfg.par and not has_par:
        log.warning("provider_par_not_offered")  # every sign-in will fail: RFC 9126 5
    if not cfg.par and meta.raw.get("require_pushed_authorization_requests") is True:
        log.warning("provider_requires_par", hint="set oidc.par: true")


def _asks_for_dpop_nonce(status: int, body: object) -> bool:
    return status == 400 and isinstance(body, Mapping) and body.get("error") == "use_dpop_nonce"


class _TooLarge(Exception):
    pass


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _copy(error: errors.ProviderError | None) -> errors.ProviderError:
    """A fresh exception for a remembered failure (re-raising one object piles up tracebacks)."""
    if error is None:
        return errors.ProviderUnavailable(
            "The identity provider's metadata is not loaded yet.", reason="not_loaded"
        )
    return type(error)(error.message, reason=error.reason)
