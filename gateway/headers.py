"""What the upstream may see, and what the client gets back. Pure: no I/O.

A client must never be able to set a header the upstream trusts: everything named
with the assertion prefix (``X-Auth-*``), method overrides, path overrides and,
unless the TCP peer is a trusted proxy, the forwarding headers. The gateway's own
cookies never reach the upstream. Hop-by-hop headers (RFC 9110 7.6.1) stop here.

Header names are compared the way the most folding upstream reads them
(:func:`normalize_name`): lower-cased, with every character other than a letter
or digit read as ``-``. CGI turns a name into an environment key by upper-casing
it and mapping ``-`` to ``_`` (RFC 3875 4.1.18); Apache's CGI/FastCGI/PHP
modules map *every* other character to ``_`` as well (``util_script.c``),
nginx with ``underscores_in_headers on`` or ``ignore_invalid_headers off``
passes ``_``, ``.`` and the rest through to FastCGI/uWSGI, and Werkzeug, Django
and Rack read ``HTTP_X_AUTH_SUBJECT`` back as ``X-Auth-Subject``. So
``X.Auth.Subject``, ``X_Auth_Subject`` and ``x~auth~subject`` all reach a PHP or
WSGI app as the gateway's own header and are stripped. The names the gateway
sets itself are also compared with the separators removed altogether
(``XAuthSubject``), at no cost to anyone.

:func:`check_framing` refuses request-smuggling shapes before anything is
forwarded; aiohttp's own parser refuses most of them first (see its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from urllib.parse import quote

from multidict import CIMultiDict

from gateway import errors, tracecontext

_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def normalize_name(name: str) -> str:
    """``X_Auth.ACR`` -> ``x-auth-acr``: the key under which the most folding servers
    compare names (every character but a letter or digit read as ``-``)."""
    return _NOT_ALNUM.sub("-", name.lower())


def compact_name(name: str) -> str:
    """``X-Auth_Acr`` -> ``xauthacr``: the name with case and every separator ignored."""
    return _NOT_ALNUM.sub("", name.lower())


# RFC 9110 7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding,
# Upgrade), RFC 9110 11.7 (Proxy-Authenticate/-Authorization are for the next
# proxy only), Trailer (RFC 9110 6.6.2: we do not forward trailers), and
# HTTP2-Settings (RFC 7540 3.2.1: a connection-specific header).
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
    }
)

METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")

# Honoured by some frameworks (Symfony, IIS URL Rewrite, Zend) to route a request
# to a path other than the one in the request line, i.e. a path the gateway never
# authorised. Nobody in front of the gateway has a reason to send them.
PATH_OVERRIDE_HEADERS = ("x-original-url", "x-rewrite-url")

# Who the client is, as told by an earlier proxy. Kept only when the TCP peer is a
# trusted proxy (server.trusted_proxies); X-Forwarded-For is then extended.
FORWARDING_HEADERS: frozenset[str] = frozenset(
    {
        "forwarded",  # RFC 7239
        "x-forwarded-for",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
    }
)

# Set by the gateway from what it knows; any copy the client sent goes.
_GATEWAY_SET: frozenset[str] = frozenset(
    {"host", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
)

# The gateway answers "Expect: 100-continue" itself (gateway.proxy, once the
# upstream is connected); the upstream must not wait to send a continue nobody relays.
_REQUEST_DROP: frozenset[str] = frozenset({"expect", *PATH_OVERRIDE_HEADERS})

# aiohttp's ws_connect writes its own handshake (key, version, extensions) and
# takes the subprotocols as an argument.
WEBSOCKET_HANDSHAKE_HEADERS: frozenset[str] = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)

# A client may list header names in Connection to have them dropped as hop-by-hop
# (RFC 9110 7.6.1). These it may not: they frame the request or route it.
_CONNECTION_PROTECTED: frozenset[str] = frozenset({"host", "content-length"})

# Names whose underscore spelling would alias a framing header on an upstream that
# folds "_" into "-": two competing lengths is a desync, so refuse the request.
_FRAMING_NAMES: frozenset[str] = frozenset({"content-length", "transfer-encoding"})
_COMPACT_FRAMING = frozenset({"contentlength", "transferencoding"})

_DROP_ALWAYS_REQUEST = HOP_BY_HOP | _GATEWAY_SET | _REQUEST_DROP
# The gateway's own names compared with every separator ignored, so that
# "XForwardedHost" or "X.Request.Id" cannot pass for one of them either.
_COMPACT_GATEWAY_SET = frozenset(
    compact_name(name) for name in _GATEWAY_SET | FORWARDING_HEADERS | _REQUEST_DROP
)
_COMPACT_FORWARDING = {compact_name(name): name for name in FORWARDING_HEADERS}
_COMPACT_XFF = "xforwardedfor"
# Built by the gateway from the chain it vouches for (client_chain), never passed on.
_REBUILT = frozenset({"x-forwarded-for", "forwarded"})
# The client's address as an earlier proxy saw it: passed on from a trusted proxy only
# when it names the client the gateway judged, or upstreams reading it would act on another.
_CLIENT_ADDRESS_HEADERS = frozenset(
    {"x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip", "cf-connecting-ip"}
)
# The assurance headers the gateway sets under its prefix (gateway.app).
ASSURANCE_SUFFIXES = ("Subject", "Email", "Acr", "Amr", "Time", "Level", "Rule", "Assertion")
_DROP_METHOD_OVERRIDE = frozenset(METHOD_OVERRIDE_HEADERS)
_DROP_WEBSOCKET = WEBSOCKET_HANDSHAKE_HEADERS

# RFC 9110 5.6.2 tchar, less the characters RFC 7239 4 leaves to quoted-strings.
_FORWARDED_TOKEN = re.compile(r"[A-Za-z0-9!$&'*+\-.^_`|~]+")


class FramingError(errors.BadRequest):
    """The request's body length is ambiguous (a request-smuggling shape), or its
    body broke off.

    Answer 400 and close the connection (RFC 9112 6.3): where this request ends,
    and so where the next one starts, is exactly what cannot be known.
    """


def forwarded_for_chain(inbound: Iterable[tuple[str, str]]) -> list[str]:
    """The addresses of every X-Forwarded-For line (and alias spelling), in order.

    aiohttp's ``headers.get`` gives the first line only; an upstream gets all of
    them joined with ``,`` (RFC 9110 5.3), so this is what the upstream reads.
    """
    chain: list[str] = []
    for name, value in inbound:
        if compact_name(name) == _COMPACT_XFF:
            chain.extend(address for a in value.split(",") if (address := a.strip(" \t")))
    return chain


def forwarded_nodes(inbound: Iterable[tuple[str, str]]) -> list[str]:
    """The ``for=`` node of every element of every ``Forwarded`` line (RFC 7239 4), in order.

    An element without ``for=`` counts as ``unknown`` (RFC 7239 6.2): a hop is a hop.
    """
    nodes: list[str] = []
    for name, value in inbound:
        if compact_name(name) != "forwarded":
            continue
        for element in _split_quoted(value, ","):
            node = "unknown"
            for pair in _split_quoted(element, ";"):
                key, _, text = pair.partition("=")
                if key.strip(" \t").lower() == "for":
                    node = text.strip(" \t")
            nodes.append(node)
    return nodes


def _split_quoted(value: str, separator: str) -> list[str]:
    """``value`` split on ``separator`` outside quoted-strings (RFC 9110 5.6.4)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip(" \t") for part in parts if part.strip(" \t")]


