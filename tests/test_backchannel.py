"""Back-channel logout from the demo provider to the gateway, over real HTTP.

The demo provider sends a logout token (OpenID Connect Back-Channel Logout 1.0) to
each relying party of a provider session that ends; the gateway deletes the sessions
of that provider session (its ``sid``), and only those. In process with the memory
store first, then against a `stepup-gateway run` process with two workers sharing
sessions in Redis (127.0.0.1:6379, database 13, a key prefix of the test's own that
is removed afterwards; without Redis that test fails, it never skips).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from redis.asyncio import Redis
from redis.exceptions import RedisError
from structlog.testing import capture_logs
from yarl import URL

from gateway.app import Gateway
from gateway.config.defaults import DEFAULT_DECISION_MEMO_S
from gateway.oidc.flow import verify_logout_token
from stepup_demo import DemoStack, start_demo_stack
from stepup_demo.backchannel import (
    BACKCHANNEL_LOGOUT_EVENT,
    BackchannelLogoutSender,
    logout_token_claims,
    sign_logout_token,
)
from stepup_demo.idp import BROWSER_COOKIE, IdentityProvider
from stepup_demo.oauth import DemoClient
from stepup_demo.provider_session import ProviderSession
from tests.conftest import Browser, Clock, Hop, free_port
from tests.support.serving import serving_demo
from tests.test_demo_idp import (
    CLIENT_ID,
    CLIENT_SECRET,
    POST_LOGOUT_URI,
    REDIRECT_URI,
    START,
    Flow,
    Page,
    sign_in_with_password,
)
from tests.test_operations import GatewayProcess
from tests.test_redis_store import SHARED_URL, keys_of

ALICE = ("alice", "alice-demo-password")  # users.yaml
SKEW_S = 60  # the gateway's default oidc.clock_skew
# Sign-ins land on a worker by the kernel's hash of each new connection: a few
# tries find both workers (the chance of missing one halves with every try).
MAX_TRIES = 24


def new_browser(*, force_close: bool = False) -> Browser:
    connector = aiohttp.TCPConnector(force_close=force_close)
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1 too
    return Browser(aiohttp.ClientSession(connector=connector, cookie_jar=jar))


async def sign_in(
    browser: Browser,
    gateway_url: str,
    idp_url: str,
    *,
    password_for: tuple[str, str] | None,
    path: str = "/",
) -> None:
    """Gateway -> provider (its password page, or single sign-on) -> callback -> ``path``.

    ``password_for`` is (user, password) when the browser has no provider session yet.
    """
    hop = await browser.get(gateway_url + path)
    assert hop.status == 302 and hop.headers["Location"].startswith(f"{idp_url}/authorize?")
    hop = await browser.get(hop.headers["Location"])
    if password_for is not None:
        assert hop.status == 303, hop
        page_url = idp_url + hop.headers["Location"]
        page = Page(page_url, (await browser.get(page_url)).body)
        username, password = password_for
        form = {"csrf_token": page.csrf(), "username": username, "password": password}
        hop = await browser.request("POST", idp_url + page.action("/password"), data=form)
        assert hop.status == 303, hop
        hop = await browser.get(idp_url + hop.headers["Location"])
    assert hop.status == 302, hop
    assert hop.headers["Location"].startswith(f"{gateway_url}/_gateway/callback?")
    hop = await browser.get(hop.headers["Location"])
    assert hop.status == 303 and hop.headers["Location"] == path, hop
    assert (await browser.get(gateway_url + path)).status == 200


def share_provider_session(source: Browser, target: Browser, idp_url: str) -> None:
    """Give ``target`` the provider cookie of ``source``, and nothing else: the
    provider sees the same session (single sign-on), the gateway a new browser."""
    value = source.cookie(BROWSER_COOKIE)
    assert value
    target.http.cookie_jar.update_cookies({BROWSER_COOKIE: value}, URL(idp_url))


async def with_cookie(url: str, name: str, value: str, *, force_close: bool = False) -> Hop:
    """One request carrying only the session cookie ``value``, on a new client."""
    connector = aiohttp.TCPConnector(force_close=force_close)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        return await Browser(http).get(url, headers={"Cookie": f"{name}={value}"})


async def sign_out_at_the_provider(browser: Browser, idp_url: str, client_id: str) -> Hop:
    """The provider's own sign-out: end-session without a hint, then its Sign out button."""
    hop = await browser.get(f"{idp_url}/end-session?client_id={client_id}")
    page = Page(hop.url, hop.body)
    assert hop.status == 200 and page.has("sign-out"), hop
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.html))
    return await browser.request("POST", f"{idp_url}/end-session", data=fields)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- the logout token ----------------------------------------------------------------


