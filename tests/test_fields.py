"""Request fields (gateway.fields): form, JSON and multipart bodies, the query, binding."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.conditions import Facts, parse_condition
from gateway.fields import (
    MAX_JSON_DEPTH,
    binding_digest,
    binding_values,
    extract_fields,
    read_fields,
)

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


# --- request fields -------------------------------------------------------------------


def _multipart(*parts: tuple[str, bytes], boundary: str = "----b0undary") -> tuple[str, bytes]:
    body = b""
    for headers, content in parts:
        body += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f'multipart/form-data; boundary="{boundary}"', body


def _field(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"' + extra


@pytest.mark.parametrize(
    ("content_type", "body", "query", "expected"),
    [
        (FORM, b"amount=1500.00&payee=DE89+3704&note=%C3%A9t%C3%A9", "",
         {"amount": "1500.00", "payee": "DE89 3704", "note": "été"}),
        (FORM + "; charset=UTF-8", b"a=1&empty=&flag", "", {"a": "1", "empty": "", "flag": ""}),
        ("Application/X-WWW-Form-URLencoded", b"a=1", "", {"a": "1"}),
        (FORM, b"a=1&a=1", "", {}),  # given twice, even alike: never judged
        (FORM, b"a=1&a=2&b=3", "", {"b": "3"}),
        (FORM, b"a=1;b=2&c=3", "", {"c": "3"}),  # ";" separates for some parsers
        (FORM, b"a=x%20y+z", "", {"a": "x y z"}),  # "+" and %20 are both a space
        (FORM, b"", "q=x", {"q": "x"}),
        (FORM, b"a=1", "q=x", {"a": "1", "q": "x"}),
        (FORM, b"a=1", "a=1&q=x", {"q": "x"}),  # in the body and the query: neither
        (FORM, b"a=1", "A=2", {}),  # ASP.NET reads names case-insensitively
        (JSON, b'{"amount": 1500.00, "currency": "EUR", "ok": true, "n": null}', "",
         {"amount": Decimal("1500.00"), "currency": "EUR", "ok": True, "n": None}),
        (JSON, b'{"beneficiary": {"iban": "DE89", "bank": {"bic": "X"}}, "l": [1]}', "",
         {"beneficiary": {"iban": "DE89", "bank": {"bic": "X"}}, "beneficiary.iban": "DE89",
          "beneficiary.bank": {"bic": "X"}, "beneficiary.bank.bic": "X", "l": [1]}),
        (JSON, b'{"a.b": 1, "a": {"b": 2}}', "", {"a": {"b": 2}}),  # dotted key collides
        (JSON, b'{"amount": 1000}', "amount=1000", {}),  # body and query: neither
        (JSON, b'{"a": 1, "a": 2, "b": 3}', "", {"b": 3}),  # a repeated key
        (JSON, b'{"p": {"a": 1, "a": 2}, "b": 3}', "", {"b": 3}),  # ... inside an object
        (JSON, b'{"a": 1e999, "b": 9007199254740993, "c": 0.1, "d": 12345678901234567}', "",
         {"c": Decimal("0.1")}),  # numbers a double cannot hold are read differently
        (JSON, b'{"a": 1' + b"0" * 10_000 + b"}", "q=1", {"q": "1"}),  # no int() limit
        (JSON, b'{"l": [{"a": 1, "a": 2}], "m": [1e400], "n": [1]}', "", {"n": [1]}),
        ("application/merge-patch+json", b'{"a": "x"}', "", {"a": "x"}),
        (JSON, b"", "q=1", {"q": "1"}),
        ("", b"", "q=1", {"q": "1"}),  # no body: the query alone
        ("text/plain", b"  \r\n", "q=1", {"q": "1"}),
    ],
)  # fmt: skip
def test_extract_fields(
    content_type: str, body: bytes, query: str, expected: dict[str, object]
) -> None:
    fields = extract_fields(content_type, body, query)
    assert fields == expected


def test_json_as_deep_as_max_json_depth_is_read() -> None:
    fields = extract_fields(JSON, b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH, "")
    assert "a" in fields and "a" * 1 + ".a" * (MAX_JSON_DEPTH - 1) in fields


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"a=%FF"),  # not UTF-8 once decoded
        (FORM, b"a=\xff"),
        (FORM, b"&".join(b"f%d=1" % n for n in range(1001))),  # past PHP's max_input_vars
        (JSON, b"{"),
        (JSON, b'{"a": NaN}'),
        (JSON, b'{"a": Infinity}'),
        (JSON, b"[1, 2]"),  # not an object
        (JSON, b'"text"'),
        (JSON, b"\xff\xfe{}"),
        (JSON, b'\xef\xbb\xbf{"a": 1}'),  # a BOM (RFC 8259 8.1: must not add one)
        (JSON, b"[" * 100_000),
        (JSON, b'{"a":' * 65 + b"1" + b"}" * 65),  # deeper than MAX_JSON_DEPTH
        (JSON, b'{"a":' * 400 + b"1" + b"}" * 400),
        ("text/xml", b"<amount>5</amount>"),  # a body the gateway cannot read
        ("application/octet-stream", b"\x00\x01"),
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"garbage"),
        ("multipart/form-data; boundary=x\r\nX-Evil: 1", b"--x--\r\n"),
    ],
)
def test_a_body_that_cannot_be_read_gives_no_fields_at_all(content_type: str, body: bytes) -> None:
    fields = read_fields(content_type, body, "q=1&amount=5")
    assert (fields.values, fields.readable) == ({}, False)


def test_every_multipart_part_without_a_filename_is_a_field() -> None:
    # Werkzeug reads a part with no filename as a field whatever its Content-Type.
    content_type, body = _multipart(
        (_field("amount"), b"1500"),
        (_field("note"), "zwei\r\nZeilen é".encode()),
        (_field("doc", '; filename="a.txt"\r\nContent-Type: text/plain'), b"a file"),
        (_field("payee", "\r\nContent-Type: application/octet-stream"), b"EVIL"),
        (_field("utf8", "\r\nContent-Type: text/plain; charset=UTF-8"), "é".encode()),
    )
    assert extract_fields(content_type, body, "q=x") == {
        "amount": "1500",
        "note": "zwei\r\nZeilen é",
        "payee": "EVIL",
        "utf8": "é",
        "q": "x",
    }


@pytest.mark.parametrize(
    ("parts", "unsure"),
    [
        ([(_field("amount"), b"1"), (_field("amount"), b"5000")], ["amount"]),
        ([(_field("amount"), b"5"), (_field("amount", '; filename=""'), b"")], ["amount"]),
        ([(_field(" amount"), b"5000")], ["amount"]),  # PHP drops leading spaces
        ([(_field("amount"), b"1"), (_field("amount[]"), b"5000")], ["amount"]),
        ([(_field("amo.unt"), b"5000")], ["amo_unt"]),  # PHP: dots become _
        ([(_field("amount%00x"), b"5000")], ["amount"]),  # ... and a name ends at NUL
        ([(_field("amo%75nt"), b"5000")], ["amount"]),  # a parser may decode escapes
        ([(_field('amount\\"'), b"5000")], ['amount"']),  # quoted-pair or literal
        ([(_field("amount", "\r\nContent-Type: text/plain; charset=iso-8859-1"), b"\xe9")],
         ["amount"]),
        ([(_field("amount", "\r\nContent-Transfer-Encoding: base64"), b"NTAwMA==")],
         ["amount"]),
        ([(_field("amount"), b"\xff5000")], ["amount"]),  # not UTF-8
        ([(_field("amount"), b"5000"), (_field("_charset_"), b"ibm037")], ["amount"]),
    ],
)  # fmt: skip
def test_multipart_fields_read_two_ways_are_unsure(
    parts: list[tuple[str, bytes]], unsure: list[str]
) -> None:
    content_type, body = _multipart(*parts)
    fields = read_fields(content_type, body, "")
    assert fields.unsure([*unsure, "other"]) == tuple(unsure)
    assert not set(unsure) & set(fields.values)


def test_a_file_part_is_not_a_field_but_takes_its_name() -> None:
    content_type, body = _multipart(
        (_field("amount", '; filename=""'), b"5000"), (_field("payee"), b"ACME")
    )
    fields = read_fields(content_type, body, "")
    assert fields.values == {"payee": "ACME"}
    assert fields.unsure(["amount", "payee"]) == ()  # a file alone: missing, not ambiguous


@pytest.mark.parametrize(
    ("body", "query", "name"),
    [
        (b"amount=1&amount=5000", "", "amount"),
        (b"amount=1", "amount=5000", "amount"),
        (b"amount=1&%20amount=5000", "", "amount"),  # PHP: " amount" is amount
        (b"%20%20amount=5000", "", "amount"),  # ... even when alone
        (b"amount=1&amount[]=5000", "", "amount"),  # PHP, qs, Rack: an array named amount
        (b"amount=1&amount[0]=5000", "", "amount"),
        (b"amount=1&amount[x]=5000", "", "amount"),
        (b"amount=1&amount%5Bx%5D=5000", "", "amount"),
        (b"amount=1&[amount]=5000", "", "amount"),  # qs and Rack skip a leading bracket
        (b"amount=1&amount[=5000", "", "amount_"),  # PHP: "[" without "]" becomes "_"
        (b"amo_unt=1&amo.unt=5000", "", "amo_unt"),  # PHP: "." and " " become "_"
        (b"amo_unt=1&amo%20unt=5000", "", "amo_unt"),
        (b"amount=1&amount%00x=5000", "", "amount"),  # PHP ends the name at NUL
        (b"amount=1&AMOUNT=5000", "", "amount"),  # ASP.NET ignores case
        (b"amount=1;amount=5000", "", "amount"),  # CGI.pm, Rack, Python < 3.10: ";"
        (b"x=1;amount=5000", "", "amount"),
        (b"amount=5000", "x=1;amount=1", "amount"),
        (b"amount=5000&_charset_=iso-8859-1", "", "amount"),  # Jetty/Tomcat decode by it
    ],
)
def test_form_fields_given_twice_or_folded_are_unsure(body: bytes, query: str, name: str) -> None:
    fields = read_fields(FORM, body, query)
    assert fields.unsure([name, "unrelated"]) == (name,)
    assert name not in fields.values


def test_a_form_charset_other_than_utf8_makes_every_field_unsure() -> None:
    fields = read_fields(FORM + "; charset=iso-8859-1", b"amount=5", "")
    assert fields.unsure(["amount"]) == ("amount",)
    assert read_fields(FORM + '; charset="utf-8"', b"amount=5", "").values == {"amount": "5"}
    assert read_fields(FORM, b"amount=5&_charset_=UTF-8", "").values["amount"] == "5"


def test_unrelated_repeats_do_not_matter() -> None:
    fields = read_fields(FORM, b"tags=a&tags=b&amount=5", "")
    assert fields.unsure(["amount"]) == ()
    assert fields.values == {"amount": "5"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        # A preamble, an epilogue, LF or CR line breaks, whitespace after a boundary:
        # Werkzeug, PHP and busboy each accept some of these and split differently.
        ("multipart/form-data; boundary=b",
         b"junk\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\nmore"),
        ("multipart/form-data; boundary=b",
         b"--b\nContent-Disposition: form-data; name=\"a\"\n\n1\n--b--\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\n--b\r\n"
         b"Content-Disposition: form-data; name=\"amount\"\r\n\r\n5000\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b \r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data;\r\n name=\"a\"\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\nX: 1\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--"
         b"\r\n--b\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n5\r\n--b--\r\n"),
        # Part headers and parameters that parsers read differently.
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"; name=\"amount\"\r\n\r\n1\r\n"
         b"--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name*=UTF-8''amount\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"; filename*=UTF-8''x\r\n\r\n1\r\n--b--"
         b"\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data\r\n\r\n1\r\n--b--\r\n"),  # no name
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Type: text/plain\r\n\r\n1\r\n--b--\r\n"),  # no Content-Disposition
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n"
         b"Content-Disposition: form-data; name=\"amount\"\r\n\r\n1\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b",
         b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n"
         b"Content-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\n1\r\n--c--\r\n--b--\r\n"),
        # Boundaries RFC 2046 does not allow, or given twice.
        ("multipart/form-data; boundary=b; boundary=c", b"--b--\r\n"),
        ('multipart/form-data; boundary="b\\"c"', b'--b"c--\r\n'),
        ('multipart/form-data; boundary="b "', b"--b --\r\n"),
        ("multipart/form-data; boundary=" + "b" * 71, b"--" + b"b" * 71 + b"--\r\n"),
    ],
)  # fmt: skip
def test_multipart_bodies_parsers_split_differently_are_not_read(
    content_type: str, body: bytes
) -> None:
    assert extract_fields(content_type, body, "q=1") == {}


def test_multipart_with_an_odd_but_valid_boundary() -> None:
    content_type, body = _multipart((_field("amount"), b"5"), boundary="a'()+_,-./:=? z")
    assert extract_fields(content_type, body, "") == {"amount": "5"}
    assert extract_fields(*_multipart(), "") == {}  # no parts at all


def test_a_smuggled_duplicate_cannot_dodge_the_risky_rule() -> None:
    risky = parse_condition("amount > 1000")
    fields = extract_fields(FORM, b"amount=1&amount=5000", "")
    assert risky.holds(Facts(fields)) is True


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(
        [FORM, JSON, "multipart/form-data; boundary=x", "multipart/form-data", "text/plain", "",
         "application/x+json", "multipart/form-data; boundary=\"\""]
    ),
    st.binary(max_size=300),
    st.text(max_size=30),
)  # fmt: skip
def test_read_fields_never_raises(content_type: str, body: bytes, query: str) -> None:
    fields = read_fields(content_type, body, query)
    assert isinstance(fields.values, dict)
    fields.unsure(["a", "amount", "q"])


_MULTIPART_PIECES = st.sampled_from(
    [b"--x\r\n", b"--x--\r\n", b"Content-Disposition: form-data; name=\"a\"\r\n",
     b"Content-Type: text/plain; charset=bogus\r\n", b"Content-Transfer-Encoding: base64\r\n",
     b"\r\n", b"value\r\n", b"\xff\xfe", b"Content-Type: multipart/mixed; boundary=y\r\n",
     b"--y\r\n", b"filename*=utf-8''%e9\r\n", b"=?utf-8?q?x?=", b"\n", b"; filename=\"\"",
     b"name=\"a\\\"b%22\"", b"name=\"%ff\""]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(_MULTIPART_PIECES, max_size=20))
def test_multipart_near_misses_never_raise(pieces: list[bytes]) -> None:
    fields = read_fields("multipart/form-data; boundary=x", b"".join(pieces), "")
    assert isinstance(fields.values, dict)
    fields.unsure(["a"])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_extract_fields_never_raises_on_arbitrary_content_types(content_type: str) -> None:
    assert isinstance(extract_fields(content_type, b"a=1", ""), dict)


# --- binding --------------------------------------------------------------------------


def test_binding_values_and_digest() -> None:
    fields = extract_fields(
        JSON,
        b'{"amount": 1500.00, "payee": {"iban": "DE89", "name": "B"}, "ok": false}',
        "ref=x",
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
