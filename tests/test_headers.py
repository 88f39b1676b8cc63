"""gateway.headers: what the upstream may see, what the client gets back, framing."""

from __future__ import annotations

import contextlib
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors, headers

GATEWAY_COOKIES = frozenset({"stepup_session", "__Host-stepup_session"})
GATEWAY_COOKIE_PREFIXES = ("stepup_tx_", "__Host-stepup_tx_")


def build(
    inbound: list[tuple[str, str]],
    *,
    allow_method_override: bool = False,
    peer_ip: str = "192.0.2.10",
    peer_trusted: bool = False,
    websocket: bool = False,
    host: str = "bank.example.com",
    trusted: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    hops = headers.client_chain(
        inbound, peer=peer_ip, peer_trusted=peer_trusted, is_trusted=trusted.__contains__
    )
    out = headers.upstream_request_headers(
        inbound,
        prefix="X-Auth-",
        allow_method_override=allow_method_override,
        strip_cookies=GATEWAY_COOKIES,
        strip_cookie_prefixes=GATEWAY_COOKIE_PREFIXES,
        client_ip=peer_ip,
        peer_trusted=peer_trusted,
        scheme="https",
        host=host,
        request_id="rid-1",
        upstream_host="app.internal:9000",
        websocket=websocket,
        hops=hops,
    )
    return list(out.items())


def values(out: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in out if k.lower() == name.lower()]


GATEWAY_SET = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"}


def passed_through(out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in out if k.lower() not in GATEWAY_SET | {"x-request-id"}]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X-Auth-Acr", True),
        ("x-auth-acr", True),
        ("X-AUTH-ACR", True),
        ("X_Auth_Acr", True),
        ("x_auth-acr", True),
        ("X-Auth-", True),
        ("X.Auth.Acr", True),  # HTTP_X_AUTH_ACR in PHP/CGI, X-Auth-Acr in Werkzeug
        ("X~Auth~Acr", True),  # Apache maps every non-alphanumeric to "_"
        ("x.auth_ACR", True),
        ("X-Auth", False),
        ("X-Authorization", False),
        ("Authorization", False),
        ("X-Author-Name", False),
        ("XX-Auth-Acr", False),
    ],
)
def test_is_assurance_header(name: str, expected: bool) -> None:
    assert headers.is_assurance_header(name, "X-Auth-") is expected


def test_hop_by_hop_covers_rfc_9110_and_proxy_headers() -> None:
    assert {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } <= headers.HOP_BY_HOP


def test_empty_prefix_is_refused() -> None:
    # "" would match every header name: nothing would reach the upstream.
    with pytest.raises(ValueError, match="prefix"):
        headers.upstream_request_headers(
            [],
            prefix="",
            allow_method_override=False,
            strip_cookies=(),
            client_ip="192.0.2.1",
            peer_trusted=False,
            scheme="https",
            host="h",
            request_id="r",
            upstream_host="u",
        )


@pytest.mark.parametrize("prefix", ["X-Auth-", "x_auth_", "X_AUTH-"])
def test_prefix_spelling_does_not_matter(prefix: str) -> None:
    out = headers.upstream_request_headers(
        [("X-Auth-Acr", "evil"), ("x_auth_level", "evil"), ("Accept", "*/*")],
        prefix=prefix,
        allow_method_override=False,
        strip_cookies=(),
        client_ip="192.0.2.1",
        peer_trusted=False,
        scheme="https",
        host="h",
        request_id="r",
        upstream_host="u",
    )

    assert not [k for k in out if headers.is_assurance_header(k, "X-Auth-")]
    assert out.getall("Accept") == ["*/*"]


@pytest.mark.parametrize(
    ("values_", "tokens"),
    [
        (["close"], {"close"}),
        (["keep-alive, X-Foo"], {"keep-alive", "x-foo"}),
        (["x_auth_acr ,, \tUpgrade"], {"x-auth-acr", "upgrade"}),
        (["a", "b"], {"a", "b"}),
        ([""], set()),
    ],
)
def test_connection_tokens(values_: list[str], tokens: set[str]) -> None:
    assert headers.connection_tokens(values_) == tokens


# --------------------------------------------------------------------------- request


