"""Request fields: what ``when`` conditions and ``bind`` read from a request. Pure: no I/O.

:func:`read_fields` reads the form, JSON or multipart body and the query. A rule
may only act on a field that every upstream reads as the gateway does, so each
name and value is read the ways real upstreams read it:

- every multipart part without a filename is a field, whatever its Content-Type
  (Werkzeug, PHP, busboy/multer and servlet containers all agree);
- names fold as upstreams fold them: PHP drops leading spaces, ends a name at
  NUL and turns spaces and dots into ``_`` and ``amount[x]`` into ``amount``;
  qs (Express) and Rack read ``amount[0]``, ``amount[]`` and ``[amount]`` as
  ``amount``; ASP.NET and some JSON binders ignore case;
- ``;`` separated form and query pairs (CGI.pm, Rack, Python before 3.10);
- a multipart name with backslash or percent escapes, a part charset or
  ``_charset_`` field other than UTF-8, a Content-Transfer-Encoding, bytes that
  are not UTF-8, a JSON key given twice, a JSON number a double cannot hold.

:meth:`RequestFields.unsure` names the fields that are given more than once
(body, query, or a spelling an upstream folds onto them) or whose value is read
differently; the caller refuses a request whose rule reads one (400).
:attr:`RequestFields.values` holds the others. A body that cannot be parsed, or
that parsers could split differently, gives no fields at all (query included):
nothing is known, so ``when`` conditions on it count as true.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final
from urllib.parse import unquote_plus

from gateway.conditions import as_text
from gateway.errors import BadRequest
from gateway.multipart import MultipartError, parameters, parse_parts, unquoted_readings

# --- Limits, and why ------------------------------------------------------------------

# JSON nesting; a deeper document is not read at all. RFC 8259 9 lets parsers limit it:
# .NET's System.Text.Json stops at 64, Ruby's JSON at 100, serde_json at 128; no request
# a rule judges needs more, and it bounds the recursion of flattening and binding.
MAX_JSON_DEPTH = 64
# Fields (and parts) read from one body and its query. PHP's max_input_vars, qs's
# parameterLimit (Express) and Werkzeug's max_form_parts all default to 1000, and PHP and
# qs silently drop the rest: past it, the gateway cannot know what an upstream reads.
MAX_FIELDS = 1000

_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"
_IDENTITY = ("7bit", "8bit", "binary")
_UTF8 = ("utf-8", "utf8")

_MISSING: Final = object()
_UNSURE: Final = object()  # upstreams may read different values
_FILE: Final = object()  # a file part: not a field, but it takes the name
# Rack's reading of a name: leading brackets skipped, up to the next bracket.
_RACK_NAME = re.compile(r"[\[\]]*([^\[\]]+)")


# --- Request fields -------------------------------------------------------------------


class _BadBody(Exception):
    """The body cannot be read as the fields it claims to hold."""


_UNREADABLE = (_BadBody, ValueError, LookupError, TypeError, RecursionError)


@dataclass(frozen=True, slots=True)
class _Occurrence:
    """One name=value pair as sent; ``aliases`` are the (lower-case) names upstreams read."""

    name: str
    value: object
    aliases: frozenset[str]


@dataclass(frozen=True, slots=True)
class RequestFields:
    """A request's fields. ``values`` holds those every upstream reads as the gateway does;
    ``readable`` is False for a body that could not be read (then nothing is known)."""

    values: Mapping[str, object] = field(default_factory=dict)
    occurrences: tuple[_Occurrence, ...] = ()
    index: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    readable: bool = True

    def unsure(self, names: Iterable[str]) -> tuple[str, ...]:
        """Those of ``names`` that are given more than once or read differently upstream."""
        return tuple(sorted(name for name in set(names) if self._reading(name) is _UNSURE))

    def _reading(self, name: str) -> object:
        found: set[int] = set()
        for key in {name.lower(), _php_name(name).lower()}:
            numbers = self.index.get(key, ())
            if len(numbers) > 1:
                return _UNSURE
            found.update(numbers)
        if not found:
            return _MISSING
        if len(found) > 1:
            return _UNSURE
        occurrence = self.occurrences[found.pop()]
        if occurrence.name != name:
            return _UNSURE  # e.g. " amount" alone, which PHP reads as amount
        return _MISSING if occurrence.value is _FILE else occurrence.value


def ambiguous(names: Sequence[str]) -> BadRequest:
    """The refusal of a request whose rule reads fields that :meth:`RequestFields.unsure` named."""
    return BadRequest(
        f"The request gives {', '.join(names)} more than once or in a form that servers "
        "read differently; send it once, plainly.",
        reason="ambiguous_field",
    )


def read_fields(content_type: str, body: bytes, query: str) -> RequestFields:
    """The body's fields, then the query's (the raw query string the upstream gets).

    JSON objects appear both nested (``beneficiary``) and flattened with dotted
    keys (``beneficiary.iban``). Never raises. ``body`` must already be bounded by
    the caller (``step_up.max_body``).
    """
    try:
        occurrences = _body_occurrences(content_type, body)
        occurrences += _form_occurrences(query)
        if len(occurrences) > MAX_FIELDS:
            raise _BadBody("too many fields")
    except _UNREADABLE:
        return RequestFields(readable=False)
    index: dict[str, list[int]] = {}
    for number, occurrence in enumerate(occurrences):
        for alias in occurrence.aliases:
            index.setdefault(alias, []).append(number)
    fields = RequestFields(
        {}, tuple(occurrences), {alias: tuple(numbers) for alias, numbers in index.items()}
    )
    values: dict[str, object] = {}
    for occurrence in occurrences:
        value = fields._reading(occurrence.name)
        if value is not _MISSING and value is not _UNSURE:
            values[occurrence.name] = value
    return RequestFields(values, fields.occurrences, fields.index)


def extract_fields(content_type: str, body: bytes, query: str) -> dict[str, object]:
    """The fields every upstream reads alike (see :func:`read_fields`)."""
    return dict(read_fields(content_type, body, query).values)


def readable_body(content_type: str, body: bytes) -> bool:
    """False when :func:`read_fields` would find the body unreadable (and give no fields)."""
    try:
        _body_occurrences(content_type, body)
    except _UNREADABLE:
        return False
    return True


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, lower case, without parameters."""
    return content_type.partition(";")[0].strip().lower()


