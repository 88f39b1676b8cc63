"""A strict ``multipart/form-data`` reader (RFC 7578, RFC 2046 5.1). Pure: no I/O.

Upstream parsers are lenient in different ways: Werkzeug accepts bare LF and CR
line breaks around boundaries and blank lines, a preamble, whitespace after a
boundary and folded part headers; PHP, busboy (Express/multer) and servlet
containers each accept their own superset. A body that any two of them could
split differently must not be judged at all, so this reader accepts only the
shape browsers send (the HTML Standard's multipart/form-data encoding) and
raises :class:`MultipartError` for anything else:

- the body starts with the first boundary (no preamble) and ends with the
  close delimiter, optionally followed by CRLF (no epilogue);
- every line break between a boundary and a part, and inside part headers, is CRLF;
- the boundary string occurs nowhere but in delimiters (RFC 2046 5.1.1 requires it);
- part headers are ``Name: value`` lines, never folded, never repeated;
- every part has ``Content-Disposition: form-data`` with a ``name``;
- no nested multipart, no RFC 2231 ``name*=``/``filename*=`` parameters, no
  parameter given twice.

What is syntactically clean but still read differently by upstreams (a name
with backslash escapes or percent signs, a charset, a transfer encoding) is
reported in :class:`Part` for the caller to judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

# RFC 9110 5.6.2 token and 5.6.4 quoted-string; 5.6.6 parameters.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~\x80-\U0010ffff]|\\[\t -~\x80-\U0010ffff])*"'
_LEADING = re.compile(rf"[ \t]*({_TOKEN}(?:/{_TOKEN})?)[ \t]*")
_PARAMETER = re.compile(rf";[ \t]*({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*")
# RFC 2046 5.1.1: 1 to 70 bchars, the last not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_HEADER = re.compile(rf"({_TOKEN}):[ \t]*(.*?)[ \t]*")
_KNOWN_HEADERS = ("content-disposition", "content-type", "content-transfer-encoding")


class MultipartError(ValueError):
    """A body (or a Content-Type) that upstreams could split into parts differently."""


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a form body.

    ``names`` holds the part's name as Werkzeug reads it first, then every other
    reading an upstream may make of it (backslash escapes undone or not, ``%22``
    and other percent escapes decoded or not); one entry when all agree.
    ``filename`` is None for a field.
    """

    names: tuple[str, ...]
    filename: str | None
    media_type: str
    charset: str | None
    transfer_encoding: str | None
    content: bytes


def parameters(value: str) -> tuple[str, dict[str, str]]:
    """A header value's leading token (lower case) and its parameters, still quoted.

    Raises :class:`MultipartError` for anything RFC 9110 5.6.6 does not allow,
    a parameter given twice (parsers disagree on which counts) and RFC 2231
    extended parameters (``name*=``), which only some parsers decode.
    """
    leading = _LEADING.match(value)
    if leading is None:
        raise MultipartError("no leading token")
    found: dict[str, str] = {}
    position = leading.end()
    while position < len(value):
        match = _PARAMETER.match(value, position)
        if match is None:
            raise MultipartError("a malformed parameter")
        key = match.group(1).lower()
        if "*" in key:
            raise MultipartError("an RFC 2231 extended parameter")
        if key in found:
            raise MultipartError(f"the parameter {key} given twice")
        found[key] = match.group(2)
        position = match.end()
    return leading.group(1).lower(), found


def unquoted_readings(raw: str) -> tuple[str, ...]:
    """What upstreams may read a parameter value as: first Werkzeug's reading, then others."""
    if not raw.startswith('"'):
        readings = [raw.replace("%22", '"'), raw]
    else:
        inner = raw[1:-1]
        # Werkzeug undoes \\ and \" (then %22), RFC 9110's quoted-pair any escaped
        # character; browsers never escape with a backslash, so there it is literal.
        werkzeug = re.sub(r'\\([\\"])', r"\1", inner).replace("%22", '"')
        readings = [werkzeug, inner, re.sub(r"\\(.)", r"\1", inner)]
    # The HTML Standard escapes " CR LF as %22 %0D %0A; a parser may decode any escape.
    readings += [unquote(text, errors="strict") for text in readings if "%" in text]
    return tuple(dict.fromkeys(readings))


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, checked strictly."""
    _, params = parameters(content_type)
    raw = params.get("boundary")
    if raw is None:
        raise MultipartError("no boundary")
    boundary = raw[1:-1] if raw.startswith('"') else raw
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("a boundary RFC 2046 does not allow")
    return boundary.encode("ascii")


def parse_parts(content_type: str, body: bytes, max_parts: int) -> list[Part]:
    """The parts of a form body; raises :class:`MultipartError` unless every parser agrees."""
    delimiter = b"--" + boundary_of(content_type)
    if not body.startswith(delimiter):
        raise MultipartError("a preamble, or no first boundary")
    pieces = body[len(delimiter) :].split(b"\r\n" + delimiter)
    # Anything that looks like the boundary but is not a delimiter is where lenient
    # parsers (LF-only, CR-only, no line break before it) would split and this one not.
    if body.count(delimiter) != len(pieces):
        raise MultipartError("the boundary inside a part")
    if pieces[-1] not in (b"--", b"--\r\n"):
        raise MultipartError("no close delimiter, or an epilogue")
    if len(pieces) - 1 > max_parts:
        raise MultipartError("too many parts")
    return [_part(piece) for piece in pieces[:-1]]


def _part(piece: bytes) -> Part:
    if not piece.startswith(b"\r\n"):
        raise MultipartError("no CRLF after a boundary")
    head, blank, content = piece[2:].partition(b"\r\n\r\n")
    if not blank:
        raise MultipartError("part headers without a blank line")
    headers = _headers(head)
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError("a part without Content-Disposition")
    kind, params = parameters(disposition)
    if kind != "form-data" or "name" not in params:
        raise MultipartError("a part that is not a named form-data part")
    media_type, charset = "text/plain", None
    if "content-type" in headers:
        media_type, type_params = parameters(headers["content-type"])
        if media_type.startswith("multipart/"):
            raise MultipartError("a nested multipart part")
        if "charset" in type_params:
            charset = unquoted_readings(type_params["charset"])[0].lower()
    filename = params.get("filename")
    encoding = headers.get("content-transfer-encoding")
    return Part(
        names=unquoted_readings(params["name"]),
        filename=None if filename is None else unquoted_readings(filename)[0],
        media_type=media_type,
        charset=charset,
        transfer_encoding=None if encoding is None else encoding.lower(),
        content=content,
    )


def _headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("utf-8").split("\r\n"):
        # A bare CR or LF is a line break to Werkzeug; a leading space folds (RFC 5322).
        if "\r" in line or "\n" in line or line[:1] in (" ", "\t", ""):
            raise MultipartError("a malformed part header line")
        match = _HEADER.fullmatch(line)
        if match is None:
            raise MultipartError("a malformed part header line")
        name = match.group(1).lower()
        if name in headers and name in _KNOWN_HEADERS:
            raise MultipartError(f"the part header {name} given twice")
        headers.setdefault(name, match.group(2))
    return headers
