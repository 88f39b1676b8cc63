"""Config loading and validation (gateway.config): every problem, with its line and key path."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config as cfg
from gateway import model
from gateway.config import load_config, load_config_text, parse_duration_s
from gateway.errors import ConfigError, ConfigProblem

SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes

# Line numbers in the table below refer to this text.
BASE = """\
server:
  listen: 127.0.0.1:8080
  public_url: https://gw.example.com
upstreams:
  app: http://127.0.0.1:9000
oidc:
  issuer: https://op.example.com
  client_id: gateway
  client_secret: s3cret
session:
  secret: 0123456789abcdef0123456789abcdef
assurance:
  levels:
    - name: password
      acr: [loa1]
    - name: mfa
      acr: [loa2]
      amr_any: [otp]
    - name: phishing-resistant
      acr: [phr]
rules:
  - name: transfers
    match: {path: /api/transfers/**, methods: [POST]}
    require: {level: mfa, max_age: 5m}
  - name: public
    match: {path: /public/**}
    require: none
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


def edited(*replacements: tuple[str, str]) -> str:
    text = BASE
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def load(text: str, environ: dict[str, str] | None = None) -> model.Config:
    return load_config_text(text, "config.yaml", environ or {})


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    return info.value.problems


def test_base_config_is_valid() -> None:
    config = load(BASE)
    assert [rule.name for rule in config.rules] == ["transfers", "public", "signed-in"]
    assert config.source == "config.yaml"


def test_unknown_level_message_is_exact() -> None:
    text = edited(("{level: mfa, max_age: 5m}", "{level: phishing_resistant}"))
    assert [str(p) for p in problems_of(text)] == [
        "config.yaml:24 rules[0].require.level: unknown level 'phishing_resistant' "
        "(known: password, mfa, phishing-resistant)"
    ]


R0 = "    require: {level: mfa, max_age: 5m}"
M0 = "    match: {path: /api/transfers/**, methods: [POST]}"

BAD = [
    # (id, replacements, line, key path, part of the message)
    ("typo-key", [(R0, "    require: {level: mfa, max_agee: 5m}")], 24,
     "rules[0].require.max_agee", "unknown key 'max_agee' (did you mean 'max_age'?)"),
    ("typo-methods", [(M0, "    match: {path: /api/transfers/**, method: [POST]}")], 23,
     "rules[0].match.method", "did you mean 'methods'?"),
    ("typo-section", [("session:\n", "sesion:\n")], 10, "sesion", "did you mean 'session'?"),
    ("unknown-key-no-match", [(M0, "    match: {path: /a/**, xyzzy: 1}")], 23,
     "rules[0].match.xyzzy", "known: path, methods, host"),
    ("empty-methods", [(M0, "    match: {path: /api/transfers/**, methods: []}")], 23,
     "rules[0].match.methods", "must not be an empty list"),
    ("bad-method-token", [(M0, "    match: {path: /api/transfers/**, methods: ['PO ST']}")], 23,
     "rules[0].match.methods[0]", "invalid method 'PO ST'"),
    # A method is case-sensitive: "post" would never match a POST (a silent weakening).
    ("lower-case-method", [(M0, "    match: {path: /api/transfers/**, methods: [post, PUT]}")],
     23, "rules[0].match.methods[0]", "'post' must be upper case (did you mean 'POST'?)"),
    ("mixed-case-method", [(M0, "    match: {path: /api/transfers/**, methods: [PUT, Delete]}")],
     23, "rules[0].match.methods[1]", "'Delete' must be upper case (did you mean 'DELETE'?)"),
    ("unknown-method", [(M0, "    match: {path: /api/transfers/**, methods: [POTS]}")], 23,
     "rules[0].match.methods[0]", "unknown method 'POTS' (did you mean 'POST'?)"),
    # A host written as a URL or with a path never equals a Host header.
    ("host-with-scheme",
     [(M0, "    match: {path: /api/transfers/**, host: 'https://bank.example.com'}")], 23,
     "rules[0].match.host", "not a URL or a path: 'https://bank.example.com' "
     "(did you mean 'bank.example.com'?)"),
    ("host-with-path", [(M0, "    match: {path: /api/transfers/**, host: bank.example.com/api}")],
     23, "rules[0].match.host", "(did you mean 'bank.example.com'?)"),
    ("host-u-label", [(M0, "    match: {path: /api/transfers/**, host: bücher.example}")], 23,
     "rules[0].match.host", "(did you mean 'xn--bcher-kva.example'?)"),
    ("glob-without-slash", [(M0, "    match: {path: api/transfers/**}")], 23,
     "rules[0].match.path", "must start with '/'"),
    ("glob-with-semicolon", [(M0, "    match: {path: /api/transfers;x/**}")], 23,
     "rules[0].match.path", "can never match a request"),
    ("server-host-invalid",
     [("  public_url:", "  hosts: [bank.example.com, 'http://x']\n  public_url:")], 3,
     "server.hosts[1]", "not a URL or a path"),
    ("upstream-mapping-unknown-key",
     [("  app: http://127.0.0.1:9000", "  app: {url: http://127.0.0.1:9000, case_sensitive: 1}")],
     5, "upstreams.app.case_sensitive", "did you mean 'case_insensitive_paths'?"),
    ("upstream-mapping-no-url",
     [("  app: http://127.0.0.1:9000", "  app: {case_insensitive_paths: true}")],
     5, "upstreams.app.url", "required key is missing"),
    ("methods-not-list", [(M0, "    match: {path: /api/transfers/**, methods: POST}")], 23,
     "rules[0].match.methods", "expected a list (write [POST])"),
    ("duplicate-rule", [("  - name: public", "  - name: transfers")], 25,
     "rules[1].name", "duplicate rule name 'transfers' (also rules[0])"),
    ("duplicate-level", [("    - name: mfa", "    - name: password")], 16,
     "assurance.levels[1].name", "duplicate level name 'password'"),
    ("unknown-upstream", [("    require: none\n", "    require: none\n    upstream: ap\n")], 28,
     "rules[1].upstream", "unknown upstream 'ap' (did you mean 'app'?)"),
    ("upstream-omitted", [("  app: http://127.0.0.1:9000\n",
                           "  app: http://127.0.0.1:9000\n  admin: http://127.0.0.1:9001\n")], 23,
     "rules[0].upstream", "required when there are several upstreams (one of: app, admin)"),
    ("glob-double-star", [(M0, "    match: {path: /api/tr**/x}")], 23,
     "rules[0].match.path", "'**' must be a whole path segment"),
    ("glob-relative", [(M0, "    match: {path: api/**}")], 23,
     "rules[0].match.path", "must start with '/'"),
    ("duration-junk", [(R0, "    require: {level: mfa, max_age: soon}")], 24,
     "rules[0].require.max_age", "invalid duration 'soon'"),
    ("duration-negative", [(R0, "    require: {level: mfa, max_age: -5}")], 24,
     "rules[0].require.max_age", "invalid duration '-5'"),
    ("duration-unit", [(R0, "    require: {level: mfa, max_age: 5 minutes}")], 24,
     "rules[0].require.max_age", "invalid duration"),
    ("max-age-zero-several-workers", [(R0, "    require: {level: mfa, max_age: 0}"),
                                      ("gw.example.com\n", "gw.example.com\n  workers: 2\n")],
     25, "rules[0].require.max_age", "workers: 1"),
    ("max-age-without-level", [(R0, "    require: {max_age: 5m}")], 24,
     "rules[0].require.level", "max_age needs a level"),
    ("require-empty", [(R0, "    require: {}")], 24,
     "rules[0].require.level", "use require: none for no sign-in"),
    ("require-shorthand", [(R0, "    require: mfa")], 24,
     "rules[0].require", "expected 'none' or a mapping"),
    ("require-missing", [(R0 + "\n", "")], 22, "rules[0].require", "required key is missing"),
    ("once-several-workers", [(R0, "    require: {level: mfa, once: true}"),
                              ("gw.example.com\n", "gw.example.com\n  workers: 2\n")], 25,
     "rules[0].require.once", "require.once needs server.workers: 1 or a Redis"),
    ("once-not-bool", [(R0, "    require: {level: mfa, once: sometimes}")], 24,
     "rules[0].require.once", "expected true or false"),
    ("override-not-bool", [(R0, R0 + "\n    allow_method_override: 1")], 25,
     "rules[0].allow_method_override", "expected true or false"),
    ("bad-rule-name", [("  - name: public", "  - name: 'pub lic'")], 25,
     "rules[1].name", "invalid name 'pub lic'"),
    ("rule-host", [(M0, "    match: {path: /api/**, host: 'bad host'}")], 23,
     "rules[0].match.host", "invalid host 'bad host'"),
    ("unreachable",
     [("rules:\n", "rules:\n  - name: all\n    match: {path: /**}\n    require: none\n")],
     25, "rules[1]", "rule 'transfers' can never match: rules[0] 'all'"),
    ("unreachable-prefix", [(M0, "    match: {path: /api/**}"),
                            ("{path: /public/**}", "{path: /api/transfers/**}")], 25,
     "rules[1]", "rule 'public' can never match: rules[0] 'transfers' (path '/api/**')"),
    ("unreachable-exact-prefix", [(M0, "    match: {path: /api/**}"),
                                  ("{path: /public/**}", "{path: /api}")], 25,
     "rules[1]", "rule 'public' can never match"),
    ("unreachable-same-path", [("    match: {path: /public/**}", "    match: {path: /**}")], 28,
     "rules[2]", "rule 'signed-in' can never match: rules[1] 'public'"),
    ("empty-rules", [("rules:\n" + BASE.split("rules:\n")[1], "rules: []\n")], 21,
     "rules", "must not be an empty list"),
    ("listen-int", [("listen: 127.0.0.1:8080", "listen: 8080")], 2,
     "server.listen", "expected host:port"),
    ("listen-ipv6-brackets", [("listen: 127.0.0.1:8080", "listen: '::1:8080'")], 2,
     "server.listen", "put an IPv6 address in brackets"),
    ("listen-port-range", [("listen: 127.0.0.1:8080", "listen: 127.0.0.1:70000")], 2,
     "server.listen", "out of range"),
    ("public-url-query", [("https://gw.example.com", "https://gw.example.com/?a=1")], 3,
     "server.public_url", "must not have a query or fragment"),
    ("public-url-fragment", [("https://gw.example.com", "'https://gw.example.com#x'")], 3,
     "server.public_url", "must not have a query or fragment"),
    ("public-url-scheme", [("https://gw.example.com", "ftp://gw.example.com")], 3,
     "server.public_url", "must start with http:// or https://"),
    ("public-url-path", [("https://gw.example.com", "https://gw.example.com/app")], 3,
     "server.public_url", "must not have a path"),
    ("prefix-root", [("gw.example.com\n", "gw.example.com\n  internal_prefix: /\n")], 4,
     "server.internal_prefix", "must not be '/'"),
    ("prefix-relative", [("gw.example.com\n", "gw.example.com\n  internal_prefix: gw\n")], 4,
     "server.internal_prefix", "must start with '/'"),
    ("prefix-dots", [("gw.example.com\n", "gw.example.com\n  internal_prefix: /a/../b\n")], 4,
     "server.internal_prefix", "invalid prefix"),
    ("workers-zero", [("gw.example.com\n", "gw.example.com\n  workers: 0\n")], 4,
     "server.workers", "must be at least 1"),
    ("workers-string", [("gw.example.com\n", "gw.example.com\n  workers: many\n")], 4,
     "server.workers", "expected an integer"),
    ("log-level", [("gw.example.com\n", "gw.example.com\n  log_level: verbose\n")], 4,
     "server.log_level", "unknown value 'verbose'"),
    ("timeout-zero", [("gw.example.com\n", "gw.example.com\n  upstream_timeout: 0\n")], 4,
     "server.upstream_timeout", "must be longer than 0 seconds"),
    ("max-connections-zero",
     [("gw.example.com\n", "gw.example.com\n  max_connections: 0\n")], 4,
     "server.max_connections", "must be between 1 and 100000 (got 0)"),
    ("keepalive-requests-text",
     [("gw.example.com\n", "gw.example.com\n  keepalive_requests: many\n")], 4,
     "server.keepalive_requests", "expected an integer"),
    ("header-timeout-zero",
     [("gw.example.com\n", "gw.example.com\n  header_timeout: 0\n")], 4,
     "server.header_timeout", "must be longer than 0 seconds"),
    ("keepalive-max-age-junk",
     [("gw.example.com\n", "gw.example.com\n  keepalive_max_age: soon\n")], 4,
     "server.keepalive_max_age", "invalid duration 'soon'"),
    ("proxies-host-bits",
     [("gw.example.com\n", "gw.example.com\n  trusted_proxies: [10.1.2.3/8]\n")], 4,
     "server.trusted_proxies[0]", "did you mean 10.0.0.0/8?"),
    ("proxies-junk", [("gw.example.com\n", "gw.example.com\n  trusted_proxies: [lan]\n")], 4,
     "server.trusted_proxies[0]", "not an IP network"),
    ("upstreams-list", [("  app: http://127.0.0.1:9000", "  - http://127.0.0.1:9000")], 5,
     "upstreams", "expected a mapping, got a list"),
    ("upstream-url", [("http://127.0.0.1:9000", "127.0.0.1:9000")], 5,
     "upstreams.app", "must start with http:// or https://"),
    ("upstream-userinfo", [("http://127.0.0.1:9000", "http://u:p@127.0.0.1:9000")], 5,
     "upstreams.app", "must not contain a user name or password"),
    ("issuer-missing", [("  issuer: https://op.example.com\n", "")], 7,
     "oidc.issuer", "required key is missing"),
    ("client-id-null", [("client_id: gateway", "client_id:")], 8,
     "oidc.client_id", "got no value"),
    ("secret-both",
     [("client_secret: s3cret", "client_secret: s3cret\n  client_secret_file: x")], 10,
     "oidc.client_secret_file", "not both"),
    ("scopes-openid", [("client_secret: s3cret", "client_secret: s3cret\n  scopes: [email]")], 10,
     "oidc.scopes", "must include 'openid'"),
    ("client-auth", [("client_secret: s3cret", "client_secret: s3cret\n  client_auth: basic")], 10,
     "oidc.client_auth", "unknown value 'basic' (known: client_secret_basic, client_secret_post)"),
    ("email-verified-not-bool",
     [("client_secret: s3cret", "client_secret: s3cret\n  assume_email_verified: yes please")],
     10, "oidc.assume_email_verified", "expected true or false"),
    ("alg-none", [("client_secret: s3cret", "client_secret: s3cret\n  algorithms: [RS256, none]")],
     10, "oidc.algorithms[1]", "'none' would accept unsigned id tokens"),
    ("alg-hmac", [("client_secret: s3cret", "client_secret: s3cret\n  algorithms: [HS256]")], 10,
     "oidc.algorithms[0]", "'HS256' is refused"),
    ("alg-unknown", [("client_secret: s3cret", "client_secret: s3cret\n  algorithms: [RS257]")], 10,
     "oidc.algorithms[0]", "unknown algorithm 'RS257'"),
    ("clock-skew", [("client_secret: s3cret", "client_secret: s3cret\n  clock_skew: 1h")], 10,
     "oidc.clock_skew", "too long"),
    ("secret-short", [("secret: " + SECRET, "secret: short")], 11,
     "session.secret", "is 5 bytes; at least 32 are needed"),
    ("secret-list-short", [("secret: " + SECRET, f"secret: [{SECRET}, short]")], 11,
     "session.secret[1]", "is 5 bytes"),
    ("secret-missing", [("  secret: " + SECRET, "  store: cookie")], 11,
     "session.secret", "required key is missing (or secret_file)"),
    ("store-typo", [(SECRET + "\n", SECRET + "\n  store: redsi\n")], 12,
     "session.store", "unknown value 'redsi' (did you mean 'redis'?)"),
    ("redis-without-url", [(SECRET + "\n", SECRET + "\n  store: redis\n")], 12,
     "session.redis_url", "required with store: redis"),
    ("redis-url-scheme", [(SECRET + "\n", SECRET + "\n  redis_url: http://r\n")], 12,
     "session.redis_url", "must start with redis://"),
    ("cookie-name", [(SECRET + "\n", SECRET + "\n  cookie_name: __Host-s\n")], 12,
     "session.cookie_name", "leave out the __Host- prefix"),
    ("idle-zero", [(SECRET + "\n", SECRET + "\n  idle_timeout: 0s\n")], 12,
     "session.idle_timeout", "must be longer than 0 seconds"),
    ("cookie-secure-http-default", [("https://gw.example.com", "http://gw.example.com")], 11,
     "session.cookie_secure", "is true (the default) but server.public_url is plain http"),
    ("cookie-secure-http", [("https://gw.example.com", "http://gw.example.com"),
                            (SECRET + "\n", SECRET + "\n  cookie_secure: yes\n")], 12,
     "session.cookie_secure", "browsers never send Secure cookies over http"),
    ("level-without-acr", [("      acr: [phr]\n", "")], 19,
     "assurance.levels[2]", "a level needs acr or amr_any"),
    ("level-empty-acr", [("      acr: [phr]", "      acr: []")], 20,
     "assurance.levels[2].acr", "must not be an empty list"),
    ("level-bad-name", [("    - name: mfa", "    - name: m f a")], 16,
     "assurance.levels[1].name", "invalid name 'm f a'"),
    ("levels-missing", [("  levels:\n", "  levelz:\n")], 13,
     "assurance.levelz", "did you mean 'levels'?"),
    ("assertion-ttl", [("rules:\n", "assertion: {ttl: 2m}\nrules:\n")], 21,
     "assertion.ttl", "at most 60s (got 120s)"),
    ("assertion-prefix", [("rules:\n", "assertion: {header_prefix: 'X Auth'}\nrules:\n")], 21,
     "assertion.header_prefix", "invalid header name prefix"),
    ("duplicate-key", [("  client_id: gateway\n", "  client_id: gateway\n  client_id: other\n")], 9,
     "oidc.client_id", "duplicate key (first given on line 8)"),
    ("section-scalar", [("session:\n  secret: " + SECRET, "session: " + SECRET)], 10,
     "session", "expected a mapping"),
    ("yaml-tag", [("client_id: gateway", "client_id: !custom gateway")], 8,
     "oidc.client_id", "unsupported YAML tag '!custom'"),
    ("missing-env", [("client_secret: s3cret", "client_secret: ${OIDC_SECRET}")], 9,
     "oidc.client_secret", "environment variable OIDC_SECRET not set"),
    ("malformed-env", [("client_secret: s3cret", "client_secret: ${OIDC SECRET}")], 9,
     "oidc.client_secret", "malformed ${...}: write ${NAME}"),
    ("unclosed-env", [("client_secret: s3cret", "client_secret: ab${OIDC")], 9,
     "oidc.client_secret", "malformed ${...}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("replacements", "line", "key_path", "fragment"),
    [pytest.param(r, line, key, frag, id=case_id) for case_id, r, line, key, frag in BAD],
)
def test_bad_config_names_line_and_key(
    replacements: list[tuple[str, str]], line: int, key_path: str, fragment: str
) -> None:
    problems = problems_of(edited(*replacements))
    matching = [p for p in problems if p.key_path == key_path and fragment in p.message]
    assert matching, [str(p) for p in problems]
    assert matching[0].line == line, str(matching[0])
    assert str(matching[0]).startswith(f"config.yaml:{line} {key_path}: ")


