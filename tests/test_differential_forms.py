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
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from yarl import URL

from gateway.fields import read_fields
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


# -- the same property, many more bodies: Werkzeug's parser in-process -------------------

_NAMES = ["amount", " amount", "amount[]", "AMOUNT", "amo.unt", "amo_unt", "payee", "_charset_"]
_PIECES = [
    b"--b0undary\r\n", b"--b0undary--\r\n", b"\r\n", b"\n", b"\r", b"--b0undary ", b"x",
    b"Content-Type: application/octet-stream\r\n", b"Content-Type: text/plain; charset=latin1\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"\xff", b"5000", b"1", b'; filename=""',
    b"Content-Type: multipart/mixed; boundary=c\r\n", b" folded\r\n", b"--c\r\n",
    *(f'Content-Disposition: form-data; name="{name}"'.encode() for name in _NAMES),
    b"Content-Disposition: form-data; name=amount; name=payee",
]  # fmt: skip


def werkzeug_reads(content_type: str, body: bytes, query: str) -> tuple[dict, dict] | None:
    """What Flask's request.form and request.args hold for these bytes (None: refused)."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    environ = EnvironBuilder(
        method="POST", query_string=query, data=body, content_type=content_type
    ).get_environ()
    request = Request(environ)
    try:
        form = {name: request.form.getlist(name) for name in request.form}
    except Exception:  # Werkzeug refuses the body (400/413): nothing reaches the handler
        return None
    return form, {name: request.args.getlist(name) for name in request.args}


def assert_agrees(content_type: str, body: bytes, query: str = "") -> None:
    fields = read_fields(content_type, body, query)
    read = werkzeug_reads(content_type, body, query)
    if read is None:
        return
    form, args = read
    for name in [*_NAMES, "q"]:
        if fields.unsure([name]):
            continue  # the gateway refuses a request whose rule reads it
        werkzeug = form.get(name, []) + args.get(name, [])
        if name in fields.values:
            assert werkzeug == [fields.values[name]], (name, body)
        elif fields.readable:
            assert werkzeug == [], (name, body)  # missing for the gateway, and for Flask


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24), st.sampled_from(["", "q=1", "amount=1"]))
def test_multipart_fields_agree_with_werkzeug(pieces: list[bytes], query: str) -> None:
    assert_agrees(MULTIPART, b"".join(pieces), query)


_FORM_PIECES = st.sampled_from(
    ["amount=1", "amount=5000", "%20amount=2", "amount[]=3", "AMOUNT=4", "amo.unt=5", "payee=x",
     "payee=%FF", "q=1", ";", "&", "=", "+", "%20", "amo_unt=6", "_charset_=latin1", "a=b;amount=7"]
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.lists(_FORM_PIECES, max_size=10), st.lists(_FORM_PIECES, max_size=3))
def test_form_fields_agree_with_werkzeug(pieces: list[str], query: list[str]) -> None:
    assert_agrees(FORM, "&".join(pieces).encode(), "&".join(query))


_EXTRAS = [
    "",
    "\r\nContent-Type: application/octet-stream",
    "\r\nContent-Type: text/plain; charset=utf-8",
    "\r\nContent-Type: text/plain; charset=latin1",
    '; filename=""',
    '; filename="a.txt"',
    "\r\nContent-Transfer-Encoding: quoted-printable",
    "\r\n folded: 1",
    "\r\nX-Other: 1",
]
_VALUES = [b"1", b"5000", b"", b"\xe9", b"a\r\nb", b"--b0undary", b"\n--b0undary\r\n"]


@st.composite
def form_bodies(draw: st.DrawFn) -> bytes:
    """Mostly well-formed multipart bodies, with a line break or a byte changed now and then."""
    parts = draw(
        st.lists(
            st.tuples(st.sampled_from(_NAMES), st.sampled_from(_EXTRAS), st.sampled_from(_VALUES)),
            max_size=4,
        )
    )
    line = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    body = draw(st.sampled_from([b"", b"", b"preamble\r\n"]))
    for name, extra, value in parts:
        head = f'Content-Disposition: form-data; name="{name}"{extra}'.encode()
        body += b"--b0undary" + line + head.replace(b"\r\n", line) + line + line + value + line
    body += b"--b0undary--" + draw(st.sampled_from([b"\r\n", b"", b"\r\nepilogue"]))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b'"'])) + body[at:]
    return body


@settings(max_examples=3000, deadline=None)
@given(form_bodies(), st.sampled_from(["", "q=1", "amount=1"]))
def test_mostly_valid_multipart_agrees_with_werkzeug(body: bytes, query: str) -> None:
    assert_agrees(MULTIPART, body, query)
