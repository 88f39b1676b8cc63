"""Signing out ends a session in every store mode, also for a saved copy of its cookie
(CWE-613), and a one-time proof is the proof of one step-up, however fast they come."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.config.defaults import DEFAULT_DECISION_MEMO_S
from tests.conftest import Browser, StackFactory
from tests.support.op import OpUser
from tests.test_gateway import COOKIE, PHR_USER, sign_in
from tests.test_operations import logout_token, post_logout_token
from tests.test_redis_gateway import prefix, redis_session
from tests.test_transactional import RULES, finish_round_trip, posts

__all__ = ["prefix"]  # the fixture, imported for pytest

MODES = ["cookie", "memory", "redis", "cookie+redis"]


async def stack_for(make_stack: StackFactory, mode: str, prefix: str, **kwargs: Any) -> Any:
    if "redis" not in mode:
        return await make_stack(store=mode, **kwargs)
    return await make_stack(
        store=mode.split("+")[0],
        session_extra=redis_session(prefix),
        **kwargs,
    )


async def with_cookie(url: str, value: str) -> int:
    """A request as somebody holding a saved copy of the session cookie."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            url, headers={"Cookie": f"{COOKIE}={value}", "Accept": "application/json"}
        ) as resp,
    ):
        return resp.status


@pytest.mark.parametrize("mode", MODES)
async def test_a_saved_cookie_is_dead_after_logout(make_stack, browser, prefix, mode):
    stack = await stack_for(make_stack, mode, prefix)
    await sign_in(stack, browser)
    saved = browser.cookie(COOKIE)
    assert saved and await with_cookie(f"{stack.url}/app/x", saved) == 200
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers={"Origin": stack.url}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    assert await with_cookie(f"{stack.url}/app/x", saved) == 401
    # Signing in again makes a new session, which works.
    stack.clock.advance(1)
    await sign_in(stack, browser)
    assert await with_cookie(f"{stack.url}/app/x", browser.cookie(COOKIE) or "") == 200
    assert await with_cookie(f"{stack.url}/app/x", saved) == 401


@pytest.mark.parametrize("mode", MODES)
async def test_backchannel_logout_ends_every_copy(make_stack, browser, api, prefix, mode):
    stack = await stack_for(make_stack, mode, prefix)
    await sign_in(stack, browser)
    saved = browser.cookie(COOKIE) or ""
    other = Browser(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    try:
        stack.op.behaviour.user = OpUser(sub="user-2")
        await sign_in(stack, other)
        someone_else = other.cookie(COOKIE) or ""
    finally:
        await other.http.close()
    stack.clock.advance(1)
    assert await post_logout_token(api, stack.url, logout_token(stack.op)) == 200
    assert await with_cookie(f"{stack.url}/app/x", saved) == 401
    assert await with_cookie(f"{stack.url}/app/x", someone_else) == 200  # user-2 stays
    # A sign-in after the logout token is a new session, and works.
    stack.op.behaviour.user = OpUser()
    stack.clock.advance(1)
    fresh = Browser(aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    try:
        await sign_in(stack, fresh)
        assert await with_cookie(f"{stack.url}/app/x", fresh.cookie(COOKIE) or "") == 200
    finally:
        await fresh.http.close()


@pytest.mark.parametrize("mode", ["cookie", "cookie+redis"])
async def test_back_channel_logout_by_provider_session(make_stack, browser, api, prefix, mode):
    stack = await stack_for(make_stack, mode, prefix)
    stack.op.behaviour.extra_claims = {"sid": "provider-session-1"}
    await sign_in(stack, browser)
    saved = browser.cookie(COOKIE) or ""
    stack.clock.advance(1)
    token = logout_token(stack.op, sub=None, sid="another-provider-session")
    assert await post_logout_token(api, stack.url, token) == 200
    assert await with_cookie(f"{stack.url}/app/x", saved) == 200  # not this session
    token = logout_token(stack.op, sub=None, sid="provider-session-1")
    assert await post_logout_token(api, stack.url, token) == 200
    assert await with_cookie(f"{stack.url}/app/x", saved) == 401


async def test_a_logout_on_one_worker_holds_on_the_others(make_stack, browser, prefix):
    """Cookie sessions with session.redis_url: two gateways (two workers, or two
    replicas) share the revocations through Redis."""
    first = await stack_for(make_stack, "cookie+redis", prefix)
    second = await stack_for(make_stack, "cookie+redis", prefix)
    await sign_in(first, browser)
    saved = browser.cookie(COOKIE) or ""
    assert await with_cookie(f"{second.url}/app/x", saved) == 200
    async with browser.http.post(
        f"{first.url}/_gateway/logout", headers={"Origin": first.url}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    # The other worker's remembered Allow lasts server.decision_memo (1 s) at most.
    assert await with_cookie(f"{second.url}/app/x", saved) == 200
    second.clock.advance(DEFAULT_DECISION_MEMO_S)
    assert await with_cookie(f"{second.url}/app/x", saved) == 401


# -- one-time proofs -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cookie", "memory", "cookie+redis"])
async def test_two_step_ups_in_the_same_second_are_two_proofs(make_stack, browser, prefix, mode):
    stack = await stack_for(make_stack, mode, prefix, rules=RULES)
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    for _ in range(2):  # the test clock stands still: both proofs have one auth_time
        hop = await browser.get(f"{stack.url}/_gateway/step-up?level=phishing-resistant&rd=/")
        await finish_round_trip(browser, hop)
        async with browser.http.post(f"{stack.url}/api/delete-tenant") as resp:
            assert resp.status == 200
        async with browser.http.post(f"{stack.url}/api/delete-tenant") as resp:
            assert resp.status == 401  # each proof still counts once
    assert len(posts(stack, "/api/delete-tenant")) == 2


async def test_a_used_proof_stays_used_across_workers(make_stack, browser, prefix):
    first = await stack_for(make_stack, "cookie+redis", prefix, rules=RULES)
    second = await stack_for(make_stack, "cookie+redis", prefix, rules=RULES)
    await sign_in(first, browser)
    first.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{first.url}/_gateway/step-up?level=phishing-resistant&rd=/")
    await finish_round_trip(browser, hop)
    saved = browser.cookie(COOKIE) or ""
    cookie = {"Cookie": f"{COOKIE}={saved}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{first.url}/api/delete-tenant", headers=cookie) as resp:
            assert resp.status == 200
        async with http.post(f"{second.url}/api/delete-tenant", headers=cookie) as resp:
            assert resp.status == 401
    assert len(posts(first, "/api/delete-tenant")) == 1
