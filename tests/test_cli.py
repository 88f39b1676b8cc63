"""The command line, run as a user would: `python -m gateway ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET = "0123456789abcdef0123456789abcdef"
ENV = {"GATEWAY_SESSION_SECRET": SECRET, "OIDC_CLIENT_SECRET": "x"}

CONFIG = """\
server:
  listen: 127.0.0.1:8080
  public_url: https://gw.example.com
upstreams:
  app: http://127.0.0.1:9000
  admin: http://127.0.0.1:9100
oidc:
  issuer: https://op.example.com
  client_id: gateway
  client_secret: ${OIDC_CLIENT_SECRET}
session:
  secret: ${GATEWAY_SESSION_SECRET}
assurance:
  levels:
    - {name: password, acr: [loa1]}
    - {name: mfa, acr: [loa2], amr_any: [otp]}
    - {name: phishing-resistant, acr: [phr]}
rules:
  - name: transfers
    match: {path: /api/transfers/**, methods: [POST, PUT], host: bank.example.com}
    require: {level: phishing-resistant, max_age: 5m}
    upstream: app
  - name: legacy-dav
    match: {path: /legacy/**, methods: [PROPFIND]}
    require: {level: mfa}
    upstream: app
  - name: reports
    match: {path: /reports/*/pdf, methods: [GET]}
    require: {level: password}
    upstream: app
  - name: admin
    match: {path: /admin/**}
    require: {level: mfa, max_age: 1h}
    upstream: admin
  - name: public
    match: {path: /public/**}
    require: none
    upstream: app
"""


def gateway(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ENV and k != "GATEWAY_CONFIG"}
    environ.update(ENV if env is None else env)
    environ["PYTHONPATH"] = str(REPO)  # the package need not be installed
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_check_ok(config_file: Path) -> None:
    result = gateway("check", "--config", str(config_file))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_check_reads_gateway_config_from_the_environment(config_file: Path) -> None:
    result = gateway("check", env={**ENV, "GATEWAY_CONFIG": str(config_file)})
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_check_without_config_is_a_usage_error() -> None:
    result = gateway("check")
    assert result.returncode == 2
    assert "GATEWAY_CONFIG" in result.stderr
    no_traceback(result)


def test_check_prints_one_line_per_problem(config_file: Path) -> None:
    text = CONFIG.replace("{level: mfa, max_age: 1h}", "{level: gold, max_agee: 1h}")
    text = text.replace("listen: 127.0.0.1:8080", "listen: 8080")
    config_file.write_text(text)
    result = gateway("check", "--config", str(config_file), env={"OIDC_CLIENT_SECRET": "x"})
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{config_file}:2 server.listen: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        " (got '8080')",
        f"{config_file}:12 session.secret: environment variable GATEWAY_SESSION_SECRET not set"
        " (and no default)",
        f"{config_file}:33 rules[3].require.max_agee: unknown key 'max_agee'"
        " (did you mean 'max_age'?)",
        f"{config_file}:33 rules[3].require.level: unknown level 'gold'"
        " (known: password, mfa, phishing-resistant)",
    ]
    no_traceback(result)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, " (file): file not found"),
        ("server: [\n  - a\n", ":2 yaml: invalid YAML"),
        ("- a list\n", ":1 (top level): expected a mapping"),
        ("", ":1 (top level): the file is empty"),
        ("\x00\x01binary", ":1 yaml: invalid YAML"),
    ],
)
def test_check_never_shows_a_traceback(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    result = gateway("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{path}{expected}"), result.stdout
    no_traceback(result)


def test_check_on_a_directory(tmp_path: Path) -> None:
    result = gateway("check", "--config", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{tmp_path} (file): cannot read")
    no_traceback(result)


def test_example_config_passes_check() -> None:
    result = gateway("check", "--config", "config.example.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_example_config_names_a_missing_variable_but_never_a_secret() -> None:
    result = gateway("check", "--config", "config.example.yaml", env={"OIDC_CLIENT_SECRET": "x"})
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("config.example.yaml:")
    assert "session.secret: environment variable GATEWAY_SESSION_SECRET not set" in line
    short = gateway(
        "check",
        "--config",
        "config.example.yaml",
        env={"OIDC_CLIENT_SECRET": "x", "GATEWAY_SESSION_SECRET": "short-s3cret-value"},
    )
    assert short.returncode == 1
    assert "session.secret: the secret is 18 bytes" in short.stdout
    assert "short-s3cret-value" not in short.stdout + short.stderr


def test_example_config_explains_a_transfer() -> None:
    result = gateway(
        "explain",
        "--config",
        "config.example.yaml",
        "POST",
        "https://bank.example.com/api/transfers/1",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "rule": "transfers",
        "require": {"level": "phishing-resistant", "max_age": 300, "once": False},
        "upstream": "app",
        "method": "POST",
        "normalized_path": "/api/transfers/1",
        "host": "bank.example.com",
    }


def explained(config_file: Path, method: str, url: str) -> tuple[int, dict[str, Any]]:
    result = gateway("explain", "--config", str(config_file), method, url)
    no_traceback(result)
    assert result.stderr == ""
    output: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, output


TRANSFERS = {"level": "phishing-resistant", "max_age": 300, "once": False}


@pytest.mark.parametrize(
    ("method", "url", "rule", "require", "path", "host"),
    [
        ("POST", "https://bank.example.com/api/transfers/1", "transfers", TRANSFERS,
         "/api/transfers/1", "bank.example.com"),
        # host rules compare the canonical host: case, trailing dot, default port
        ("PUT", "https://BANK.Example.com.:443/api/transfers/1?x=1#f", "transfers", TRANSFERS,
         "/api/transfers/1", "bank.example.com"),
        # a path alone goes to public_url's host, which the transfers rule does not name
        ("POST", "/api/transfers/1", None, None, "/api/transfers/1", "gw.example.com"),
        # dot segments are resolved before matching
        ("POST", "https://bank.example.com/public/../api/transfers/1", "transfers", TRANSFERS,
         "/api/transfers/1", "bank.example.com"),
        ("GET", "/public/../admin/users", "admin", {"level": "mfa", "max_age": 3600,
         "once": False}, "/admin/users", "gw.example.com"),
        ("GET", "/public//x/./y", "public", "none", "/public/x/y", "gw.example.com"),
        ("GET", "/reports/2024/pdf", "reports", {"level": "password", "max_age": None,
         "once": False}, "/reports/2024/pdf", "gw.example.com"),
        ("HEAD", "/reports/2024/pdf", "reports", {"level": "password", "max_age": None,
         "once": False}, "/reports/2024/pdf", "gw.example.com"),  # GET covers HEAD
        ("POST", "/reports/2024/pdf", None, None, "/reports/2024/pdf", "gw.example.com"),
        # a method outside RFC 9110's is known once a rule names it
        ("PROPFIND", "/legacy/form", "legacy-dav", {"level": "mfa", "max_age": None,
         "once": False}, "/legacy/form", "gw.example.com"),
        ("POST", "/legacy/form", None, None, "/legacy/form", "gw.example.com"),
        ("GET", "/%7Euser", None, None, "/~user", "gw.example.com"),
    ],
)  # fmt: skip
def test_explain(
    config_file: Path,
    method: str,
    url: str,
    rule: str | None,
    require: object,
    path: str,
    host: str,
) -> None:
    status, output = explained(config_file, method, url)
    assert status == 0
    if rule is None:
        assert output == {
            "rule": None,
            "decision": "deny",
            "status": 403,
            "method": method,
            "normalized_path": path,
            "host": host,
        }
    else:
        assert output["rule"] == rule
        assert output["require"] == require
        assert (output["normalized_path"], output["host"]) == (path, host)
        assert output["upstream"] == ("admin" if rule == "admin" else "app")


@pytest.mark.parametrize(
    ("method", "url", "reason"),
    [
        ("GET", "/public/%2e%2e/admin", "encoded_dot_segment"),
        ("GET", "/public/a%2Fb", "encoded_slash"),
        ("GET", "/public\\..\\admin", "backslash"),
        ("GET", "/public/%zz", "malformed_escape"),
        ("GET", "https://bank.example.com/a/%00", "nul"),
        ("GET", "https://bad host/x", "bad_host"),
    ],
)
def test_explain_refused_path(config_file: Path, method: str, url: str, reason: str) -> None:
    status, output = explained(config_file, method, url)
    assert status == 2
    assert output["rule"] is None
    assert output["reason"] == reason
    assert output["status"] == 400
    assert output["error"]


@pytest.mark.parametrize(
    "url",
    [
        "https://other.example.com/api/transfers/1",
        "https://bank.example.com:8443/api/transfers/1",
        "https://10.0.0.1/api/transfers/1",
    ],
)
def test_explain_unknown_host_is_421(config_file: Path, url: str) -> None:
    """A rule names a host: a host nobody configured must not fall through to a weaker rule."""
    status, output = explained(config_file, "POST", url)
    assert status == 2
    assert (output["rule"], output["status"], output["reason"]) == (None, 421, "unknown_host")


def test_explain_not_a_url(config_file: Path) -> None:
    status, output = explained(config_file, "GET", "ftp://x/y")
    assert status == 2
    assert output["rule"] is None
    assert "must be absolute" in output["error"]


def test_explain_unknown_method_is_405(config_file: Path) -> None:
    status, output = explained(config_file, "BREW", "/public/x")
    assert status == 2
    assert output["rule"] is None
    assert output["status"] == 405
    assert "405" in output["error"]
    # "get" is not GET and no rule names it
    assert explained(config_file, "get", "/public/x")[1]["status"] == 405


def test_explain_internal_endpoint(config_file: Path) -> None:
    status, output = explained(config_file, "GET", "/_gateway/callback")
    assert status == 0
    assert output == {
        "rule": None,
        "decision": "internal",
        "endpoint": "/callback",
        "normalized_path": "/_gateway/callback",
        "host": "gw.example.com",
    }


def test_explain_with_a_bad_config(config_file: Path) -> None:
    config_file.write_text(CONFIG.replace("require: none", "require: nothing"))
    result = gateway("explain", "--config", str(config_file), "GET", "/public/x")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "rules[4].require: expected 'none' or a mapping" in result.stderr
    no_traceback(result)


def test_run_with_a_bad_config_exits_1(config_file: Path) -> None:
    config_file.write_text(CONFIG.replace("https://gw.example.com", "http://gw.example.com"))
    result = gateway("run", "--config", str(config_file))
    assert result.returncode == 1
    assert "session.cookie_secure: is true (the default) but server.public_url is plain http" in (
        result.stderr
    )
    no_traceback(result)


def test_version_and_usage() -> None:
    version = gateway("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("stepup-gateway ")
    usage = gateway()
    assert usage.returncode == 2
    assert "check" in usage.stderr
    demo_help = gateway("demo", "--help")
    assert demo_help.returncode == 0
    assert "--i-know-this-is-not-production" in demo_help.stdout


# --- explain with when conditions: --body, --content-type, --client-ip ----------------

CONDITIONS = CONFIG.replace(
    "rules:\n",
    """\
rules:
  - name: large-payments
    match: {path: /api/payments/**, methods: [POST]}
    when: {any: ["amount > 1000", "client_ip not in [10.0.0.0/8]"]}
    require: {level: phishing-resistant, max_age: 5m, once: true, bind: [amount, payee.iban]}
    risk: {url: "https://risk.internal/score", on_error: deny, cache: 1m}
    upstream: app
  - name: stale-session
    match: {path: /api/payments/**, methods: [POST]}
    when: auth_age > 10m
    require: {level: mfa, max_age: 10m}
    upstream: app
  - name: payments
    match: {path: /api/payments/**, methods: [POST]}
    require: {level: mfa}
    upstream: app
    upstream_challenge: true
  - name: risky-only
    match: {path: /risky/**}
    when: amount > 1000
    require: {level: mfa}
    upstream: app
""",
)
LARGE = {
    "rule": "large-payments",
    "require": {
        "level": "phishing-resistant",
        "max_age": 300,
        "once": True,
        "bind": ["amount", "payee.iban"],
    },
    "when": {"any": ["amount > 1000", "client_ip not in [10.0.0.0/8]"]},
    "risk": {"url": "https://risk.internal/score", "timeout": 1.0, "on_error": "deny", "cache": 60},
}
SKIPPED_LARGE = {"rule": "large-payments", "when": LARGE["when"]}
STALE = {
    "rule": "stale-session",
    "require": {"level": "mfa", "max_age": 600, "once": False},
    "when": "auth_age > 10m",
    "unknown": ["session"],
    "note": "conditions on what is unknown count as true (fail closed); explain has no "
    "session, so auth_age and client_ip_changed are unknown",
}


@pytest.fixture
def conditions_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONDITIONS)
    return path


def explained_with(config_file: Path, *args: str) -> dict[str, Any]:
    result = gateway("explain", "--config", str(config_file), *args)
    no_traceback(result)
    assert (result.returncode, result.stderr) == (0, "")
    output: dict[str, Any] = json.loads(result.stdout)
    return output


@pytest.mark.parametrize(
    ("args", "expected", "fields"),
    [
        (["--body", "amount=5000&payee.iban=DE89", "--client-ip", "10.1.2.3"], LARGE,
         {"amount": "5000", "payee.iban": "DE89"}),
        # 1000.00 is not more than 1000: the risky rule is skipped, the next when holds
        # only because explain has no session
        (["--body", "amount=1000.00", "--client-ip", "10.1.2.3"],
         {**STALE, "skipped": [SKIPPED_LARGE]}, {"amount": "1000.00", "payee.iban": None}),
        (["--client-ip", "10.1.2.3"], {**LARGE, "unknown": ["amount"]},
         {"amount": None, "payee.iban": None}),  # no amount: fail closed
        (["--body", "amount=50"], {**LARGE, "unknown": ["client_ip"]},
         {"amount": "50", "payee.iban": None}),  # no client address: fail closed
        (["--body", "amount=50", "--client-ip", "198.51.100.1"], LARGE,
         {"amount": "50", "payee.iban": None}),
        (["--content-type", "application/json", "--client-ip", "10.0.0.1",
          "--body", '{"amount": 50.5, "payee": {"iban": "DE89"}}'],
         {**STALE, "skipped": [SKIPPED_LARGE]}, {"amount": "50.5", "payee.iban": "DE89"}),
    ],
)  # fmt: skip
def test_explain_evaluates_when(
    conditions_file: Path, args: list[str], expected: dict[str, Any], fields: dict[str, Any]
) -> None:
    output = explained_with(conditions_file, *args, "POST", "/api/payments/1")
    if "unknown" in expected and "note" not in expected:
        expected = {**expected, "note": STALE["note"]}
    assert output == {
        **expected,
        "upstream": "app",
        "method": "POST",
        "normalized_path": "/api/payments/1",
        "host": "gw.example.com",
        "fields": fields,
    }


def test_explain_reads_the_query(conditions_file: Path) -> None:
    output = explained_with(
        conditions_file, "--client-ip", "10.0.0.1", "POST", "/api/payments/1?amount=5"
    )
    assert (output["rule"], output["fields"]["amount"]) == ("stale-session", "5")


@pytest.mark.parametrize(
    ("body", "url"),
    [
        ("amount=1&amount=5000", "/api/payments/1"),
        ("amount=5000", "/api/payments/1?amount=5"),  # body and query
        ("%20amount=5000", "/api/payments/1"),  # PHP reads it as amount
    ],
)
def test_explain_refuses_a_field_a_rule_reads_twice(
    conditions_file: Path, body: str, url: str
) -> None:
    result = gateway(
        "explain", "--config", str(conditions_file), "--client-ip", "10.0.0.1", "--body", body,
        "POST", url,
    )  # fmt: skip
    no_traceback(result)
    assert result.returncode == 2
    output = json.loads(result.stdout)
    assert (output["rule"], output["reason"], output["status"]) == (
        "large-payments",
        "ambiguous_field",
        400,
    )
    assert "amount" in output["error"]


def test_explain_with_an_unreadable_body(conditions_file: Path) -> None:
    output = explained_with(
        conditions_file, "--content-type", "application/json", "--body", '{"amount": 5',
        "--client-ip", "10.0.0.1", "POST", "/api/payments/1?amount=5",
    )  # fmt: skip
    assert output["rule"] == "large-payments"
    assert output["unknown"] == ["amount"]
    assert output["body"].startswith("not readable as application/json")


def test_explain_a_body_over_max_body(conditions_file: Path) -> None:
    conditions_file.write_text(CONDITIONS + "step_up: {max_body: 16}\n")
    output = explained_with(
        conditions_file, "--body", "amount=5&pad=" + "x" * 20, "--client-ip", "10.0.0.1",
        "POST", "/api/payments/1",
    )  # fmt: skip
    assert output["rule"] == "large-payments"
    assert output["body"].startswith("larger than step_up.max_body")


def test_explain_shows_upstream_challenge_and_no_when(conditions_file: Path) -> None:
    conditions_file.write_text(
        CONDITIONS.replace("    when: auth_age > 10m\n", "    when: a == b\n")
    )
    output = explained_with(
        conditions_file, "--body", "amount=5&a=x", "--client-ip", "10.0.0.1", "POST",
        "/api/payments/1",
    )  # fmt: skip
    assert output["rule"] == "payments"
    assert output["upstream_challenge"] is True
    assert "when" not in output and "unknown" not in output
    assert [entry["rule"] for entry in output["skipped"]] == ["large-payments", "stale-session"]


def test_explain_deny_after_skipping(conditions_file: Path) -> None:
    output = explained_with(conditions_file, "--body", "amount=5", "GET", "/risky/x")
    assert output == {
        "rule": None,
        "decision": "deny",
        "status": 403,
        "method": "GET",
        "normalized_path": "/risky/x",
        "host": "gw.example.com",
        "fields": {"amount": "5"},
        "skipped": [{"rule": "risky-only", "when": "amount > 1000"}],
    }


def test_explain_refuses_a_bad_client_ip(conditions_file: Path) -> None:
    result = gateway(
        "explain", "--config", str(conditions_file), "--client-ip", "intranet", "GET", "/x"
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert "--client-ip 'intranet' is not an IP address" in result.stderr
    no_traceback(result)


def test_check_names_the_condition_and_its_line(conditions_file: Path) -> None:
    conditions_file.write_text(CONDITIONS.replace('"amount > 1000"', '"amount > lots"'))
    result = gateway("check", "--config", str(conditions_file))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{conditions_file}:21 rules[0].when.any[0]: 'amount > lots': > needs a number, got 'lots'"
    ]
