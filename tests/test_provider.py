"""ProviderClient against the test OpenID Provider, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway import errors, model
from gateway.oidc import flow
from gateway.oidc.provider import (
    JWKS_REFETCH_INTERVAL_S,
    METADATA_MAX_AGE_S,
    RETRY_AFTER_FAILURE_S,
    ProviderClient,
)
from tests.support.op import (
    CALLBACK_MISBEHAVIOURS,
    ID_TOKEN_MISBEHAVIOURS,
    MISSING_AUTH_TIME,
    OpClient,
    OpenIdProvider,
    start_op,
)

REDIRECT_URI = "http://127.0.0.1:1/_gateway/callback"  # never contacted: we stop at the 302
LOGOUT_URI = "http://127.0.0.1:1/signed-out"
SECRET = "s3cr:t %+/é"  # needs RFC 6749 2.3.1 form-encoding to survive Basic auth
NOW = 1_700_000_000.0


class Clock:
    """The monotonic clock the client's caches run on; tests move it by hand."""

    def __init__(self) -> None:
        self.t = 5_000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        """Sleep on this clock: move it to when the sleeper wakes (tasks that sleep
        together wake together), and let the other tasks run."""
        self.waits.append(seconds)
        wake_at = self.t + seconds
        await asyncio.sleep(0)
        self.t = max(self.t, wake_at)


@pytest.fixture
async def op(aiohttp_server: Callable[..., Awaitable[Any]]) -> OpenIdProvider:
    client = OpClient(
        client_secret=SECRET, redirect_uris=[REDIRECT_URI], post_logout_redirect_uris=[LOGOUT_URI]
    )
    provider = await start_op(aiohttp_server, clients=[client])
    provider.behaviour.now = lambda: NOW
    return provider


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Setup:
    def __init__(self, op: OpenIdProvider, http: aiohttp.ClientSession, clock: Clock) -> None:
        self.op, self.http, self.clock = op, http, clock
        self.errors: list[str] = []

    def config(self, **changes: Any) -> model.OidcConfig:
        values: dict[str, Any] = {
            "issuer": self.op.issuer,
            "client_id": "gateway",
            "client_secret": SECRET,
            "http_timeout_s": 5.0,
        }
        values.update(changes)
        return model.OidcConfig(**values)

    def client(self, **changes: Any) -> ProviderClient:
        return ProviderClient(
            self.config(**changes),
            self.http,
            clock=self.clock,
            sleep=self.clock.sleep,
            on_error=self.errors.append,
        )

    async def authorize(
        self, provider: ProviderClient, **kw: Any
    ) -> tuple[dict[str, str], str, str, str]:
        """Walk /authorize; return (callback params, code_verifier, nonce, state)."""
        meta = await provider.metadata()
        verifier, challenge = flow.new_pkce()
        state, nonce = flow.random_token(), flow.random_token()
        url = flow.authorization_url(
            meta,
            provider.config,
            redirect_uri=REDIRECT_URI,
            state=state,
            nonce=nonce,
            code_challenge=challenge,
            **kw,
        )
        async with self.http.get(url, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            location = response.headers["Location"]
        assert location.startswith(REDIRECT_URI + "?")
        return dict(parse_qsl(urlsplit(location).query)), verifier, nonce, state

    async def sign_in(self, provider: ProviderClient, **kw: Any) -> flow.IdTokenClaims:
        params, verifier, nonce, state = await self.authorize(provider, **kw)
        callback = flow.parse_callback(await provider.metadata(), params)
        assert callback.state == state and callback.code
        tokens = await provider.exchange_code(
            code=callback.code, redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
        id_token = tokens["id_token"]
        assert isinstance(id_token, str)
        return await provider.verify(
            id_token, nonce=nonce, now=NOW, require_auth_time="max_age_s" in kw
        )


@pytest.fixture
def setup(op: OpenIdProvider, http: aiohttp.ClientSession, clock: Clock) -> Setup:
    return Setup(op, http, clock)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -------------------------------------------------------------------- discovery


async def test_load_fetches_metadata_and_keys(setup: Setup) -> None:
    provider = setup.client()
    assert not provider.ready

    await provider.load()

    assert provider.ready
    meta = await provider.metadata()
    assert meta.issuer == setup.op.issuer
    assert meta.token_endpoint == f"{setup.op.issuer}/token"
    assert meta.jwks_uri == f"{setup.op.issuer}/jwks"
    assert meta.end_session_endpoint == f"{setup.op.issuer}/end_session"
    assert meta.iss_parameter_supported is True
    assert meta.code_challenge_methods == ("S256",)
    assert setup.op.hits == {"discovery": 1, "jwks": 1}


async def test_metadata_is_cached_then_refreshed_hourly(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    for _ in range(5):
        await provider.metadata()
    assert setup.op.hits["discovery"] == 1

    setup.clock.advance(METADATA_MAX_AGE_S - 1)
    await provider.metadata()
    assert setup.op.hits["discovery"] == 1
    setup.clock.advance(1)
    await provider.metadata()
    assert setup.op.hits["discovery"] == 2


@pytest.mark.parametrize(
    "issuer_in_document",
    ["{issuer}/", "{issuer}/other", "https://evil.example", None],
    ids=["trailing_slash", "other_path", "other_host", "missing"],
)
async def test_issuer_mismatch_is_a_provider_error(
    setup: Setup, issuer_in_document: str | None
) -> None:
    value = issuer_in_document and issuer_in_document.format(issuer=setup.op.issuer)
    setup.op.behaviour.discovery_overrides = {"issuer": value}
    provider = setup.client()

    with pytest.raises(errors.ProviderError) as caught:
        await provider.load()

    assert not isinstance(caught.value, errors.ProviderUnavailable)
    assert caught.value.reason == "issuer_mismatch"
    assert setup.errors == ["discovery_invalid"]
    assert not provider.ready


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"token_endpoint": None}, "metadata_invalid"),
        ({"jwks_uri": "/relative/jwks"}, "metadata_invalid"),
        ({"response_types_supported": ["id_token"]}, "metadata_invalid"),
        ({"authorization_response_iss_parameter_supported": "yes"}, "metadata_invalid"),
    ],
    ids=["no_token_endpoint", "relative_jwks_uri", "no_code_flow", "flag_not_bool"],
)
async def test_unusable_metadata_is_refused(
    setup: Setup, overrides: dict[str, Any], reason: str
) -> None:
    setup.op.behaviour.discovery_overrides = overrides
    with pytest.raises(errors.ProviderError) as caught:
        await setup.client().load()
    assert caught.value.reason == reason


