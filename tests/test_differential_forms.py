"""Form and JSON bodies through the gateway to Flask (Werkzeug) on gunicorn.

The same crafted bytes are judged by the gateway and read by a real Flask app.
For every body, either the gateway refuses it (400), or it applies the stricter
rule because it cannot know the field (401), or what Flask reads is exactly what
the gateway judged: a ``when: amount >= 1000`` rule is never skipped while Flask
reads 1000 or more, and a ``bind`` approval is for the values Flask acts on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import Browser, Stack, free_port, query_of
from tests.support.werkzeug_upstream import FlaskUpstream, start_flask
from tests.test_gateway import PHR_USER, sign_in
from tests.test_transactional import finish_round_trip

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

RULES = """\
rules:
  - name: big
    match: {path: /pay, methods: [POST]}
    when: "amount >= 1000"
    require: {level: phishing-resistant, max_age: 5m}
  - name: small
    match: {path: /pay, methods: [POST]}
    require: {level: password}
  - name: payout
    match: {path: /payout, methods: [POST]}
    require: {level: phishing-resistant, max_age: 5m, bind: [amount, payee]}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


@pytest.fixture(scope="session")
def flask_upstream() -> Iterator[FlaskUpstream]:
    try:
        flask = start_flask(free_port())
    except RuntimeError as exc:
        pytest.fail(f"Flask on gunicorn must start for these tests: {exc}")
    yield flask
    flask.stop()


@pytest.fixture
async def fstack(make_stack: Any, flask_upstream: FlaskUpstream) -> Stack:
    stack: Stack = await make_stack(rules=RULES, upstream_url=flask_upstream.url)
    return stack


def multipart(*parts: tuple[str, bytes], line: bytes = b"\r\n") -> bytes:
    """A form body; each part is ("name[; params][\r\nmore headers]", content)."""
    body = b""
    for head, content in parts:
        disposition, crlf, more = head.partition("\r\n")
        name, semicolon, params = disposition.partition(";")
        headers = f'Content-Disposition: form-data; name="{name}"{semicolon}{params}{crlf}{more}'
        body += b"--" + BOUNDARY.encode() + line + headers.encode().replace(b"\r\n", line)
        body += line + line + content + line
    return body + b"--" + BOUNDARY.encode() + b"--" + line


def deep(levels: int, leaf: str = "1") -> str:
    return '{"x":' * levels + leaf + "}" * levels


async def post(
    browser: Browser, stack: Stack, path: str, content_type: str, body: bytes, query: str = ""
) -> tuple[int, dict[str, Any] | None]:
    url = URL(f"{stack.url}{path}{'?' + query if query else ''}", encoded=True)
    async with browser.http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.status == 200 else None


def amounts_read(seen: dict[str, Any]) -> list[object]:
    """Every amount Flask offers its handler: request.form, request.args, the JSON."""
    document = seen["json"]
    in_json = [document["amount"]] if isinstance(document, dict) and "amount" in document else []
    return seen["form"].get("amount", []) + seen["args"].get("amount", []) + in_json


def as_number(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# (id, content type, body, query, the gateway's answer)
WHEN_CASES = [
    ("small", FORM, b"amount=20", "", 200),
    ("big", FORM, b"amount=5000", "", 401),
    ("a non-text part is a field",
     MULTIPART, multipart(("amount\r\nContent-Type: application/octet-stream", b"20")), "", 200),
    ("a non-text part before a text one",
     MULTIPART, multipart(("amount\r\nContent-Type: application/octet-stream", b"5000"),
                          ("amount", b"1")), "", 400),
    ("a non-text part alone",
     MULTIPART, multipart(("amount\r\nContent-Type: application/json", b"5000")), "", 401),
    ("a file and a field", MULTIPART,
     multipart(('amount; filename=""', b"5000"), ("amount", b"1")), "", 400),
    ("a base64 part", MULTIPART,
     multipart(("amount\r\nContent-Transfer-Encoding: base64", b"NTAwMA==")), "", 400),
    ("LF line breaks", MULTIPART, multipart(("amount", b"5000"), line=b"\n"), "", 401),
    ("LF line breaks, small", MULTIPART, multipart(("amount", b"20"), line=b"\n"), "", 401),
    ("repeated", FORM, b"amount=1&amount=5000", "", 400),
    ("repeated alike", FORM, b"amount=5000&amount=5000", "", 400),
    ("body and query", FORM, b"amount=1", "amount=5000", 400),
    ("PHP drops a leading space", FORM, b"amount=1&%20amount=5000", "", 400),
    ("PHP leading space alone", FORM, b"%20amount=5000", "", 400),
    ("PHP array", FORM, b"amount=1&amount%5B%5D=5000", "", 400),
    ("qs index", FORM, b"amount=1&amount[0]=5000", "", 400),
    ("case", FORM, b"amount=1&AMOUNT=5000", "", 400),
    ("semicolon", FORM, b"amount=1;amount=5000", "", 400),
    ("semicolon in the query", FORM, b"amount=1", "x=1;amount=5000", 400),
    ("_charset_", FORM, b"amount=20&_charset_=ibm037", "", 400),
    ("charset parameter", FORM + "; charset=utf-16", b"amount=20", "", 400),
    ("plus and %20 are spaces", FORM, b"amount=20&note=a+b%20c", "", 200),
    ("past max_input_vars", FORM, b"f=1&" * 1000 + b"amount=20", "", 401),
    ("JSON", JSON, b'{"amount": 20}', "", 200),
    ("JSON big", JSON, b'{"amount": 5000}', "", 401),
    ("JSON repeated key", JSON, b'{"amount": 5000, "amount": 1}', "", 400),
    ("JSON and query", JSON, b'{"amount": 20}', "amount=5000", 400),
    ("JSON beyond a double", JSON, b'{"amount": 999.99999999999999999}', "", 400),
    ("JSON 1e999", JSON, b'{"amount": 1e999}', "", 400),
    ("JSON 400 deep", JSON, f'{{"amount": {deep(400)}}}'.encode(), "", 401),
    ("JSON with a BOM", JSON, b'\xef\xbb\xbf{"amount": 20}', "", 401),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "body", "query", "status"),
    [case[1:] for case in WHEN_CASES],
    ids=[case[0] for case in WHEN_CASES],
)
async def test_when_judges_what_flask_reads(
    fstack: Stack, browser: Browser, content_type: str, body: bytes, query: str, status: int
) -> None:
    await sign_in(fstack, browser)  # a password session: "small" lets it through, "big" not
    answer, seen = await post(browser, fstack, "/pay", content_type, body, query)
    assert answer == status
    if answer == 200:
        assert seen is not None and seen["rule"] == "small"
        amounts = [as_number(value) for value in amounts_read(seen)]
        assert all(amount is None or amount < 1000 for amount in amounts), seen


