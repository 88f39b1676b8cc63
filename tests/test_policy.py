"""The pure decision layer: levels, freshness, allow/challenge/deny, redirect targets."""

from __future__ import annotations

import pytest

from gateway import assurance, responses
from gateway.model import AssuranceConfig, Level, Match, Requirement, Rule
from gateway.policy import Allow, Challenge, Deny, decide
from gateway.session.model import Proof, Session

PASSWORD = Level("password", 0, acr=("urn:example:loa:1",))
MFA = Level("mfa", 1, acr=("urn:example:loa:2",), amr_any=("otp", "hwk", "swk"))
PHR = Level("phishing-resistant", 2, acr=("phr", "phrh"), amr_any=("hwk",))
LEVELS = AssuranceConfig((PASSWORD, MFA, PHR))
NOW = 1_800_000_000.0


def rule(level: str | None, max_age_s: int | None = None) -> Rule:
    return Rule(
        name=f"needs-{level}",
        index=0,
        match=Match(path="/**"),
        require=Requirement(level=level, max_age_s=max_age_s),
        upstream="app",
    )


def session(*proofs: tuple[str | None, tuple[str, ...], float]) -> Session:
    fields = {"sub": "alice", "email": None, "name": None, "provider_sid": None, "id_token": None}
    first, *rest = [Proof(acr, amr, at) for acr, amr, at in proofs]
    s = Session.start(first, now=NOW - 3600, **fields)
    for proof in rest:
        s = s.with_proof(proof, now=NOW - 3600, **fields)
    return s


@pytest.mark.parametrize(
    ("acr", "amr", "expected"),
    [
        ("urn:example:loa:1", ("pwd",), "password"),
        ("urn:example:loa:2", ("pwd", "otp"), "mfa"),
        ("urn:example:loa:1", ("pwd", "otp"), "mfa"),  # amr_any lifts it
        ("phr", ("hwk",), "phishing-resistant"),
        ("phrh", (), "phishing-resistant"),
        ("urn:example:loa:1", ("hwk",), "phishing-resistant"),
        ("unknown", ("pwd",), None),
        (None, (), None),
    ],
)
def test_level_of_takes_the_strongest_level_the_token_proves(acr, amr, expected):
    level = assurance.level_of(LEVELS.levels, acr, amr)
    assert (level.name if level else None) == expected


@pytest.mark.parametrize(
    ("proofs", "required", "max_age_s", "expected"),
    [
        ([("urn:example:loa:1", ("pwd",), NOW - 10)], PASSWORD, None, True),
        ([("urn:example:loa:1", ("pwd",), NOW - 10)], MFA, None, False),
        ([("phr", ("hwk",), NOW - 10)], MFA, 60, True),  # stronger satisfies weaker
        ([("phr", ("hwk",), NOW - 301)], PHR, 300, False),  # too old
        ([("phr", ("hwk",), NOW - 300)], PHR, 300, True),  # boundary is inclusive
        # An old strong proof and a fresh weak one: a fresh strong one is still needed.
        ([("phr", ("hwk",), NOW - 900), ("urn:example:loa:1", ("pwd",), NOW - 5)], PHR, 300, False),
        (
            [("phr", ("hwk",), NOW - 900), ("urn:example:loa:1", ("pwd",), NOW - 5)],
            PASSWORD,
            60,
            True,
        ),
        ([], PASSWORD, None, False),
    ],
)
def test_satisfies(proofs, required, max_age_s, expected):
    proof_objects = [Proof(acr, amr, at) for acr, amr, at in proofs]
    assert assurance.satisfies(LEVELS.levels, proof_objects, required, max_age_s, NOW) is expected


def test_no_rule_is_denied():
    assert decide(None, None, LEVELS, NOW) == Deny(403, "no_rule_matches")


def test_public_rule_allows_without_session():
    decision = decide(rule(None), None, LEVELS, NOW)
    assert isinstance(decision, Allow) and decision.level is None


def test_missing_session_is_challenged():
    decision = decide(rule("password"), None, LEVELS, NOW)
    assert isinstance(decision, Challenge)
    assert (decision.reason, decision.required) == ("no_session", PASSWORD)