def node_address(node: str) -> str:
    """A hop as an address: quotes, IPv6 brackets and a port removed (``"[::1]:80"`` -> ``::1``)."""
    text = node.strip(" \t")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text


def client_chain(
    inbound: Iterable[tuple[str, str]],
    *,
    peer: str,
    peer_trusted: bool,
    is_trusted: Callable[[str], bool] = lambda address: False,
) -> tuple[str, ...]:
    """The hops the gateway vouches for: the client it judges first, ``peer`` last.

    From an untrusted peer that is ``(peer,)``. From a trusted proxy, the chain it
    sent (every X-Forwarded-For line, or without one the ``for=`` nodes of
    Forwarded) is read from the right up to the first address that is not a
    trusted proxy (``is_trusted``): that is the client. Anything left of it was
    written by the client itself and is not vouched for; the upstream is sent
    exactly this chain, so one that reads the leftmost address (Jetty's
    ForwardedRequestCustomizer, Spring) and one that reads the rightmost
    untrusted one (Express, Werkzeug's ProxyFix) both act on the client judged.

    Raises :class:`gateway.errors.BadRequest` (``forwarding_mismatch``) when
    X-Forwarded-For and Forwarded name different chains: the gateway could not
    know which one the upstream reads.
    """
    if not peer_trusted:
        return (peer,)
    items = inbound if isinstance(inbound, list | tuple) else list(inbound)
    by_xff = [node_address(node) for node in forwarded_for_chain(items)]
    by_forwarded = [node_address(node) for node in forwarded_nodes(items)]
    if by_xff and by_forwarded and by_xff != by_forwarded:
        raise errors.BadRequest(
            "X-Forwarded-For and Forwarded name different clients.", reason="forwarding_mismatch"
        )
    hops = [peer]
    for address in reversed(by_xff or by_forwarded):
        hops.append(address)
        if not is_trusted(address):
            break
    return tuple(reversed(hops))


