"""Transactional step-up end to end: kept form posts, one-time and bound proofs,
upstream-initiated step-up, popups, risk conditions and risk engines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from structlog.testing import capture_logs

from tests.conftest import Browser, Stack, query_of
from tests.support.upstream import header_values
from tests.test_gateway import PHR_USER, sign_in

RECORDS = web.AppKey("records", list)

# What a browser sends with a form from a page of the same site (Fetch Metadata).
FORM = {
    "Content-Type": "application/x-www-form-urlencoded",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Site": "same-origin",
}

RULES = """\
rules:
  - name: transfer
    match: {path: /transfers, methods: [POST]}
    require: {level: phishing-resistant, max_age: 5m}
  - name: payout
    match: {path: /payouts, methods: [POST]}
    require: {level: phishing-resistant, max_age: 5m, once: true, bind: [amount, payee]}
  - name: one-shot
    match: {path: /api/delete-tenant, methods: [POST]}
    require: {level: phishing-resistant, max_age: 5m, once: true}
  - name: big-payment
    match: {path: /payments, methods: [POST]}
    when: "amount > 1000"
    require: {level: phishing-resistant, max_age: 5m}
  - name: payment
    match: {path: /payments, methods: [POST]}
    require: {level: password}
  - name: legacy
    match: {path: /legacy/**}
    require: {level: password}
    upstream_challenge: true
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


@pytest.fixture(params=["cookie", "memory", "redis", "cookie+redis"])
async def tstack(request: Any, make_stack: Any) -> Any:
    """Every test runs with each store: kept requests and one-time claims live in the
    process (cookie, memory) or in Redis (shared by workers and replicas), also when
    the sessions themselves are cookies (cookie+redis)."""
    if "redis" not in request.param:
        yield await make_stack(rules=RULES, store=request.param)
        return
    import secrets

    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:6379/13")
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis must run on 127.0.0.1:6379 for these tests ({exc})")
    prefix = f"test-{secrets.token_hex(4)}:"
    yield await make_stack(
        rules=RULES,
        store=request.param.split("+")[0],
        session_extra=f"redis_url: redis://127.0.0.1:6379/13\nredis_prefix: '{prefix}'\n",
    )
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def post_form(browser: Browser, url: str, data: str) -> Any:
    return await browser.request("POST", url, data=data, headers=FORM)


async def finish_round_trip(browser: Browser, hop: Any) -> Any:
    """Follow provider -> callback -> resume; return the final hop."""
    assert hop.status == 302, hop.body
    at_op = await browser.get(hop.headers["Location"])
    back = await browser.get(at_op.headers["Location"])
    return back


def posts(stack: Stack, path: str) -> list[dict[str, Any]]:
    return [r for r in stack.seen if r["method"] == "POST" and r["path_qs"].startswith(path)]


async def test_form_post_survives_the_step_up_and_is_replayed_once(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await post_form(browser, f"{tstack.url}/transfers", "amount=250.00&payee=ACME+Ltd")
    assert posts(tstack, "/transfers") == []  # nothing reached the upstream yet
    back = await finish_round_trip(browser, hop)
    assert back.status == 303 and back.headers["Location"].startswith("/_gateway/resume?r=")
    resumed = await browser.get(f"{tstack.url}{back.headers['Location']}")
    assert resumed.status == 200
    sent = posts(tstack, "/transfers")
    assert len(sent) == 1
    assert sent[0]["body_size"] == len(b"amount=250.00&payee=ACME+Ltd")
    assert header_values(sent[0], "X-Auth-Acr") == ["phr"]
    assert header_values(sent[0], "Content-Type") == ["application/x-www-form-urlencoded"]
    # Reload and back: the kept request is gone; nothing is sent twice.
    again = await browser.get(f"{tstack.url}{back.headers['Location']}")
    assert again.status == 410
    assert len(posts(tstack, "/transfers")) == 1


async def test_nothing_is_replayed_when_the_step_up_is_too_weak(tstack, browser):
    await sign_in(tstack, browser)  # the provider keeps answering with a password login
    hop = await post_form(browser, f"{tstack.url}/transfers", "amount=250&payee=ACME")
    back = await finish_round_trip(browser, hop)
    assert back.status == 403
    assert posts(tstack, "/transfers") == []


async def test_a_kept_request_cannot_be_resumed_by_another_session(tstack, browser, api):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await post_form(browser, f"{tstack.url}/transfers", "amount=1&payee=x")
    back = await finish_round_trip(browser, hop)
    async with api.get(f"{tstack.url}{back.headers['Location']}") as resp:
        assert resp.status == 403  # no session, or another one: refused ...
    resumed = await browser.get(f"{tstack.url}{back.headers['Location']}")
    assert resumed.status == 410  # ... and the attempt used it up: single use
    assert posts(tstack, "/transfers") == []


async def test_a_body_over_the_limit_gets_413(make_stack, browser):
    stack = await make_stack(rules=RULES, extra="step_up:\n  max_body: 1KiB\n")
    await sign_in(stack, browser)
    hop = await post_form(browser, f"{stack.url}/transfers", "payee=x&amount=" + "9" * 2000)
    assert hop.status == 413 and "sign in" in hop.body.lower()


async def test_one_time_proof_authorises_exactly_one_request(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{tstack.url}/_gateway/step-up?level=phishing-resistant&rd=/")
    await finish_round_trip(browser, hop)
    async with browser.http.post(f"{tstack.url}/api/delete-tenant") as resp:
        assert resp.status == 200
    async with browser.http.post(f"{tstack.url}/api/delete-tenant") as resp:
        assert resp.status == 401  # used up: the next one needs its own step-up
        assert "insufficient_user_authentication" in resp.headers["WWW-Authenticate"]
        assert resp.headers["WWW-Authenticate"].endswith("max_age=0")  # a new sign-in
    assert len(posts(tstack, "/api/delete-tenant")) == 1


async def test_fifty_concurrent_requests_with_one_proof_forward_exactly_one(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{tstack.url}/_gateway/step-up?level=phishing-resistant&rd=/")
    await finish_round_trip(browser, hop)

    async def one() -> int:
        async with browser.http.post(f"{tstack.url}/api/delete-tenant") as resp:
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert sorted(statuses).count(200) == 1 and statuses.count(401) == 49
    assert len(posts(tstack, "/api/delete-tenant")) == 1


async def test_once_rules_ask_for_a_new_authentication(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=250.00&payee=ACME")
    q = query_of(hop.headers["Location"])
    assert q["max_age"] == "0" and q["prompt"] == "login"


async def test_bound_proof_carries_the_details_and_cannot_pay_someone_else(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=250.00&payee=ACME+Ltd")
    q = query_of(hop.headers["Location"])
    details = json.loads(q["authorization_details"])
    assert details == [{"type": "payment_initiation", "amount": "250.00", "payee": "ACME Ltd"}]
    assert "250.00" in q["binding_message"] and "ACME Ltd" in q["binding_message"]
    back = await finish_round_trip(browser, hop)
    resumed = await browser.get(f"{tstack.url}{back.headers['Location']}")
    assert resumed.status == 200
    assert len(posts(tstack, "/payouts")) == 1
    # The same proof, replayed for 9,000 to someone else: asked again, nothing sent.
    tstack.clock.advance(1)
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=9000&payee=Mallory")
    assert hop.status == 302
    assert (
        json.loads(query_of(hop.headers["Location"])["authorization_details"])[0]["payee"]
        == "Mallory"
    )
    async with browser.http.post(
        f"{tstack.url}/payouts", data={"amount": "9000", "payee": "Mallory"}
    ) as resp:
        assert resp.status == 401
    assert len(posts(tstack, "/payouts")) == 1


async def test_provider_approving_other_details_is_refused(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    tstack.op.behaviour.extra_claims = {
        "authorization_details": [
            {"type": "payment_initiation", "amount": "9000", "payee": "Mallory"}
        ]
    }
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=250.00&payee=ACME")
    back = await finish_round_trip(browser, hop)
    assert back.status == 403 and "approved differs" in back.body
    assert posts(tstack, "/payouts") == []


async def test_provider_echoing_the_same_details_is_accepted(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    tstack.op.behaviour.extra_claims = {
        "authorization_details": [
            {"type": "payment_initiation", "amount": "250.00", "payee": "ACME"}
        ]
    }
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=250.00&payee=ACME")
    back = await finish_round_trip(browser, hop)
    resumed = await browser.get(f"{tstack.url}{back.headers['Location']}")
    assert resumed.status == 200 and len(posts(tstack, "/payouts")) == 1


async def test_bound_field_given_twice_is_refused(tstack, browser):
    await sign_in(tstack, browser)
    hop = await post_form(browser, f"{tstack.url}/payouts", "amount=1&amount=9000&payee=x")
    assert hop.status == 400


async def test_when_conditions_pick_the_riskier_rule(tstack, browser):
    await sign_in(tstack, browser)
    async with browser.http.post(f"{tstack.url}/payments", data={"amount": "20"}) as resp:
        assert resp.status == 200
    async with browser.http.post(f"{tstack.url}/payments", data={"amount": "1500"}) as resp:
        assert resp.status == 401
        assert 'acr_values="phr phrh"' in resp.headers["WWW-Authenticate"]
    async with browser.http.post(f"{tstack.url}/payments", data={"amount": "lots"}) as resp:
        assert resp.status == 401  # not a number: the stricter rule applies (fail closed)


# -- upstream-initiated step-up ------------------------------------------------------


@pytest.fixture
async def picky_upstream(aiohttp_server: Any) -> Any:
    """An app that asks for phr itself (RFC 9470) for large amounts."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append(
            {"method": request.method, "acr": request.headers.get("X-Auth-Acr"), "form": dict(form)}
        )
        amount = float(str(form.get("amount", "0")) or 0)
        if amount > 1000 and request.headers.get("X-Auth-Acr") != "phr":
            # A Basic challenge first: the step-up one need not be the only one.
            return web.Response(
                status=401,
                headers=CIMultiDict(
                    [
                        ("WWW-Authenticate", 'Basic realm="legacy"'),
                        (
                            "WWW-Authenticate",
                            'Bearer error="insufficient_user_authentication", '
                            'error_description="large amount", acr_values="phr", max_age=300',
                        ),
                    ]
                ),
            )
        return web.json_response({"ok": True, "amount": amount})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    app[RECORDS] = seen
    return await aiohttp_server(app)


async def test_upstream_challenge_runs_the_step_up_and_replays(make_stack, picky_upstream, browser):
    stack = await make_stack(rules=RULES, upstream_url=str(picky_upstream.make_url("")).rstrip("/"))
    await sign_in(stack, browser, "/legacy/home")
    stack.op.behaviour.user = PHR_USER
    hop = await post_form(browser, f"{stack.url}/legacy/pay", "amount=5000&payee=ACME")
    assert hop.status == 302  # the upstream's 401 never reached the browser
    q = query_of(hop.headers["Location"])
    assert q["acr_values"] == "phr phrh" and q["max_age"] == "300"  # the level phr belongs to
    back = await finish_round_trip(browser, hop)
    resumed = await browser.get(f"{stack.url}{back.headers['Location']}")
    assert resumed.status == 200 and json.loads(resumed.body)["ok"] is True
    forms = [s for s in picky_upstream.app[RECORDS] if s["method"] == "POST"]
    assert [f["acr"] for f in forms] == ["urn:example:loa:1", "phr"]
    assert forms[1]["form"] == {"amount": "5000", "payee": "ACME"}


async def test_upstream_challenge_passes_through_to_api_clients(
    make_stack, picky_upstream, browser
):
    stack = await make_stack(rules=RULES, upstream_url=str(picky_upstream.make_url("")).rstrip("/"))
    await sign_in(stack, browser, "/legacy/home")
    async with browser.http.post(f"{stack.url}/legacy/pay", data={"amount": "5000"}) as resp:
        assert resp.status == 401  # both challenges, as the upstream sent them
        assert resp.headers.getall("WWW-Authenticate")[0] == 'Basic realm="legacy"'
        assert 'acr_values="phr"' in resp.headers.getall("WWW-Authenticate")[1]


# -- single-page apps ------------------------------------------------------------------


async def test_popup_step_up_posts_a_message_to_its_opener(tstack, browser):
    await sign_in(tstack, browser)
    tstack.op.behaviour.user = PHR_USER
    hop = await browser.get(
        f"{tstack.url}/_gateway/step-up?level=phishing-resistant&max_age=300&mode=popup&rd=/x"
    )
    back = await finish_round_trip(browser, hop)
    assert back.status == 200
    assert "postMessage" in back.body and json.dumps(tstack.url) in back.body
    assert '"ok": true' in back.body


# -- external risk engine --------------------------------------------------------------


@pytest.fixture
async def risk_engine(aiohttp_server: Any) -> Any:
    asked: list[dict[str, Any]] = []

    async def assess(request: web.Request) -> web.Response:
        facts = await request.json()
        asked.append(facts)
        if facts["fields"].get("amount") == "fail":
            return web.Response(status=500)
        amount = float(facts["fields"].get("amount") or 0)
        if amount > 1000:
            return web.json_response({"require": "phishing-resistant", "max_age": 300})
        return web.json_response({"require": "allow"})

    app = web.Application()
    app.router.add_post("/assess", assess)
    app[RECORDS] = asked
    return await aiohttp_server(app)


async def test_risk_engine_raises_the_requirement(make_stack, risk_engine, browser):
    url = str(risk_engine.make_url("/assess"))
    rules = f"""\
rules:
  - name: scored
    match: {{path: /scored, methods: [POST]}}
    require: {{level: password, bind: [amount]}}
    risk: {{url: "{url}", timeout: 1s, on_error: step_up}}
  - name: signed-in
    match: {{path: /**}}
    require: {{level: password}}
"""
    stack = await make_stack(rules=rules)
    await sign_in(stack, browser)
    async with browser.http.post(f"{stack.url}/scored", data={"amount": "50"}) as resp:
        assert resp.status == 401  # bind: the password proof approved no values yet
    asked = risk_engine.app[RECORDS]
    assert asked[-1]["subject"] == "user-1" and asked[-1]["fields"] == {"amount": "50"}
    async with browser.http.post(f"{stack.url}/scored", data={"amount": "5000"}) as resp:
        assert resp.status == 401
        assert 'acr_values="phr phrh"' in resp.headers["WWW-Authenticate"]
    async with browser.http.post(f"{stack.url}/scored", data={"amount": "fail"}) as resp:
        assert resp.status == 401  # engine failure: step up to the strongest level
        assert 'acr_values="phr phrh"' in resp.headers["WWW-Authenticate"]


async def test_risk_engine_outage_never_lets_a_request_through(make_stack, browser):
    from tests.conftest import free_port

    rules = f"""\
rules:
  - name: scored
    match: {{path: /scored, methods: [POST]}}
    require: {{level: password}}
    risk: {{url: "http://127.0.0.1:{free_port()}/assess", timeout: 1s, on_error: deny}}
  - name: signed-in
    match: {{path: /**}}
    require: {{level: password}}
"""
    stack = await make_stack(rules=rules)
    await sign_in(stack, browser)
    async with browser.http.post(f"{stack.url}/scored", data={"amount": "1"}) as resp:
        assert resp.status == 403
    assert posts(stack, "/scored") == []


async def test_step_up_endpoint_takes_the_acr_values_of_a_challenge(tstack, browser):
    from urllib.parse import quote

    hop = await browser.get(
        f"{tstack.url}/_gateway/step-up?mode=popup&acr_values={quote('phr phrh')}"
    )
    assert hop.status == 302
    assert query_of(hop.headers["Location"])["acr_values"] == "phr phrh"
    hop = await browser.get(f"{tstack.url}/_gateway/step-up?acr_values=unknown")
    assert hop.status == 400


async def test_a_body_of_another_type_leaves_the_fields_unknown(tstack, browser):
    """The query must not decide when the body may carry the same names."""
    await sign_in(tstack, browser)
    async with browser.http.post(
        f"{tstack.url}/payments?amount=1",
        data=b"amount=5000",
        headers={"Content-Type": "text/plain"},
    ) as resp:
        assert resp.status == 401  # nothing known: the stricter rule applies
    async with browser.http.post(f"{tstack.url}/payments?amount=1") as resp:
        assert resp.status == 200  # no body: the query is all there is


async def test_api_client_gets_the_upstream_challenge_even_when_its_body_was_read(
    make_stack, picky_upstream, browser
):
    rules = """\
rules:
  - name: legacy-scored
    match: {path: /legacy/**, methods: [POST]}
    when: "amount > 10"
    require: {level: password}
    upstream_challenge: true
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""
    stack = await make_stack(rules=rules, upstream_url=str(picky_upstream.make_url("")).rstrip("/"))
    await sign_in(stack, browser, "/legacy/home")
    async with browser.http.post(f"{stack.url}/legacy/pay", data={"amount": "5000"}) as resp:
        assert resp.status == 401
        bearer = resp.headers.getall("WWW-Authenticate")[-1]
        assert bearer.endswith("max_age=300")
        assert 'error_description="large amount"' in bearer


async def test_a_once_rule_without_max_age_still_needs_auth_time(make_stack, browser):
    # max_age=0 went out, so the ID token must say when the user authenticated: iat
    # (always "now") would make any silent single sign-on look like a new sign-in.
    rules = """\
rules:
  - name: one-shot
    match: {path: /api/delete-tenant, methods: [POST]}
    require: {level: phishing-resistant, once: true}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""
    stack = await make_stack(rules=rules, store="memory")
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    stack.op.behaviour.omit_auth_time = True
    hop = await post_form(browser, f"{stack.url}/api/delete-tenant", "confirm=yes")
    assert query_of(hop.headers["Location"])["max_age"] == "0"
    back = await finish_round_trip(browser, hop)
    assert back.status == 400, back.body
    assert posts(stack, "/api/delete-tenant") == []


async def test_a_once_rule_refuses_a_sign_in_from_before_its_request(make_stack, browser):
    # The provider ignores max_age=0/prompt=login and reports the single sign-on of
    # 30 s ago. The old check allowed oidc.clock_skew (60 s) before the request, so
    # that passed as a new sign-in; now only a sign-in after the request does.
    stack = await make_stack(rules=RULES, store="memory")
    await sign_in(stack, browser)
    stack.clock.advance(30)
    stack.op.behaviour.user = PHR_USER
    stack.op.behaviour.auth_time_delta_s = -30
    hop = await post_form(browser, f"{stack.url}/api/delete-tenant", "confirm=yes")
    assert query_of(hop.headers["Location"])["max_age"] == "0"
    with capture_logs() as logs:
        back = await finish_round_trip(browser, hop)
    assert back.status == 403, back.body
    assert "new sign-in each time" in back.body
    assert any(e["event"] == "not_reauthenticated" for e in logs)
    assert posts(stack, "/api/delete-tenant") == []

    # A provider that does sign the user in again passes (same second included).
    stack.op.behaviour.auth_time_delta_s = 0
    hop = await post_form(browser, f"{stack.url}/api/delete-tenant", "confirm=yes")
    back = await finish_round_trip(browser, hop)
    resumed = await browser.get(f"{stack.url}{back.headers['Location']}")
    assert resumed.status == 200, resumed.body
    assert len(posts(stack, "/api/delete-tenant")) == 1