def _body_occurrences(content_type: str, body: bytes) -> list[_Occurrence]:
    kind = media_type(content_type)
    if kind == _FORM:
        found = _form_occurrences(body.decode("utf-8"))  # strict: bad bytes are a ValueError
    elif kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        found = _json_occurrences(body)
    elif kind == _MULTIPART:
        found = _multipart_occurrences(content_type, body)
    elif body.strip():
        raise _BadBody("a body the gateway cannot read")
    else:
        return []
    if not _utf8_only(content_type, found):
        # Jetty and Tomcat decode by the charset parameter or the HTML Standard's
        # _charset_ field, body-parser refuses other charsets, Werkzeug ignores both.
        found = [_Occurrence(o.name, _UNSURE, o.aliases) for o in found]
    return found


def _utf8_only(content_type: str, found: list[_Occurrence]) -> bool:
    try:
        _, params = parameters(content_type)
    except MultipartError:
        return False
    if "charset" in params and unquoted_readings(params["charset"])[0].lower() not in _UTF8:
        return False
    declared = [o.value for o in found if "_charset_" in o.aliases]
    return all(isinstance(v, str) and v.strip().lower() in _UTF8 for v in declared)


# --- Form names, as upstreams read them -----------------------------------------------


def _php_name(name: str) -> str:
    """PHP's name for a form or query key (main/php_variables.c, php_register_variable_ex).

    Leading spaces are dropped, the name ends at NUL, spaces and dots become ``_``;
    ``[`` starts an array index (``amount[x]`` is ``$_POST['amount']``), or, with no
    ``]`` after it, becomes ``_`` and ends the folding.
    """
    name = name.lstrip(" ").partition("\0")[0]
    folded: list[str] = []
    for position, char in enumerate(name):
        if char == "[":
            rest = name[position + 1 :]
            return "".join(folded) + ("" if "]" in rest else "_" + rest)
        folded.append("_" if char in " ." else char)
    return "".join(folded)


def _form_aliases(name: str) -> frozenset[str]:
    aliases = {name, _php_name(name)}
    base, bracket, rest = name.partition("[")
    if bracket and "]" in rest:
        # qs (Express): amount[0], amount[] and amount[x] nest under amount; a leading
        # [amount] is amount itself. Rack skips leading brackets.
        aliases.add(base or rest.partition("]")[0])
    rack = _RACK_NAME.match(name)
    if rack is not None:
        aliases.add(rack.group(1))
    return frozenset(alias.lower() for alias in aliases)


