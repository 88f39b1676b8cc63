"""The configuration's JSON Schema (gateway/config.schema.json): the one description of its keys.

The schema pass itself, the schema against the builders (same keys, same defaults, never
stricter), the example file against the schema, and the README's tables against both.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from gateway import config as cfg
from gateway.config import docs as config_docs
from gateway.config import load_config_text
from gateway.config import schema as config_schema
from gateway.errors import ConfigError, ConfigProblem
from tests.test_config import BASE, R0, SECRET, edited

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "gateway" / "config.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def load(text: str, environ: dict[str, str] | None = None, base_dir: str = ".") -> Any:
    return load_config_text(text, "config.yaml", environ or {}, base_dir=base_dir)


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    return info.value.problems


def schema_pass(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """What the schema pass alone reports, before any builder runs."""
    validator = cfg._Validator("config.yaml", environ or {}, ".")
    root = validator.compose(text)
    assert root is not None
    return [str(p) for p in validator.schema_problems(root)]


def builders_alone(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    validator = cfg._Validator("config.yaml", environ or {}, ".")
    root = validator.compose(text)
    if root is not None:
        validator.config(root)
    return validator.problems


# --- the schema itself ------------------------------------------------------------------


def objects(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every mapping the schema describes with fixed keys, by path ("rules[].match")."""
    found = [(path, schema)] if "properties" in schema else []
    for key in schema.get("properties", {}):
        child = f"{path}.{key}" if path else key
        sub = config_schema.subschema(child)
        if sub.get("type") == "array":
            sub = config_schema.subschema(child + "[]")
            child += "[]"
        found += objects(sub, child)
    return found


OBJECTS = objects(SCHEMA)
KEYS = [
    (f"{path}.{key}" if path else key, prop)
    for path, schema in OBJECTS
    for key, prop in schema["properties"].items()
]


def test_schema_is_draft_2020_12_and_valid() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)
    assert [path for path, _ in OBJECTS] == [
        "",
        "server",
        "oidc",
        "session",
        "assurance",
        "assurance.levels[]",
        "rules[]",
        "rules[].match",
        "rules[].require",
        "rules[].risk",
        "assertion",
        "step_up",
        "api",
        "telemetry",
    ]


@pytest.mark.parametrize(("key", "prop"), KEYS, ids=[key for key, _ in KEYS])
def test_every_key_is_described(key: str, prop: dict[str, Any]) -> None:
    # The description is the README's "meaning" column and the editor's hover text.
    description = config_schema.subschema(key).get("description", "")
    assert len(description) > 10, key


@pytest.mark.parametrize(("path", "schema"), OBJECTS, ids=[p or "(top level)" for p, _ in OBJECTS])
def test_every_mapping_refuses_unknown_keys(path: str, schema: dict[str, Any]) -> None:
    assert schema["additionalProperties"] is False


# --- the example file -------------------------------------------------------------------