def is_assurance_header(name: str, prefix: str) -> bool:
    """True when ``name`` falls under the assertion ``prefix`` (case-insensitive, ``_`` = ``-``)."""
    return normalize_name(name).startswith(normalize_name(prefix))


def _is_gateway_cookie(name: str, names: Collection[str], prefixes: tuple[str, ...]) -> bool:
    return name in names or (bool(prefixes) and name.startswith(prefixes))


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """The header names listed in ``Connection`` (RFC 9110 7.6.1), normalized."""
    tokens: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip(" \t")
            if token:
                tokens.add(normalize_name(token))
    return frozenset(tokens)


def strip_cookie_header(value: str, names: Collection[str], prefixes: tuple[str, ...] = ()) -> str:
    """``Cookie`` without the cookies in ``names`` (or starting with one of
    ``prefixes``); ``""`` when nothing is left."""
    kept: list[str] = []
    for pair in value.split(";"):
        pair = pair.strip(" \t")
        if not pair:
            continue
        name = pair.split("=", 1)[0].strip(" \t") if "=" in pair else ""
        if name and _is_gateway_cookie(name, names, prefixes):
            continue
        kept.append(pair)
    return "; ".join(kept)


def _forwarded_node(address: str) -> str:
    # RFC 7239 6: an IPv6 node is bracketed and quoted; "unknown" and IPv4 are tokens.
    if ":" in address:
        return f'"[{address}]"'
    return _forwarded_value(address)


def _forwarded_value(value: str) -> str:
    # RFC 7239 4: value = token / quoted-string; a host with a port needs quotes.
    if _FORWARDED_TOKEN.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def upstream_request_headers(
    inbound: Iterable[tuple[str, str]],
    *,
    prefix: str,
    allow_method_override: bool,
    strip_cookies: Collection[str],
    client_ip: str,
    peer_trusted: bool,
    scheme: str,
    host: str,
    request_id: str,
    upstream_host: str,
    websocket: bool = False,
    strip_cookie_prefixes: tuple[str, ...] = (),
    hops: Sequence[str] | None = None,
) -> CIMultiDict[str]:
    """The headers the upstream gets, before the gateway adds its assurance headers.

    ``inbound`` is the client's headers in order (``request.headers.items()``).
    Every header under ``prefix`` (the assertion prefix, e.g. ``X-Auth-``) goes.
    ``strip_cookies`` are the gateway's cookie names (a set is fastest; pass the
    session cookie with and without ``__Host-``), ``strip_cookie_prefixes``
    families of them (one transaction cookie per login in flight).
    ``client_ip`` is the TCP peer; ``peer_trusted`` says it is one of
    ``server.trusted_proxies``. ``scheme`` and ``host`` are what the client used
    (the public URL's, or a trusted proxy's), ``upstream_host`` the upstream's
    ``host[:port]``. With ``websocket`` the client's handshake headers go too:
    ``ws_connect`` writes its own. ``hops`` is :func:`client_chain`'s answer (from
    the peer alone when not given): X-Forwarded-For and Forwarded are built from
    it, and a client-address header a trusted proxy sent (``X-Real-IP``...) is
    kept only when it names the same client.

    The result has ``Host``, ``X-Forwarded-For``/``-Proto``/``-Host``,
    ``Forwarded`` and ``X-Request-Id`` set by the gateway; ``Content-Length`` is
    kept when the client sent it, so the upstream gets a length, not chunks.
    """
    own = frozenset(compact_name(prefix + suffix) for suffix in ASSURANCE_SUFFIXES)
    prefix = normalize_name(prefix)
    if not prefix:
        raise ValueError("the assertion header prefix must not be empty")
    items = inbound if isinstance(inbound, list | tuple) else list(inbound)
    listed: frozenset[str] = frozenset()
    for name, value in items:
        if name.lower() == "connection":
            listed = listed | connection_tokens((value,))
    if listed:
        listed = listed - _CONNECTION_PROTECTED

    if hops is None:
        hops = client_chain(items, peer=client_ip, peer_trusted=peer_trusted)
    out: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    traced: list[tuple[str, str]] = []
    for name, value in items:
        key = normalize_name(name)
        if key in _DROP_ALWAYS_REQUEST or key.startswith(prefix):
            continue
        if listed and key in listed:
            continue
        compact = compact_name(name)
        if compact in own:
            continue
        if compact in tracecontext.COMPACT_NAMES:
            traced.append((name, value))  # passed on below, only when well-formed
            continue
        forwarding = _COMPACT_FORWARDING.get(compact)
        if forwarding is not None:
            names_client = (
                forwarding not in _CLIENT_ADDRESS_HEADERS or value.strip(" \t") == hops[0]
            )
            if peer_trusted and forwarding not in _REBUILT and names_client:
                out.add(name, value)
            continue
        if compact in _COMPACT_GATEWAY_SET:
            continue
        if key == "cookie":
            cookies.append(value)
            continue
        if key in _DROP_METHOD_OVERRIDE and not allow_method_override:
            continue
        if websocket and key in _DROP_WEBSOCKET:
            continue
        out.add(name, value)

    if traced:
        trace = tracecontext.inbound_of(traced)
        if trace is not None:
            out.extend(trace.headers())
    if cookies:
        # RFC 6265 5.4: one Cookie header; pairs joined with "; ".
        remaining = strip_cookie_header("; ".join(cookies), strip_cookies, strip_cookie_prefixes)
        if remaining:
            out.add("Cookie", remaining)

    # add(), not assignment: the loop above let no client copy of these through.
    out.add("Host", upstream_host)
    out.add("X-Forwarded-For", ", ".join(hops))
    out.add("X-Forwarded-Proto", scheme)
    out.add("X-Forwarded-Host", host)
    # Every element says host and proto: some readers (Spring) take them from the first.
    host_proto = f"host={_forwarded_value(host)};proto={scheme}"
    out.add("Forwarded", ", ".join(f"for={_forwarded_node(hop)};{host_proto}" for hop in hops))
    out.add("X-Request-Id", request_id)
    return out