def test_weak_session_is_challenged_for_the_required_level():
    decision = decide(
        rule("phishing-resistant", 300),
        session(("urn:example:loa:1", ("pwd",), NOW - 5)),
        LEVELS,
        NOW,
    )
    assert isinstance(decision, Challenge)
    assert decision.reason == "insufficient_level"
    assert decision.held == PASSWORD and decision.max_age_s == 300


def test_stale_strong_session_is_challenged_as_stale():
    decision = decide(
        rule("phishing-resistant", 300), session(("phr", ("hwk",), NOW - 301)), LEVELS, NOW
    )
    assert isinstance(decision, Challenge) and decision.reason == "stale"


def test_fresh_strong_session_is_allowed_and_reports_highest_level():
    decision = decide(rule("mfa", 600), session(("phr", ("hwk",), NOW - 5)), LEVELS, NOW)
    assert isinstance(decision, Allow) and decision.level == PHR


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/transfers?x=1", "/transfers?x=1"),
        ("/", "/"),
        ("//evil.com", "/"),
        ("/\\evil.com", "/"),
        ("\\\\evil.com", "/"),
        ("https://evil.com", "/"),
        ("http:/evil.com", "/"),
        ("evil.com", "/"),
        ("/%2F%2Fevil.com", "/"),
        ("/%2fevil.com", "/"),  # decodes to //evil.com
        ("/%5Cevil.com", "/"),
        ("/%252F%252Fevil.com", "/"),  # double-encoded
        ("/\t/evil.com", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
        ("", "/"),
        (None, "/"),
        ("/ok/%20space", "/ok/%20space"),
    ],
)
def test_safe_return_to_only_allows_same_origin_paths(target, expected):
    assert responses.safe_return_to(target) == expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {"Accept": "text/html,application/xhtml+xml"}, True),
        ("HEAD", {"Accept": "text/html"}, True),
        ("GET", {"Sec-Fetch-Mode": "navigate"}, True),
        ("GET", {"Accept": "application/json"}, False),
        ("GET", {}, False),
        ("POST", {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}, False),
    ],
)
def test_is_navigation(method, headers, expected):
    assert responses.is_navigation(method, headers) is expected


def test_rfc9470_challenge_header():
    value = responses.www_authenticate(PHR, 300, ("phr", "phrh"))
    assert value.startswith('Bearer error="insufficient_user_authentication", error_description="')
    assert 'acr_values="phr phrh"' in value
    assert value.endswith("max_age=300")
    assert responses.www_authenticate(None, None) == "Bearer"


@pytest.mark.parametrize(
    ("auth_time", "received_at", "expected"),
    [
        (NOW - 30, NOW, NOW - 30),  # the usual case: the provider's auth_time
        (NOW + 50, NOW, NOW),  # provider clock ahead (within skew): never in the future
        (NOW, NOW, NOW),
    ],
    ids=["past", "provider_ahead", "same"],
)
def test_a_proof_is_dated_no_later_than_its_arrival(auth_time, received_at, expected):
    assert assurance.proven_at(auth_time, received_at) == expected


@pytest.mark.parametrize(
    ("age_s", "max_age_s", "allowed"),
    [(0, 5, True), (5, 5, True), (5.5, 5, False), (65, 5, False), (10**6, None, True)],
)
def test_max_age_has_no_leeway(age_s, max_age_s, allowed):
    decision = decide(
        rule("password", max_age_s),
        session(("urn:example:loa:1", ("pwd",), NOW - age_s)),
        LEVELS,
        NOW,
    )
    assert isinstance(decision, Allow if allowed else Challenge)


@pytest.mark.parametrize(
    ("raw_html", "back_links"),
    [
        ("", 1),  # an error page: the way back is the application's front page
        ('<form method="post"><button>Sign out</button></form>', 1),
        ('<p><a href="/transfers">Go back</a></p>', 0),  # it has its own way on
    ],
)
def test_every_gateway_page_offers_a_way_back(raw_html: str, back_links: int) -> None:
    text = responses.page("Access denied", ["No rule allows <this>."], raw_html=raw_html)
    assert "<h1>Access denied</h1>" in text and "No rule allows &lt;this&gt;." in text
    assert text.count(responses.BACK_TO_APP) == back_links
    assert "<a href=" in text