def test_example_names_the_schema_for_editors() -> None:
    first = (ROOT / "config.example.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=gateway/config.schema.json"
    assert (ROOT / first.partition("$schema=")[2]).resolve() == SCHEMA_FILE.resolve()


def test_example_validates_against_the_schema_with_jsonschema() -> None:
    # As an editor sees it: the file as written, ${...} not replaced.
    document = yaml.safe_load((ROOT / "config.example.yaml").read_text(encoding="utf-8"))
    validator = Draft202012Validator(SCHEMA)
    assert [e.message for e in validator.iter_errors(document)] == []
    # ... and the same validator does refuse a typo in it.
    document["session"]["idel_timeout"] = document["session"].pop("idle_timeout")
    [error] = validator.iter_errors(document)
    assert list(error.absolute_path) == ["session"]
    assert "'idel_timeout' was unexpected" in error.message


def test_example_commented_out_keys_validate_too() -> None:
    # The example shows optional keys commented out; uncommented they must be valid.
    text = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    start, end = text.index("  # - name: large-transfers"), text.index("  - name: transfers")
    text = text[:start] + re.sub(r"(?m)^  # ", "  ", text[start:end]) + text[end:]
    text = re.sub(r"(?m)^# (step_up:|  max_body|  authorization_details_type)", r"\1", text)
    document = yaml.safe_load(text)
    assert document["step_up"]["max_body"] == "1MiB"
    assert document["rules"][0]["risk"]["on_error"] == "step_up"
    assert list(Draft202012Validator(SCHEMA).iter_errors(document)) == []


@pytest.mark.parametrize("key", [key for key, _ in KEYS])
def test_every_key_is_shown_in_the_example(key: str) -> None:
    # "every key shown": set, or commented out with a word on what it does.
    text = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    name = re.escape(key.rpartition(".")[2])
    assert re.search(rf"(?m)^[ #-]*{name}:|[{{,] *{name}:", text), key


# --- the schema pass: messages, key paths and lines -------------------------------------

SCHEMA_BAD = [
    # (id, replacements in tests/test_config.py's BASE, the exact problem)
    ("unknown-top", [("rules:\n", "rulez: 1\nrules:\n")],
     "config.yaml:21 rulez: unknown key 'rulez' (did you mean 'rules'?)"),
    ("unknown-server", [("  listen:", "  listne: x\n  listen:")],
     "config.yaml:2 server.listne: unknown key 'listne' (did you mean 'listen'?)"),
    ("unknown-oidc", [("  client_id:", "  clientid: x\n  client_id:")],
     "config.yaml:8 oidc.clientid: unknown key 'clientid' (did you mean 'client_id'?)"),
    ("unknown-session", [(SECRET + "\n", SECRET + "\n  idel_timeout: 5m\n")],
     "config.yaml:12 session.idel_timeout: unknown key 'idel_timeout' "
     "(did you mean 'idle_timeout'?)"),
    ("unknown-assurance", [("  levels:", "  level: x\n  levels:")],
     "config.yaml:13 assurance.level: unknown key 'level' (did you mean 'levels'?)"),
    ("unknown-level", [("      acr: [phr]", "      acr: [phr]\n      amr: [hwk]")],
     "config.yaml:21 assurance.levels[2].amr: unknown key 'amr' (did you mean 'acr'?)"),
    ("unknown-rule", [(R0, R0 + "\n    upsteam: app")],
     "config.yaml:25 rules[0].upsteam: unknown key 'upsteam' (did you mean 'upstream'?)"),
    ("unknown-require", [(R0, "    require: {level: mfa, onse: true}")],
     "config.yaml:24 rules[0].require.onse: unknown key 'onse' (did you mean 'once'?)"),
    ("unknown-risk", [(R0, R0 + "\n    risk: {url: 'http://r', xyzzy: 1}")],
     "config.yaml:25 rules[0].risk.xyzzy: unknown key 'xyzzy' "
     "(known: url, timeout, on_error, cache)"),
    ("unknown-assertion", [("rules:\n", "assertion: {tll: 1m}\nrules:\n")],
     "config.yaml:21 assertion.tll: unknown key 'tll' (did you mean 'ttl'?)"),
    ("unknown-step-up", [("rules:\n", "step_up: {max_bdy: 1}\nrules:\n")],
     "config.yaml:21 step_up.max_bdy: unknown key 'max_bdy' (did you mean 'max_body'?)"),
    ("bool", [("gw.example.com\n", "gw.example.com\n  access_log: maybe\n")],
     "config.yaml:4 server.access_log: expected true or false"),
    ("bool-list", [(SECRET + "\n", SECRET + "\n  cookie_secure: [true]\n")],
     "config.yaml:12 session.cookie_secure: expected true or false, got a list"),
    ("bool-quoted-env", [(SECRET + "\n", SECRET + "\n  cookie_secure: '${SECURE:-false}'\n")],
     "config.yaml:12 session.cookie_secure: expected true or false"),
    ("enum", [("gw.example.com\n", "gw.example.com\n  log_level: INFO\n")],
     "config.yaml:4 server.log_level: unknown value 'INFO' (known: debug, info, warning, error)"),
    ("enum-list", [(SECRET + "\n", SECRET + "\n  store: [redis]\n")],
     "config.yaml:12 session.store: expected one of cookie, memory, redis, got a list"),
    ("enum-number", [(R0, R0 + "\n    risk: {url: 'http://r', on_error: 0}")],
     "config.yaml:25 rules[0].risk.on_error: unknown value '0' (known: step_up, deny)"),
    ("list-scalar", [("client_secret: s3cret", "client_secret: s3cret\n  scopes: openid")],
     "config.yaml:10 oidc.scopes: expected a list (write [openid])"),
    ("list-mapping", [("      acr: [loa1]", "      acr: {a: 1}")],
     "config.yaml:15 assurance.levels[0].acr: expected a list"),
    ("list-empty", [("client_secret: s3cret", "client_secret: s3cret\n  algorithms: []")],
     "config.yaml:10 oidc.algorithms: must not be an empty list"),
    ("mapping-list", [("  listen: 127.0.0.1:8080\n  public_url: https://gw.example.com\n",
                       "  - listen\n")],
     "config.yaml:2 server: expected a mapping with keys listen, public_url, internal_prefix, "
     "metrics_listen, shutdown_timeout, trusted_proxies, workers, upstream_connect_timeout, "
     "upstream_timeout, access_log, log_level, hosts, case_insensitive_paths, max_connections, "
     "header_timeout, body_timeout, keepalive_timeout, keepalive_requests, keepalive_max_age, "
     "mode, decision_memo, decision_memo_entries, unix_socket, unix_socket_mode, got a list"),
    ("top-level-list", [(BASE, "- server\n")],
     "config.yaml:1 (top level): expected a mapping with keys server, upstreams, oidc, "
     "session, assurance, rules, assertion, step_up, api, telemetry, got a list"),
    ("require-list", [(R0, "    require: [mfa]")],
     "config.yaml:24 rules[0].require: expected a mapping with keys level, max_age, once, "
     "bind, got a list"),
    ("string-mapping", [("client_id: gateway", "client_id: {a: 1}")],
     "config.yaml:8 oidc.client_id: expected a string, got a mapping"),
    ("string-empty", [("client_id: gateway", "client_id: ' '")],
     "config.yaml:8 oidc.client_id: must not be empty"),
    ("required-key", [("  - name: public\n    match: {path: /public/**}\n", "  - name: public\n")],
     "config.yaml:25 rules[1].match: required key is missing"),
    ("required-section", [("\nsession:\n", "\nsesion:\n")],
     "config.yaml:1 session: required section is missing"),
    ("duration", [("client_secret: s3cret", "client_secret: s3cret\n  clock_skew: 1.5")],
     "config.yaml:10 oidc.clock_skew: invalid duration '1.5': use whole seconds (300) or a "
     "number with a unit s, m, h or d (90s, 5m, 12h, 1d)"),
    ("duration-mapping", [(SECRET + "\n", SECRET + "\n  lifetime: {h: 1}\n")],
     "config.yaml:12 session.lifetime: expected a duration, got a mapping"),
    ("duration-zero", [(SECRET + "\n", SECRET + "\n  lifetime: 0h0m\n")],
     "config.yaml:12 session.lifetime: must be longer than 0 seconds"),
    ("timeout-float", [("client_secret: s3cret", "client_secret: s3cret\n  http_timeout: -0.5")],
     "config.yaml:10 oidc.http_timeout: must be a positive number of seconds"),
    ("size", [("rules:\n", "step_up: {max_body: 1 parsec}\nrules:\n")],
     "config.yaml:21 step_up.max_body: invalid size '1 parsec': use bytes (65536) or a number "
     "with a unit KiB, MiB, GiB, kB, MB or GB (512KiB, 1MiB)"),
    ("size-range", [("rules:\n", "step_up: {max_body: 67108865}\nrules:\n")],
     "config.yaml:21 step_up.max_body: must be between 1 byte and 67108864 bytes (64MiB)"),
    ("workers-float", [("gw.example.com\n", "gw.example.com\n  workers: 2.5\n")],
     "config.yaml:4 server.workers: expected an integer"),
    ("name-pattern", [("  - name: public", "  - name: -public")],
     "config.yaml:25 rules[1].name: invalid name '-public': use letters, digits, '.', '_' and "
     "'-', starting with a letter or digit"),
    ("method-pattern", [("methods: [POST]", "methods: [POST, 'GET;']")],
     "config.yaml:23 rules[0].match.methods[1]: invalid method 'GET;' (RFC 7230 token)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("replacements", "expected"),
    [pytest.param(r, e, id=case_id) for case_id, r, e in SCHEMA_BAD],
)
def test_schema_pass_reports_once_with_line_and_key(
    replacements: list[tuple[str, str]], expected: str
) -> None:
    text = edited(*replacements)
    assert expected in schema_pass(text)  # the schema found it ...
    problems = problems_of(text)
    [reported] = [p for p in problems if str(p) == expected]  # ... it is what check shows ...
    # ... and no builder reports it, or anything below it, a second time.
    below = [
        p for p in problems if re.match(re.escape(reported.key_path) + r"($|[.\[])", p.key_path)
    ]
    assert below == [reported]


def test_schema_problems_and_builder_problems_are_merged_by_line() -> None:
    text = edited(
        ("listen: 127.0.0.1:8080", "listen: nowhere"),  # builder: line 2
        ("client_id: gateway", "client_id: [gateway]"),  # schema: line 8
        (R0, "    require: {level: gold, max_age: 5m}"),  # builder: line 24
        ("  - name: public", "  - name: public\n    upstram: app"),  # schema: line 26
    )
    assert [(p.line, p.key_path) for p in problems_of(text)] == [
        (2, "server.listen"),
        (8, "oidc.client_id"),
        (24, "rules[0].require.level"),
        (26, "rules[1].upstram"),
    ]


def test_an_unreadable_value_is_reported_by_the_builders_only() -> None:
    # The schema cannot see a value whose variable is unset; the builder says why, once.
    text = edited(("gw.example.com\n", "gw.example.com\n  workers: ${WORKERS}\n"))
    assert schema_pass(text) == []
    assert [str(p) for p in problems_of(text)] == [
        "config.yaml:4 server.workers: environment variable WORKERS not set (and no default)"
    ]


def test_interpolated_values_are_typed_before_the_schema_sees_them() -> None:
    text = edited(
        ("gw.example.com\n", "gw.example.com\n  workers: ${W:-2}\n  access_log: ${LOG:-false}\n")
    )
    assert schema_pass(text) == []
    config = load(text)
    assert (config.server.workers, config.server.access_log) == (2, False)
    assert schema_pass(text, {"W": "auto", "LOG": "on"}) == []
    assert schema_pass(text, {"W": "many"}) == ["config.yaml:4 server.workers: expected an integer"]


def test_alias_bombs_are_left_to_the_builders() -> None:
    # Nine levels of nine aliases: 9**9 nodes once expanded. The schema pass must not
    # expand them; the builders report the unknown keys without reading their values.
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    text = "\n".join(lines) + "\n" + BASE
    started = time.perf_counter()
    problems = problems_of(text)
    assert time.perf_counter() - started < 10
    assert [p.key_path for p in problems] == [f"a{i}" for i in range(10)]


# --- the schema against the builders ----------------------------------------------------

MAXIMAL = """\
server:
  listen: '[::1]:8443'
  public_url: https://gw.example.com
  internal_prefix: /auth
  metrics_listen: 127.0.0.1:9090
  shutdown_timeout: 1m
  trusted_proxies: [10.0.0.0/8, unix]
  workers: 1
  unix_socket: /run/stepup-gateway/gateway.sock
  unix_socket_mode: '0600'
  upstream_connect_timeout: 2s
  upstream_timeout: 2.5
  access_log: false
  log_level: debug
  hosts: [bank.example.com]
  case_insensitive_paths: true
  max_connections: 200
  header_timeout: 10s
  body_timeout: 15s
  keepalive_timeout: 30s
  keepalive_requests: 100
  keepalive_max_age: 5s
  mode: both
  decision_memo: 2s
  decision_memo_entries: 500
upstreams:
  app: http://127.0.0.1:9000
  admin: https://admin.internal/base
  api: {url: 'https://api.internal', case_insensitive_paths: true, pass_authorization: true}
oidc:
  issuer: https://op.example.com/
  client_id: 1234
  client_secret: s
  scopes: [openid, email]
  client_auth: client_secret_post
  essential_acr: true
  profile: keycloak
  client_key_file: client-key.pem
  par: true
  dpop: true
  assume_email_verified: true
  clock_skew: 30s
  algorithms: [ES256]
  http_timeout: 3s
  providers:
    customers:
      issuer: https://login.example.net/
      client_id: web
      client_secret: s2
      scopes: [openid]
      levels:
        - {name: basic, acr: [urn:example:loa:1]}
        - {name: strong, acr: [urn:example:loa:2]}
session:
  secret: [0123456789abcdef0123456789abcdef, oooooooooooooooooooooooooooooooo]
  store: redis
  redis_url: redis://127.0.0.1:6379/0
  redis_prefix: "gw:"
  cookie_secure: true
  cookie_name: sid
  idle_timeout: 10m
  lifetime: 1d
  transaction_ttl: 5m
  redis_pool_size: 20
  redis_pool_timeout: 2s
assurance:
  levels:
    - {name: basic, acr: [1, 0.5]}
    - {name: strong, acr: [phr], amr_any: [hwk]}
rules:
  - name: transfers
    match: {path: /api/transfers/**, methods: [POST], host: gw.example.com}
    when: {any: ['amount > 1000', client_ip_changed]}
    require: {level: strong, max_age: 5m, once: true, bind: [amount, beneficiary.iban]}
    risk: {url: 'https://risk.internal/score', timeout: 0.5, on_error: deny, cache: 2m}
    upstream: app
    allow_method_override: true
    upstream_challenge: true
    credentials: session
  - name: admin
    match: {path: /admin/**}
    require: {level: strong}
    upstream: admin
  - name: customer
    match: {path: /customer/**}
    require: {level: strong}
    provider: customers
    upstream: app
  - name: rest
    match: {path: /**}
    require: none
    upstream: app
assertion:
  key_file: /run/secrets/assertion-key.pem
  ttl: 30s
  header_prefix: X-Gw-
step_up:
  max_body: 512KiB
  authorization_details_type: urn:example:transfer
  keep_budget: 16MiB
  keep_per_client: 4
api:
  audience: https://gw.example.com/api
  tokens: [jwt, introspection]
  dpop: required
  algorithms: [ES256]
  dpop_algorithms: [ES256]
  dpop_nonce: true
  dpop_max_age: 30s
  introspection_cache: 10s
  cache_entries: 100
  providers: [default, customers]
telemetry:
  otlp_endpoint: http://127.0.0.1:4318
  service_name: gateway-eu
  sample_ratio: 0.25
"""


def maximal_files(tmp_path: Path) -> list[str]:
    """The maximal config, and its variant with secrets read from files."""
    (tmp_path / "client").write_text("client-secret\n")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "client-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "session").write_text(SECRET + "\n")
    with_files = MAXIMAL.replace("  client_secret: s\n", "  client_secret_file: client\n")
    with_files = re.sub(r"  secret: \[.*\]\n", "  secret_file: session\n", with_files)
    return [MAXIMAL, with_files]


def key_paths(value: object, path: str = "") -> set[str]:
    """Every key path in a plain document, list items as "[]"."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            found |= {child} | key_paths(item, child)
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, path + "[]")
    return found


def test_the_maximal_configs_use_every_key_of_the_schema(tmp_path: Path) -> None:
    used: set[str] = set()
    for text in maximal_files(tmp_path):
        used |= key_paths(yaml.safe_load(text))
    schema_keys = {key for key, _ in KEYS}
    upstream_mapping = SCHEMA["properties"]["upstreams"]["additionalProperties"]["then"]
    mapped = {key.rpartition(".")[2] for key in used if re.match(r"upstreams\.[^.]+\.", key)}
    assert set(upstream_mapping["properties"]) - mapped == set()  # every upstream key used
    assert schema_keys - used == set()  # a new key in the schema belongs in MAXIMAL
    # a named provider's keys are the provider definition's (its name is data)
    provider_keys = {k.split(".", 3)[3] for k in used if re.match(r"oidc\.providers\.[^.]+\.", k)}
    assert "levels" in provider_keys
    assert {k.partition(".")[0].removesuffix("[]") for k in provider_keys} <= set(
        SCHEMA["$defs"]["provider"]["properties"]
    )
    # upstream and provider names and the parts of a condition are data, not keys
    data = ("upstreams.", "rules[].when.", "oidc.providers.")
    assert {k for k in used - schema_keys if not k.startswith(data)} == set()


def test_the_builders_read_exactly_the_keys_the_schema_describes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every mapping a builder reads, with the keys it knows, against the schema's."""
    seen: dict[str, set[str]] = {}
    mapping = cfg._Validator.mapping

    def recording(self: Any, node: Any, path: str, keys: Any) -> Any:
        if keys is not None:
            path = re.sub(r"\[\d+\]", "[]", path)
            path = re.sub(r"^upstreams\.[^.]+$", "upstreams.*", path)  # names are data
            path = re.sub(r"^oidc\.providers\.[^.]+", "oidc.providers.*", path)
            seen.setdefault(path, set()).update(keys)
        return mapping(self, node, path, keys)

    monkeypatch.setattr(cfg._Validator, "mapping", recording)
    for text in maximal_files(tmp_path):
        config = load(text, base_dir=str(tmp_path))  # the builders accept every schema key
        assert config.rules[0].risk is not None
    described = {path: set(o["properties"]) for path, o in OBJECTS}
    # an upstream written as a mapping ({url, ...}) rather than a URL
    upstream_mapping = SCHEMA["properties"]["upstreams"]["additionalProperties"]["then"]
    described["upstreams.*"] = set(upstream_mapping["properties"])
    described["oidc.providers.*"] = set(SCHEMA["$defs"]["provider"]["properties"])
    described["oidc.providers.*.levels[]"] = set(SCHEMA["$defs"]["level"]["properties"])
    assert seen == described


@pytest.mark.parametrize(
    "key", [key for key, prop in KEYS if "default" in config_schema.subschema(key)]
)
def test_writing_a_default_out_changes_nothing(key: str) -> None:
    """The schema's default is what the builders use when the key is left out."""
    document = yaml.safe_load(BASE)
    document["rules"][0]["risk"] = {"url": "http://127.0.0.1:7000/risk"}
    document["rules"][0]["require"] = {"level": "mfa"}
    document["api"] = {"audience": "https://gw.example.com/api"}  # its keys' parent
    implicit = load(yaml.safe_dump(document, sort_keys=False))
    explicit = copy.deepcopy(document)
    *parents, last = key.replace("[]", ".0").split(".")
    target: Any = explicit
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[last] = config_schema.default(key)
    assert load(yaml.safe_dump(explicit, sort_keys=False)) == implicit


def test_limits_agree_with_the_schema() -> None:
    assert config_schema.MAX_SIZE_BYTES == cfg.MAX_BODY_LIMIT_BYTES


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_schema_is_never_stricter_than_the_builders(data: st.DataObject) -> None:
    """Whatever the builders accept, the schema accepts; where both fault one key, they
    say the same thing."""
    position = data.draw(st.integers(0, len(MAXIMAL) - 1))
    length = data.draw(st.integers(0, 12))
    insert = data.draw(st.text(alphabet="{}[]:-, \n'\"&*0a1.sm$", max_size=8))
    text = MAXIMAL[:position] + insert + MAXIMAL[position + length :]
    assert_not_stricter(text)


def assert_not_stricter(text: str) -> None:
    built = builders_alone(text, {"X": "y", "E": ""})
    validator = cfg._Validator("config.yaml", {"X": "y", "E": ""}, ".")
    root = validator.compose(text)
    by_schema = [] if root is None else validator.schema_problems(root)
    if not built:
        assert by_schema == []
    said = {(p.key_path, p.line): p.message for p in built}
    for problem in by_schema:
        if (problem.key_path, problem.line) in said:
            assert problem.message == said[problem.key_path, problem.line]


_VALUES = st.sampled_from(
    ["true", "no", "0", "-1", "7", "1.5", "-0.5", ".inf", "''", "' '", "[]", "{}", "~", "[a]",
     "{a: 1}", "5m", "0s", "0h0m", "1MiB", "0 B", "auto", "none", "'none'", "${X}", "'${X}'",
     "${E:-3}", "${E}", "!!str 1", "!x y", "*nothing", "a b", "-x", "GET;", "http://h"]
)  # fmt: skip
_VALUE_LINES = [i for i, line in enumerate(MAXIMAL.splitlines()) if re.match(r" *[a-z_]+: ", line)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_VALUE_LINES), _VALUES), min_size=1, max_size=3))
def test_the_schema_agrees_with_the_builders_on_odd_values(edits: list[tuple[int, str]]) -> None:
    lines = MAXIMAL.splitlines()
    for index, value in edits:
        key = lines[index].split(":")[0]
        lines[index] = f"{key}: {value}"
    assert_not_stricter("\n".join(lines) + "\n")


def test_a_redis_url_with_a_stray_bracket_is_a_problem_not_a_traceback() -> None:
    # Found by the property test above: urlsplit raises on an unbalanced "]".
    text = edited((SECRET + "\n", SECRET + "\n  redis_url: redis://:pw@127.0.0.1]:6379/0\n"))
    assert [str(p) for p in problems_of(text)] == [
        "config.yaml:12 session.redis_url: invalid Redis URL"
    ]


# --- the README's tables ----------------------------------------------------------------


def test_readme_tables_are_generated_from_the_schema() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config_docs.render(readme) == readme, "run: python -m gateway.config.docs"
    for section in ("server", "oidc", "session", "assurance.levels", "rules", "assertion"):
        assert f"<!-- config:{section}:begin -->" in readme
    assert "| `idle_timeout` | `30m` | re-authenticate after this long idle" in readme


def test_a_stale_readme_table_is_found_and_rewritten(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("| `lifetime` | `12h` |", "| `lifetime` | `24h` |")
    assert stale != readme
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert config_docs.main(["--check", str(path)]) == 1
    assert config_docs.main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == readme
    assert config_docs.main(["--check", str(path)]) == 0