@pytest.mark.parametrize(
    "spoofed",
    [
        [("X-Auth-Acr", "evil")],
        [("x-auth-subject", "admin"), ("X-AUTH-SUBJECT", "root")],
        [("X_Auth_Level", "high")],
        [("x_auth_assertion", "eyJ...")],
        [("X-Auth-Acr", "a"), ("X-Auth-Acr", "b"), ("x_auth_acr", "c")],
        [("X.Auth.Subject", "admin")],
        [("X.Auth-Level", "high"), ("X~Auth~Rule", "transfers"), ("X-Auth.Email", "a@b")],
        [("X!Auth#Amr", "hwk"), ("X'Auth*Time", "1"), ("X|Auth`Acr", "phr")],
    ],
)
def test_assurance_headers_are_removed(spoofed: list[tuple[str, str]]) -> None:
    out = build([("Accept", "*/*"), *spoofed])

    assert not [k for k, _ in out if headers.is_assurance_header(k, "X-Auth-")]
    assert values(out, "Accept") == ["*/*"]


@pytest.mark.parametrize(
    ("connection", "removed", "kept"),
    [
        ("x-custom", ["X-Custom"], ["Content-Length"]),
        ("host, content-length", [], ["Content-Length"]),
        ("X-Custom, Content-Length", ["X-Custom"], ["Content-Length"]),
        ("x_custom", ["X-Custom"], ["Content-Length"]),
        ("x-auth-acr", [], ["Content-Length"]),
    ],
)
def test_connection_listed_headers(connection: str, removed: list[str], kept: list[str]) -> None:
    out = build(
        [
            ("Host", "bank.example.com"),
            ("Connection", connection),
            ("X-Custom", "1"),
            ("Content-Length", "5"),
            ("X-Auth-Acr", "evil"),
        ]
    )

    for name in removed:
        assert values(out, name) == []
    for name in kept:
        assert values(out, name) != []
    assert values(out, "Host") == ["app.internal:9000"]
    assert values(out, "Connection") == []
    assert values(out, "X-Auth-Acr") == []


def test_hop_by_hop_and_path_overrides_are_removed() -> None:
    inbound = [
        ("Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic eA=="),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Transfer-Encoding", "chunked"),
        ("Transfer_Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ("Expect", "100-continue"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Request-Id", "client-chosen"),
        ("Host", "evil.example"),
    ]

    out = build(inbound)

    assert passed_through(out) == []
    assert values(out, "X-Request-Id") == ["rid-1"]
    assert values(out, "Host") == ["app.internal:9000"]


@pytest.mark.parametrize("allowed", [False, True])
@pytest.mark.parametrize("name", [*headers.METHOD_OVERRIDE_HEADERS, "X_HTTP_Method_Override"])
def test_method_override_only_when_the_rule_allows_it(name: str, allowed: bool) -> None:
    out = build([(name, "DELETE")], allow_method_override=allowed)

    assert values(out, name) == (["DELETE"] if allowed else [])