def test_every_problem_is_reported_at_once() -> None:
    text = edited(
        ("listen: 127.0.0.1:8080", "listen: nowhere"),
        ("client_id: gateway", "client_id: [gateway]"),
        ("secret: " + SECRET, "secret: short"),
        (R0, "    require: {level: mfa, max_age: 5 min}"),
        ("  - name: public", "  - name: signed-in"),
    )
    problems = problems_of(text)
    assert [(p.line, p.key_path) for p in problems] == [
        (2, "server.listen"),
        (8, "oidc.client_id"),
        (11, "session.secret"),
        (24, "rules[0].require.max_age"),
        (28, "rules[2].name"),
    ]


def test_several_problems_in_one_rule() -> None:
    text = edited((R0, "    require: {level: gold, max_age: never, once: sometimes}"))
    keys = sorted(p.key_path for p in problems_of(text))
    assert keys == [
        "rules[0].require.level",
        "rules[0].require.max_age",
        "rules[0].require.once",
    ]


@pytest.mark.parametrize(
    ("text", "line", "key_path", "fragment"),
    [
        ("server: [\n", 2, "yaml", "invalid YAML"),
        ("server:\n  listen: a\n listen: b\n", 3, "yaml", "invalid YAML"),
        ("a: 1\n---\nb: 2\n", 2, "yaml", "invalid YAML"),
        ("server:\n  listen: \x00\n", 2, "yaml", "is not allowed"),
        ("", 1, "(top level)", "the file is empty"),
        ("# only a comment\n", 1, "(top level)", "the file is empty"),
        ("- server\n", 1, "(top level)", "expected a mapping"),
        ("just a string\n", 1, "(top level)", "expected a mapping"),
        ("? [a]\n: 1\n", 1, "(top level)", "keys must be plain strings"),
        ("a: &x [*x]\n" + BASE, 1, "a", "unknown key"),
        ("[" * 5000, None, "yaml", "invalid YAML"),
    ],
)
def test_yaml_level_problems(text: str, line: int | None, key_path: str, fragment: str) -> None:
    problems = problems_of(text)
    assert problems[0].key_path == key_path
    assert fragment in problems[0].message
    assert problems[0].line == line


