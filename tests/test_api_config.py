"""The ``api`` section, ``upstreams.NAME.pass_authorization`` and ``rules[].credentials``."""

from __future__ import annotations

import pytest

from gateway import model
from tests.test_config import BASE, edited, load, problems_of
from tests.test_config_schema import MAXIMAL, assert_not_stricter

API = """\
api:
  audience: https://bank.example.com/api
"""


def test_api_defaults() -> None:
    config = load(BASE + API)
    assert config.api == model.ApiConfig(audience="https://bank.example.com/api")
    assert config.api.tokens == ("jwt",) and config.api.dpop == "allowed"
    assert config.rules[0].credentials == "any"
    assert config.upstreams["app"].pass_authorization is False


def test_no_api_section_means_no_tokens() -> None:
    assert load(BASE).api is None


def test_api_every_key() -> None:
    text = BASE + (
        "api:\n"
        "  audience: https://bank.example.com/api\n"
        "  tokens: [jwt, introspection]\n"
        "  dpop: required\n"
        "  algorithms: [ES256]\n"
        "  dpop_algorithms: [ES256, EdDSA]\n"
        "  dpop_nonce: true\n"
        "  dpop_max_age: 2m\n"
        "  introspection_cache: 30s\n"
        "  cache_entries: 500\n"
    )
    api = load(text).api
    assert api == model.ApiConfig(
        audience="https://bank.example.com/api",
        tokens=("jwt", "introspection"),
        dpop="required",
        algorithms=("ES256",),
        dpop_algorithms=("ES256", "EdDSA"),
        dpop_nonce=True,
        dpop_max_age_s=120,
        introspection_cache_s=30,
        cache_entries=500,
    )


@pytest.mark.parametrize("written", ["off", "'off'", '"off"'])
def test_dpop_off_as_written(written: str) -> None:
    """YAML 1.1 reads an unquoted ``off`` as false; the key's value is its text."""
    api = load(BASE + API + f"  dpop: {written}\n").api
    assert api is not None and api.dpop == "off"


@pytest.mark.parametrize(
    ("section", "key_path", "fragment"),
    [
        ("api:\n  tokens: [jwt]\n", "api.audience", "required key is missing"),
        (API + "  tokens: [opaque]\n", "api.tokens[0]", "unknown value 'opaque'"),
        (API + "  tokens: []\n", "api.tokens", "must not be an empty list"),
        (API + "  dpop: maybe\n", "api.dpop", "unknown value 'maybe'"),
        (API + "  algorithms: [none]\n", "api.algorithms[0]", "'none'"),
        (API + "  algorithms: [HS256]\n", "api.algorithms[0]", "HMAC"),
        (API + "  dpop_algorithms: [HS256]\n", "api.dpop_algorithms[0]", "HMAC"),
        (API + "  dpop_max_age: 1h\n", "api.dpop_max_age", "between"),
        (API + "  introspection_cache: 1h\n", "api.introspection_cache", "between"),
        (API + "  dpop: off\n  dpop_nonce: true\n", "api.dpop_nonce", "needs dpop"),
        (API + "  audiences: x\n", "api.audiences", "unknown key"),
        (API + "  algorithms: [ES512]\n", "api.algorithms", "not in oidc.algorithms"),
    ],
)
def test_api_problems_name_the_key(section: str, key_path: str, fragment: str) -> None:
    problems = problems_of(BASE + section)
    assert any(p.key_path == key_path and fragment in p.message for p in problems), problems


def test_pass_authorization_per_upstream() -> None:
    text = edited(
        (
            "  app: http://127.0.0.1:9000\n",
            "  app: {url: 'http://127.0.0.1:9000', pass_authorization: true}\n",
        )
    )
    assert load(text + API).upstreams["app"].pass_authorization is True


def test_rule_credentials() -> None:
    text = edited(("    require: none\n", "    require: none\n    credentials: session\n"))
    config = load(text + API)
    assert config.rules[1].credentials == "session"


def test_rule_credentials_need_the_api_section() -> None:
    text = edited(("    require: none\n", "    require: none\n    credentials: token\n"))
    problems = problems_of(text)
    assert [(p.key_path, p.line) for p in problems] == [("rules[1].credentials", 28)]
    assert "needs the api section" in problems[0].message


def test_rule_credentials_unknown_value() -> None:
    text = edited(("    require: none\n", "    require: none\n    credentials: cookie\n"))
    problems = problems_of(text + API)
    assert problems[0].key_path == "rules[1].credentials"


@pytest.mark.parametrize("zero", ["0", "0s", "0h0m"])
def test_dpop_max_age_zero_the_schema_and_builders_say_alike(zero: str) -> None:
    """Found by the property test in tests/test_config_schema.py: the schema said
    "longer than 0 seconds", the builders "between 1s and 300s"."""
    text = MAXIMAL.replace("  dpop_max_age: 30s\n", f"  dpop_max_age: {zero}\n")
    assert text != MAXIMAL
    assert_not_stricter(text)
    problems = problems_of(text)
    assert [p.message for p in problems if p.key_path == "api.dpop_max_age"] == [
        "must be longer than 0 seconds"
    ]