FORWARDING_IN = [
    ("X-Forwarded-For", "203.0.113.1"),
    ("X-Forwarded-For", "198.51.100.2, 198.51.100.3"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Real-IP", "198.51.100.3"),
    ("True-Client-IP", "203.0.113.1"),
    ("X-Forwarded-Port", "80"),
]


@pytest.mark.parametrize(
    "alias",
    [
        "XAuthSubject",  # separators left out altogether
        "X-AuthSubject",
        "XAuth-Assertion",
        "X.Forwarded.Host",
        "X_Forwarded_Proto",
        "XForwardedHost",
        "X.Request.Id",
        "X_Real_IP",
        "X.Original.URL",
        "X_Rewrite_Url",
    ],
)
def test_aliases_of_the_gateways_own_headers_are_removed(alias: str) -> None:
    """Equal to one of the gateway's names once case, "-", "_" and "." are ignored."""
    for peer_trusted in (False, True):
        out = build([(alias, "forged"), ("Accept", "*/*")], peer_trusted=peer_trusted)
        assert [(k, v) for k, v in out if v == "forged"] == []
        assert values(out, "Accept") == ["*/*"]


def test_ordinary_names_with_separators_are_kept() -> None:
    kept = [("X-Authorization", "t"), ("X.Custom.Thing", "1"), ("X_Trace", "2")]
    assert passed_through(build(kept)) == kept


@pytest.mark.parametrize(
    ("lines", "chain"),
    [
        ([("X-Forwarded-For", "203.0.113.1")], ["203.0.113.1"]),
        (
            [("X-Forwarded-For", "203.0.113.1"), ("X-Forwarded-For", "198.51.100.2, 10.0.0.1")],
            ["203.0.113.1", "198.51.100.2", "10.0.0.1"],
        ),
        (
            [("x-forwarded-for", " a ,, b "), ("Accept", "*/*"), ("X_Forwarded_For", "c")],
            ["a", "b", "c"],
        ),
        ([("X.Forwarded.For", "d")], ["d"]),
    ],
)
def test_forwarded_for_chain_reads_every_line(
    lines: list[tuple[str, str]], chain: list[str]
) -> None:
    assert headers.forwarded_for_chain(lines) == chain
    # ... and, when every hop is trusted, it is what the upstream is sent, then the peer.
    out = build(lines, peer_trusted=True, trusted=frozenset(chain))
    assert values(out, "X-Forwarded-For") == [", ".join([*chain, "192.0.2.10"])]
    assert headers.client_chain(lines, peer="192.0.2.10", peer_trusted=True)[0] == chain[-1]


@pytest.mark.parametrize(
    ("lines", "trusted", "hops"),
    [
        # The client is the first address from the right that is not a trusted proxy.
        (
            [("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "203.0.113.66, 10.0.0.1")],
            {"10.0.0.1"},
            ("203.0.113.66", "10.0.0.1", "192.0.2.10"),
        ),
        # Every hop trusted: the leftmost is the client (what Express's req.ip says too).
        ([("X-Forwarded-For", "10.0.0.2, 10.0.0.1")], {"10.0.0.1", "10.0.0.2"},
         ("10.0.0.2", "10.0.0.1", "192.0.2.10")),
        # No chain: the peer itself.
        ([], set(), ("192.0.2.10",)),
        # Forwarded alone (RFC 7239), with quoting, ports and IPv6.
        (
            [("Forwarded", 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.1:80')],
            {"10.0.0.1"},
            ("2001:db8::1", "10.0.0.1", "192.0.2.10"),
        ),
        ([("Forwarded", 'for=_hidden;by="a,b", for=unknown')], set(), ("unknown", "192.0.2.10")),
        ([("Forwarded", "proto=https")], set(), ("unknown", "192.0.2.10")),
        # Both, naming the same hops: fine.
        (
            [("X-Forwarded-For", "203.0.113.1"), ("Forwarded", 'for="203.0.113.1:5000"')],
            set(),
            ("203.0.113.1", "192.0.2.10"),
        ),
    ],
)  # fmt: skip
def test_client_chain(
    lines: list[tuple[str, str]], trusted: set[str], hops: tuple[str, ...]
) -> None:
    assert (
        headers.client_chain(
            lines, peer="192.0.2.10", peer_trusted=True, is_trusted=trusted.__contains__
        )
        == hops
    )
    # From an untrusted peer none of it counts.
    assert headers.client_chain(lines, peer="192.0.2.10", peer_trusted=False) == ("192.0.2.10",)


def test_forwarded_and_x_forwarded_for_that_disagree_are_refused() -> None:
    lines = [("X-Forwarded-For", "198.51.100.7"), ("Forwarded", "for=203.0.113.66")]
    with pytest.raises(errors.BadRequest) as refused:
        headers.client_chain(lines, peer="192.0.2.10", peer_trusted=True)
    assert refused.value.reason == "forwarding_mismatch"


def test_forwarded_host_and_proto_sent_twice_are_replaced() -> None:
    inbound = [
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Host", "bank.example.com"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Proto", "https"),
    ]
    for peer_trusted in (False, True):
        out = build(inbound, peer_trusted=peer_trusted)
        assert values(out, "X-Forwarded-Host") == ["bank.example.com"]
        assert values(out, "X-Forwarded-Proto") == ["https"]


def test_forwarding_from_an_untrusted_peer() -> None:
    out = build(FORWARDING_IN, peer_trusted=False)

    assert values(out, "X-Forwarded-For") == ["192.0.2.10"]
    assert values(out, "X-Forwarded-Proto") == ["https"]
    assert values(out, "X-Forwarded-Host") == ["bank.example.com"]
    assert values(out, "Forwarded") == ["for=192.0.2.10;host=bank.example.com;proto=https"]
    assert passed_through(out) == []


def test_forwarding_from_a_trusted_peer() -> None:
    """Only the hops the gateway vouches for go on: the client it judged, then proxies."""
    out = build(FORWARDING_IN, peer_trusted=True)

    assert values(out, "X-Forwarded-For") == ["198.51.100.3, 192.0.2.10"]
    assert values(out, "X-Forwarded-Proto") == ["https"]
    assert values(out, "X-Forwarded-Host") == ["bank.example.com"]
    assert values(out, "Forwarded") == [
        "for=198.51.100.3;host=bank.example.com;proto=https, "
        "for=192.0.2.10;host=bank.example.com;proto=https"
    ]
    assert values(out, "X-Real-IP") == ["198.51.100.3"]  # names the client judged: kept
    assert values(out, "True-Client-IP") == []  # names another: an upstream would act on it
    assert values(out, "X-Forwarded-Port") == ["80"]

    out = build(FORWARDING_IN, peer_trusted=True, trusted=frozenset({"198.51.100.3"}))
    assert values(out, "X-Forwarded-For") == ["198.51.100.2, 198.51.100.3, 192.0.2.10"]


@pytest.mark.parametrize(
    ("peer_ip", "host", "forwarded"),
    [
        ("::1", "bank.example.com", 'for="[::1]";host=bank.example.com;proto=https'),
        (
            "10.0.0.1",
            "bank.example.com:8443",
            'for=10.0.0.1;host="bank.example.com:8443";proto=https',
        ),
        ("10.0.0.1", '"odd"', 'for=10.0.0.1;host="\\"odd\\"";proto=https'),
    ],
)
def test_forwarded_element_quoting(peer_ip: str, host: str, forwarded: str) -> None:
    # RFC 7239 4 and 6: IPv6 nodes bracketed and quoted, non-token values quoted.
    out = build([], peer_ip=peer_ip, host=host)

    assert values(out, "Forwarded") == [forwarded]


@pytest.mark.parametrize(
    ("cookies", "forwarded"),
    [
        (["a=1; b=2"], ["a=1; b=2"]),
        (["a=1; __Host-stepup_session=S; b=2"], ["a=1; b=2"]),
        (["stepup_session=S"], []),
        (["__Host-stepup_tx_abc=T; stepup_tx_def=U"], []),
        (["a=1", "stepup_session=S", "b=2"], ["a=1; b=2"]),
        (["a=1;;  ; b=2"], ["a=1; b=2"]),
        (
            ["stepup_session_x=keep; xstepup_session=keep"],
            ["stepup_session_x=keep; xstepup_session=keep"],
        ),
        (["  stepup_session = S ; a=1"], ["a=1"]),
        (["flag; stepup_session=S"], ["flag"]),
    ],
)
def test_gateway_cookies_are_stripped(cookies: list[str], forwarded: list[str]) -> None:
    out = build([("Cookie", value) for value in cookies])

    assert values(out, "Cookie") == forwarded


def test_websocket_handshake_headers_are_left_to_ws_connect() -> None:
    inbound = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ("Origin", "https://bank.example.com"),
    ]

    assert passed_through(build(inbound, websocket=True)) == [
        ("Origin", "https://bank.example.com")
    ]
    assert [k for k, _ in passed_through(build(inbound, websocket=False))] == [
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Origin",
    ]


def test_ordinary_headers_pass_in_order_with_duplicates() -> None:
    inbound = [
        ("Accept", "text/html"),
        ("X-Custom", "1"),
        ("Authorization", "Bearer t"),
        ("X-Custom", "2"),
        ("Content-Length", "12"),
        ("User-Agent", "curl/8"),
    ]

    assert passed_through(build(inbound)) == inbound


def test_accepts_any_iterable() -> None:
    inbound = (pair for pair in [("Accept", "*/*"), ("Connection", "x-a"), ("X-A", "1")])

    out = headers.upstream_request_headers(
        inbound,
        prefix="X-Auth-",
        allow_method_override=False,
        strip_cookies=(),
        client_ip="192.0.2.1",
        peer_trusted=False,
        scheme="http",
        host="h",
        request_id="r",
        upstream_host="u",
    )

    assert out.getall("Accept") == ["*/*"]
    assert "X-A" not in out


# --------------------------------------------------------------------------- response


def test_response_hop_by_hop_removed_and_set_cookies_kept() -> None:
    upstream = [
        ("Connection", "keep-alive, X-Upstream-Private"),
        ("Keep-Alive", "timeout=5"),
        ("X-Upstream-Private", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "99"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Set-Cookie", "__Host-stepup_session=forged; Path=/"),
        ("Content-Type", "text/html"),
        ("Upgrade", "h2c"),
    ]

    with_names = list(
        headers.upstream_response_headers(
            upstream,
            strip_set_cookies=GATEWAY_COOKIES,
            strip_set_cookie_prefixes=GATEWAY_COOKIE_PREFIXES,
        ).items()
    )
    without = list(headers.upstream_response_headers(upstream).items())

    assert with_names == [
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Content-Type", "text/html"),
    ]
    assert ("Set-Cookie", "__Host-stepup_session=forged; Path=/") in without


def test_response_content_length_kept_without_transfer_encoding() -> None:
    out = headers.upstream_response_headers(
        [("Content-Length", "5"), ("Content-Encoding", "gzip"), ("Connection", "content-length")]
    )

    assert list(out.items()) == [("Content-Length", "5"), ("Content-Encoding", "gzip")]


# --------------------------------------------------------------------------- websockets


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([("Connection", "Upgrade"), ("Upgrade", "websocket")], True),
        ([("Connection", "keep-alive, upgrade"), ("Upgrade", "WebSocket")], True),
        ([("Upgrade", "websocket")], False),
        ([("Connection", "Upgrade"), ("Upgrade", "h2c")], False),
        ([("Connection", "close"), ("Upgrade", "websocket")], False),
    ],
)
def test_is_websocket_upgrade(fields: list[tuple[str, str]], expected: bool) -> None:
    assert headers.is_websocket_upgrade(fields) is expected


def test_websocket_protocols_in_order() -> None:
    fields = [("Sec-WebSocket-Protocol", "chat.v2, chat.v1"), ("sec-websocket-protocol", " x ,")]

    assert headers.websocket_protocols(fields) == ("chat.v2", "chat.v1", "x")


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [("Content-Length", "0")],
        [("Content-Length", "1234")],
        [("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "Chunked")],
        [("Transfer-Encoding", " chunked\t")],
        [("X-Content_Length", "1")],
        [("Host", "h"), ("Content-Length", "5"), ("Accept", "*/*")],
    ],
)
def test_framing_accepts(fields: list[tuple[str, str]]) -> None:
    headers.check_framing(fields)
    headers.check_framing([(n.encode(), v.encode()) for n, v in fields])


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "cl_and_te"),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], "cl_and_te"),
        ([("Content-Length", "5"), ("Content-Length", "5")], "duplicate_content_length"),
        ([("Content-Length", "5"), ("content-length", "6")], "duplicate_content_length"),
        ([("Content-Length", "5, 5")], "bad_content_length"),
        ([("Content-Length", "+5")], "bad_content_length"),
        ([("Content-Length", "-1")], "bad_content_length"),
        ([("Content-Length", "0x5")], "bad_content_length"),
        ([("Content-Length", "")], "bad_content_length"),
        ([("Content-Length", "\u0665")], "bad_content_length"),  # Arabic-Indic five
        ([("Transfer-Encoding", "gzip, chunked")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", "chunked, chunked")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", ", chunked")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", "")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", "identity")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", "xchunked")], "bad_transfer_encoding"),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "duplicate_te"),
        ([("Content-Length", "5"), ("Content_Length", "0")], "framing_alias"),
        ([("Transfer_Encoding", "chunked")], "framing_alias"),
        ([("Content-Length", "5"), ("Content.Length", "0")], "framing_alias"),
        ([("Transfer.Encoding", "chunked")], "framing_alias"),
        ([("ContentLength", "0")], "framing_alias"),
        ([("X-Folded", "a\r\n b")], "header_value_ctl"),
        ([("X-Nul", "a\x00b")], "header_value_ctl"),
        ([("Transfer-Encoding", "chunked\r\nX: y")], "header_value_ctl"),
    ],
)
def test_framing_refuses(fields: list[tuple[str, str]], reason: str) -> None:
    for shape in (fields, [(n.encode(), v.encode("utf-8")) for n, v in fields]):
        with pytest.raises(headers.FramingError) as refused:
            headers.check_framing(shape)
        assert refused.value.reason == reason
        assert refused.value.status == 400
        assert isinstance(refused.value, errors.BadRequest)


