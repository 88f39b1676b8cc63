"""Canonical request paths, hosts and methods.

Rules are matched against one spelling of the request and the upstream receives
that same spelling, so a path can never mean one thing to the gateway and
another to the app behind it. Everything here is pure: strings in, strings out,
:class:`gateway.errors.BadRequest` for input that has no safe canonical form.

Path normalisation (:func:`normalize_path`) works segment by segment:

1. split the raw target on raw ``/`` only (an encoded slash is refused, so no
   segment boundary can hide inside an escape);
2. in each segment, refuse what upstreams disagree about (``%2F``, ``\\``,
   ``%5C``, NUL, control characters, malformed escapes, invalid UTF-8), decode
   escapes of unreserved characters (RFC 3986 6.2.2.2), upper-case the hex of
   the others (RFC 3986 6.2.2.1) and percent-encode characters that may not
   appear raw in a path;
3. refuse dot-segments spelled with ``%2E`` (``/a/%2e%2e/admin``): servers
   disagree on whether they climb, so no spelling is safe to forward;
4. refuse spellings that some upstream reads as another path (see below);
5. collapse empty segments (``//``) and then remove dot-segments
   (RFC 3986 5.2.4) on the decoded-unreserved form, keeping a trailing slash.

Spellings another server reads as a different path are refused, because no
single canonical form is right for every upstream:

* ``;`` anywhere (raw or ``%3B``): servlet containers (Jetty, Tomcat) cut path
  parameters off each segment before mapping (Servlet 4.0 3.5), so
  ``/api/transfers;x/1`` reaches the servlet at ``/api/transfers/*`` while the
  gateway would have judged a segment named ``transfers;x``;
* a segment ending in ``.`` or whitespace (raw, or ``%2E``, ``%20``, ``%09``,
  any control character or Unicode space): Windows, IIS and ASP.NET trim them
  (``/api/transfers./1`` is ``/api/transfers/1`` there), and Java's
  ``String.trim`` drops a trailing space or control character;
* a double encoding, ``%25`` followed by two hex digits (``%252e``): servers
  that decode twice (IIS with double escaping allowed, some application code)
  read ``%2e`` and then ``.``;
* characters that Unicode compatibility normalisation (NFKC) changes, such as
  fullwidth letters or ``%EF%BC%8F`` (fullwidth ``/``): Windows "best fit"
  mappings and NFKC-normalising frameworks read them as ASCII.

The result is idempotent: ``normalize_path(normalize_path(p)) == normalize_path(p)``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string
import unicodedata

from gateway.errors import BadRequest

# RFC 9110 section 9.3 (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE)
# and RFC 5789 (PATCH). Methods are case-sensitive (RFC 9110 9.1), so "post" is
# not POST: an upstream that upper-cases it would see a different request than
# the one the rules were asked about.
STANDARD_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# RFC 3986 2.3: unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
_RAW_PCHAR = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_HEXDIGITS = frozenset(string.hexdigits)
# A segment made only of these characters is already canonical.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]*")
_DOUBLE_ESCAPE = re.compile(r"%25[0-9A-Fa-f]{2}")
# RFC 9110 5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# RFC 1035 2.3.4: 255 octets on the wire, 253 characters in text form.
_MAX_HOST_LEN = 253
_MAX_LABEL_LEN = 63
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def is_standard_method(method: str) -> bool:
    """True for the standard methods spelled in upper case (``GET``, not ``get``)."""
    return method in STANDARD_METHODS


def is_method_token(method: str) -> bool:
    """True if ``method`` is a syntactically valid HTTP method (RFC 9110 9.1 token)."""
    return _TOKEN.fullmatch(method) is not None


def split_request_target(target: str) -> tuple[str, str | None]:
    """Split an origin-form request-target into (raw path, raw query or None).

    A fragment cannot appear in a request-target (RFC 9112 3.2) and is refused.
    """
    if "#" in target:
        raise BadRequest("The request target contains a fragment ('#').", reason="fragment")
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


# Recent results of normalize_path for paths up to this long: most requests repeat
# a path seen shortly before, and the function is pure (refusals are not kept).
_CACHED_PATH_MAX = 256
_PATH_CACHE_SIZE = 4096


def normalize_path(raw_path: str) -> str:
    """Return the canonical form of a raw (percent-encoded, query-less) request path.

    Raises :class:`BadRequest` with a short ``reason`` (``encoded_slash``,
    ``backslash``, ``nul``, ``control_char``, ``malformed_escape``,
    ``invalid_utf8``, ``encoded_dot_segment``, ``path_parameter``,
    ``trailing_dot_or_space``, ``double_encoding``, ``unicode_compatibility``,
    ``not_origin_form``,
    ``query_in_path``, ``fragment``) when the path has no safe canonical form.
    """
    if len(raw_path) <= _CACHED_PATH_MAX:
        return _normalize_cached(raw_path)
    return _normalize(raw_path)


def _normalize(raw_path: str) -> str:
    if not raw_path.startswith("/"):
        # Also absolute-form ("http://x/") and asterisk-form ("*") targets:
        # the gateway only routes origin-form requests.
        raise BadRequest("The request path must start with '/'.", reason="not_origin_form")
    raw_segments = raw_path[1:].split("/")
    last = len(raw_segments) - 1
    kept: list[str] = []
    trailing_slash = False
    for position, raw_segment in enumerate(raw_segments):
        segment = _canonical_segment(raw_segment)
        is_last = position == last
        if segment == "" or segment == ".":
            trailing_slash = is_last
        elif segment == "..":
            if kept:
                kept.pop()
            trailing_slash = is_last
        else:
            kept.append(segment)
            trailing_slash = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


_normalize_cached = functools.lru_cache(maxsize=_PATH_CACHE_SIZE)(_normalize)


def _refuse(message: str, reason: str) -> BadRequest:
    return BadRequest(message, reason=reason)


def _canonical_segment(raw: str) -> str:
    """One path segment with unreserved escapes decoded and the rest canonical."""
    if _PLAIN_SEGMENT.fullmatch(raw) is not None:
        text = decoded = raw
    else:
        text, decoded, encoded_dot = _canonical_escapes(raw)
        if encoded_dot and text in (".", ".."):
            raise _refuse(
                "The request path contains a dot-segment written with %2E.",
                "encoded_dot_segment",
            )
    if ";" in decoded:
        # Servlet containers drop ";..." from each segment before mapping (and before
        # resolving "..;"), so the servlet that answers is not the one this path names.
        raise _refuse(
            "The request path contains ';' (a path parameter), which some servers "
            "drop before choosing a handler.",
            "path_parameter",
        )
    if decoded and decoded not in (".", "..") and _trimmed_by_some_server(decoded[-1]):
        raise _refuse(
            "A segment of the request path ends in '.' or whitespace, which some "
            "servers trim before choosing a handler.",
            "trailing_dot_or_space",
        )
    if not decoded.isascii() and unicodedata.normalize("NFKC", decoded) != decoded:
        # Windows "best fit" code pages, IIS and NFKC-normalising frameworks read
        # fullwidth letters (U+FF54 as "t"), ligatures (U+FB01 as "fi") and decomposed
        # accents (NFC file systems compose them) as other characters.
        raise _refuse(
            "The request path contains Unicode compatibility characters, which some "
            "servers read as other characters.",
            "unicode_compatibility",
        )
    return text


def _trimmed_by_some_server(char: str) -> bool:
    # Windows/IIS trim trailing dots and spaces from names; Java's String.trim()
    # everything up to U+0020; .NET's Trim() every Unicode space.
    return char == "." or char <= " " or char.isspace() or char == "\x7f"


def _canonical_escapes(raw: str) -> tuple[str, str, bool]:
    """Canonicalise escapes in a segment: (canonical, fully decoded, dot written as %2E)."""
    out: list[str] = []
    decoded = bytearray()  # the segment with every escape decoded, for the UTF-8 check
    encoded_dot = False
    index = 0
    length = len(raw)
    while index < length:
        char = raw[index]
        if char == "%":
            hex_pair = raw[index + 1 : index + 3]
            if len(hex_pair) != 2 or not (hex_pair[0] in _HEXDIGITS and hex_pair[1] in _HEXDIGITS):
                raise _refuse(
                    "The request path contains a malformed percent-escape.", "malformed_escape"
                )
            byte = int(hex_pair, 16)
            _check_decoded_byte(byte)
            decoded.append(byte)
            decoded_char = chr(byte)
            if decoded_char in _UNRESERVED:
                out.append(decoded_char)
                encoded_dot = encoded_dot or decoded_char == "."
            else:
                out.append("%" + hex_pair.upper())
            index += 3
            continue
        _check_raw_char(char)
        if char in _RAW_PCHAR:
            out.append(char)
            decoded.append(ord(char))
        else:
            # Not allowed raw in a path (space, '"', '<', non-ASCII, ...): the
            # escaped form is the only valid spelling (RFC 3986 2.1, 3.3).
            try:
                encoded = char.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogate
                raise _refuse("The request path is not valid UTF-8.", "invalid_utf8") from exc
            decoded += encoded
            out.append("".join(f"%{octet:02X}" for octet in encoded))
        index += 1
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError as exc:  # also catches overlong forms such as %C0%AE
        raise _refuse("The request path is not valid UTF-8.", "invalid_utf8") from exc
    canonical = "".join(out)
    # Checked on the result: "%25%32%66" becomes "%252f" once "%32%66" is decoded.
    if "%25" in canonical and _DOUBLE_ESCAPE.search(canonical):
        raise _refuse(
            "The request path is percent-encoded twice (%25 before an escape).",
            "double_encoding",
        )
    return canonical, text, encoded_dot


def _check_decoded_byte(byte: int) -> None:
    if byte == 0x2F:
        raise _refuse("The request path contains an encoded slash (%2F).", "encoded_slash")
    if byte == 0x5C:
        raise _refuse("The request path contains an encoded backslash (%5C).", "backslash")
    if byte == 0x00:
        raise _refuse("The request path contains an encoded NUL (%00).", "nul")


def _check_raw_char(char: str) -> None:
    code = ord(char)
    if code == 0:
        raise _refuse("The request path contains a NUL character.", "nul")
    if char == "\\":
        raise _refuse("The request path contains a backslash.", "backslash")
    if code < 0x20 or 0x7F <= code <= 0x9F:
        raise _refuse("The request path contains a control character.", "control_char")
    if char == "?":
        raise _refuse(
            "The request path contains '?'; pass the path without its query.", "query_in_path"
        )
    if char == "#":
        raise _refuse("The request target contains a fragment ('#').", "fragment")


@functools.lru_cache(maxsize=1024)  # pure; a few hosts per deployment; errors not cached
def canonical_host(host: str | None, scheme: str) -> str | None:
    """Canonical form of a request's Host: lower case, no trailing dot, no default port.

    ``scheme`` ("http"/"https") decides which port is the default. IPv6 literals
    stay in brackets, in compressed form (``[::1]:8080``). ``None`` (no Host
    header) stays ``None``. Anything that is not a valid host raises
    :class:`BadRequest` (reason ``bad_host``).
    """
    if host is None:
        return None
    default_port = _DEFAULT_PORTS.get(scheme.lower())
    try:
        return _canonical_host(host, frozenset({default_port} if default_port else ()))
    except ValueError as exc:
        raise BadRequest(f"The Host header is invalid: {exc}.", reason="bad_host") from exc


def canonical_rule_host(host: str, scheme: str | None = None) -> str:
    """Canonical form of a host written in a rule; ``ValueError`` when it is invalid.

    With ``scheme`` this is exactly :func:`canonical_host`. Without it both
    ``:80`` and ``:443`` are dropped. Idempotent.
    """
    if scheme is None:
        default_ports = frozenset({80, 443})
    else:
        default_port = _DEFAULT_PORTS.get(scheme.lower())
        default_ports = frozenset({default_port} if default_port else ())
    return _canonical_host(host, default_ports)


def _canonical_host(host: str, default_ports: frozenset[int]) -> str:
    if not host:
        raise ValueError("empty host")
    if not host.isascii():
        # Checked before lower-casing: "\u212a".lower() is an ASCII "k".
        raise ValueError("non-ASCII characters (use the IDNA A-label form)")
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        literal, rest = host[1:end], host[end + 1 :]
        if "%" in literal:
            raise ValueError("IPv6 zone identifiers are not allowed")
        try:
            name = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError as exc:
            raise ValueError("not a valid IPv6 literal") from exc
        if rest and not rest.startswith(":"):
            raise ValueError("unexpected characters after the IPv6 literal")
        port = rest[1:] if rest else None
    else:
        name, sep, port_text = host.partition(":")
        port = port_text if sep else None
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]
        if not name or len(name) > _MAX_HOST_LEN:
            raise ValueError("host name is empty or too long")
        for label in name.split("."):
            if len(label) > _MAX_LABEL_LEN or _HOST_LABEL.fullmatch(label) is None:
                raise ValueError("host name has an invalid label")
    if port is None or port == "":
        # An empty port means the default one (RFC 3986 6.2.3).
        return name
    if _PORT.fullmatch(port) is None or not 0 < int(port) <= 65535:
        raise ValueError("port is not a number between 1 and 65535")
    port_number = int(port)
    if port_number in default_ports:
        return name
    return f"{name}:{port_number}"