def test_logout_token_is_one_the_gateway_accepts() -> None:
    idp = IdentityProvider(issuer="http://127.0.0.1:9", clients=[])
    claims = logout_token_claims(
        issuer=idp.issuer, client_id="rp", sub="alice", sid="op-sid", now=START + 0.7, jti="j-1"
    )
    assert claims == {
        "iss": idp.issuer,
        "aud": "rp",
        "iat": int(START),
        "exp": int(START) + 120,
        "jti": "j-1",
        "sub": "alice",
        "sid": "op-sid",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }  # and no nonce, ever: that is what keeps it from passing as an ID token
    token = sign_logout_token(claims, idp.key)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": idp.key.kid, "typ": "logout+jwt"}
    key = jwt.PyJWK(idp.jwks()["keys"][0])
    verified = verify_logout_token(
        token,
        key,
        issuer=idp.issuer,
        client_id="rp",
        now=START,
        skew_s=SKEW_S,
        allowed_algs=["ES256"],
    )
    assert (verified.sub, verified.sid, verified.jti) == ("alice", "op-sid", "j-1")


# --- the provider's side, against a relying party that records what it is sent --------


@dataclass
class Received:
    path: str
    content_type: str
    form: dict[str, str]


@dataclass
class RelyingParty:
    """Back-channel logout endpoints: /ok answers 200, /fail 500, /hang never."""

    url: str
    received: list[Received]
    release: asyncio.Event  # lets the /hang handler return once the test is over