def test_missing_sections_are_each_reported() -> None:
    problems = problems_of("server:\n  listen: 127.0.0.1:8080\n  public_url: https://gw.example\n")
    assert [p.key_path for p in problems] == [
        "upstreams",
        "oidc",
        "session",
        "assurance",
        "rules",
    ]
    assert all(p.message == "required section is missing" for p in problems)


def test_file_not_found(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert [str(p) for p in info.value.problems] == [f"{missing} (file): file not found"]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "not UTF-8" in info.value.problems[0].message


# --- environment interpolation --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${ID}", {"ID": "from-env"}, "from-env"),
        ("${ID:-fallback}", {}, "fallback"),
        ("${ID:-fallback}", {"ID": ""}, "fallback"),  # as in sh and docker compose
        ("${ID:-fallback}", {"ID": "set"}, "set"),
        ("pre-${A}-${B}-post", {"A": "1", "B": "2"}, "pre-1-2-post"),
        ("'$${ID}'", {"ID": "x"}, "${ID}"),
        ("'$$x'", {}, "$$x"),
        ("'${ID:-a:b}'", {}, "a:b"),
        ("'${ID}'", {"ID": "${NOT_EXPANDED}"}, "${NOT_EXPANDED}"),
    ],
)
def test_interpolation(value: str, environ: dict[str, str], expected: str) -> None:
    config = load(edited(("client_id: gateway", f"client_id: {value}")), environ)
    assert config.oidc.client_id == expected