def _form_occurrences(text: str) -> list[_Occurrence]:
    found: list[_Occurrence] = []
    for pair in text.split("&"):
        if ";" in pair:
            # Also a separator to CGI.pm, Rack and Python before 3.10 (CVE-2021-23336):
            # the names of both readings are given, and no value is sure.
            pieces = [pair, *pair.split(";")]
            if len(found) + len(pieces) > MAX_FIELDS:
                raise _BadBody("too many fields")
            readings = [_pair(piece) for piece in pieces if piece]
            found += [_Occurrence(o.name, _UNSURE, o.aliases) for o in readings]
        elif pair:
            found.append(_pair(pair))
        if len(found) > MAX_FIELDS:
            raise _BadBody("too many fields")
    return found


def _pair(pair: str) -> _Occurrence:
    # As Werkzeug, PHP, qs and servlet containers: "+" is a space, %XX is UTF-8.
    raw_name, _, raw_value = pair.partition("=")
    name = unquote_plus(raw_name, errors="strict")
    return _Occurrence(name, unquote_plus(raw_value, errors="strict"), _form_aliases(name))


# --- Multipart ------------------------------------------------------------------------


def _multipart_occurrences(content_type: str, body: bytes) -> list[_Occurrence]:
    found: list[_Occurrence] = []
    for part in parse_parts(content_type, body, MAX_FIELDS):
        name = part.names[0]
        aliases = frozenset[str]().union(*(_form_aliases(n) for n in part.names))
        value: object
        if part.filename is not None:
            # Werkzeug, PHP and busboy read even filename="" as a file, not a field.
            value = _FILE
        elif (
            len(part.names) > 1
            or (part.charset is not None and part.charset not in _UTF8)
            or (part.transfer_encoding or "binary") not in _IDENTITY
        ):
            # Werkzeug honours a charset and ignores a transfer encoding; busboy and
            # servlet containers honour more charsets, PHP neither (RFC 7578 4.7).
            value = _UNSURE
        else:
            try:
                value = part.content.decode("utf-8")
            except UnicodeDecodeError:
                value = _UNSURE  # Werkzeug substitutes U+FFFD, PHP keeps the bytes
        found.append(_Occurrence(name, value, aliases))
    return found


# --- JSON -----------------------------------------------------------------------------


class _Object(dict[str, object]):
    """A JSON object that remembers which keys it was given more than once."""

    __slots__ = ("repeated",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)  # the last value wins, as in json.loads and most parsers
        seen: set[str] = set()
        repeated: set[str] = set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        self.repeated = frozenset(repeated)


class _Inexact(Decimal):
    """A JSON number a double cannot hold as written, such as 1e999 or 9007199254740993:
    JavaScript, PHP and Flask's json read another number than the gateway would."""

    __slots__ = ()


def _json_number(text: str) -> Decimal:
    number = Decimal(text)
    if len(text) <= 15 and "e" not in text and "E" not in text:
        return number  # 15 significant digits or fewer survive a double (DBL_DIG)
    as_double = float(number)
    if math.isfinite(as_double) and Decimal(repr(as_double)) == number:
        return number
    return _Inexact(text)


def _no_constants(name: str) -> object:
    raise _BadBody(f"{name} is not JSON (RFC 8259 6)")


def _json_occurrences(body: bytes) -> list[_Occurrence]:
    if not body.strip():
        return []
    text = body.decode("utf-8")
    document = json.loads(
        text,
        parse_float=_json_number,
        parse_int=_json_number,  # no int-from-str digit limit; a double is checked instead
        parse_constant=_no_constants,
        object_pairs_hook=_Object,
    )
    if not isinstance(document, _Object):
        raise _BadBody("the JSON body is not an object")
    if _depth(text) > MAX_JSON_DEPTH:
        raise _BadBody("JSON nested too deeply")
    found: list[_Occurrence] = []
    _flatten(document, "", found)
    return found


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """The nesting of a JSON text that parsed (so its strings are well formed)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _flatten(obj: _Object, prefix: str, out: list[_Occurrence]) -> bool:
    """Append ``obj``'s names; True when something in it is read differently by parsers."""
    unsure_inside = False
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, _Object):
            unsure = _flatten(value, name + ".", out)
        else:
            unsure = not _exact(value)
        unsure = unsure or key in obj.repeated
        out.append(_Occurrence(name, _UNSURE if unsure else value, frozenset({name.lower()})))
        if len(out) > MAX_FIELDS:
            raise _BadBody("too many fields")
        unsure_inside = unsure_inside or unsure
    return unsure_inside


def _exact(value: object) -> bool:
    """Whether every parser reads this value alike (no repeated key, no inexact number)."""
    if isinstance(value, _Object):
        return not value.repeated and all(_exact(item) for item in value.values())
    if isinstance(value, list):
        return all(_exact(item) for item in value if isinstance(item, _Object | list | _Inexact))
    return not isinstance(value, _Inexact)


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