def test_transfer_encoding_in_http_1_0_is_refused() -> None:
    # RFC 9112 6.1: faulty framing, even though it says "chunked".
    with pytest.raises(headers.FramingError) as refused:
        headers.check_framing([("Transfer-Encoding", "chunked")], http_version=(1, 0))
    assert refused.value.reason == "te_http10"
    headers.check_framing([("Content-Length", "3")], http_version=(1, 0))


# --------------------------------------------------------------------------- properties

NAME_PIECES = st.sampled_from(
    [
        "x", "auth", "X", "AUTH", "Auth", "acr", "-", "_", "connection", "host",
        "forwarded", "for", "cookie", "te", "upgrade", "http", "method", "override",
        "keep", "alive", "content", "length", "transfer", "encoding", "request", "id",
    ]
)  # fmt: skip
NAMES = st.lists(NAME_PIECES, min_size=1, max_size=5).map("".join)
FIELDS = st.lists(
    st.tuples(NAMES, st.text(st.characters(codec="latin-1"), max_size=20)), max_size=12
)


@given(inbound=FIELDS, trusted=st.booleans(), override=st.booleans(), websocket=st.booleans())
def test_no_client_header_survives_under_the_prefix_or_hop_by_hop(
    inbound: list[tuple[str, str]], trusted: bool, override: bool, websocket: bool
) -> None:
    out = build(inbound, peer_trusted=trusted, allow_method_override=override, websocket=websocket)

    names = [headers.normalize_name(k) for k, _ in out]
    assert not [n for n in names if n.startswith("x-auth-")]
    assert not set(names) & headers.HOP_BY_HOP
    for single in (
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ):
        assert names.count(single) == 1
    assert values(out, "Host") == ["app.internal:9000"]