async def test_an_ambiguous_field_is_logged_by_name_never_by_value(
    fstack: Stack, browser: Browser
) -> None:
    await sign_in(fstack, browser)
    with capture_logs() as logs:
        answer, _ = await post(browser, fstack, "/pay", FORM, b"amount=1&%20amount=5678")
    assert answer == 400
    refused = [entry for entry in logs if entry["event"] == "ambiguous_field"]
    assert refused == [{"event": "ambiguous_field", "fields": ["amount"], "log_level": "warning"}]
    assert "5678" not in json.dumps(logs, default=str)


# -- bind: the approval is for the values Flask acts on ----------------------------------


async def approve_and_replay(
    stack: Stack, browser: Browser, content_type: str, body: bytes
) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
    """A form post to /payout: (status, the values approved, what Flask then read)."""
    hop = await browser.request(
        "POST",
        f"{stack.url}/payout",
        data=body,
        headers={
            "Content-Type": content_type,
            "Sec-Fetch-Mode": "navigate",
            "Sec-Fetch-Site": "same-origin",
            "Origin": stack.url,
        },
    )
    if hop.status != 302:
        return hop.status, None, None
    approved = json.loads(query_of(hop.headers["Location"])["authorization_details"])[0]
    stack.op.behaviour.user = PHR_USER
    back = await finish_round_trip(browser, hop)
    resumed = await browser.get(f"{stack.url}{back.headers['Location']}")
    assert resumed.status == 200, resumed.body
    return 200, approved, json.loads(resumed.body)


BIND_CASES = [
    ("plain", FORM, b"amount=250&payee=ACME", 200),
    ("a non-text payee is a field", MULTIPART,
     multipart(("amount", b"250"), ("payee\r\nContent-Type: application/octet-stream", b"ACME")),
     200),
    ("a non-text payee before the text one", MULTIPART,
     multipart(("amount", b"250"), ("payee\r\nContent-Type: application/octet-stream", b"EVIL"),
               ("payee", b"ACME")), 400),
    ("a payee PHP folds", FORM, b"amount=250&payee=ACME&%20payee=EVIL", 400),
    ("a payee in a charset", MULTIPART,
     multipart(("amount", b"250"), ("payee\r\nContent-Type: text/plain; charset=utf-16", b"ACME")),
     400),
    ("a preamble", MULTIPART,
     b"--" + BOUNDARY.encode() + b"x\r\n" + multipart(("amount", b"250"), ("payee", b"ACME")),
     400),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [case[1:] for case in BIND_CASES],
    ids=[case[0] for case in BIND_CASES],
)
async def test_bind_approves_what_flask_reads(
    fstack: Stack, browser: Browser, content_type: str, body: bytes, status: int
) -> None:
    await sign_in(fstack, browser)
    answer, approved, seen = await approve_and_replay(fstack, browser, content_type, body)
    assert answer == status
    if answer == 200:
        assert approved is not None and seen is not None and seen["rule"] == "payout"
        for name in ("amount", "payee"):
            assert seen["form"][name] == [approved[name]]  # one value, the one approved


async def test_bind_on_json_nested_400_levels_fails_closed(fstack: Stack, browser: Browser) -> None:
    await sign_in(fstack, browser)
    body = f'{{"amount": 250, "payee": {deep(400)}}}'.encode()
    answer, _ = await post(browser, fstack, "/payout", JSON, body)
    assert answer == 401  # too deep to read: nothing bound, so no proof can match (not a 500)


async def test_a_body_that_is_not_read_is_logged(fstack: Stack, browser: Browser) -> None:
    await sign_in(fstack, browser)
    with capture_logs() as logs:
        answer, _ = await post(
            browser, fstack, "/pay", MULTIPART, multipart(("a", b"1"), line=b"\n")
        )
    assert answer == 401
    assert {
        "event": "body_not_read",
        "reason": "unreadable",
        "content_type": "multipart/form-data",
        "log_level": "info",
    } in logs