def test_interpolated_plain_scalar_takes_its_type_quoted_stays_string() -> None:
    text = edited(("gw.example.com\n", "gw.example.com\n  workers: ${WORKERS:-3}\n"))
    assert load(text).server.workers == 3
    assert load(text, {"WORKERS": "2"}).server.workers == 2
    quoted = edited(("gw.example.com\n", "gw.example.com\n  workers: '${WORKERS}'\n"))
    [problem] = problems_of(quoted, {"WORKERS": "2"})
    assert (problem.key_path, problem.message) == ("server.workers", "expected an integer")
    boolean = edited((SECRET + "\n", SECRET + "\n  cookie_secure: ${SECURE:-false}\n"))
    assert load(boolean).session.cookie_secure is False


def test_missing_variables_are_all_named_once() -> None:
    text = edited(("client_secret: s3cret", "client_secret: ${A}${B}"))
    [problem] = problems_of(text)
    assert problem.message == "environment variables A, B not set (and no default)"


def test_secret_values_never_appear_in_problems() -> None:
    short_secret = "hunter2-tooshort"
    environ = {"SESSION_SECRET": short_secret, "CLIENT_SECRET": "client-secret-value"}
    text = edited(
        ("secret: " + SECRET, "secret: ['${SESSION_SECRET}', hunter2]"),
        ("client_secret: s3cret", "client_secret_file: ${CLIENT_SECRET}/nope"),
        ("https://gw.example.com", "http://gw.example.com"),  # another problem, in another key
    )
    problems = problems_of(text, environ)
    assert {p.key_path for p in problems} == {
        "session.secret[0]",
        "session.secret[1]",
        "oidc.client_secret_file",
        "session.cookie_secure",
    }
    output = "\n".join(str(p) for p in problems)
    assert short_secret not in output
    assert "hunter2" not in output


# --- values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("300", 300),
        ("90s", 90),
        ("5m", 300),
        ("12h", 43200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("", None),
        ("5", 5),
        ("-5", None),
        ("5 m", None),
        ("5M", None),
        ("1.5h", None),
        ("m", None),
        ("5ms", None),
        ("٣", None),  # a non-ASCII digit is not a duration
    ],
)
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert parse_duration_s(text) == seconds


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_parse_duration_sums_units(d: int, h: int, m: int, s: int) -> None:
    assert parse_duration_s(f"{d}d{h}h{m}m{s}s") == ((d * 24 + h) * 60 + m) * 60 + s
    assert parse_duration_s(str(s)) == s


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("90", 90), ("'90'", 90), ("90s", 90), ("5m", 300), ("1d", 86400), ("1", 1)],
)
def test_max_age_values(written: str, seconds: int) -> None:
    config = load(edited((R0, f"    require: {{level: mfa, max_age: {written}}}")))
    assert config.rules[0].require == model.Requirement("mfa", max_age_s=seconds)


@pytest.mark.parametrize("written", ["0", "0s", "'0'"])
def test_max_age_zero_is_a_new_sign_in_for_every_request(written: str) -> None:
    # Freshness is measured without leeway, so "proven 0 s ago" can only mean a
    # one-time rule: each request asks for, and consumes, a sign-in of its own.
    config = load(edited((R0, f"    require: {{level: mfa, max_age: {written}}}")))
    assert config.rules[0].require == model.Requirement("mfa", max_age_s=None, once=True)


def test_connection_limits_and_the_pool_sized_from_them() -> None:
    text = edited(
        ("gw.example.com\n", "gw.example.com\n  max_connections: 200\n  keepalive_max_age: 1m\n")
    )
    config = load(text)
    assert (config.server.max_connections, config.server.keepalive_max_age_s) == (200, 60.0)
    assert config.session.redis_pool_size == 50  # a quarter of max_connections
    text = edited(
        ("0123456789abcdef\n", "0123456789abcdef\n  redis_pool_size: 7\n  redis_pool_timeout: 2s\n")
    )
    assert (load(text).session.redis_pool_size, load(text).session.redis_pool_timeout_s) == (7, 2.0)


def test_fractional_timeouts_are_kept() -> None:
    text = edited(("gw.example.com\n", "gw.example.com\n  upstream_timeout: 2.5\n"))
    assert load(text).server.upstream_timeout_s == 2.5