@given(FIELDS, st.sampled_from([(1, 0), (1, 1)]))
def test_check_framing_raises_only_framing_errors(
    fields: list[tuple[str, str]], version: tuple[int, int]
) -> None:
    with contextlib.suppress(headers.FramingError):
        headers.check_framing(fields, http_version=version)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "stepup_session", "__Host-stepup_tx_1", "b"]),
            st.text("xyz", max_size=3),
        ),
        max_size=6,
    )
)
def test_cookie_stripping_keeps_exactly_the_others(pairs: list[tuple[str, str]]) -> None:
    value = "; ".join(f"{n}={v}" for n, v in pairs)

    kept = headers.strip_cookie_header(value, GATEWAY_COOKIES, GATEWAY_COOKIE_PREFIXES)

    assert kept == "; ".join(f"{n}={v}" for n, v in pairs if n in ("a", "b"))


# ------------------------------------------------------ claim values in X-Auth-*

CLAIM_VALUES: list[tuple[str, str]] = [
    ("alice@example.com", "alice@example.com"),  # the common case arrives unchanged
    ("user+tag@example.com", "user+tag@example.com"),  # "+" is not a space here
    ("248289761001", "248289761001"),
    ("urn:example:loa:2", "urn:example:loa:2"),
    ("auth0|5f7c8ec7c33c6c004bbafe82", "auth0|5f7c8ec7c33c6c004bbafe82"),
    ("zoë@exämple.com", "zo%C3%AB@ex%C3%A4mple.com"),  # UTF-8, percent-encoded
    ("Jürgen Müller", "J%C3%BCrgen%20M%C3%BCller"),
    ("100%", "100%25"),  # the escape character itself
    ("a,b", "a%2Cb"),  # X-Auth-Amr's separator
    (" padded ", "%20padded%20"),  # servers strip header whitespace: keep it
    ("a\r\nX-Auth-Level: admin", "a%0D%0AX-Auth-Level:%20admin"),
    ("nul\x00", "nul%00"),
    ("tab\t", "tab%09"),
    ("del\x7f", "del%7F"),
    ("lone\ud800", "lone%ED%A0%80"),
    ("😀", "%F0%9F%98%80"),
    ("", ""),
]


@pytest.mark.parametrize(
    ("value", "expected"), CLAIM_VALUES, ids=[repr(v) for v, _ in CLAIM_VALUES]
)
def test_claim_header_values_are_percent_encoded_utf8(value: str, expected: str) -> None:
    assert headers.claim_header_value(value) == expected


@given(st.text())
def test_claim_header_values_are_one_visible_ascii_line_that_decodes_back(value: str) -> None:
    encoded = headers.claim_header_value(value)
    assert all(0x21 <= ord(c) <= 0x7E for c in encoded)
    assert "," not in encoded
    assert unquote(encoded, errors="surrogatepass") == value


@given(st.lists(st.text(min_size=1), max_size=5))
def test_an_amr_header_splits_back_into_its_values(values: list[str]) -> None:
    joined = ",".join(headers.claim_header_value(v) for v in values)
    split = [unquote(v, errors="surrogatepass") for v in joined.split(",")] if joined else []
    assert split == values