async def test_provider_down_is_unavailable(http: aiohttp.ClientSession, clock: Clock) -> None:
    events: list[str] = []
    cfg = model.OidcConfig(
        issuer=f"http://127.0.0.1:{free_port()}", client_id="gateway", client_secret=SECRET
    )
    provider = ProviderClient(cfg, http, clock=clock, on_error=events.append)

    with pytest.raises(errors.ProviderUnavailable) as caught:
        await provider.load()
    assert caught.value.reason == "discovery_unreachable"
    assert events == ["discovery_unreachable"]
    assert not provider.ready
    # Still down and inside the retry interval: refused without another attempt.
    with pytest.raises(errors.ProviderUnavailable):
        await provider.metadata()
    assert events == ["discovery_unreachable"]


async def test_last_good_metadata_and_keys_survive_a_failed_refresh(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    meta = await provider.metadata()
    setup.op.behaviour.discovery_status = 503
    setup.op.behaviour.jwks_status = 500

    setup.clock.advance(METADATA_MAX_AGE_S)
    assert await provider.metadata() is meta
    assert setup.op.hits["discovery"] == 2
    assert setup.errors == ["discovery_status"]
    # The keys' own hourly refresh fails too, and the old keys still verify tokens.
    claims = await setup.sign_in(provider)
    assert claims.sub == "user-1"
    assert setup.op.hits["jwks"] == 2
    assert setup.errors == ["discovery_status", "jwks_status"]
    assert provider.ready

    # Within the retry interval nothing is refetched; after it, the provider is back.
    await provider.metadata()
    assert setup.op.hits["discovery"] == 2
    setup.op.behaviour.discovery_status = 200
    setup.op.behaviour.discovery_overrides = {"userinfo_endpoint": None}
    setup.clock.advance(RETRY_AFTER_FAILURE_S)
    assert (await provider.metadata()).userinfo_endpoint is None
    assert setup.op.hits["discovery"] == 3


async def test_forced_load_reports_a_failure_but_keeps_the_copy(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    meta = await provider.metadata()
    setup.op.behaviour.discovery_status = 500

    with pytest.raises(errors.ProviderError):
        await provider.load(force=True)
    assert provider.ready
    assert await provider.metadata() is meta


async def test_startup_warns_about_a_client_auth_the_provider_does_not_offer(
    setup: Setup,
) -> None:
    setup.op.behaviour.discovery_overrides = {
        "token_endpoint_auth_methods_supported": ["private_key_jwt"]
    }
    with capture_logs() as logs:
        await setup.client().load()
    events = [entry for entry in logs if entry["event"] == "provider_client_auth_not_advertised"]
    assert events and events[0]["configured"] == "client_secret_basic"


async def test_no_secret_code_or_token_reaches_the_logs(setup: Setup) -> None:
    provider = setup.client()
    with capture_logs() as logs:
        params, verifier, nonce, _ = await setup.authorize(provider)
        setup.op.behaviour.unknown_kid = True
        tokens = await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
        with pytest.raises(flow.IdTokenError):
            await provider.verify(str(tokens["id_token"]), nonce=nonce, now=NOW)
        with pytest.raises(errors.ProviderError):  # the code is used up now
            await provider.exchange_code(
                code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
            )
    text = repr(logs)
    assert "provider_error" in text  # the refusal was logged ...
    for secret in (SECRET, params["code"], verifier, nonce, str(tokens["id_token"])):
        assert secret not in text  # ... without anything secret


# ------------------------------------------------------------------------- JWKS


async def test_rotation_picks_up_the_new_key(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    assert (await setup.sign_in(provider)).sub == "user-1"

    new_key = setup.op.rotate_keys("RSA", retire_old=True)
    setup.clock.advance(JWKS_REFETCH_INTERVAL_S)
    claims = await setup.sign_in(provider)

    assert claims.sub == "user-1"
    assert setup.op.hits["jwks"] == 2
    assert setup.clock.waits == []  # the interval had passed: fetched at once
    assert (await provider.key_for(new_key.kid, "RS256")).key_id == new_key.kid


@pytest.mark.parametrize("seconds_after_load", [0, 1, 4.5, 6, 29])
async def test_a_rotation_soon_after_a_fetch_costs_seconds_not_a_failed_sign_in(
    setup: Setup, seconds_after_load: float
) -> None:
    # The provider rotates (OIDC Core 10.1.1: publish, then sign with the new key)
    # shortly after the gateway fetched its keys. The first sign-in with the new
    # kid used to fail for up to 30 s; now it waits for the next allowed fetch.
    provider = setup.client()
    await provider.load()
    setup.op.rotate_keys("RSA", retire_old=True)
    setup.clock.advance(seconds_after_load)

    assert (await setup.sign_in(provider)).sub == "user-1"

    assert setup.op.hits["jwks"] == 2
    expected_wait = max(0.0, JWKS_REFETCH_INTERVAL_S - seconds_after_load)
    assert setup.clock.waits == ([expected_wait] if expected_wait else [])
    assert JWKS_REFETCH_INTERVAL_S <= 5


async def test_bursts_of_unknown_kids_share_one_fetch_per_interval(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    started = setup.clock()

    for burst in range(1, 4):  # three bursts of 50 made-up kids, back to back
        results = await asyncio.gather(
            *(provider.key_for(f"random-{burst}-{i}", "RS256") for i in range(50)),
            return_exceptions=True,
        )
        assert all(isinstance(r, flow.IdTokenError) and r.reason == "kid" for r in results)
        assert setup.op.hits["jwks"] == 1 + burst  # one fetch per burst, not fifty

    # Each burst waited out the interval (together), never longer.
    assert setup.clock() - started == pytest.approx(3 * JWKS_REFETCH_INTERVAL_S)
    assert max(setup.clock.waits) <= JWKS_REFETCH_INTERVAL_S


async def test_made_up_kids_never_fetch_faster_than_the_interval(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    started, fetches_before = setup.clock(), setup.op.hits["jwks"]

    for i in range(40):  # one after the other, as fast as the gateway answers
        with pytest.raises(flow.IdTokenError) as caught:
            await provider.key_for(f"random-{i}", "RS256")
        assert caught.value.reason == "kid"
        setup.clock.advance(0.5)

    fetches = setup.op.hits["jwks"] - fetches_before
    elapsed = setup.clock() - started
    assert fetches <= elapsed / JWKS_REFETCH_INTERVAL_S + 1
    assert all(wait <= JWKS_REFETCH_INTERVAL_S for wait in setup.clock.waits)


async def test_ec_keys_work_too(setup: Setup) -> None:
    setup.op.behaviour.sign_with = "EC"
    provider = setup.client()
    await provider.load()
    assert (await setup.sign_in(provider)).sub == "user-1"


async def test_concurrent_unknown_kids_share_one_refetch(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    setup.clock.advance(JWKS_REFETCH_INTERVAL_S)

    results = await asyncio.gather(
        *(provider.key_for(f"kid-{i}", "RS256") for i in range(10)), return_exceptions=True
    )

    assert all(isinstance(r, flow.IdTokenError) for r in results)
    assert setup.op.hits["jwks"] == 2


@pytest.mark.parametrize("alg", ["none", "HS256", "RS999"])
async def test_unacceptable_alg_never_triggers_a_fetch(setup: Setup, alg: str) -> None:
    provider = setup.client()
    await provider.load()
    setup.clock.advance(JWKS_REFETCH_INTERVAL_S)
    with pytest.raises(flow.IdTokenError) as caught:
        await provider.key_for("rsa-1", alg)
    assert caught.value.reason == "alg"
    assert setup.op.hits["jwks"] == 1


async def test_key_without_kid_only_when_unambiguous(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    # One RSA and one EC key published: for RS256 the choice is clear ...
    assert (await provider.key_for(None, "RS256")).key_id == "rsa-1"
    # ... after a rotation there are two RSA keys, so a kid is required.
    setup.op.rotate_keys("RSA")
    await provider.load(force=True)
    with pytest.raises(flow.IdTokenError):
        await provider.key_for(None, "RS256")


async def test_a_key_published_for_one_alg_is_not_used_for_another(setup: Setup) -> None:
    # The JWK says "alg": "RS256"; a PS256 header must not borrow it (RFC 7517 4.4).
    provider = setup.client()
    await provider.load()
    assert (await provider.key_for("rsa-1", "RS256")).algorithm_name == "RS256"
    with pytest.raises(flow.IdTokenError) as caught:
        await provider.key_for("rsa-1", "PS256")
    assert caught.value.reason == "kid"


async def test_encryption_keys_are_not_signing_keys(setup: Setup) -> None:
    jwk = {**setup.op.keys[0].public_jwk(), "use": "enc"}
    setup.op.jwks = lambda: {"keys": [jwk]}  # type: ignore[method-assign]
    provider = setup.client()
    await provider.load()
    with pytest.raises(flow.IdTokenError) as caught:
        await provider.key_for("rsa-1", "RS256")
    assert caught.value.reason == "kid"


async def test_jwks_without_usable_keys_is_refused(setup: Setup) -> None:
    setup.op.keys = []
    with pytest.raises(errors.ProviderError) as caught:
        await setup.client().load()
    assert caught.value.reason == "jwks_invalid"
    assert setup.errors == ["jwks_invalid"]


# -------------------------------------------------------------- code exchange


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_code_exchange(setup: Setup, method: str) -> None:
    setup.op.clients["gateway"].auth_method = method
    provider = setup.client(client_auth=method)

    claims = await setup.sign_in(provider)

    assert claims.sub == "user-1"
    assert claims.acr == "urn:example:loa:1"
    assert claims.amr == ("pwd",)
    assert claims.auth_time == int(NOW)
    recorded = setup.op.token_requests[-1]
    assert recorded["auth_method"] == method.removeprefix("client_secret_")
    assert recorded["grant_type"] == "authorization_code"


@pytest.mark.parametrize(
    ("op_method", "our_method"),
    [("client_secret_basic", "client_secret_post"), ("client_secret_post", "client_secret_basic")],
)
async def test_wrong_client_auth_method_is_rejected(
    setup: Setup, op_method: str, our_method: str
) -> None:
    setup.op.clients["gateway"].auth_method = op_method
    provider = setup.client(client_auth=our_method)
    params, verifier, _, _ = await setup.authorize(provider)

    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )

    assert caught.value.reason == "invalid_client"
    assert setup.errors == ["token_rejected"]


async def test_wrong_secret_is_rejected(setup: Setup) -> None:
    provider = setup.client(client_secret="not-the-secret")
    params, verifier, _, _ = await setup.authorize(provider)
    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
    assert caught.value.reason == "invalid_client"


async def test_pkce_mismatch_is_rejected_by_the_provider(setup: Setup) -> None:
    provider = setup.client()
    params, _, _, _ = await setup.authorize(provider)
    other_verifier, _ = flow.new_pkce()

    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=other_verifier
        )

    assert caught.value.reason == "invalid_grant"
    shown = f"{caught.value} {caught.value.message} {caught.value.reason}"
    for secret in (params["code"], other_verifier, SECRET):
        assert secret not in shown


async def test_code_is_single_use(setup: Setup) -> None:
    provider = setup.client()
    params, verifier, _, _ = await setup.authorize(provider)
    await provider.exchange_code(
        code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
    )
    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
    assert caught.value.reason == "invalid_grant"


async def test_redirect_uri_must_match_the_request(setup: Setup) -> None:
    provider = setup.client()
    params, verifier, _, _ = await setup.authorize(provider)
    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI + "x", code_verifier=verifier
        )
    assert caught.value.reason == "invalid_grant"


@pytest.mark.parametrize(
    ("knobs", "reason"),
    [
        ({"token_error": "invalid_grant"}, "invalid_grant"),
        ({"token_error": "bad code\nx"}, "invalid_error"),
        (
            {"token_response": {"access_token": "a", "token_type": "Bearer"}},
            "token_response_no_id_token",
        ),
        ({"token_response": {"id_token": 42}}, "token_response_no_id_token"),
    ],
    ids=["invalid_grant", "odd_error_code", "no_id_token", "id_token_not_string"],
)
async def test_bad_token_responses(setup: Setup, knobs: dict[str, Any], reason: str) -> None:
    provider = setup.client()
    params, verifier, _, _ = await setup.authorize(provider)
    for name, value in knobs.items():
        setattr(setup.op.behaviour, name, value)
    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("status", "unavailable"), [(503, True), (502, True), (500, False), (404, False)]
)
async def test_token_endpoint_http_status(setup: Setup, status: int, unavailable: bool) -> None:
    provider = setup.client()
    params, verifier, _, _ = await setup.authorize(provider)
    setup.op.behaviour.token_status = status
    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(
            code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
        )
    assert isinstance(caught.value, errors.ProviderUnavailable) is unavailable


async def test_token_endpoint_down_is_unavailable(setup: Setup) -> None:
    provider = setup.client()
    await provider.load()
    await setup.op.server.close()
    with pytest.raises(errors.ProviderUnavailable) as caught:
        await provider.exchange_code(code="c", redirect_uri=REDIRECT_URI, code_verifier="v" * 43)
    assert caught.value.reason == "token_unreachable"


# ------------------------------------------------------ what the provider asserts


async def test_a_password_login_stays_a_password_login(setup: Setup) -> None:
    provider = setup.client(essential_acr=True)

    claims = await setup.sign_in(provider, acr_values=["phr", "phrh"], max_age_s=300)

    asked = setup.op.last_authorization
    assert asked is not None
    assert asked["acr_values"] == "phr phrh"
    assert asked["max_age"] == "300"
    assert '"essential":true' in asked["claims"]
    assert (claims.acr, claims.amr) == ("urn:example:loa:1", ("pwd",))


async def test_a_provider_that_honours_acr_values(setup: Setup) -> None:
    setup.op.behaviour.honour_acr_values = True
    setup.op.behaviour.user.amr = ["hwk", "user"]
    claims = await setup.sign_in(setup.client(), acr_values=["phr"])
    assert (claims.acr, claims.amr) == ("phr", ("hwk", "user"))


@pytest.mark.parametrize(
    ("knobs", "reason"), list(ID_TOKEN_MISBEHAVIOURS.values()), ids=list(ID_TOKEN_MISBEHAVIOURS)
)
async def test_every_id_token_misbehaviour_over_http(
    setup: Setup, knobs: dict[str, Any], reason: str
) -> None:
    provider = setup.client()
    await provider.load()
    setup.clock.advance(JWKS_REFETCH_INTERVAL_S)
    for name, value in knobs.items():
        setattr(setup.op.behaviour, name, value)

    with pytest.raises(flow.IdTokenError) as caught:
        await setup.sign_in(provider)

    assert caught.value.reason == reason


async def test_missing_auth_time_when_max_age_was_asked(setup: Setup) -> None:
    knobs, reason = MISSING_AUTH_TIME
    for name, value in knobs.items():
        setattr(setup.op.behaviour, name, value)
    provider = setup.client()
    assert (await setup.sign_in(provider)).auth_time is None
    with pytest.raises(flow.IdTokenError) as caught:
        await setup.sign_in(provider, max_age_s=60)
    assert caught.value.reason == reason


# -------------------------------------------------------- the authorization response


@pytest.mark.parametrize(
    ("knobs", "reason"), list(CALLBACK_MISBEHAVIOURS.values()), ids=list(CALLBACK_MISBEHAVIOURS)
)
async def test_callback_iss_misbehaviours(setup: Setup, knobs: dict[str, Any], reason: str) -> None:
    for name, value in knobs.items():
        setattr(setup.op.behaviour, name, value)
    provider = setup.client()
    params, _, _, _ = await setup.authorize(provider)

    with pytest.raises(flow.CallbackError) as caught:
        flow.parse_callback(await provider.metadata(), params)

    assert caught.value.reason == reason
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("knobs", "ok"),
    [
        ({"omit_callback_iss": True}, True),
        ({"callback_iss": "https://evil.example"}, False),
    ],
    ids=["absent_is_fine", "present_must_still_match"],
)
async def test_callback_iss_when_not_advertised(
    setup: Setup, knobs: dict[str, Any], ok: bool
) -> None:
    setup.op.behaviour.advertise_iss_parameter = False
    for name, value in knobs.items():
        setattr(setup.op.behaviour, name, value)
    provider = setup.client()
    params, _, _, _ = await setup.authorize(provider)
    meta = await provider.metadata()
    assert meta.iss_parameter_supported is False
    if ok:
        assert flow.parse_callback(meta, params).code
    else:
        with pytest.raises(flow.CallbackError):
            flow.parse_callback(meta, params)


@pytest.mark.parametrize(
    "error", ["access_denied", "login_required", "unmet_authentication_requirements"]
)
async def test_provider_refusal_comes_back_as_an_error(setup: Setup, error: str) -> None:
    setup.op.behaviour.authorize_error = error
    provider = setup.client()
    params, _, _, state = await setup.authorize(provider, acr_values=["phr"])

    callback = flow.parse_callback(await provider.metadata(), params)

    assert (callback.error, callback.state, callback.code) == (error, state, None)


async def test_the_provider_insists_on_pkce(setup: Setup) -> None:
    provider = setup.client()
    meta = await provider.metadata()
    url = flow.authorization_url(
        meta,
        setup.config(),
        redirect_uri=REDIRECT_URI,
        state="s",
        nonce="n",
        code_challenge="x",  # not a SHA-256 challenge
    )
    async with setup.http.get(url, allow_redirects=False) as response:
        location = response.headers["Location"]
    assert dict(parse_qsl(urlsplit(location).query))["error"] == "invalid_request"


async def test_the_provider_never_redirects_to_an_unregistered_uri(setup: Setup) -> None:
    provider = setup.client()
    meta = await provider.metadata()
    _, challenge = flow.new_pkce()
    url = flow.authorization_url(
        meta,
        setup.config(),
        redirect_uri="https://evil.example/cb",
        state="s",
        nonce="n",
        code_challenge=challenge,
    )
    async with setup.http.get(url, allow_redirects=False) as response:
        assert response.status == 400


# ------------------------------------------------------------- logout, userinfo


async def test_end_session_round_trip(setup: Setup) -> None:
    provider = setup.client()
    id_token = setup.op.make_id_token(nonce="n")
    url = flow.end_session_url(
        await provider.metadata(),
        client_id="gateway",
        id_token_hint=id_token,
        post_logout_redirect_uri=LOGOUT_URI,
        state="bye",
    )
    assert url is not None
    async with setup.http.get(url, allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{LOGOUT_URI}?state=bye"
    assert setup.op.end_session_requests[-1]["id_token_hint"] == id_token


async def test_userinfo_answers_for_the_access_token(setup: Setup) -> None:
    provider = setup.client()
    params, verifier, _, _ = await setup.authorize(provider)
    tokens = await provider.exchange_code(
        code=params["code"], redirect_uri=REDIRECT_URI, code_verifier=verifier
    )
    meta = await provider.metadata()
    assert meta.userinfo_endpoint
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    async with setup.http.get(meta.userinfo_endpoint, headers=headers) as response:
        assert (await response.json())["sub"] == "user-1"
    async with setup.http.get(meta.userinfo_endpoint) as response:
        assert response.status == 401


# ---------------------------------------------------------- a hostile provider


async def test_oversized_and_non_json_answers(
    aiohttp_server: Callable[..., Awaitable[Any]], http: aiohttp.ClientSession, clock: Clock
) -> None:
    routes = web.RouteTableDef()
    big = b"[" + b"1," * 700_000 + b"1]"

    @routes.get("/big/.well-known/openid-configuration")
    async def oversized(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    @routes.get("/text/.well-known/openid-configuration")
    async def text(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.add_routes(routes)
    server = await aiohttp_server(app)
    for path, reason in [("big", "discovery_invalid"), ("text", "metadata_not_object")]:
        cfg = model.OidcConfig(
            issuer=f"http://{server.host}:{server.port}/{path}", client_id="g", client_secret="s"
        )
        with pytest.raises(errors.ProviderError) as caught:
            await ProviderClient(cfg, http, clock=clock).load()
        assert caught.value.reason == reason
        assert not isinstance(caught.value, errors.ProviderUnavailable)


async def test_token_request_never_follows_a_redirect(
    setup: Setup, aiohttp_server: Callable[..., Awaitable[Any]]
) -> None:
    # A 307 would replay the POST, client secret included, to wherever it points.
    elsewhere: list[str] = []

    async def bounce(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"{base}/capture"})

    async def capture(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Authorization", ""))
        return web.json_response({"id_token": "x"})

    app = web.Application()
    app.router.add_post("/token", bounce)
    app.router.add_post("/capture", capture)
    server = await aiohttp_server(app)
    base = f"http://{server.host}:{server.port}"
    setup.op.behaviour.discovery_overrides = {"token_endpoint": f"{base}/token"}
    provider = setup.client()

    with pytest.raises(errors.ProviderError) as caught:
        await provider.exchange_code(code="c", redirect_uri=REDIRECT_URI, code_verifier="v" * 43)

    assert caught.value.reason == "token_response_invalid"
    assert elsewhere == []


async def test_slow_provider_times_out(
    aiohttp_server: Callable[..., Awaitable[Any]], http: aiohttp.ClientSession, clock: Clock
) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", stuck)
    server = await aiohttp_server(app)
    cfg = model.OidcConfig(
        issuer=f"http://{server.host}:{server.port}",
        client_id="g",
        client_secret="s",
        http_timeout_s=0.2,
    )
    try:
        with pytest.raises(errors.ProviderUnavailable) as caught:
            await ProviderClient(cfg, http, clock=clock).load()
        assert caught.value.reason == "discovery_timeout"
    finally:
        release.set()


# ----------------------------------------------------------- as a process


async def test_op_runs_as_a_process(http: aiohttp.ClientSession) -> None:
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "tests.support.op", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--redirect-uri", REDIRECT_URI],
        cwd=root,
        env={**os.environ, "OP_CLIENT_SECRET": "process-secret", "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=30)
        assert f"http://127.0.0.1:{port}" in line  # printed once the socket is bound
        url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
        async with http.get(url) as response:
            document = await response.json()
        assert document["issuer"] == f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "process-secret" not in line + rest
