"""The gateway end to end: a real test OpenID Provider, a real echo upstream and the
gateway between them, all over HTTP on loopback. One test per contract row."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import jwt
import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import CLIENT_SECRET, SESSION_SECRET, Browser, Stack, query_of, raw_request
from tests.support.op import ID_TOKEN_MISBEHAVIOURS, MISSING_AUTH_TIME, OpUser
from tests.support.upstream import header_values

PHR_USER = OpUser(acr="phr", amr=["hwk"])
MFA_USER = OpUser(acr="urn:example:loa:2", amr=["pwd", "otp"])
COOKIE = "stepup_session"


async def sign_in(stack: Stack, browser: Browser, path: str = "/app/home") -> dict:
    final = await browser.follow(f"{stack.url}{path}")
    assert final.status == 200, final.body
    return json.loads(final.body)


def upstream_saw(record: dict, name: str) -> list[str]:
    return header_values(record, name)


# -- the contract's rows ----------------------------------------------------------


async def test_unmatched_request_is_denied_and_never_forwarded(stack, api):
    async with api.get(f"{stack.url}/nothing/here") as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "no_rule_matches"
    assert stack.seen == []


async def test_a_refusal_page_says_what_happened_and_offers_a_way_back(stack, browser):
    hop = await browser.get(f"{stack.url}/nothing/here")
    assert hop.status == 403
    page = hop.body
    assert "<h1>" in page and 'href="/"' in page and "Back to the application" in page
    assert stack.seen == []


async def test_browser_navigation_without_session_is_sent_to_the_provider(stack, browser):
    hop = await browser.get(f"{stack.url}/app/home?tab=2")
    assert hop.status == 302
    location = hop.headers["Location"]
    assert location.startswith(f"{stack.op.issuer}/authorize?")
    q = query_of(location)
    assert q["response_type"] == "code"
    assert q["client_id"] == "gateway"
    assert q["redirect_uri"] == f"{stack.url}/_gateway/callback"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) >= 32 and len(q["nonce"]) >= 32 and q["state"] != q["nonce"]
    assert q["acr_values"] == "urn:example:loa:1"
    assert "max_age" not in q and "prompt" not in q
    assert "openid" in q["scope"].split()
    tx_cookies = [c for c in hop.headers.get("Set-Cookie", "").split(",") if "_tx_" in c]
    assert tx_cookies and "HttpOnly" in tx_cookies[0] and "SameSite=Lax" in tx_cookies[0]
    assert stack.seen == []


async def test_sign_in_returns_to_the_first_url_and_forwards_assurance(stack, browser):
    record = await sign_in(stack, browser, "/app/home?tab=2")
    assert record["path_qs"] == "/app/home?tab=2"
    hops = [(h.status, h.url.split("?")[0]) for h in browser.hops]
    assert [s for s, _ in hops] == [302, 302, 303, 200]
    assert upstream_saw(record, "X-Auth-Subject") == ["user-1"]
    assert upstream_saw(record, "X-Auth-Email") == ["alice@example.com"]
    assert upstream_saw(record, "X-Auth-Acr") == ["urn:example:loa:1"]
    assert upstream_saw(record, "X-Auth-Amr") == ["pwd"]
    assert upstream_saw(record, "X-Auth-Level") == ["password"]
    assert upstream_saw(record, "X-Auth-Rule") == ["signed-in"]
    auth_time = int(upstream_saw(record, "X-Auth-Time")[0])
    assert abs(auth_time - stack.clock.now) < 5
    # The gateway's own cookies never reach the upstream.
    assert all(COOKIE not in v for v in upstream_saw(record, "Cookie"))


async def test_assertion_verifies_against_the_published_jwks(stack, browser, api):
    record = await sign_in(stack, browser)
    token = upstream_saw(record, "X-Auth-Assertion")[0]
    async with api.get(f"{stack.url}/_gateway/jwks.json") as resp:
        jwks = await resp.json()
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(
        token, key, algorithms=["ES256"], audience="app", options={"verify_iat": False}
    )
    assert claims["sub"] == "user-1" and claims["acr"] == "urn:example:loa:1"
    assert claims["amr"] == ["pwd"] and claims["level"] == "password"
    assert claims["rule"] == "signed-in" and claims["iss"] == stack.url
    assert 0 < claims["exp"] - claims["iat"] <= 60
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key, algorithms=["ES256"], audience="other-app")


@pytest.mark.parametrize(
    ("email_verified", "oidc_extra", "forwarded"),
    [
        (True, "", True),
        (False, "", False),
        (False, "assume_email_verified: true\n", False),  # the provider said no
        (None, "", False),  # not said (Entra ID never says)
        (None, "assume_email_verified: true\n", True),
    ],
    ids=["verified", "unverified", "unverified_assumed", "not_said", "not_said_assumed"],
)
async def test_only_a_verified_email_reaches_the_upstream(
    make_stack, browser, email_verified, oidc_extra, forwarded
):
    stack = await make_stack(oidc_extra=oidc_extra)
    stack.op.behaviour.user = OpUser(email="ceo@bank.example", email_verified=email_verified)
    with capture_logs() as logs:
        record = await sign_in(stack, browser)
    token = upstream_saw(record, "X-Auth-Assertion")[0]
    claims = jwt.decode(token, options={"verify_signature": False})
    if forwarded:
        assert upstream_saw(record, "X-Auth-Email") == ["ceo@bank.example"]
        assert claims["email"] == "ceo@bank.example"
    else:
        assert upstream_saw(record, "X-Auth-Email") == []
        assert "email" not in claims
        assert any(e["event"] == "email_not_forwarded" for e in logs)
    assert upstream_saw(record, "X-Auth-Subject") == ["user-1"]


async def test_unusual_claims_reach_the_upstream_percent_encoded(stack, browser):
    # Non-ASCII, spaces, "%" and commas pass the callback; in headers they are UTF-8
    # percent-encoded (so "a,b" stays one amr value); the assertion keeps them raw.
    stack.op.behaviour.user = OpUser(
        sub="Jürgen, 100%", email="zoë@exämple.com", amr=["pwd", "a,b"]
    )
    record = await sign_in(stack, browser)
    assert upstream_saw(record, "X-Auth-Subject") == ["J%C3%BCrgen%2C%20100%25"]
    assert upstream_saw(record, "X-Auth-Email") == ["zo%C3%AB@ex%C3%A4mple.com"]
    assert upstream_saw(record, "X-Auth-Amr") == ["pwd,a%2Cb"]
    assert upstream_saw(record, "X-Auth-Acr") == ["urn:example:loa:1"]
    claims = jwt.decode(
        upstream_saw(record, "X-Auth-Assertion")[0], options={"verify_signature": False}
    )
    assert (claims["sub"], claims["email"], claims["amr"]) == (
        "Jürgen, 100%",
        "zoë@exämple.com",
        ["pwd", "a,b"],
    )


async def test_a_sub_with_crlf_is_refused_at_the_callback_with_a_clear_page(stack, browser):
    stack.op.behaviour.user = OpUser(sub="user-1\r\nX-Auth-Level: admin")
    with capture_logs() as logs:
        final = await browser.follow(f"{stack.url}/app/home")
    assert final.status == 400
    assert "control characters" in final.body and "Sign-in did not complete" in final.body
    assert browser.cookie(COOKIE) is None and stack.seen == []
    refused = next(e for e in logs if e["event"] == "id_token_claim_refused")
    assert refused["claim"] == "sub"
    assert "X-Auth-Level: admin" not in repr(logs)  # the value itself is never logged


async def test_a_stored_session_with_a_control_character_is_forwarded_not_a_500(stack, api):
    # Sessions sealed before the callback refused such claims: every request used to
    # fail with 500 (the header could not be written). Now one encoded header each.
    from gateway.session.model import Proof, Session

    now = stack.clock.now
    session = Session.start(
        Proof(acr="urn:example:loa:1", amr=("pwd", "x\r\ny"), auth_time=now),
        sub="user-1\r\nX-Auth-Level: admin",
        email="a@example.com\nX-Evil: 1",
        name=None,
        provider_sid=None,
        id_token=None,
        now=now,
    )
    cookie = await stack.gateway.store.save(session, now)
    async with api.get(
        f"{stack.url}/app/x", headers={"Cookie": f"{COOKIE}={cookie}", "Accept": "text/html"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        record = await resp.json()
    assert upstream_saw(record, "X-Auth-Subject") == ["user-1%0D%0AX-Auth-Level:%20admin"]
    assert upstream_saw(record, "X-Auth-Email") == ["a@example.com%0AX-Evil:%201"]
    assert upstream_saw(record, "X-Auth-Amr") == ["pwd,x%0D%0Ay"]
    assert upstream_saw(record, "X-Auth-Level") == ["password"]
    assert upstream_saw(record, "X-Evil") == []


@pytest.mark.parametrize(
    ("char", "limit_bytes"),
    [("x", 3 * 1024), ("é", 7.5 * 1024), ("😀", 7.5 * 1024)],
    ids=["ascii", "two_byte_utf8", "four_byte_utf8"],
)
async def test_assurance_headers_stay_bounded_at_the_claim_limits(stack, char, limit_bytes):
    # Every header-bound claim at the longest the callback accepts (flow.MAX_CLAIM_BYTES,
    # MAX_AMR_VALUES x MAX_AMR_VALUE_BYTES): the X-Auth-* headers, assertion included,
    # stay under the 8 KiB that Jetty, Tomcat and gunicorn accept for a request.
    from gateway.oidc.flow import MAX_AMR_VALUE_BYTES, MAX_AMR_VALUES, MAX_CLAIM_BYTES
    from gateway.session.model import Proof, Session

    def longest(max_bytes: int) -> str:
        return char * (max_bytes // len(char.encode()))

    now = stack.clock.now
    session = Session.start(
        Proof(
            acr=longest(MAX_CLAIM_BYTES["acr"]),
            amr=tuple(longest(MAX_AMR_VALUE_BYTES) for _ in range(MAX_AMR_VALUES)),
            auth_time=now,
        ),
        sub=longest(MAX_CLAIM_BYTES["sub"]),
        email=longest(MAX_CLAIM_BYTES["email"]),
        name=None,
        provider_sid=None,
        id_token=None,
        now=now,
    )
    config = stack.gateway.config
    rule = max(stack.gateway.rules.rules, key=lambda r: len(r.name))
    _, pairs = stack.gateway.forwarder.assurance_headers_until(
        session, config.assurance.levels[-1], rule
    )
    size = sum(len(name) + len(value) + 4 for name, value in pairs)  # ": " and CRLF
    assert size <= limit_bytes
    assert all(value.isascii() and value.isprintable() for _, value in pairs)


async def test_api_call_without_session_gets_plain_bearer_challenge(stack, api):
    async with api.post(f"{stack.url}/api/transfers/1", json={"amount": 5}) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert stack.seen == []


async def test_under_assured_api_call_gets_rfc9470_challenge(stack, browser):
    await sign_in(stack, browser)
    async with browser.http.post(f"{stack.url}/api/transfers/1", json={"amount": 5}) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        body = await resp.json()
    assert challenge.startswith('Bearer error="insufficient_user_authentication"')
    assert 'acr_values="phr phrh"' in challenge
    assert "max_age=300" in challenge
    assert "error_description=" in challenge
    assert body["error"] == "insufficient_user_authentication"
    assert len(stack.seen) == 1  # only the sign-in's own request reached the upstream


async def test_step_up_upgrades_the_session_mid_session(stack, browser):
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{stack.url}/transfers/new")
    assert hop.status == 302
    q = query_of(hop.headers["Location"])
    assert q["acr_values"] == "phr phrh" and q["max_age"] == "300"
    final = await browser.follow(f"{stack.url}/transfers/new")
    record = json.loads(final.body)
    assert record["path_qs"] == "/transfers/new"
    assert upstream_saw(record, "X-Auth-Acr") == ["phr"]
    assert upstream_saw(record, "X-Auth-Amr") == ["hwk"]
    assert upstream_saw(record, "X-Auth-Level") == ["phishing-resistant"]
    # The earlier, weaker routes still work without another round trip.
    async with browser.http.get(f"{stack.url}/app/x", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 200


async def test_provider_answering_phr_with_password_does_not_yield_phr(stack, browser):
    await sign_in(stack, browser)
    authorizations_before = len(stack.op.authorization_requests)
    final = await browser.follow(f"{stack.url}/transfers/new")  # the OP still says loa:1/pwd
    assert final.status == 403
    assert "phishing-resistant" in final.body and "password" in final.body
    assert len(stack.op.authorization_requests) == authorizations_before + 1  # no loop
    # Still signed in at the level it had.
    async with browser.http.get(f"{stack.url}/app/x", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 200
        record = await resp.json()
    assert upstream_saw(record, "X-Auth-Level") == ["password"]


async def test_stale_step_up_is_asked_for_again(stack, browser):
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    await browser.follow(f"{stack.url}/transfers/new")
    # max_age 300 s, measured from auth_time (whole seconds: at most 1 s earlier than
    # the clock) with no clock-skew leeway on top.
    stack.clock.advance(299)
    hop = await browser.get(f"{stack.url}/transfers/new")
    assert hop.status == 200
    stack.clock.advance(2)
    hop = await browser.get(f"{stack.url}/transfers/new")
    assert hop.status == 302 and query_of(hop.headers["Location"])["max_age"] == "300"


FIVE_SECONDS = """\
rules:
  - name: quick
    match: {path: /quick/**}
    require: {level: password, max_age: 5s}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


@pytest.mark.parametrize("provider_clock_ahead_s", [0, 50], ids=["same_clock", "op_ahead_50s"])
async def test_max_age_has_no_skew_leeway_on_top(make_stack, browser, provider_clock_ahead_s):
    # max_age: 5s once accepted a sign-in 65 s old (the 60 s skew added on top), and a
    # provider clock 50 s ahead added 50 s more. Skew is allowed when the token arrives
    # (auth_time in the future within oidc.clock_skew passes); the proof is then dated
    # no later than its arrival, and 5 s means 5 s.
    stack = await make_stack(rules=FIVE_SECONDS)
    stack.op.behaviour.clock_offset_s = provider_clock_ahead_s
    record = await sign_in(stack, browser, "/quick/a")
    assert record["path_qs"] == "/quick/a"
    assert int(upstream_saw(record, "X-Auth-Time")[0]) <= stack.clock.now
    stack.clock.advance(4)
    assert (await browser.get(f"{stack.url}/quick/b")).status == 200
    stack.clock.advance(2)
    hop = await browser.get(f"{stack.url}/quick/c")
    assert hop.status == 302 and query_of(hop.headers["Location"])["max_age"] == "5"
    assert (await browser.get(f"{stack.url}/app/x")).status == 200  # still signed in


async def test_a_provider_ignoring_max_age_is_caught_at_the_callback(make_stack, browser):
    # The provider answers max_age=5 with a sign-in 30 s old (single sign-on that did
    # not re-authenticate). Within max_age + skew that used to pass.
    stack = await make_stack(rules=FIVE_SECONDS)
    await sign_in(stack, browser, "/app/x")
    stack.clock.advance(30)
    stack.op.behaviour.auth_time_delta_s = -30
    with capture_logs() as logs:
        final = await browser.follow(f"{stack.url}/quick/a")
    assert final.status == 403, final.body
    assert "proven within 5 s" in final.body
    failure = next(e for e in logs if e["event"] == "step_up_failure")
    assert failure["reason"] == "too_old" and failure["age_s"] >= 30
    assert [r["path_qs"] for r in stack.seen] == ["/app/x"]


async def test_amr_alone_can_prove_a_level(stack, browser):
    stack.op.behaviour.user = OpUser(acr="urn:example:loa:1", amr=["pwd", "otp"])
    record = await sign_in(stack, browser, "/payees/list")
    assert upstream_saw(record, "X-Auth-Level") == ["mfa"]


async def test_once_forces_prompt_login(make_stack, browser):
    stack = await make_stack(
        rules=(
            "rules:\n  - name: fresh\n    match: {path: /**}\n"
            "    require: {level: password, once: true}\n"
        )
    )
    hop = await browser.get(f"{stack.url}/x")
    q = query_of(hop.headers["Location"])
    assert q["prompt"] == "login" and q["max_age"] == "0"


async def test_essential_acr_claims_parameter(make_stack, browser):
    stack = await make_stack(oidc_extra="essential_acr: true\n")
    await sign_in(stack, browser)
    hop = await browser.get(f"{stack.url}/transfers/new")
    claims = json.loads(query_of(hop.headers["Location"])["claims"])
    assert claims == {"id_token": {"acr": {"essential": True, "values": ["phr", "phrh"]}}}


async def test_client_secret_post(make_stack, browser):
    stack = await make_stack(oidc_extra="client_auth: client_secret_post\n")
    stack.op.clients["gateway"].auth_method = "client_secret_post"
    await sign_in(stack, browser)
    request = stack.op.token_requests[-1]
    assert request["client_id"] == "gateway" and "client_secret" not in request


# -- the callback and the ID token ------------------------------------------------


@pytest.mark.parametrize("name", sorted(ID_TOKEN_MISBEHAVIOURS))
async def test_every_id_token_check_refuses_a_token_failing_it(stack, browser, name):
    knobs, reason = ID_TOKEN_MISBEHAVIOURS[name]
    for knob, value in knobs.items():
        setattr(stack.op.behaviour, knob, value)
    with capture_logs() as logs:
        final = await browser.follow(f"{stack.url}/app/home")
    assert final.status == 400, final.body
    assert "could not be verified" in final.body
    assert browser.cookie(COOKIE) is None
    assert stack.seen == []
    failures = [e for e in logs if e["event"] == "step_up_failure"]
    assert failures and failures[0]["reason"] == f"id_token_{reason}"


async def test_a_key_rotation_right_after_start_up_does_not_fail_sign_ins(stack, browser):
    # The gateway fetched the keys at start-up, a moment ago; the provider now rotates
    # and signs with a new key. The sign-in waits (at most a few seconds) for one
    # refetch instead of failing with an unknown kid for half a minute.
    fetches = stack.op.hits["jwks"]
    stack.op.rotate_keys("RSA", retire_old=True)
    record = await sign_in(stack, browser)
    assert upstream_saw(record, "X-Auth-Subject") == ["user-1"]
    assert stack.op.hits["jwks"] == fetches + 1


async def test_missing_auth_time_is_refused_when_max_age_was_asked(stack, browser):
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    knobs, reason = MISSING_AUTH_TIME
    for knob, value in knobs.items():
        setattr(stack.op.behaviour, knob, value)
    with capture_logs() as logs:
        final = await browser.follow(f"{stack.url}/transfers/new")
    assert final.status == 400
    failure = next(e for e in logs if e["event"] == "step_up_failure")
    assert failure["reason"] == f"id_token_{reason}"


async def test_missing_auth_time_falls_back_to_iat_without_max_age(stack, browser):
    stack.op.behaviour.omit_auth_time = True
    with capture_logs() as logs:
        record = await sign_in(stack, browser)
    assert upstream_saw(record, "X-Auth-Level") == ["password"]
    assert any(e["event"] == "auth_time_missing" for e in logs)


@pytest.mark.parametrize(
    "knobs", [{"omit_callback_iss": True}, {"callback_iss": "https://evil.example"}]
)
async def test_rfc9207_iss_on_the_callback(stack, browser, knobs):
    for knob, value in knobs.items():
        setattr(stack.op.behaviour, knob, value)
    final = await browser.follow(f"{stack.url}/app/home")
    assert final.status == 400
    assert browser.cookie(COOKIE) is None


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("access_denied", 403),
        ("unmet_authentication_requirements", 403),
        ("login_required", 502),
        ("<script>alert(1)</script>", 502),
    ],
)
async def test_provider_errors_keep_the_session_and_do_not_loop(stack, browser, error, status):
    await sign_in(stack, browser)
    cookie_before = browser.cookie(COOKIE)
    stack.op.behaviour.authorize_error = error
    final = await browser.follow(f"{stack.url}/transfers/new")
    assert final.status == status
    assert "<script>" not in final.body
    assert "still signed in" in final.body
    assert browser.cookie(COOKIE) == cookie_before
    stack.op.behaviour.authorize_error = None
    async with browser.http.get(f"{stack.url}/app/x", headers={"Accept": "text/html"}) as resp:
        assert resp.status == 200


async def test_callback_without_transaction_is_refused(stack, browser):
    hop = await browser.get(f"{stack.url}/_gateway/callback?code=abc&state=forged")
    assert hop.status == 400 and "expired" in hop.body
    hop = await browser.get(f"{stack.url}/_gateway/callback")
    assert hop.status == 400


async def test_callback_state_cannot_be_swapped_between_transactions(stack, browser):
    first = await browser.get(f"{stack.url}/app/a")
    second = await browser.get(f"{stack.url}/app/b")
    state_a = query_of(first.headers["Location"])["state"]
    # Complete b's authorization but present a's state: refused.
    at_op = await browser.get(second.headers["Location"])
    callback = query_of(at_op.headers["Location"])
    hop = await browser.get(
        f"{stack.url}/_gateway/callback?code={callback['code']}&state={state_a}&iss={callback['iss']}"
    )
    # a's transaction with b's code: a's PKCE verifier does not fit, the OP refuses.
    assert hop.status == 400
    assert browser.cookie(COOKIE) is None


async def test_several_tabs_can_sign_in_at_once(stack, browser):
    first = await browser.get(f"{stack.url}/app/a")
    second = await browser.get(f"{stack.url}/app/b")
    # Finish the second round trip first, then the first.
    for hop in (second, first):
        at_op = await browser.get(hop.headers["Location"])
        back = await browser.get(at_op.headers["Location"])
        assert back.status == 303
    assert [h.headers["Location"] for h in browser.hops if h.status == 303] == ["/app/b", "/app/a"]


async def test_transaction_expires(stack, browser):
    hop = await browser.get(f"{stack.url}/app/a")
    at_op = await browser.get(hop.headers["Location"])
    stack.clock.advance(601)
    back = await browser.get(at_op.headers["Location"])
    assert back.status == 400


# -- sessions -----------------------------------------------------------------------


async def test_tampered_cookie_is_no_session(stack, browser, api):
    await sign_in(stack, browser)
    value = browser.cookie(COOKIE)
    tampered = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
    with capture_logs() as logs:
        async with api.get(
            f"{stack.url}/app/x",
            headers={"Cookie": f"{COOKIE}={tampered}", "Accept": "text/html"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302
    assert any(e["event"] == "session_rejected" for e in logs)
    assert all(value not in json.dumps(e) and tampered not in json.dumps(e) for e in logs)


async def test_idle_timeout_is_enforced(stack, browser):
    await sign_in(stack, browser)
    stack.clock.advance(29 * 60)
    assert (await browser.get(f"{stack.url}/app/x")).status == 200  # refreshes last_seen
    stack.clock.advance(29 * 60)
    assert (await browser.get(f"{stack.url}/app/x")).status == 200
    stack.clock.advance(31 * 60)
    assert (await browser.get(f"{stack.url}/app/x")).status == 302


async def test_absolute_lifetime_is_enforced(stack, browser):
    await sign_in(stack, browser)
    for _ in range(25):  # 12 h 30 min of activity every 30 min
        stack.clock.advance(30 * 60 - 1)
        hop = await browser.get(f"{stack.url}/app/x")
    assert hop.status == 302


async def test_secret_rotation_keeps_sessions(make_stack, browser):
    old = await make_stack()
    await sign_in(old, browser)
    # Cookies are per host, not per port: the browser sends the same cookie to both.
    rotated = await make_stack(secret=f"[new-secret-0123456789abcdef0123456789, {SESSION_SECRET}]")
    assert (await browser.get(f"{rotated.url}/app/x")).status == 200
    retired = await make_stack(secret="new-secret-0123456789abcdef0123456789")
    assert (await browser.get(f"{retired.url}/app/x")).status == 302


async def test_memory_store_rotates_the_session_id_on_step_up(make_stack, browser, api):
    stack = await make_stack(store="memory")
    await sign_in(stack, browser)
    before = browser.cookie(COOKIE)
    stack.op.behaviour.user = PHR_USER
    await browser.follow(f"{stack.url}/transfers/new")
    after = browser.cookie(COOKIE)
    assert after != before and len(after) >= 43
    # The pre-step-up id no longer works at all.
    async with api.get(
        f"{stack.url}/app/x", headers={"Cookie": f"{COOKIE}={before}"}, allow_redirects=False
    ) as resp:
        assert resp.status == 401


async def test_a_different_subject_never_inherits_proofs(stack, browser):
    stack.op.behaviour.user = PHR_USER
    await sign_in(stack, browser, "/transfers/new")
    stack.op.behaviour.user = OpUser(sub="mallory", acr="urn:example:loa:1", amr=["pwd"])
    stack.op.behaviour.honour_acr_values = False
    stack.clock.advance(400)  # the phr proof is stale, so a new round trip happens
    final = await browser.follow(f"{stack.url}/transfers/new")
    assert final.status == 403
    async with browser.http.get(f"{stack.url}/app/x", headers={"Accept": "text/html"}) as resp:
        record = await resp.json()
    assert upstream_saw(record, "X-Auth-Subject") == ["mallory"]
    assert upstream_saw(record, "X-Auth-Level") == ["password"]


# -- redirect targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rd", "expected"),
    [
        ("/app/ok?x=1", "/app/ok?x=1"),
        ("//evil.com", "/"),
        ("/\\evil.com", "/"),
        ("https://evil.com/", "/"),
        ("/%2F%2Fevil.com", "/"),
        ("%2F%2Fevil.com", "/"),
        ("/%5Cevil.com", "/"),
    ],
)
async def test_step_up_endpoint_only_returns_to_same_origin(stack, browser, rd, expected):
    from urllib.parse import quote

    hop = await browser.get(f"{stack.url}/_gateway/step-up?level=password&rd={quote(rd, safe='')}")
    assert hop.status == 302
    at_op = await browser.get(hop.headers["Location"])
    back = await browser.get(at_op.headers["Location"])
    assert back.status == 303 and back.headers["Location"] == expected


async def test_step_up_endpoint_validates_its_parameters(stack, api):
    async with api.get(f"{stack.url}/_gateway/step-up?level=nope") as resp:
        assert resp.status == 400
    async with api.get(f"{stack.url}/_gateway/step-up?level=mfa&max_age=-1") as resp:
        assert resp.status == 400


# -- what the upstream receives ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "forwarded"),
    [
        ("/public/../app/x", 302, None),  # judged as /app/x: needs sign-in
        ("/public/./a//b", 200, "/public/a/b"),
        ("/public/%7Euser", 200, "/public/~user"),
        ("/public/a%2fb", 400, None),
        ("/public/a%5Cb", 400, None),
        ("/public/%2e%2e/app/x", 400, None),
        ("/public/a%00b", 400, None),
        ("/public/%ff", 400, None),
    ],
)
async def test_upstream_sees_exactly_the_judged_path(stack, api, path, status, forwarded):
    url = URL(f"{stack.url}{path}", encoded=True)  # sent as written, not cleaned by the client
    async with api.get(url, headers={"Accept": "text/html"}, allow_redirects=False) as resp:
        assert resp.status == status
    if forwarded is None:
        assert stack.seen == []
    else:
        assert stack.seen[-1]["path_qs"] == forwarded


async def test_raw_targets_are_checked_too(stack):
    """Clients that do not normalise (curl --path-as-is) are judged on the same path."""
    answer = await raw_request(
        stack.url, b"GET /public/../app/secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 401 ")
    answer = await raw_request(
        stack.url, b"GET http://evil/public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert stack.seen == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("post", "/public/x", 405),
        ("Get", "/public/x", 405),
        ("PROPFIND", "/dav/x", 200),
        ("PROPFIND", "/public/x", 200),  # named by a rule, so known; /public allows any method
        ("MKCALENDAR", "/public/x", 405),  # a real method, but no rule names it
        ("FOO", "/public/x", 405),
        ("HEAD", "/dav/x", 200),  # GET covers HEAD
        ("DELETE", "/dav/x", 403),  # /dav names GET and PROPFIND only; nothing else matches
    ],
)
async def test_methods(stack, method, path, status):
    with capture_logs() as logs:
        answer = await raw_request(
            stack.url,
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1] == str(status).encode(), answer[:200]
    if status == 405:
        assert method.encode() not in answer.split(b"\r\n\r\n", 1)[1]  # nothing echoed back
        assert any(e.get("reason") == "unknown_method" for e in logs)
        assert stack.seen == []


async def test_method_override_headers_are_removed_unless_allowed(stack, api):
    spoof = {
        name: "DELETE" for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
    }
    async with api.post(f"{stack.url}/public/x", headers=spoof) as resp:
        record = await resp.json()
    assert not any(upstream_saw(record, name) for name in spoof)
    async with api.post(f"{stack.url}/legacy/x", headers=spoof) as resp:
        record = await resp.json()
    assert upstream_saw(record, "X-HTTP-Method-Override") == ["DELETE"]


async def test_spoofed_assurance_headers_never_reach_the_upstream(stack, browser):
    await sign_in(stack, browser)
    spoof = [
        ("X-Auth-Acr", "phr"),
        ("x-auth-acr", "phr"),
        ("X-AUTH-LEVEL", "phishing-resistant"),
        ("X_Auth_Acr", "phr"),
        ("x_auth_subject", "admin"),
        ("X-Auth-Custom", "1"),
        ("Connection", "X-Auth-Acr, X-Auth-Subject"),
    ]
    async with browser.http.get(f"{stack.url}/app/x", headers=CIMultiDict(spoof)) as resp:
        record = await resp.json()
    assert upstream_saw(record, "X-Auth-Acr") == ["urn:example:loa:1"]
    assert upstream_saw(record, "X-Auth-Subject") == ["user-1"]
    assert upstream_saw(record, "X-Auth-Level") == ["password"]
    assert upstream_saw(record, "X-Auth-Custom") == []
    names = [k.lower().replace("_", "-") for k, _ in record["headers"]]
    assert names.count("x-auth-acr") == 1


async def test_public_route_strips_spoofed_headers_without_a_session(stack, api):
    async with api.get(f"{stack.url}/public/x", headers={"X-Auth-Subject": "admin"}) as resp:
        record = await resp.json()
    assert upstream_saw(record, "X-Auth-Subject") == []


async def test_forwarded_headers_and_request_id(stack, api):
    async with api.get(
        f"{stack.url}/public/x",
        headers={"X-Forwarded-For": "6.6.6.6", "X-Request-Id": "abc-123"},
    ) as resp:
        record = await resp.json()
        assert resp.headers.get("X-Request-Id") in (None, "abc-123")
    assert upstream_saw(record, "X-Forwarded-For") == ["127.0.0.1"]  # untrusted peer
    assert upstream_saw(record, "X-Forwarded-Proto") == ["http"]
    assert upstream_saw(record, "X-Request-Id") == ["abc-123"]


async def test_trusted_proxies_extend_the_forwarded_chain(make_stack, api):
    stack = await make_stack(server_extra="trusted_proxies: [127.0.0.0/8]\n")
    async with api.get(f"{stack.url}/public/x", headers={"X-Forwarded-For": "203.0.113.9"}) as resp:
        record = await resp.json()
    assert upstream_saw(record, "X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]


# -- upstream failures -----------------------------------------------------------------


async def test_upstream_down_is_502(make_stack, api):
    from tests.conftest import free_port

    stack = await make_stack(upstream_url=f"http://127.0.0.1:{free_port()}")
    with capture_logs() as logs:
        async with api.get(f"{stack.url}/public/x") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]
    assert any(e.get("status") == 502 for e in logs)


async def test_upstream_timeout_is_504(make_stack, aiohttp_server, api):
    from aiohttp import web

    async def slow(request):
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    server = await aiohttp_server(app)
    stack = await make_stack(
        upstream_url=str(server.make_url("")).rstrip("/"), server_extra="upstream_timeout: 1\n"
    )
    async with api.get(f"{stack.url}/public/x") as resp:
        assert resp.status == 504


async def test_websocket_is_proxied_when_the_rule_allows(stack, api):
    async with api.ws_connect(f"{stack.url}/public/ws") as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"


async def test_a_websocket_handshake_carries_the_refreshed_session_cookie(stack, browser):
    await sign_in(stack, browser)
    stack.clock.advance(61)  # the session's last_seen is due to be saved again
    before = browser.cookie(COOKIE)
    async with browser.http.ws_connect(f"{stack.url}/app/ws") as ws:
        assert browser.cookie(COOKIE) not in (None, before)  # set on the 101 answer
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"


async def test_websocket_needs_the_rule_too(stack, api):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with api.ws_connect(f"{stack.url}/app/ws"):
            pass
    assert info.value.status == 401


# -- internal endpoints ----------------------------------------------------------------


async def test_internal_endpoints(stack, api, browser):
    async with api.get(f"{stack.url}/_gateway/healthz") as resp:
        assert resp.status == 200
    async with api.get(f"{stack.url}/_gateway/readyz") as resp:
        assert resp.status == 200
    async with api.get(f"{stack.url}/_gateway/nope") as resp:
        assert resp.status == 404
    async with api.get(f"{stack.url}/_gateway") as resp:
        assert resp.status == 404
    assert stack.seen == []
    await sign_in(stack, browser)
    async with api.get(f"{stack.url}/_gateway/metrics") as resp:
        text = await resp.text()
    assert 'stepup_requests_total{decision="allow",rule="signed-in"} 1.0' in text
    assert 'stepup_challenges_total{level="password",outcome="issued"} 1.0' in text
    assert 'stepup_challenges_total{level="password",outcome="completed"} 1.0' in text
    assert "stepup_upstream_latency_seconds_bucket" in text


async def test_provider_down_readyz_503_and_step_up_503(make_stack, api, browser):
    from tests.conftest import free_port

    stack = await make_stack(issuer=f"http://127.0.0.1:{free_port()}")
    async with api.get(f"{stack.url}/_gateway/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json()) == {"ready": False, "provider": False, "store": True}
    async with api.get(f"{stack.url}/_gateway/healthz") as resp:
        assert resp.status == 200
    hop = await browser.get(f"{stack.url}/app/x")
    assert hop.status == 503 and "identity provider" in hop.body.lower()
    async with api.get(f"{stack.url}/public/x") as resp:
        assert resp.status == 200  # routes that need no sign-in keep working


async def test_metrics_listener_moves_metrics(make_stack, api):
    from tests.conftest import free_port

    stack = await make_stack(server_extra=f"metrics_listen: 127.0.0.1:{free_port()}\n")
    async with api.get(f"{stack.url}/_gateway/metrics") as resp:
        assert resp.status == 404


async def test_logout_ends_the_session_here_and_at_the_provider(make_stack, browser, api):
    stack = await make_stack(store="memory")
    await sign_in(stack, browser)
    value = browser.cookie(COOKIE)
    confirm = await browser.get(f"{stack.url}/_gateway/logout")
    assert confirm.status == 200 and "<form" in confirm.body
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers={"Origin": stack.url}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        location = resp.headers["Location"]
    q = query_of(location)
    assert location.startswith(f"{stack.op.issuer}/")
    assert q["post_logout_redirect_uri"] == f"{stack.url}/_gateway/logged-out"
    assert q["id_token_hint"].count(".") == 2
    async with api.get(
        f"{stack.url}/app/x", headers={"Cookie": f"{COOKIE}={value}"}, allow_redirects=False
    ) as resp:
        assert resp.status == 401  # the old cookie is dead server-side


async def test_cross_site_logout_post_is_refused(stack, browser):
    await sign_in(stack, browser)
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert browser.cookie(COOKIE)


async def test_no_token_cookie_or_secret_is_ever_logged(stack, browser):
    with capture_logs() as logs:
        await sign_in(stack, browser)
        stack.op.behaviour.user = PHR_USER
        await browser.follow(f"{stack.url}/transfers/new")
    dumped = json.dumps(logs)
    assert browser.cookie(COOKIE) not in dumped
    assert SESSION_SECRET not in dumped and CLIENT_SECRET not in dumped
    assert "eyJ" not in dumped  # no JWT of any kind
    events = [e["event"] for e in logs]
    assert events.count("step_up_challenge") == 2 and events.count("step_up_success") == 2
    success = [e for e in logs if e["event"] == "step_up_success"][-1]
    assert success["acr"] == "phr" and success["amr"] == ["hwk"]


async def test_the_readme_verification_snippet_works(stack, browser):
    """The ten lines the README gives upstream developers, run as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("**Verify the assertion**") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"https://bank.example.com"', repr(stack.url))
    record = await sign_in(stack, browser)
    token = upstream_saw(record, "X-Auth-Assertion")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    claims = await asyncio.to_thread(namespace["verified_user"], {"X-Auth-Assertion": token})
    assert claims["sub"] == "user-1" and claims["level"] == "password"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(jwt.InvalidSignatureError):
        await asyncio.to_thread(namespace["verified_user"], {"X-Auth-Assertion": forged})


async def test_provider_down_after_sign_in_keeps_sessions_working(stack, browser):
    """Metadata and keys come from the cache: satisfied rules still pass; step-ups 503."""
    await sign_in(stack, browser)
    await stack.op.server.close()
    hop = await browser.get(f"{stack.url}/app/x")
    assert hop.status == 200
    stack.clock.advance(11)  # past the last successful probe's 10 s
    hop = await browser.get(f"{stack.url}/transfers/new")
    assert hop.status == 503 and "not answering" in hop.body


# -- remembered computations: identical requests, never a stale answer -------------------
# The gateway keeps recent results of pure steps (framing check, the upstream's copy of
# the client's headers, the relayed response headers, the assurance headers); these
# tests repeat byte-identical requests where a result kept too broadly would show.


async def test_identical_requests_each_get_their_own_request_id(stack, api):
    ids = []
    for _ in range(3):
        async with api.get(f"{stack.url}/public/x") as resp:
            record = await resp.json()
            [sent] = upstream_saw(record, "X-Request-Id")
            ids.append(sent)
    assert len(set(ids)) == 3


async def test_identical_headers_after_logout_carry_no_assurance(make_stack, browser, api):
    stack = await make_stack(store="memory")
    await sign_in(stack, browser)
    value = browser.cookie(COOKIE)
    same = {"Cookie": f"{COOKIE}={value}", "Accept": "application/json"}
    async with api.get(f"{stack.url}/public/x", headers=same) as resp:
        assert upstream_saw(await resp.json(), "X-Auth-Subject") == ["user-1"]
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers={"Origin": stack.url}, allow_redirects=False
    ) as resp:
        assert resp.status == 303

    async with api.get(f"{stack.url}/public/x", headers=same) as resp:
        record = await resp.json()
    assert [name for name, _ in record["headers"] if name.lower().startswith("x-auth-")] == []
    assert upstream_saw(record, "Cookie") == []  # still the gateway's own cookie: removed


async def test_identical_headers_over_http_1_0_are_checked_again(stack):
    head = b"Host: gateway.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = b"5\r\nhello\r\n0\r\n\r\n"
    ok = await raw_request(stack.url, b"POST /public/x HTTP/1.1\r\n" + head + body)
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]

    refused = await raw_request(stack.url, b"POST /public/x HTTP/1.0\r\n" + head + body)
    assert refused.startswith(b"HTTP/1.0 400") or refused.startswith(b"HTTP/1.1 400"), refused
    assert b"te_http10" in refused or b"Transfer-Encoding" in refused


async def test_a_refreshed_cookie_is_not_repeated_on_identical_responses(
    make_stack, aiohttp_server, browser
):
    from aiohttp import web

    async def fixed(request):  # the same head every time, Date included
        return web.Response(
            text="same", headers={"Date": "Sat, 01 Jan 2033 00:00:00 GMT", "X-Fixed": "1"}
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", fixed)
    server = await aiohttp_server(app)
    stack = await make_stack(upstream_url=str(server.make_url("")).rstrip("/"))
    assert (await browser.follow(f"{stack.url}/app/x")).body == "same"

    stack.clock.advance(61)  # the session's last_seen is due to be saved again
    refreshed = await browser.get(f"{stack.url}/app/x")
    again = await browser.get(f"{stack.url}/app/x")

    assert refreshed.status == again.status == 200
    assert COOKIE in refreshed.headers.get("Set-Cookie", "")
    assert "Set-Cookie" not in again.headers
    assert refreshed.headers["X-Fixed"] == again.headers["X-Fixed"] == "1"


async def test_assurance_headers_follow_a_step_up_and_the_assertion_is_renewed(stack, browser):
    first = await sign_in(stack, browser, "/app/x")
    async with browser.http.get(f"{stack.url}/app/x") as resp:
        same = await resp.json()
    assert upstream_saw(same, "X-Auth-Assertion") == upstream_saw(first, "X-Auth-Assertion")

    stack.clock.advance(31)  # past half the assertion's 60 s: signed anew
    async with browser.http.get(f"{stack.url}/app/x") as resp:
        later = await resp.json()
    assert upstream_saw(later, "X-Auth-Assertion") != upstream_saw(first, "X-Auth-Assertion")

    stack.op.behaviour.user = PHR_USER
    stepped = await sign_in(stack, browser, "/transfers/new")
    assert upstream_saw(stepped, "X-Auth-Acr") == ["phr"]
    async with browser.http.get(f"{stack.url}/app/x") as resp:
        after = await resp.json()
    assert upstream_saw(after, "X-Auth-Acr") == ["phr"]
    assert upstream_saw(after, "X-Auth-Level") == ["phishing-resistant"]
    claims = jwt.decode(
        upstream_saw(after, "X-Auth-Assertion")[0], options={"verify_signature": False}
    )
    assert claims["acr"] == "phr" and claims["rule"] == "signed-in"