def upstream_response_headers(
    headers: Iterable[tuple[str, str]],
    *,
    strip_set_cookies: Collection[str] = (),
    strip_set_cookie_prefixes: tuple[str, ...] = (),
) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones, duplicates kept.

    Every ``Set-Cookie`` survives, except one that would overwrite or delete a
    gateway cookie (``strip_set_cookies``, ``strip_set_cookie_prefixes``).
    """
    items = headers if isinstance(headers, list | tuple) else list(headers)
    listed: frozenset[str] = frozenset()
    has_transfer_encoding = False
    for name, value in items:
        key = name.lower()
        if key == "connection":
            listed = listed | connection_tokens((value,))
        elif key == "transfer-encoding":
            has_transfer_encoding = True
    listed = listed - _CONNECTION_PROTECTED
    check_cookies = bool(strip_set_cookies or strip_set_cookie_prefixes)

    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        key = name.lower()
        if key in HOP_BY_HOP or key in listed:
            continue
        # RFC 9112 6.3: with Transfer-Encoding the length is the chunks', not
        # Content-Length's; the body we relay is de-chunked, so the length goes.
        if has_transfer_encoding and key == "content-length":
            continue
        if check_cookies and key == "set-cookie":
            cookie_name = value.split(";", 1)[0].split("=", 1)[0].strip(" \t")
            if _is_gateway_cookie(cookie_name, strip_set_cookies, strip_set_cookie_prefixes):
                continue
        out.add(name, value)
    return out


def is_websocket_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    """``Connection: upgrade`` with ``Upgrade: websocket`` (RFC 6455 4.2.1)."""
    upgrade = False
    connection_upgrade = False
    for name, value in headers:
        key = name.lower()
        if key == "upgrade":
            upgrade = upgrade or "websocket" in {t.strip(" \t").lower() for t in value.split(",")}
        elif key == "connection":
            connection_upgrade = connection_upgrade or "upgrade" in connection_tokens((value,))
    return upgrade and connection_upgrade


def websocket_protocols(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The client's offered subprotocols, in order (RFC 6455 4.1 item 10)."""
    protocols: list[str] = []
    for name, value in headers:
        if name.lower() == "sec-websocket-protocol":
            protocols.extend(p.strip(" \t") for p in value.split(",") if p.strip(" \t"))
    return tuple(protocols)


