"""``explain --token-claims``: how a token-bearing request would be judged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import explain, main
from gateway.config import load_config_text
from tests.test_api_config import API
from tests.test_config import BASE, edited

NOW = 1_800_000_000
TEXT = edited(("    require: none\n", "    require: none\n    credentials: session\n")) + API


def token(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "https://op.example.com",
        "sub": "alice",
        "aud": "https://bank.example.com/api",
        "client_id": "app",
        "iat": NOW - 10,
        "exp": NOW + 300,
        "acr": "loa2",
        "amr": ["pwd", "otp"],
        "auth_time": NOW - 60,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(
    ("method", "path", "claims", "scheme", "expected"),
    [
        ("POST", "/api/transfers/1", token(), "Bearer", {"decision": "allow", "level": "mfa"}),
        (
            "POST",
            "/api/transfers/1",
            token(auth_time=NOW - 600),
            "Bearer",
            {"decision": "challenge", "reason": "stale", "status": 401},
        ),
        (
            "POST",
            "/api/transfers/1",
            token(acr="loa1", amr=["pwd"]),
            "DPoP",
            {"decision": "challenge", "reason": "insufficient_level"},
        ),
        ("GET", "/x", token(aud="https://other"), "Bearer", {"reason": "aud"}),
        ("GET", "/x", token(exp=NOW - 3600), "Bearer", {"reason": "exp"}),
        ("GET", "/x", token(iss="https://evil"), "Bearer", {"reason": "iss"}),
        ("GET", "/public/a", token(), "Bearer", {"reason": "token_not_accepted"}),
    ],
)
def test_explain_judges_token_claims(
    method: str, path: str, claims: dict[str, Any], scheme: str, expected: dict[str, Any]
) -> None:
    config = load_config_text(TEXT, "c.yaml")
    result, status = explain(
        config, method, path, token_claims=claims, token_scheme=scheme, now=NOW
    )
    assert status == 0
    judged = result["token"]
    assert isinstance(judged, dict)
    assert {k: judged[k] for k in expected} == expected


def test_explain_challenge_is_the_rfc_9470_one() -> None:
    config = load_config_text(TEXT, "c.yaml")
    result, _ = explain(
        config,
        "POST",
        "/api/transfers/1",
        token_claims=token(acr="loa1", amr=["pwd"]),
        token_scheme="DPoP",
        now=NOW,
    )
    judged = result["token"]
    assert isinstance(judged, dict)
    assert judged["www_authenticate"] == (
        'DPoP algs="ES256 ES384 EdDSA PS256 RS256", error="insufficient_user_authentication", '
        "error_description=\"This action needs a sign-in at level 'mfa' within the last 5 min\", "
        'acr_values="loa2", max_age=300'
    )
    assert result["credentials"] == "any"


def test_explain_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(TEXT)
    claims = json.dumps(token(iat=int(time.time()), exp=int(time.time()) + 60, auth_time=None))
    code = main(["explain", "--config", str(path), "--token-claims", claims, "GET", "/x"])
    assert code == 0
    judged = json.loads(capsys.readouterr().out)["token"]
    assert judged == {"level": "mfa", "decision": "allow", "status": 200}
    # Without the api section, or with claims that are no object: usage errors.
    path.write_text(BASE)
    assert main(["explain", "--config", str(path), "--token-claims", claims, "GET", "/x"]) == 2
    path.write_text(TEXT)
    assert main(["explain", "--config", str(path), "--token-claims", "[1]", "GET", "/x"]) == 2


ENTRA = edited(
    ("  client_secret: s3cret\n", "  client_secret: s3cret\n  profile: entra\n"),
    ("    require: none\n", "    require: none\n    credentials: session\n"),
    ("    require: {level: password}", "    require: {level: signed-in}"),
)
ENTRA = ENTRA[: ENTRA.index("assurance:\n")] + ENTRA[ENTRA.index("rules:\n") :] + API


@pytest.mark.parametrize(
    ("text", "changes", "expected"),
    [
        # Entra puts the authentication contexts a sign-in met in access tokens' acrs
        # ("Access token claims reference"); the entra profile reads the level there.
        (ENTRA, {"acr": None, "acrs": ["c1"]}, {"decision": "allow", "level": "mfa"}),
        (ENTRA, {"acr": None, "acrs": ["c2", "c1"]}, {"level": "phishing-resistant"}),
        # No context met: no level at all. The "signed-in" stand-in the entra profile
        # gives an ID token is never given to an access token (an app-only token has
        # neither acr nor acrs, and proves no user's sign-in).
        (
            ENTRA,
            {"acr": None, "acrs": []},
            {"decision": "challenge", "reason": "insufficient_level", "level": None},
        ),
        # The generic profile reads acr only: acrs prove nothing there.
        (TEXT, {"acr": None, "amr": [], "acrs": ["c1"]}, {"level": None}),
        (ENTRA, {"acrs": "c1"}, {"decision": "invalid_token", "reason": "malformed (acrs)"}),
    ],
)
def test_a_profile_reads_the_level_from_access_tokens_as_from_id_tokens(
    text: str, changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    config = load_config_text(text, "c.yaml")
    claims = token(**changes)
    if changes.get("acr", "") is None:
        claims.pop("acr", None)
    result, status = explain(config, "POST", "/api/transfers/1", token_claims=claims, now=NOW)
    assert status == 0
    judged = result["token"]
    assert isinstance(judged, dict)
    assert {k: judged.get(k) for k in expected} == expected
