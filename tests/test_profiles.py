"""Provider profiles as tables: the request each sends, how each reads an answer,
which errors mean "cannot meet", and what `check` and `explain` say about them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.errors import ConfigError
from gateway.model import Level
from gateway.oidc import profiles
from gateway.oidc.profiles import AUTH0_MFA_ACR, SIGNED_IN_ACR

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("profile", "acr", "max_age", "expected"),
    [
        ("generic", ("loa2",), None, {"acr_values": "loa2"}),
        ("generic", ("loa2",), 0, {"acr_values": "loa2", "max_age": "0", "prompt": "login"}),
        (
            "entra",
            ("c1",),
            None,
            {"claims": '{"id_token":{"acrs":{"essential":true,"value":"c1"}}}'},
        ),
        (
            "entra",
            ("c1", "c2"),
            300,
            {
                "claims": '{"id_token":{"acrs":{"essential":true,"values":["c1","c2"]}}}',
                "prompt": "login",
            },
        ),
        ("entra", (SIGNED_IN_ACR,), None, {}),  # a plain sign-in asks for no context
        ("auth0", (SIGNED_IN_ACR,), None, {}),
        ("auth0", (AUTH0_MFA_ACR,), 60, {"acr_values": AUTH0_MFA_ACR, "max_age": "60"}),
        ("okta", ("phr", "phrh"), None, {"acr_values": "phr phrh"}),
        (
            "keycloak",
            ("gold",),
            None,
            {
                "acr_values": "gold",
                "claims": '{"id_token":{"acr":{"essential":true,"values":["gold"]}}}',
            },
        ),
        ("pingone", ("Multi_Factor",), None, {"acr_values": "Multi_Factor"}),
        (
            "fapi2",  # the essential acr alone: acr_values would make it voluntary
            ("phr", "phrh"),
            300,
            {
                "claims": '{"id_token":{"acr":{"essential":true,"values":["phr","phrh"]}}}',
                "max_age": "300",
            },
        ),
    ],
)
def test_authorization_params(profile, acr, max_age, expected) -> None:
    assert profiles.authorization_params(profiles.get(profile), acr, max_age) == expected


LEVELS = (
    Level("signed-in", 0, (SIGNED_IN_ACR,)),
    Level("mfa", 1, ("c1",)),
    Level("strong", 2, ("c2",)),
)


@pytest.mark.parametrize(
    ("profile", "acr", "acrs", "expected"),
    [
        ("entra", None, ["c1", "c2"], "c2"),  # the strongest context a level names
        ("entra", None, ["c1"], "c1"),
        ("entra", None, ["c7"], SIGNED_IN_ACR),  # a context no level names proves nothing more
        ("entra", None, [], SIGNED_IN_ACR),
        ("auth0", None, [], SIGNED_IN_ACR),
        ("auth0", AUTH0_MFA_ACR, [], AUTH0_MFA_ACR),
        ("generic", None, ["c2"], None),  # acrs means nothing outside the entra profile
        ("okta", None, [], None),  # Okta always reflects an acr: none is no level
    ],
)
def test_asserted_acr(profile, acr, acrs, expected) -> None:
    assert profiles.asserted_acr(profiles.get(profile), acr, acrs, LEVELS) == expected


@pytest.mark.parametrize(
    ("profile", "payload", "expected"),
    [
        ("entra", {"acrs": ["c1"], "acr": "1"}, "c1"),  # an Entra v1.0 access token
        ("entra", {"acrs": "c2"}, SIGNED_IN_ACR),  # not a list: no context from it
        ("okta", {"acr": "urn:okta:loa:2fa:any"}, "urn:okta:loa:2fa:any"),
        ("keycloak", {"acr": 2}, None),  # not a string: no level
    ],
)
def test_token_acr_reads_access_token_claims(profile, payload, expected) -> None:
    assert profiles.token_acr(profiles.get(profile), payload, LEVELS) == expected


@pytest.mark.parametrize(
    ("profile", "error", "description", "codes", "expected"),
    [
        ("generic", "unmet_authentication_requirements", None, [], True),
        ("generic", "access_denied", "AADSTS53003: blocked", [], False),
        ("entra", "access_denied", "AADSTS53003: Access has been blocked", [], True),
        ("entra", "interaction_required", None, [53000], True),
        ("entra", "interaction_required", "AADSTS50076: use MFA", [50076], False),
        ("entra", "access_denied", "AADSTS530030x", [], False),
        ("okta", "access_denied", None, [], False),
    ],
)
def test_cannot_meet(profile, error, description, codes, expected) -> None:
    assert profiles.cannot_meet(profiles.get(profile), error, description, codes) is expected


BASE = """\
server: {listen: 127.0.0.1:8080, public_url: https://gw.example.com}
upstreams: {app: http://127.0.0.1:9000}
oidc:
  issuer: https://op.example.com
  client_id: gateway
  client_secret: s3cret
  profile: PROFILE
session: {secret: 0123456789abcdef0123456789abcdef}
LEVELS
rules:
  - name: transfers
    match: {path: /transfers/**}
    require: {level: mfa, max_age: 5m}
  - name: signed-in
    match: {path: /**}
    require: {level: LOW}
"""


def config_text(profile: str, levels: str = "", low: str = "password") -> str:
    return BASE.replace("PROFILE", profile).replace("LEVELS", levels).replace("LOW", low)


@pytest.mark.parametrize(
    ("profile", "low", "names"),
    [
        ("entra", "signed-in", ["signed-in", "mfa", "phishing-resistant"]),
        ("okta", "password", ["password", "mfa", "phishing-resistant"]),
        ("auth0", "signed-in", ["signed-in", "mfa"]),
        ("keycloak", "password", ["password", "mfa"]),
        ("pingone", "password", ["password", "mfa"]),
    ],
)
def test_a_profile_brings_its_levels(profile, low, names) -> None:
    config = load_config_text(config_text(profile, low=low), "c.yaml", {})
    assert [level.name for level in config.assurance.levels] == names


def test_generic_still_needs_levels() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(config_text("generic"), "c.yaml", {})
    assert [p.key_path for p in info.value.problems] == ["assurance"]


@pytest.mark.parametrize(
    ("profile", "levels", "path", "words"),
    [
        # Entra reads acrs only: an acr_values-style level would never be asserted.
        ("entra", "acr: [urn:example:loa:2]", "assurance.levels[1].acr", "c1..c99"),
        ("entra", "acr: [c1]\n      amr_any: [mfa]", "assurance.levels[1].amr_any", "no amr"),
        ("okta", "acr: [urn:okta:loa:2fa]", "assurance.levels[1].acr", "never asserted"),
        ("okta", "acr: [urn:okta:loa:2fa:any:ifpossible]", "assurance.levels[1].acr", "one factor"),
        ("okta", "acr: [phr]\n      amr_any: [okta_verify]", "assurance.levels[1].amr_any", "amr"),
        ("auth0", "amr_any: [otp]", "assurance.levels[1].amr_any", "never sent"),
        ("generic", f"acr: [{SIGNED_IN_ACR}]", "assurance.levels[1].acr", "only recorded"),
    ],
)
def test_check_refuses_levels_that_would_never_step_up(profile, levels, path, words) -> None:
    block = (
        "assurance:\n  levels:\n    - name: password\n      acr: [urn:okta:loa:1fa:any, "
        f"{SIGNED_IN_ACR}]\n    - name: mfa\n      {levels}\n"
    )
    if profile in ("entra", "generic"):
        block = block.replace("urn:okta:loa:1fa:any, ", "" if profile == "entra" else "x, ")
        if profile == "generic":
            block = block.replace(f", {SIGNED_IN_ACR}", "")
    with pytest.raises(ConfigError) as info:
        load_config_text(config_text(profile, block), "c.yaml", {})
    found = {p.key_path: p.message for p in info.value.problems}
    assert path in found, found
    assert words in found[path]
    assert f"oidc.profile: {profile}" in found[path]


def test_unknown_profile_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(config_text("azure"), "c.yaml", {})
    found = {p.key_path: p.message for p in info.value.problems}
    assert "unknown value 'azure'" in found["oidc.profile"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_names_what_the_profile_implies(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_text("entra", low="signed-in"))
    result = _cli("check", "--config", str(path))
    assert (result.returncode, result.stdout) == (
        0,
        "ok (profile entra: levels from acrs; asks with the claims parameter)\n",
    )


def test_explain_shows_the_step_up_request(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_text("entra", low="signed-in"))
    result = _cli("explain", "--config", str(path), "GET", "/transfers/1")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["rule"] == "transfers"
    assert answer["authorization"] == {
        "claims": '{"id_token":{"acrs":{"essential":true,"value":"c1"}}}',
        "prompt": "login",
    }