def test_secret_rotation_list_first_writes() -> None:
    old = "o" * 40
    text = edited(("secret: " + SECRET, f"secret: [{SECRET}, {old}]"))
    assert load(text).session.secrets == (SECRET.encode(), old.encode())


def test_secret_file_relative_to_config_dir(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "session").write_text(f"{SECRET}\n\n{'o' * 32}\n")
    (tmp_path / "secrets" / "client").write_text("client-secret\n")
    text = edited(
        ("secret: " + SECRET, "secret_file: secrets/session"),
        ("client_secret: s3cret", "client_secret_file: secrets/client"),
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    config = load_config(str(path), environ={})
    assert config.session.secrets == (SECRET.encode(), b"o" * 32)
    assert config.oidc.client_secret == "client-secret"
    assert config.source == str(path)


def test_unreadable_secret_file_is_a_problem(tmp_path: Path) -> None:
    text = edited(("secret: " + SECRET, "secret_file: missing"))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml", {}, base_dir=str(tmp_path))
    [problem] = info.value.problems
    assert problem.key_path == "session.secret_file"
    assert problem.line == 11
    assert problem.message == f"cannot read {tmp_path / 'missing'}: No such file or directory"


def test_defaults() -> None:
    config = load(BASE)
    assert config.server == model.ServerConfig(
        listen_host="127.0.0.1", listen_port=8080, public_url="https://gw.example.com"
    )
    assert config.oidc == model.OidcConfig(
        issuer="https://op.example.com", client_id="gateway", client_secret="s3cret"
    )
    assert config.session == model.SessionConfig(secrets=(SECRET.encode(),))
    assert config.assertion == model.AssertionConfig()
    assert config.rules[1].require == model.Requirement(level=None)
    assert config.rules[0].upstream == "app"  # the only upstream
    assert config.rules[2].match == model.Match(path="/**")


@pytest.mark.parametrize(
    ("dataclass", "defaults"),
    [
        (
            model.ServerConfig,
            {
                "internal_prefix": cfg.DEFAULT_INTERNAL_PREFIX,
                "shutdown_timeout_s": cfg.DEFAULT_SHUTDOWN_TIMEOUT_S,
                "trusted_proxies": cfg.DEFAULT_TRUSTED_PROXIES,
                "workers": cfg.DEFAULT_WORKERS,
                "upstream_connect_timeout_s": cfg.DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S,
                "upstream_timeout_s": cfg.DEFAULT_UPSTREAM_TIMEOUT_S,
                "access_log": cfg.DEFAULT_ACCESS_LOG,
                "log_level": cfg.DEFAULT_LOG_LEVEL,
                "max_connections": cfg.DEFAULT_MAX_CONNECTIONS,
                "header_timeout_s": cfg.DEFAULT_HEADER_TIMEOUT_S,
                "body_timeout_s": cfg.DEFAULT_BODY_TIMEOUT_S,
                "keepalive_timeout_s": cfg.DEFAULT_KEEPALIVE_TIMEOUT_S,
                "keepalive_requests": cfg.DEFAULT_KEEPALIVE_REQUESTS,
                "keepalive_max_age_s": cfg.DEFAULT_KEEPALIVE_MAX_AGE_S,
            },
        ),
        (
            model.OidcConfig,
            {
                "scopes": cfg.DEFAULT_SCOPES,
                "client_auth": cfg.DEFAULT_CLIENT_AUTH,
                "essential_acr": cfg.DEFAULT_ESSENTIAL_ACR,
                "assume_email_verified": cfg.DEFAULT_ASSUME_EMAIL_VERIFIED,
                "clock_skew_s": cfg.DEFAULT_CLOCK_SKEW_S,
                "algorithms": cfg.DEFAULT_ALGORITHMS,
                "http_timeout_s": cfg.DEFAULT_HTTP_TIMEOUT_S,
            },
        ),
        (
            model.SessionConfig,
            {
                "store": cfg.DEFAULT_STORE,
                "cookie_secure": cfg.DEFAULT_COOKIE_SECURE,
                "cookie_name": cfg.DEFAULT_COOKIE_NAME,
                "idle_timeout_s": cfg.DEFAULT_IDLE_TIMEOUT_S,
                "lifetime_s": cfg.DEFAULT_LIFETIME_S,
                "transaction_ttl_s": cfg.DEFAULT_TRANSACTION_TTL_S,
                "redis_pool_size": cfg.DEFAULT_MAX_CONNECTIONS // cfg.REDIS_POOL_SHARE,
                "redis_pool_timeout_s": cfg.DEFAULT_REDIS_POOL_TIMEOUT_S,
            },
        ),
        (
            model.AssertionConfig,
            {"ttl_s": cfg.DEFAULT_ASSERTION_TTL_S, "header_prefix": cfg.DEFAULT_HEADER_PREFIX},
        ),
    ],
)
def test_documented_defaults_match_the_model(dataclass: type, defaults: dict[str, object]) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(dataclass)}
    for name, value in defaults.items():
        assert fields[name] == value, name


def test_full_config_values() -> None:
    text = """\
server:
  listen: '[::1]:8443'
  public_url: https://Gw.Example.com/
  internal_prefix: /auth/
  metrics_listen: 0.0.0.0:9090
  shutdown_timeout: 1m
  trusted_proxies: [10.0.0.0/8, '::1']
  workers: 4
  upstream_connect_timeout: 2s
  upstream_timeout: 2m
  access_log: false
  log_level: debug
upstreams:
  app: http://127.0.0.1:9000/base/
  admin: https://admin.internal
oidc:
  issuer: https://tenant.eu.auth0.com/
  client_id: 1234
  client_secret: s
  scopes: [openid, email]
  client_auth: client_secret_post
  essential_acr: true
  assume_email_verified: true
  clock_skew: 30s
  algorithms: [ES256]
  http_timeout: 3s
session:
  secret: 0123456789abcdef0123456789abcdef
  store: redis
  redis_url: rediss://:pw@redis:6380/1
  cookie_secure: true
  cookie_name: sid
  idle_timeout: 10m
  lifetime: 1d
  transaction_ttl: 5m
defaults: &strong {level: strong, max_age: 1m}
"""
    # "defaults" is not a key: anchors must live inside known keys.
    problems = problems_of(text + "assurance: {levels: []}\nrules: []\n")
    assert problems[0].key_path == "defaults"
    text = text.replace("defaults: &strong {level: strong, max_age: 1m}\n", "")
    text += """\
assurance:
  levels:
    - {name: basic, acr: [1, 0.5]}
    - {name: strong, amr_any: [hwk]}
rules:
  - name: admin
    match: {path: /admin/**, host: ADMIN.example.com.:443, methods: [GET, PROPFIND]}
    require: &strong {level: strong, max_age: 1m}
    upstream: admin
    allow_method_override: true
  - name: app
    match: {path: /**}
    require: *strong
    upstream: app
"""
    config = load(text)
    assert config.server == model.ServerConfig(
        listen_host="::1",
        listen_port=8443,
        public_url="https://Gw.Example.com",
        internal_prefix="/auth",
        metrics_listen=("0.0.0.0", 9090),
        shutdown_timeout_s=60.0,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")),
        workers=4,
        upstream_connect_timeout_s=2.0,
        upstream_timeout_s=120.0,
        access_log=False,
        log_level="debug",
    )
    assert config.upstreams == {
        "app": model.UpstreamConfig("app", "http://127.0.0.1:9000/base"),
        "admin": model.UpstreamConfig("admin", "https://admin.internal"),
    }
    assert config.oidc == model.OidcConfig(
        issuer="https://tenant.eu.auth0.com/",  # kept exactly: compared with iss
        client_id="1234",
        client_secret="s",
        scopes=("openid", "email"),
        client_auth="client_secret_post",
        essential_acr=True,
        assume_email_verified=True,
        clock_skew_s=30,
        algorithms=("ES256",),
        http_timeout_s=3.0,
    )
    assert config.session == model.SessionConfig(
        secrets=(SECRET.encode(),),
        store="redis",
        redis_url="rediss://:pw@redis:6380/1",
        cookie_secure=True,
        cookie_name="sid",
        idle_timeout_s=600,
        lifetime_s=86400,
        transaction_ttl_s=300,
    )
    assert config.assurance.levels == (
        model.Level("basic", 0, acr=("1", "0.5")),  # numbers kept as written
        model.Level("strong", 1, amr_any=("hwk",)),
    )
    admin, app = config.rules
    assert admin.match == model.Match(
        path="/admin/**", methods=frozenset({"GET", "PROPFIND"}), host="admin.example.com"
    )
    assert admin.allow_method_override is True
    assert admin.require == app.require == model.Requirement("strong", max_age_s=60)
    assert (admin.index, app.index) == (0, 1)


