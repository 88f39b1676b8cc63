"""Cross-site requests: a form from another site is never kept and replayed, a kept
form is replayed with the origin it came from, and only this site can sign a user out.

The test provider signs in without asking (single sign-on), exactly the silent round
trip that turned a kept cross-site form into a request made as the victim."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import Browser, Stack
from tests.support.upstream import header_values
from tests.test_gateway import COOKIE, PHR_USER, sign_in
from tests.test_transactional import FORM, RULES, finish_round_trip, posts

FORM_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}


def from_evil(stack: Stack) -> dict[str, str]:
    return {
        **FORM_TYPE,
        "Origin": "https://evil.example",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
    }


CROSS_SITE_SHAPES = {
    "other_origin": {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    "null_origin": {"Origin": "null", "Sec-Fetch-Mode": "navigate"},
    "sibling_site": {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"},
    "says_nothing": {"Sec-Fetch-Mode": "navigate"},  # fail closed: not a browser we know
    "origin_lies_fetch_site_not": {"Sec-Fetch-Site": "cross-site", "Origin": "SELF"},
}


async def follow_everything(browser: Browser, stack: Stack, hop: Any) -> None:
    """What a browser does with the answer: follow every redirect, as far as it goes."""
    for _ in range(6):
        if hop.status not in (302, 303):
            return
        location = hop.headers["Location"]
        hop = await browser.get(location if location.startswith("http") else stack.url + location)


@pytest.mark.parametrize("store", ["cookie", "memory"])
async def test_a_cross_site_form_is_refused_and_never_replayed(make_stack, browser, store):
    """The victim has no gateway cookie on this request (SameSite=Lax) but a session at
    the provider; the attacker's page posts a transfer form to the gateway."""
    stack = await make_stack(rules=RULES, store=store)
    stack.op.behaviour.user = PHR_USER
    with capture_logs() as logs:
        hop = await browser.request(
            "POST",
            f"{stack.url}/transfers",
            data="amount=9000&payee=Mallory",
            headers=from_evil(stack),
        )
        await follow_everything(browser, stack, hop)
    assert hop.status == 403 and "not sent from a page of this site" in hop.body
    assert "Set-Cookie" not in hop.headers  # no sign-in started, nothing kept
    assert posts(stack, "/transfers") == []
    refused = [e for e in logs if e["event"] == "cross_site_request_refused"]
    assert refused and refused[0]["reason"] == "cross_origin" and refused[0]["rule"] == "transfer"
    assert not [e for e in logs if e["event"] == "request_kept"]


@pytest.mark.parametrize("shape", sorted(CROSS_SITE_SHAPES))
async def test_every_shape_of_a_form_not_from_this_site_is_refused(make_stack, browser, shape):
    stack = await make_stack(rules=RULES)
    await sign_in(stack, browser)  # even with a session: the step-up would be silent
    stack.op.behaviour.user = PHR_USER
    headers = {**FORM_TYPE, **CROSS_SITE_SHAPES[shape]}
    if headers.get("Origin") == "SELF":
        headers["Origin"] = stack.url
    hop = await browser.request(
        "POST", f"{stack.url}/transfers", data="amount=1&payee=x", headers=headers
    )
    await follow_everything(browser, stack, hop)
    assert hop.status == 403
    assert posts(stack, "/transfers") == []


async def test_a_same_origin_form_is_replayed_with_its_own_origin(make_stack, browser):
    stack = await make_stack(rules=RULES)
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    hop = await browser.request(
        "POST",
        f"{stack.url}/transfers",
        data="amount=250&payee=ACME",
        headers={**FORM, "Origin": stack.url},
    )
    back = await finish_round_trip(browser, hop)
    # The browser arrives at /resume from the provider's redirect: a cross-site navigation.
    resumed = await browser.get(
        f"{stack.url}{back.headers['Location']}",
        headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
    )
    assert resumed.status == 200
    (sent,) = posts(stack, "/transfers")
    assert header_values(sent, "Origin") == [stack.url]
    assert header_values(sent, "Sec-Fetch-Site") == ["same-origin"]


# -- logout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "null"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {},  # says nothing about where it came from: refused (fail closed)
    ],
    ids=["null", "other", "same_site", "cross_site", "none"],
)
async def test_logout_from_anywhere_but_this_site_is_refused(make_stack, browser, headers):
    stack = await make_stack()
    await sign_in(stack, browser)
    with capture_logs() as logs:
        async with browser.http.post(
            f"{stack.url}/_gateway/logout", headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == 403
    assert [e["reason"] for e in logs if e["event"] == "cross_site_request_refused"]
    assert browser.cookie(COOKIE)
    assert (await browser.get(f"{stack.url}/app/x")).status == 200  # still signed in


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "SELF"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Origin": "SELF", "Sec-Fetch-Site": "same-origin"},
    ],
    ids=["origin", "fetch_site", "both"],
)
async def test_logout_from_this_site_signs_out(make_stack, browser, headers):
    stack = await make_stack()
    await sign_in(stack, browser)
    headers = {k: stack.url if v == "SELF" else v for k, v in headers.items()}
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers=headers, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    assert (await browser.get(f"{stack.url}/app/x")).status == 302


# -- the check itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public", "headers", "refusal"),
    [
        ("https://bank.example.com", {"Origin": "https://bank.example.com"}, None),
        ("https://Bank.Example.com:443", {"Origin": "https://bank.example.com"}, None),
        ("http://127.0.0.1:8080", {"Origin": "http://127.0.0.1:8080"}, None),
        ("https://bank.example.com", {"Sec-Fetch-Site": "same-origin"}, None),
        ("https://bank.example.com", {"Origin": "https://bank.example.com:8443"}, "cross_origin"),
        ("https://bank.example.com", {"Origin": "http://bank.example.com"}, "cross_origin"),
        ("https://bank.example.com", {"Origin": "null"}, "cross_origin"),
        ("https://bank.example.com", {"Origin": "https://bank.example.com/x"}, "cross_origin"),
        ("https://bank.example.com", {"Origin": "https://bank.example.com.evil"}, "cross_origin"),
        ("https://bank.example.com", {"Sec-Fetch-Site": "same-site"}, "cross_site"),
        ("https://bank.example.com", {"Sec-Fetch-Site": "none"}, "cross_site"),
        ("https://bank.example.com",
         {"Origin": "https://bank.example.com", "Sec-Fetch-Site": "cross-site"}, "cross_site"),
        ("https://bank.example.com", {}, "origin_unknown"),
        ("https://[::1]:8443", {"Origin": "https://[::1]:8443"}, None),
    ],
)  # fmt: skip
def test_same_origin_refusal(public, headers, refusal):
    from gateway.transactional import same_origin_refusal

    assert same_origin_refusal(headers, public) == refusal
