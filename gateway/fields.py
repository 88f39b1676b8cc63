"""Request fields: what ``when`` conditions and ``bind`` read from a request. Pure: no I/O.

:func:`extract_fields` reads the form, JSON or multipart body and the query
into one flat mapping, body first. A field whose value the gateway cannot pin
down (a repeated form key with different values, a body and a query that
disagree, a dotted JSON key that collides with a nested one) is left out, so
it counts as missing; a body that cannot be parsed gives no fields at all.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from email.errors import MessageError
from email.message import EmailMessage
from typing import Final
from urllib.parse import parse_qsl

from gateway.conditions import as_text

# --- Limits, and why ------------------------------------------------------------------

# JSON nesting the flattener follows; deeper values stay reachable only as objects.
MAX_JSON_DEPTH = 32
# Form and multipart fields read from one body (the body's size is bounded by the caller).
MAX_FIELDS = 10_000

_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"
_IDENTITY = ("7bit", "8bit", "binary")

_MISSING: Final = object()


# --- Request fields -------------------------------------------------------------------


class _BadBody(Exception):
    """The body cannot be read as the fields it claims to hold."""


def extract_fields(content_type: str, body: bytes, query: Mapping[str, str]) -> dict[str, object]:
    """The request's fields: the body's (form, JSON or multipart text parts), then the query's.

    JSON objects appear both nested (``beneficiary``) and flattened with dotted
    keys (``beneficiary.iban``). A name given more than once with different values
    is left out (it counts as missing). A body that cannot be parsed, or a
    non-empty body of another type, gives no fields at all, query included: the
    upstream may read it some other way, so nothing is known. Never raises.
    ``body`` must already be bounded by the caller (``step_up.max_body``).
    """
    try:
        body_fields = _body_fields(content_type, body)
    except (_BadBody, ValueError, LookupError, TypeError, MessageError, RecursionError):
        return {}
    pairs = list(body_fields)
    try:
        pairs.extend(query.items())
    except (TypeError, ValueError):  # a mapping that cannot even be iterated: nothing known
        return {}
    return _merge(pairs)


def readable_body(content_type: str, body: bytes) -> bool:
    """False when :func:`extract_fields` would find the body unreadable (and give no fields)."""
    try:
        _body_fields(content_type, body)
    except (_BadBody, ValueError, LookupError, TypeError, MessageError, RecursionError):
        return False
    return True


def _merge(pairs: Iterable[tuple[str, object]]) -> dict[str, object]:
    fields: dict[str, object] = {}
    conflicting: set[str] = set()
    for name, value in pairs:
        if name in conflicting:
            continue
        if name in fields:
            if _comparable(fields[name]) != _comparable(value):
                del fields[name]
                conflicting.add(name)
            continue
        fields[name] = value
    return fields


def _comparable(value: object) -> tuple[str, str]:
    """Form text "1000" and JSON 1000 agree; JSON null and the text "null" do not."""
    text = as_text(value)
    return ("text", text) if text is not None else ("json", _canonical(value))


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, lower case, without parameters."""
    return content_type.partition(";")[0].strip().lower()


def _body_fields(content_type: str, body: bytes) -> list[tuple[str, object]]:
    kind = media_type(content_type)
    if kind == _FORM:
        return _form_fields(body)
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return _json_fields(body)
    if kind == _MULTIPART:
        return _multipart_fields(content_type, body)
    if body.strip():
        raise _BadBody("a body the gateway cannot read")
    return []


def _form_fields(body: bytes) -> list[tuple[str, object]]:
    text = body.decode("utf-8")  # strict: a UnicodeDecodeError is a ValueError
    pairs = parse_qsl(
        text,
        keep_blank_values=True,
        strict_parsing=False,
        encoding="utf-8",
        errors="strict",
        max_num_fields=MAX_FIELDS,
    )
    return list(pairs)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            # RFC 8259 4: names SHOULD be unique; parsers then disagree on which wins.
            raise _BadBody(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise _BadBody(f"{name} is not JSON (RFC 8259 6)")


def _json_fields(body: bytes) -> list[tuple[str, object]]:
    if not body.strip():
        return []
    document = json.loads(
        body.decode("utf-8"),
        parse_float=Decimal,
        parse_constant=_no_constants,
        object_pairs_hook=_no_duplicates,
    )
    if not isinstance(document, dict):
        raise _BadBody("the JSON body is not an object")
    pairs: list[tuple[str, object]] = []
    _flatten(document, "", pairs, 0)
    return pairs


def _flatten(
    obj: dict[str, object], prefix: str, out: list[tuple[str, object]], depth: int
) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        out.append((name, value))
        if isinstance(value, dict) and depth < MAX_JSON_DEPTH:
            _flatten(value, name + ".", out, depth + 1)


def _multipart_fields(content_type: str, body: bytes) -> list[tuple[str, object]]:
    if any(char in content_type for char in "\r\n\0"):
        raise _BadBody("a line break in Content-Type")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(head + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise _BadBody("not a multipart body")
    if message.defects:
        raise _BadBody("a malformed multipart body")
    pairs: list[tuple[str, object]] = []
    for part in message.iter_parts():
        if not isinstance(part, EmailMessage) or part.defects:
            raise _BadBody("a malformed part")
        if part.get_content_disposition() != "form-data":
            continue
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename() is not None:
            continue  # files (and odd parts) are not fields
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get("content-transfer-encoding", "binary").strip().lower() not in _IDENTITY:
            # RFC 7578 4.7: senders must not use it, and an upstream would not decode it.
            raise _BadBody("a Content-Transfer-Encoding in a form part")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        pairs.append((name, payload.decode(charset)))
        if len(pairs) > MAX_FIELDS:
            raise _BadBody("too many fields")
    return pairs


# --- Binding --------------------------------------------------------------------------


def _canonical(value: object) -> str:
    """Canonical JSON: sorted keys, no spaces, Decimals as written (RFC 8785-like)."""
    if value is None or value is _MISSING:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = sorted((str(key), item) for key, item in value.items())
        inner = ",".join(
            f"{json.dumps(key, ensure_ascii=False)}:{_canonical(v)}" for key, v in items
        )
        return "{" + inner + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(item) for item in value) + "]"
    return "null"


def binding_values(bind: Sequence[str], fields: Mapping[str, object]) -> dict[str, str | None]:
    """The bound fields' values as text (objects as canonical JSON); missing -> None."""
    values: dict[str, str | None] = {}
    for name in bind:
        value = fields.get(name, _MISSING)
        if value is _MISSING or value is None:
            values[name] = None
        elif isinstance(value, Mapping | list | tuple):
            values[name] = _canonical(value)
        else:
            values[name] = as_text(value)
    return values


def binding_digest(bind: Sequence[str], fields: Mapping[str, object]) -> str:
    """SHA-256 (hex) over the canonical JSON of the bound fields' values; missing -> null.

    Keys are sorted, so the order of ``bind`` does not matter; the names are part
    of what is hashed, so the same values under other names give another digest.
    """
    canonical = _canonical(binding_values(bind, fields))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