def test_merge_keys() -> None:
    text = edited(
        (
            M0 + "\n" + R0,
            M0 + "\n    require:\n      <<: {level: password, max_age: 1m}\n      level: mfa",
        ),
    )
    assert load(text).rules[0].require == model.Requirement("mfa", max_age_s=60)
    bad = edited((M0 + "\n" + R0, M0 + "\n    require:\n      <<: {level: mfa, maxage: 1m}"))
    [problem] = problems_of(bad)
    assert problem.key_path == "rules[0].require.maxage"


def test_cookie_secure_with_plain_http_on_loopback_is_allowed() -> None:
    # Browsers treat http://localhost and 127.0.0.1 as secure contexts (the contract's example).
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        assert load(edited(("https://gw.example.com", url))).session.cookie_secure is True


def test_store_redis_is_accepted() -> None:
    text = edited((SECRET + "\n", SECRET + "\n  store: redis\n  redis_url: redis://r:6379/0\n"))
    assert load(text).session.store == "redis"


# --- never anything but ConfigError ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        load(text)
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, ConfigProblem) and str(p) for p in exc.problems)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_config_raises_only_config_error(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(BASE) - 1))
    length = data.draw(st.integers(0, 20))
    insert = data.draw(st.text(alphabet="{}[]:-, \n'\"&*!|>#%$@`?~0a1.", max_size=8))
    text = BASE[:position] + insert + BASE[position + length :]
    try:
        load(text, {"X": "y"})
    except ConfigError as exc:
        assert exc.problems


# --- unreachable rules: the indexed check finds exactly what a full scan finds ---------

_REACH_PATHS = ("/**", "/a", "/a/**", "/a/b", "/a/b/**", "/b/**", "/a*/**", "/a/*", "/a/")
_REACH_HOSTS = (None, "a.example.com", "b.example.com")
_REACH_METHODS = (None, ("GET",), ("GET", "POST"), ("POST",))


def _covers_by_scan(
    rule: tuple[str, str | None, tuple[str, ...] | None],
    before: tuple[str, str | None, tuple[str, ...] | None],
) -> bool:
    (path, host, methods), (b_path, b_host, b_methods) = rule, before
    if b_host is not None and b_host != host:
        return False
    if b_methods is not None and (methods is None or not set(methods) <= set(b_methods)):
        return False
    return b_path == path or (
        b_path.endswith("/**") and (path.startswith(b_path[:-2]) or path == b_path[:-3])
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_REACH_PATHS),
            st.sampled_from(_REACH_HOSTS),
            st.sampled_from(_REACH_METHODS),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_unreachable_rules_match_a_full_scan(
    rules: list[tuple[str, str | None, tuple[str, ...] | None]],
) -> None:
    lines = ["rules:"]
    for i, (path, host, methods) in enumerate(rules):
        match = f"path: '{path}'"
        if host is not None:
            match += f", host: {host}"
        if methods is not None:
            match += f", methods: [{', '.join(methods)}]"
        lines += [f"  - name: r{i}", f"    match: {{{match}}}", "    require: none"]
    text = BASE.split("rules:\n")[0] + "\n".join(lines) + "\n"
    expected = []
    for j, rule in enumerate(rules):
        first = next((i for i in range(j) if _covers_by_scan(rule, rules[i])), None)
        if first is not None:
            expected.append(f"rule 'r{j}' can never match: rules[{first}] 'r{first}'")
    try:
        load(text)
        found: list[str] = []
    except ConfigError as exc:
        found = [p.message.split(" (path")[0] for p in exc.problems]
    assert found == expected


# --- transactional step-up: when, risk, bind, once, upstream_challenge, step_up -------

W0 = R0 + "\n    when: amount > 1000"  # rules[0].when is on line 25


def test_step_up_keys_load() -> None:
    text = edited(
        ("gw.example.com\n", "gw.example.com\n"),
        (
            R0,
            "    require: {level: mfa, max_age: 5m, once: true, bind: [amount, beneficiary.iban]}\n"
            "    when: {any: ['amount > 1000', 'client_ip not in [10.0.0.0/8]']}\n"
            "    risk: {url: 'https://risk.internal/score', timeout: 0.5, on_error: deny, "
            "cache: 2m}\n"
            "    upstream_challenge: true",
        ),
    )
    text += "step_up:\n  max_body: 512KiB\n  authorization_details_type: urn:example:transfer\n"
    config = load(text)
    transfers = config.rules[0]
    assert transfers.require == model.Requirement(
        "mfa", max_age_s=300, once=True, bind=("amount", "beneficiary.iban")
    )
    assert transfers.when.describe() == {"any": ["amount > 1000", "client_ip not in [10.0.0.0/8]"]}
    assert transfers.risk == model.RiskConfig(
        url="https://risk.internal/score", timeout_s=0.5, on_error="deny", cache_s=120
    )
    assert transfers.upstream_challenge is True
    assert config.step_up == model.StepUpConfig(
        max_body_bytes=512 * 1024, authorization_details_type="urn:example:transfer"
    )