@pytest.fixture
async def relying_party(aiohttp_server: Any) -> AsyncIterator[RelyingParty]:
    received: list[Received] = []
    release = asyncio.Event()

    async def endpoint(request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        received.append(Received(request.path, request.content_type, form))
        if request.path == "/hang":
            await release.wait()
        status = 500 if request.path == "/fail" else 200
        return web.Response(status=status, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_post("/{name}", endpoint)
    server = await aiohttp_server(app)
    rp = RelyingParty(str(server.make_url("")).rstrip("/"), received, release)
    yield rp
    release.set()


def demo_client(client_id: str, backchannel_logout_uri: str | None) -> DemoClient:
    return DemoClient(
        client_id=client_id,
        client_secret=CLIENT_SECRET,
        client_name="Demo Bank",
        redirect_uris=(REDIRECT_URI,),
        post_logout_redirect_uris=(POST_LOGOUT_URI,),
        backchannel_logout_uri=backchannel_logout_uri,
    )


async def provider(aiohttp_server: Any, clock: Clock, *clients: DemoClient) -> IdentityProvider:
    port = unused_port()
    idp = IdentityProvider(issuer=f"http://127.0.0.1:{port}", clients=clients, clock=clock)
    await aiohttp_server(idp.app(), port=port)
    return idp


def verified(idp: IdentityProvider, received: Received, client_id: str) -> dict[str, Any]:
    """The logout token's claims, checked as the gateway checks them, and its header."""
    assert received.content_type == "application/x-www-form-urlencoded"
    assert set(received.form) == {"logout_token"}
    token = received.form["logout_token"]
    assert jwt.get_unverified_header(token)["typ"] == "logout+jwt"
    key = jwt.PyJWK(idp.jwks()["keys"][0])
    verify_logout_token(
        token,
        key,
        issuer=idp.issuer,
        client_id=client_id,
        now=idp.clock(),
        skew_s=SKEW_S,
        allowed_algs=["ES256"],
    )
    # The signature and the claims passed just above; read them.
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_ending_a_session_tells_the_clients_that_took_part_in_it(
    aiohttp_server: Any, relying_party: RelyingParty
) -> None:
    clock = Clock(START)
    idp = await provider(
        aiohttp_server,
        clock,
        demo_client(CLIENT_ID, f"{relying_party.url}/ok"),
        demo_client("bystander", f"{relying_party.url}/bystander"),  # never signed in
    )
    discovery = idp.discovery()
    assert discovery["backchannel_logout_supported"] is True
    assert discovery["backchannel_logout_session_supported"] is True
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        flow = Flow.new(idp)
        reply = await sign_in_with_password(browser, idp, flow)
        tokens = await flow.redeem(browser, flow.callback(reply)["code"])
        id_claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
        clock.advance(30)
        params = {
            "id_token_hint": tokens["id_token"],
            "client_id": CLIENT_ID,
            "post_logout_redirect_uri": POST_LOGOUT_URI,
        }
        with capture_logs() as logs:
            reply = await browser.get(
                f"{idp.issuer}/end-session", params=params, allow_redirects=False
            )
        assert reply.status == 302 and reply.headers["Location"] == POST_LOGOUT_URI
    (received,) = relying_party.received  # the bystander got nothing
    assert received.path == "/ok"
    claims = verified(idp, received, CLIENT_ID)
    assert claims["sub"] == "alice" and claims["sid"] == id_claims["sid"]
    assert claims["iat"] == int(clock()) and "nonce" not in claims
    assert [(e["client_id"], e["status"]) for e in events(logs, "idp_backchannel_logout_sent")] == [
        (CLIENT_ID, 200)
    ]


async def test_another_user_signing_in_on_the_browser_ends_the_old_session(
    aiohttp_server: Any, relying_party: RelyingParty
) -> None:
    idp = await provider(
        aiohttp_server, Clock(START), demo_client(CLIENT_ID, relying_party.url + "/ok")
    )
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        alice = Flow.new(idp)
        alice_claims = await alice.id_token(
            browser, await sign_in_with_password(browser, idp, alice)
        )
        assert relying_party.received == []
        bob = Flow.new(idp, prompt="login")
        bob_claims = await bob.id_token(
            browser, await sign_in_with_password(browser, idp, bob, username="bob")
        )
    assert bob_claims["sub"] == "bob" and bob_claims["sid"] != alice_claims["sid"]
    (received,) = relying_party.received
    claims = verified(idp, received, CLIENT_ID)
    assert (claims["sub"], claims["sid"]) == ("alice", alice_claims["sid"])


@pytest.mark.parametrize("failure", ["fail", "hang", "refused"])
async def test_a_relying_party_that_fails_never_holds_up_the_others(
    relying_party: RelyingParty, failure: str
) -> None:
    idp = IdentityProvider(issuer="http://127.0.0.1:9", clients=[], clock=Clock(START))
    timeout_s = 0.3
    sender = BackchannelLogoutSender(
        issuer=idp.issuer, key=idp.key, clock=idp.clock, timeout_s=timeout_s
    )
    broken = (
        f"http://127.0.0.1:{free_port()}/nobody-listens"
        if failure == "refused"
        else f"{relying_party.url}/{failure}"
    )
    clients = [demo_client("broken", broken), demo_client("fine", f"{relying_party.url}/ok")]
    session = ProviderSession(sid="op-sid", username="alice", sub="alice", created_at=START)
    started = time.monotonic()
    with capture_logs() as logs:
        deliveries = await sender.send(session, clients)
    assert time.monotonic() - started < timeout_s + 1.0
    assert [(d.client_id, d.ok) for d in deliveries] == [("broken", False), ("fine", True)]
    assert deliveries[0].status == (500 if failure == "fail" else None)
    (failed,) = events(logs, "idp_backchannel_logout_failed")
    assert failed["client_id"] == "broken"
    assert "logout_token" not in str(failed)
    assert any(r.path == "/ok" for r in relying_party.received)


async def test_a_failing_relying_party_does_not_stop_the_sign_out(
    aiohttp_server: Any,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/backchannel-logout"
    idp = await provider(aiohttp_server, Clock(START), demo_client(CLIENT_ID, nobody))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        browser = Browser(http)
        flow = Flow.new(idp)
        await flow.id_token(http, await sign_in_with_password(http, idp, flow))
        with capture_logs() as logs:
            hop = await sign_out_at_the_provider(browser, idp.issuer, CLIENT_ID)
    assert hop.status == 200 and "signed out" in hop.body
    assert idp.sessions == {}
    assert events(logs, "idp_backchannel_logout_failed")[0]["client_id"] == CLIENT_ID


# --- the demo stack in process: provider, gateway (memory store), Demo Bank -------------


@dataclass
class Demo:
    stack: DemoStack
    gateway: Gateway

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    @property
    def idp_url(self) -> str:
        return self.stack.idp_url

    @property
    def cookie_name(self) -> str:
        return self.gateway.session_cookie

    async def answer(self, session_cookie: str) -> Hop:
        return await with_cookie(f"{self.url}/", self.cookie_name, session_cookie)

    async def is_signed_in(self, session_cookie: str) -> bool:
        hop = await self.answer(session_cookie)
        if hop.status == 302:
            assert hop.headers["Location"].startswith(f"{self.idp_url}/authorize?")
            return False
        assert hop.status == 200, hop
        return True


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    clock = Clock(time.time())  # one clock for the provider and the gateway
    async with serving_demo(clock) as (stack, gateway):
        yield Demo(stack, gateway)


@dataclass
class ThreeSessions:
    """alice at the gateway three times: two in one provider session, one in another."""

    first: Browser  # signed in with a password: provider session 1
    first_cookie: str
    second_cookie: str  # single sign-on in provider session 1
    other_cookie: str  # a password again, in another browser: provider session 2


@pytest.fixture
async def alice(demo: Demo) -> AsyncIterator[ThreeSessions]:
    first, second, other = browsers = [new_browser() for _ in range(3)]
    try:
        await sign_in(first, demo.url, demo.idp_url, password_for=ALICE)
        share_provider_session(first, second, demo.idp_url)
        await sign_in(second, demo.url, demo.idp_url, password_for=None)
        await sign_in(other, demo.url, demo.idp_url, password_for=ALICE)
        cookies = [browser.cookie(demo.cookie_name) or "" for browser in browsers]
        assert all(cookies) and len(set(cookies)) == 3
        assert len({session.sid for session in demo.stack.idp.sessions.values()}) == 2
        yield ThreeSessions(first, *cookies)
    finally:
        for browser in browsers:
            await browser.http.close()


async def test_signing_out_at_the_provider_ends_only_that_provider_sessions_gateway_sessions(
    demo: Demo, alice: ThreeSessions
) -> None:
    with capture_logs() as logs:
        hop = await sign_out_at_the_provider(alice.first, demo.idp_url, "stepup-gateway")
    assert hop.status == 200 and "signed out" in hop.body
    (sent,) = events(logs, "idp_backchannel_logout_sent")
    assert (sent["client_id"], sent["status"]) == ("stepup-gateway", 200)
    (logout,) = events(logs, "backchannel_logout")
    assert logout["sub"] == "alice" and logout["sid_given"] is True
    assert logout["sessions_deleted"] == 2
    assert not await demo.is_signed_in(alice.first_cookie)
    assert not await demo.is_signed_in(alice.second_cookie)
    assert await demo.is_signed_in(alice.other_cookie)


async def test_signing_out_at_the_gateway_ends_the_other_tab_through_the_provider(
    demo: Demo, alice: ThreeSessions
) -> None:
    with capture_logs() as logs:
        hop = await alice.first.request(
            "POST", f"{demo.url}/_gateway/logout", headers={"Origin": demo.url}
        )
        assert hop.status == 303 and hop.headers["Location"].startswith(
            f"{demo.idp_url}/end-session?"
        )
        hop = await alice.first.get(hop.headers["Location"])  # the hint names the session
    assert hop.status == 302 and hop.headers["Location"] == f"{demo.url}/_gateway/logged-out"
    (logout,) = events(logs, "backchannel_logout")
    assert logout["sessions_deleted"] == 1  # the first is gone already: the gateway's own logout
    assert not await demo.is_signed_in(alice.first_cookie)
    assert not await demo.is_signed_in(alice.second_cookie)
    assert await demo.is_signed_in(alice.other_cookie)


# --- a `stepup-gateway run` process with two workers and sessions in Redis -------------


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[Redis, str]]:
    client = Redis.from_url(SHARED_URL, decode_responses=True)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(
            f"Redis does not answer on 127.0.0.1:6379 ({exc}). This test needs it; "
            "scripts/test starts one."
        )
    prefix = f"test-bcl-{secrets.token_hex(6)}:"
    try:
        yield client, prefix
    finally:
        keys = await keys_of(client, prefix)
        if keys:
            await client.delete(*keys)
        await client.aclose()


def two_worker_config(stack: DemoStack, redis_prefix: str) -> str:
    """demo.yaml filled in, with two workers sharing sessions in Redis."""
    text = stack.config_text
    for name, value in stack.environ.items():
        text = text.replace("${" + name + "}", value)
    assert "\nserver:\n" in text and "\n  store: memory\n" in text
    text = text.replace("\nserver:\n", "\nserver:\n  workers: 2\n  shutdown_timeout: 5s\n")
    prefix = json.dumps(redis_prefix)  # quoted: a prefix may end in ":"
    redis = f"  store: redis\n  redis_url: {SHARED_URL}\n  redis_prefix: {prefix}\n"
    return text.replace("\n  store: memory\n", "\n" + redis)


async def which_worker(process: GatewayProcess, before: int, event: str) -> int:
    """The pid in the ``before``-th ``event`` line: the one the last request caused."""
    found = await process.wait_for(event, count=before + 1)
    pid: int = found[before]["pid"]
    return pid


async def answers_by_worker(
    process: GatewayProcess, url: str, cookie: tuple[str, str]
) -> dict[int, Hop]:
    """Ask with ``cookie`` on new connections until both workers have answered."""
    answers: dict[int, Hop] = {}
    for _ in range(MAX_TRIES):
        before = len(process.events("request"))
        hop = await with_cookie(url, *cookie, force_close=True)
        answers[await which_worker(process, before, "request")] = hop
        if len(answers) == 2:
            return answers
    raise AssertionError(f"one worker answered {MAX_TRIES} new connections")


async def test_backchannel_logout_ends_sessions_held_by_both_workers(
    tmp_path: Path, redis_prefix: tuple[Redis, str]
) -> None:
    redis, prefix = redis_prefix
    stack = await start_demo_stack()  # the provider (and Demo Bank), in this process
    config = tmp_path / "gateway.yaml"
    config.write_text(two_worker_config(stack, prefix))
    process = GatewayProcess(config)
    browsers: list[Browser] = []
    try:
        workers = {e["pid"] for e in await process.wait_for("listening", count=2)}
        assert len(workers) == 2
        gateway, idp = stack.gateway_url, stack.idp_url
        cookie_name = stack.config.session.cookie_name

        # alice signs in again and again in one provider session (single sign-on after
        # the first), every hop on a new connection, until both workers made sessions.
        first = new_browser(force_close=True)
        browsers.append(first)
        made_by: dict[str, int] = {}  # gateway session cookie -> the worker that made it
        for attempt in range(MAX_TRIES):
            browser = first if attempt == 0 else new_browser(force_close=True)
            if attempt:
                browsers.append(browser)
                share_provider_session(first, browser, idp)
            before = len(process.events("step_up_success"))
            await sign_in(browser, gateway, idp, password_for=ALICE if attempt == 0 else None)
            cookie = browser.cookie(cookie_name)
            assert cookie
            made_by[cookie] = await which_worker(process, before, "step_up_success")
            if set(made_by.values()) == workers and len(made_by) >= 3:
                break
        else:
            raise AssertionError(f"one worker served {MAX_TRIES} sign-ins: {made_by}")

        # alice in another browser: another provider session, which must live on.
        other = new_browser(force_close=True)
        browsers.append(other)
        await sign_in(other, gateway, idp, password_for=ALICE)
        survivor = other.cookie(cookie_name)
        assert survivor

        session_keys = {k for k in await keys_of(redis, prefix) if k.startswith(f"{prefix}s:")}
        assert len(session_keys) == len(made_by) + 1
        for cookie in [*made_by, survivor]:
            answers = await answers_by_worker(process, f"{gateway}/", (cookie_name, cookie))
            assert {pid: hop.status for pid, hop in answers.items()} == dict.fromkeys(workers, 200)

        with capture_logs() as logs:
            hop = await sign_out_at_the_provider(first, idp, "stepup-gateway")
        assert hop.status == 200 and "signed out" in hop.body
        (sent,) = events(logs, "idp_backchannel_logout_sent")
        assert sent["status"] == 200
        (logout,) = await process.wait_for("backchannel_logout")
        assert logout["pid"] in workers and logout["sessions_deleted"] == len(made_by)
        # The other worker forgets a remembered Allow within server.decision_memo.
        await asyncio.sleep(DEFAULT_DECISION_MEMO_S + 0.1)

        for cookie in made_by:
            answers = await answers_by_worker(process, f"{gateway}/", (cookie_name, cookie))
            assert set(answers) == workers
            for hop in answers.values():
                assert hop.status == 302
                assert hop.headers["Location"].startswith(f"{idp}/authorize?")
        answers = await answers_by_worker(process, f"{gateway}/", (cookie_name, survivor))
        assert {pid: hop.status for pid, hop in answers.items()} == dict.fromkeys(workers, 200)
        session_keys = {k for k in await keys_of(redis, prefix) if k.startswith(f"{prefix}s:")}
        assert len(session_keys) == 1
    finally:
        for browser in browsers:
            await browser.http.close()
        process.stop()
        await stack.close()
