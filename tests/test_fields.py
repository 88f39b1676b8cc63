"""Request fields (gateway.fields): form, JSON and multipart bodies, the query, binding."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.conditions import Facts, parse_condition
from gateway.fields import binding_digest, binding_values, extract_fields

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


# --- request fields -------------------------------------------------------------------


def _multipart(*parts: tuple[str, str, bytes]) -> tuple[str, bytes]:
    boundary = "----b0undary"
    body = b""
    for headers, _, content in parts:
        body += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


@pytest.mark.parametrize(
    ("content_type", "body", "query", "expected"),
    [
        (FORM, b"amount=1500.00&payee=DE89+3704&note=%C3%A9t%C3%A9", {},
         {"amount": "1500.00", "payee": "DE89 3704", "note": "été"}),
        (FORM + "; charset=UTF-8", b"a=1&empty=", {}, {"a": "1", "empty": ""}),
        ("Application/X-WWW-Form-URLencoded", b"a=1", {}, {"a": "1"}),
        (FORM, b"a=1&a=1", {}, {"a": "1"}),  # repeated with the same value
        (FORM, b"a=1&a=2&b=3", {}, {"b": "3"}),  # repeated with different values: left out
        (FORM, b"a=1;b=2", {}, {"a": "1;b=2"}),  # only & separates (as aiohttp)
        (FORM, b"", {"q": "x"}, {"q": "x"}),
        (FORM, b"a=1", {"a": "1", "q": "x"}, {"a": "1", "q": "x"}),
        (FORM, b"a=1", {"a": "2", "q": "x"}, {"q": "x"}),  # body and query disagree
        (JSON, b'{"amount": 1500.00, "currency": "EUR", "ok": true, "n": null}', {},
         {"amount": Decimal("1500.00"), "currency": "EUR", "ok": True, "n": None}),
        (JSON, b'{"beneficiary": {"iban": "DE89", "bank": {"bic": "X"}}, "l": [1]}', {},
         {"beneficiary": {"iban": "DE89", "bank": {"bic": "X"}}, "beneficiary.iban": "DE89",
          "beneficiary.bank": {"bic": "X"}, "beneficiary.bank.bic": "X", "l": [1]}),
        (JSON, b'{"a.b": 1, "a": {"b": 2}}', {}, {"a": {"b": 2}}),  # dotted key collides
        (JSON, b'{"a.b": 1, "a": {"b": 1}}', {}, {"a.b": 1, "a": {"b": 1}}),
        (JSON, b'{"amount": 1000}', {"amount": "1000"}, {"amount": 1000}),  # agree as text
        ("application/merge-patch+json", b'{"a": "x"}', {}, {"a": "x"}),
        (JSON, b"", {"q": "1"}, {"q": "1"}),
        ("", b"", {"q": "1"}, {"q": "1"}),  # no body: the query alone
        ("text/plain", b"  \r\n", {"q": "1"}, {"q": "1"}),
    ],
)  # fmt: skip
def test_extract_fields(
    content_type: str, body: bytes, query: dict[str, str], expected: dict[str, object]
) -> None:
    assert extract_fields(content_type, body, query) == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"a=%FF"),  # not UTF-8 once decoded
        (FORM, b"a=\xff"),
        (JSON, b"{"),
        (JSON, b'{"a": 1, "a": 2}'),  # duplicate keys: parsers disagree on which wins
        (JSON, b'{"a": NaN}'),
        (JSON, b'{"a": Infinity}'),
        (JSON, b"[1, 2]"),  # not an object
        (JSON, b'"text"'),
        (JSON, b"\xff\xfe{}"),
        (JSON, b"1" * 5000),  # int() refuses this many digits
        (JSON, b"[" * 100_000),
        ("text/xml", b"<amount>5</amount>"),  # a body the gateway cannot read
        ("application/octet-stream", b"\x00\x01"),
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"garbage"),
        ("multipart/form-data; boundary=x\r\nX-Evil: 1", b"--x--\r\n"),
    ],
)
def test_a_body_that_cannot_be_read_gives_no_fields_at_all(content_type: str, body: bytes) -> None:
    assert extract_fields(content_type, body, {"q": "1", "amount": "5"}) == {}


def test_multipart_text_parts_only() -> None:
    content_type, body = _multipart(
        ('Content-Disposition: form-data; name="amount"', "", b"1500"),
        ('Content-Disposition: form-data; name="note"', "", "zwei\r\nZeilen é".encode()),
        (
            'Content-Disposition: form-data; name="doc"; filename="a.txt"\r\n'
            "Content-Type: text/plain",
            "",
            b"a file",
        ),
        ('Content-Disposition: form-data; name="img"\r\nContent-Type: image/png', "", b"\x89PNG"),
        (
            'Content-Disposition: form-data; name="latin"\r\nContent-Type: text/plain; '
            "charset=iso-8859-1",
            "",
            "é".encode("latin-1"),
        ),
    )
    assert extract_fields(content_type, body, {"q": "x"}) == {
        "amount": "1500",
        "note": "zwei\r\nZeilen é",
        "latin": "é",
        "q": "x",
    }


def test_multipart_transfer_encoding_is_refused() -> None:
    # RFC 7578 4.7: deprecated, and an upstream would read the encoded text.
    content_type, body = _multipart(
        (
            'Content-Disposition: form-data; name="amount"\r\nContent-Transfer-Encoding: base64',
            "",
            b"MTUwMA==",
        ),
    )
    assert extract_fields(content_type, body, {}) == {}


def test_multipart_repeated_names_that_disagree_are_left_out() -> None:
    content_type, body = _multipart(
        ('Content-Disposition: form-data; name="amount"', "", b"1"),
        ('Content-Disposition: form-data; name="amount"', "", b"5000"),
        ('Content-Disposition: form-data; name="payee"', "", b"X"),
    )
    assert extract_fields(content_type, body, {}) == {"payee": "X"}


def test_query_duplicates_in_a_multidict_are_seen() -> None:
    from multidict import MultiDict

    query = MultiDict([("amount", "1"), ("amount", "5000"), ("q", "x")])
    assert extract_fields("", b"", query) == {"q": "x"}


def test_a_smuggled_duplicate_cannot_dodge_the_risky_rule() -> None:
    risky = parse_condition("amount > 1000")
    fields = extract_fields(FORM, b"amount=1&amount=5000", {})
    assert risky.holds(Facts(fields)) is True


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(
        [FORM, JSON, "multipart/form-data; boundary=x", "multipart/form-data", "text/plain", "",
         "application/x+json", "multipart/form-data; boundary=\"\""]
    ),
    st.binary(max_size=300),
)  # fmt: skip
def test_extract_fields_never_raises(content_type: str, body: bytes) -> None:
    fields = extract_fields(content_type, body, {"q": "1"})
    assert isinstance(fields, dict)


_MULTIPART_PIECES = st.sampled_from(
    [b"--x\r\n", b"--x--\r\n", b"Content-Disposition: form-data; name=\"a\"\r\n",
     b"Content-Type: text/plain; charset=bogus\r\n", b"Content-Transfer-Encoding: base64\r\n",
     b"\r\n", b"value\r\n", b"\xff\xfe", b"Content-Type: multipart/mixed; boundary=y\r\n",
     b"--y\r\n", b"filename*=utf-8''%e9\r\n", b"=?utf-8?q?x?=", b"\n"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_MULTIPART_PIECES, max_size=20))
def test_multipart_near_misses_never_raise(pieces: list[bytes]) -> None:
    fields = extract_fields("multipart/form-data; boundary=x", b"".join(pieces), {})
    assert isinstance(fields, dict)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_extract_fields_never_raises_on_arbitrary_content_types(content_type: str) -> None:
    assert isinstance(extract_fields(content_type, b"a=1", {}), dict)


# --- binding --------------------------------------------------------------------------


def test_binding_values_and_digest() -> None:
    fields = extract_fields(
        JSON,
        b'{"amount": 1500.00, "payee": {"iban": "DE89", "name": "B"}, "ok": false}',
        {"ref": "x"},
    )
    values = binding_values(["amount", "payee", "payee.iban", "ok", "ref", "missing"], fields)
    assert values == {
        "amount": "1500.00",
        "payee": '{"iban":"DE89","name":"B"}',
        "payee.iban": "DE89",
        "ok": "false",
        "ref": "x",
        "missing": None,
    }
    canonical = (
        '{"amount":"1500.00","missing":null,"ok":"false","payee":"{\\"iban\\":\\"DE89\\",'
        '\\"name\\":\\"B\\"}","payee.iban":"DE89","ref":"x"}'
    )
    digest = binding_digest(["amount", "payee", "payee.iban", "ok", "ref", "missing"], fields)
    assert digest == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    ("bind", "a", "b", "same"),
    [
        (["amount", "payee"], {"amount": "10", "payee": "X"}, {"payee": "X", "amount": "10"}, True),
        (["amount"], {"amount": "10"}, {"amount": "10.0"}, False),  # bound as written
        (["amount"], {"amount": "10"}, {"amount": 10}, True),  # form text and JSON number
        (["amount"], {"amount": None}, {}, True),  # null and missing both bind null
        (["amount"], {"amount": "null"}, {}, False),
        (["amount"], {"amount": "10"}, {"amount": "10", "other": "y"}, True),
        (["amount", "payee"], {"amount": "10"}, {"amount": "10", "payee": "X"}, False),
    ],
)
def test_binding_digest_compares_what_is_bound(
    bind: list[str], a: dict[str, object], b: dict[str, object], same: bool
) -> None:
    assert (binding_digest(bind, a) == binding_digest(bind, b)) is same


def test_binding_order_does_not_matter_but_names_do() -> None:
    fields = {"amount": "10", "payee": "X", "other": "10"}
    assert binding_digest(["amount", "payee"], fields) == binding_digest(
        ["payee", "amount"], fields
    )
    assert binding_digest(["amount"], fields) != binding_digest(["other"], fields)
    assert len(binding_digest([], fields)) == 64