def test_step_up_defaults() -> None:
    config = load(edited((R0, R0 + "\n    risk: {url: 'http://127.0.0.1:7000/risk'}")))
    transfers, public, _ = config.rules
    assert transfers.risk == model.RiskConfig(url="http://127.0.0.1:7000/risk")
    assert transfers.when is None
    assert transfers.upstream_challenge is False
    assert transfers.require.bind == ()
    assert (public.risk, public.when) == (None, None)
    assert config.step_up == model.StepUpConfig()


@pytest.mark.parametrize(
    ("dataclass", "defaults"),
    [
        (
            model.RiskConfig,
            {
                "timeout_s": cfg.DEFAULT_RISK_TIMEOUT_S,
                "on_error": cfg.DEFAULT_RISK_ON_ERROR,
                "cache_s": cfg.DEFAULT_RISK_CACHE_S,
            },
        ),
        (
            model.StepUpConfig,
            {
                "max_body_bytes": cfg.DEFAULT_MAX_BODY_BYTES,
                "authorization_details_type": cfg.DEFAULT_AUTHORIZATION_DETAILS_TYPE,
                "keep_budget_bytes": cfg.DEFAULT_KEEP_BUDGET_BYTES,
                "keep_per_client": cfg.DEFAULT_KEEP_PER_CLIENT,
            },
        ),
    ],
)
def test_step_up_defaults_match_the_model(dataclass: type, defaults: dict[str, object]) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(dataclass)}
    for name, value in defaults.items():
        assert fields[name] == value, name


@pytest.mark.parametrize(
    ("when_yaml", "described"),
    [
        ("amount > 1000", "amount > 1000"),
        ("'currency == \"EUR\"'", 'currency == "EUR"'),
        ("[amount > 1000, currency == EUR]", ["amount > 1000", "currency == EUR"]),
        ("\n      - amount > 1000\n      - auth_age > 10m", ["amount > 1000", "auth_age > 10m"]),
        ("{all: [client_ip_changed, {any: ['a == 1', 'b == 2']}]}",
         {"all": ["client_ip_changed", {"any": ["a == 1", "b == 2"]}]}),
        ("'client_ip in [2001:db8::/32, 192.168.0.0/16]'",
         "client_ip in [2001:db8::/32, 192.168.0.0/16]"),
    ],
)  # fmt: skip
def test_when_forms(when_yaml: str, described: object) -> None:
    config = load(edited((R0, R0 + "\n    when: " + when_yaml)))
    assert config.rules[0].when.describe() == described


def test_when_is_interpolated() -> None:
    text = edited((R0, R0 + "\n    when: amount > ${LIMIT:-1000}"))
    assert load(text).rules[0].when.describe() == "amount > 1000"
    assert load(text, {"LIMIT": "250.50"}).rules[0].when.describe() == "amount > 250.50"