def check_framing(
    raw_headers: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]],
    *,
    http_version: tuple[int, int] = (1, 1),
) -> None:
    """Raise :class:`FramingError` (a 400) for a request whose body length is ambiguous.

    Refused (RFC 9112 6.1, 6.3): Content-Length together with Transfer-Encoding;
    more than one Content-Length, even equal ones; a Content-Length that is not
    plain digits; more than one Transfer-Encoding header or any coding other
    than exactly ``chunked`` (``gzip, chunked``, ``chunked, chunked``, empty
    members); Transfer-Encoding in an HTTP/1.0 request; a CR, LF or NUL inside a
    value (what obsolete line folding or header injection leaves); an underscore
    spelling of Content-Length or Transfer-Encoding.

    aiohttp 3.14's strict request parser (llhttp, and the pure-Python one)
    already answers 400 itself for CL+TE, duplicate/invalid CL, unknown or
    non-final codings, duplicate TE headers, obs-fold, bare CR/LF and malformed
    chunk sizes; both let ``gzip, chunked``, ``, chunked``, TE with HTTP/1.0
    and the underscore aliases through, and llhttp also an empty TE and the
    pure-Python parser ``chunked, chunked``. This check covers all of them, so
    the gateway does not depend on the parser's version or build.

    Call it with ``request.raw_headers`` and ``http_version=request.version``
    (the default assumes 1.1). A body that breaks after an accepted head (a
    malformed chunk) is the proxy's to catch: see ``gateway.proxy``.
    """
    content_lengths = 0
    transfer_encodings: list[str] = []
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        if "\r" in value or "\n" in value or "\x00" in value:
            raise FramingError("Malformed header value.", reason="header_value_ctl")
        key = name.lower()
        if key == "content-length":
            content_lengths += 1
            if content_lengths > 1:
                raise FramingError(
                    "More than one Content-Length.", reason="duplicate_content_length"
                )
            stripped = value.strip(" \t")
            if not (stripped.isascii() and stripped.isdigit()):
                raise FramingError("Invalid Content-Length.", reason="bad_content_length")
        elif key == "transfer-encoding":
            transfer_encodings.append(value)
        elif normalize_name(key) in _FRAMING_NAMES or compact_name(key) in _COMPACT_FRAMING:
            # "Content_Length", "Content.Length": a length an upstream may also read.
            raise FramingError("Ambiguous framing header name.", reason="framing_alias")

    if not transfer_encodings:
        return
    if content_lengths:
        raise FramingError("Content-Length and Transfer-Encoding together.", reason="cl_and_te")
    if http_version < (1, 1):
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        raise FramingError("Transfer-Encoding in HTTP/1.0.", reason="te_http10")
    if len(transfer_encodings) > 1:
        raise FramingError("More than one Transfer-Encoding.", reason="duplicate_te")
    # Transfer-coding names are case-insensitive (RFC 9112 7); anything but the one
    # coding "chunked" is a length this gateway and the upstream could read differently.
    if transfer_encodings[0].strip(" \t").lower() != "chunked":
        raise FramingError("Unsupported Transfer-Encoding.", reason="bad_transfer_encoding")


# ------------------------------------------------------------ claim values as headers

# What a claim value may carry unchanged in an X-Auth-* header: visible ASCII
# (RFC 9110 5.5 field-vchar, less obs-text), except "%" (the escape itself) and ","
# (it separates X-Auth-Amr's values, and many servers join or split headers on it).
_CLAIM_SAFE = re.compile(r"[!-$&-+\--~]*")
_CLAIM_SAFE_CHARS = "".join(
    chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%," and not chr(c).isalnum()
)


def claim_header_value(value: str) -> str:
    """A claim (``sub``, ``email``, ``acr``, one ``amr`` value) as a header value.

    The value's UTF-8 bytes, percent-encoded (RFC 3986 2.1) wherever a byte is not
    visible ASCII, or is ``%`` or ``,``. So a value of visible ASCII without ``%`` or
    ``,`` arrives unchanged, and every value decodes back exactly with a percent-decoder
    (``urllib.parse.unquote``, ``decodeURIComponent``; not form decoding: ``+`` stays).
    No value can end a header line or smuggle another header, whatever a provider
    sent. Lone surrogates (JSON allows ``\\ud800``) are kept as their own bytes.
    """
    if _CLAIM_SAFE.fullmatch(value):
        return value
    return quote(value.encode("utf-8", "surrogatepass"), safe=_CLAIM_SAFE_CHARS)