WHEN_BAD = [
    # (id, replacement for R0, line, key path, part of the message)
    ("when-syntax", W0.replace("> 1000", ">"), 25, "rules[0].when", "a value is missing after >"),
    ("when-not-number", W0.replace("1000", "lots"), 25, "rules[0].when", "> needs a number"),
    ("when-list-item", R0 + "\n    when:\n      - amount > 1000\n      - amount >> 5", 27,
     "rules[0].when[1]", "expected a value after >, got '>'"),
    ("when-any-item", R0 + "\n    when:\n      any:\n        - a == 1\n        - a = 2", 28,
     "rules[0].when.any[1]", "use == to compare"),
    ("when-mapping-key", R0 + "\n    when: {either: [a == 1]}", 25, "rules[0].when",
     "exactly one key, any or all (got 'either')"),
    ("when-empty-list", R0 + "\n    when: []", 25, "rules[0].when", "an empty list"),
    ("when-null", R0 + "\n    when:", 25, "rules[0].when", "got no value"),
    ("when-not", R0 + "\n    when: not client_ip_changed", 25, "rules[0].when",
     "there is no 'not'"),
    ("when-cidr", R0 + "\n    when: client_ip in [10.1.0.0/8]", 25, "rules[0].when",
     "did you mean 10.0.0.0/8?"),
    ("when-auth-age", R0 + "\n    when: auth_age > soon", 25, "rules[0].when",
     "auth_age needs a duration"),
    ("when-on-none", "    require: none\n    when: amount > 1000", 25, "rules[0].when",
     "a rule with when must require a level"),
    ("bind-not-list", "    require: {level: mfa, bind: amount}", 24, "rules[0].require.bind",
     "expected a list (write [amount])"),
    ("bind-bad-name", "    require: {level: mfa, bind: [amount, 'pay ee']}", 24,
     "rules[0].require.bind[1]", "invalid field name 'pay ee'"),
    ("bind-twice", "    require: {level: mfa, bind: [amount, amount]}", 24,
     "rules[0].require.bind[1]", "'amount' is listed twice"),
    ("bind-empty", "    require: {level: mfa, bind: []}", 24, "rules[0].require.bind",
     "must not be an empty list"),
    ("bind-no-level", "    require: {bind: [amount]}", 24, "rules[0].require.level",
     "required key is missing"),
    ("risk-url", R0 + "\n    risk: {url: 'ftp://risk'}", 25, "rules[0].risk.url",
     "risk URL must start with http:// or https://"),
    ("risk-url-missing", R0 + "\n    risk: {timeout: 1s}", 25, "rules[0].risk.url",
     "required key is missing"),
    ("risk-timeout", R0 + "\n    risk: {url: 'http://r', timeout: 30s}", 25,
     "rules[0].risk.timeout", "at most 10s (got 30s)"),
    ("risk-timeout-zero", R0 + "\n    risk: {url: 'http://r', timeout: 0}", 25,
     "rules[0].risk.timeout", "must be longer than 0 seconds"),
    ("risk-on-error", R0 + "\n    risk: {url: 'http://r', on_error: allow}", 25,
     "rules[0].risk.on_error", "unknown value 'allow'"),
    ("risk-cache", R0 + "\n    risk: {url: 'http://r', cache: forever}", 25,
     "rules[0].risk.cache", "invalid duration 'forever'"),
    ("risk-typo", R0 + "\n    risk: {url: 'http://r', on_eror: deny}", 25,
     "rules[0].risk.on_eror", "did you mean 'on_error'?"),
    ("upstream-challenge", R0 + "\n    upstream_challenge: yes please", 25,
     "rules[0].upstream_challenge", "expected true or false"),
    ("rule-key-typo", R0 + "\n    wen: amount > 1", 25, "rules[0].wen", "did you mean 'when'?"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("replacement", "line", "key_path", "fragment"),
    [pytest.param(r, line, key, frag, id=case_id) for case_id, r, line, key, frag in WHEN_BAD],
)
def test_step_up_keys_name_line_and_key(
    replacement: str, line: int, key_path: str, fragment: str
) -> None:
    problems = problems_of(edited((R0, replacement)))
    matching = [p for p in problems if p.key_path == key_path and fragment in p.message]
    assert matching, [str(p) for p in problems]
    assert matching[0].line == line, str(matching[0])


@pytest.mark.parametrize(
    ("step_up", "line", "key_path", "fragment"),
    [
        ("  max_body: lots", 32, "step_up.max_body", "invalid size 'lots'"),
        ("  max_body: 0", 32, "step_up.max_body", "must be between 1 byte and"),
        ("  max_body: 1GiB", 32, "step_up.max_body", "(64MiB)"),
        ("  max_body: 1 MB", None, None, None),
        ("  authorization_details_type: 'a b'", 32, "step_up.authorization_details_type",
         "no spaces"),
        ("  max_bodies: 1MiB", 32, "step_up.max_bodies", "did you mean 'max_body'?"),
        ("  keep_budget: lots", 32, "step_up.keep_budget", "between 1 byte and 4GiB"),
        ("  keep_budget: 8GiB", 32, "step_up.keep_budget", "between 1 byte and 4GiB"),
        ("  keep_budget: 512KiB", 32, "step_up.keep_budget", "smaller than step_up.max_body"),
        ("  keep_per_client: 0", 32, "step_up.keep_per_client", "must be between 1 and 1000"),
        ("  keep_per_client: many", 32, "step_up.keep_per_client", "expected an integer"),
    ],
)  # fmt: skip
def test_step_up_section(
    step_up: str, line: int | None, key_path: str | None, fragment: str | None
) -> None:
    text = BASE + "step_up:\n" + step_up + "\n"
    if key_path is None:
        assert load(text).step_up.max_body_bytes == 1_000_000
        return
    [problem] = problems_of(text)
    assert (problem.line, problem.key_path) == (line, key_path)
    assert fragment is not None and fragment in problem.message


@pytest.mark.parametrize(
    ("server", "session", "accepted"),
    [
        ("", "", True),  # one worker (the default), cookie store
        ("  workers: 1\n", "  store: memory\n", True),
        ("  workers: 4\n", "", False),  # cookie store, consumption per process
        ("  workers: 4\n", "  store: redis\n  redis_url: redis://r:6379/0\n", True),
        # the cookie store with a Redis beside it for consumption records
        ("  workers: 4\n", "  redis_url: redis://r:6379/0\n", True),
    ],
)
def test_once_needs_one_place_to_consume_proofs(server: str, session: str, accepted: bool) -> None:
    text = edited(
        ("gw.example.com\n", "gw.example.com\n" + server),
        (SECRET + "\n", SECRET + "\n" + session),
        (R0, "    require: {level: mfa, once: true}"),
    )
    if accepted:
        assert load(text).rules[0].require.once is True
        return
    [problem] = problems_of(text)
    assert problem.key_path == "rules[0].require.once"
    assert problem.message == cfg.ONCE_NEEDS_ONE_CONSUMER
    assert problem.line == 25


def test_once_false_is_fine_with_many_workers() -> None:
    text = edited(
        ("gw.example.com\n", "gw.example.com\n  workers: 4\n"),
        (R0, "    require: {level: mfa, once: false}"),
    )
    assert load(text).rules[0].require.once is False


def test_a_rule_with_when_does_not_hide_the_rules_after_it() -> None:
    risky = (
        "  - name: big-transfers\n"
        "    match: {path: /api/transfers/**, methods: [POST]}\n"
        "    require: {level: phishing-resistant, max_age: 5m}\n"
        "    when: amount > 1000\n"
    )
    text = edited(("rules:\n", "rules:\n" + risky))
    assert [rule.name for rule in load(text).rules][:2] == ["big-transfers", "transfers"]
    # without when it would: the same path and methods
    [problem] = problems_of(text.replace("    when: amount > 1000\n", ""))
    assert "rule 'transfers' can never match: rules[0] 'big-transfers'" in problem.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_when_text_raises_only_config_error(when: str) -> None:
    text = edited((R0, R0 + "\n    when: " + json.dumps(when)))
    try:
        load(text)
    except ConfigError as exc:
        assert exc.problems


def test_keep_limits_load() -> None:
    text = BASE + "step_up:\n  keep_budget: 16MiB\n  keep_per_client: 3\n"
    step_up = load(text).step_up
    assert (step_up.keep_budget_bytes, step_up.keep_per_client) == (16 * 1024 * 1024, 3)


def test_upstream_as_a_mapping_and_the_path_and_host_options() -> None:
    text = edited(
        (
            "  app: http://127.0.0.1:9000",
            "  app: {url: 'http://127.0.0.1:9000/', case_insensitive_paths: true}\n  plain: http://127.0.0.1:9001",
        ),
        (
            "  public_url: https://gw.example.com",
            "  public_url: https://gw.example.com\n"
            "  hosts: [BANK.example.com.:443, 10.0.0.5, '[::1]:8443']\n"
            "  case_insensitive_paths: true",
        ),
        ("    match: {path: /public/**}", "    match: {path: /public/**}\n    upstream: plain"),
        ("    match: {path: /**}", "    match: {path: /**}\n    upstream: app"),
        (
            "    require: {level: mfa, max_age: 5m}",
            "    require: {level: mfa, max_age: 5m}\n    upstream: app",
        ),
    )
    config = load(text)
    assert config.upstreams == {
        "app": model.UpstreamConfig("app", "http://127.0.0.1:9000", case_insensitive_paths=True),
        "plain": model.UpstreamConfig("plain", "http://127.0.0.1:9001"),
    }
    assert config.server.hosts == ("bank.example.com", "10.0.0.5", "[::1]:8443")
    assert config.server.case_insensitive_paths is True
    assert load(BASE).server.case_insensitive_paths is False
    assert load(BASE).server.hosts == ()


@pytest.mark.parametrize(
    ("public_url", "written", "canonical"),
    [
        ("https://gw.example.com", "bank.example.com:443", "bank.example.com"),
        ("https://gw.example.com", "bank.example.com:80", "bank.example.com:80"),
        ("http://gw.example.com", "bank.example.com:80", "bank.example.com"),
        ("http://gw.example.com", "bank.example.com:443", "bank.example.com:443"),
        ("https://gw.example.com", "XN--BCHER-KVA.Example.", "xn--bcher-kva.example"),
    ],
)
def test_rule_hosts_drop_only_the_public_schemes_default_port(
    public_url: str, written: str, canonical: str
) -> None:
    """A request's Host is canonicalised against public_url's scheme: so are rule hosts."""
    text = edited(
        ("  public_url: https://gw.example.com", f"  public_url: {public_url}"),
        (
            "    match: {path: /api/transfers/**, methods: [POST]}",
            f"    match: {{path: /api/transfers/**, methods: [POST], host: '{written}'}}",
        ),
        ("  listen: 127.0.0.1:8080", f"  listen: 127.0.0.1:8080\n  hosts: ['{written}']"),
        (
            "  secret: 0123456789abcdef0123456789abcdef",
            "  secret: 0123456789abcdef0123456789abcdef\n  cookie_secure: false",
        ),
    )
    config = load(text)
    assert config.rules[0].match.host == canonical
    assert config.server.hosts == (canonical,)
