"""The configuration's JSON Schema (``gateway/config.schema.json``) and the pass that checks it.

The schema is the one description of the configuration's keys: their types, enums,
defaults, which are required and that no others exist. ``check`` and start-up validate
with it first (``jsonschema``, draft 2020-12); editors with the YAML language server use
it as the operator types; the README's tables are generated from it
(:mod:`gateway.config.docs`); the ``DEFAULT_*`` constants in :mod:`gateway.config` are
read from it. What a schema cannot say — a level a rule names must exist, a URL's
parts, cross-field rules — stays in :mod:`gateway.config`'s builders.

The validator's errors are rephrased here in the gateway's own words, one problem per
key path, with the line of the YAML node, never echoing a secret's value.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.conditions import parse_duration_s

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "config.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
# A key path as a tuple: ("rules", 0, "require", "max_age").
KeyPath = tuple[str | int, ...]

NAME_HINT = "letters, digits, '.', '_' and '-', starting with a letter or digit"
MAX_SIZE_BYTES: int = SCHEMA["$defs"]["size"]["then"]["maximum"]
_DURATION_HINT = "use whole seconds (300) or a number with a unit s, m, h or d (90s, 5m, 12h, 1d)"
_SIZE_HINT = "use bytes (65536) or a number with a unit KiB, MiB, GiB, kB, MB or GB (512KiB, 1MiB)"
# When one key has several errors, the most basic one is reported.
_PRIORITY = (
    "type",
    "required",
    "additionalProperties",
    "const",
    "enum",
    "pattern",
    "minItems",
    "minProperties",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "not",
)


def _inline(node: object, kind: str | None, kinds: dict[int, tuple[str, object]]) -> Any:
    """A copy of ``node`` with every ``$ref`` replaced by what it names.

    Validating without references is several times faster (a 10,000-rule file is
    checked at every reload); the schema has no recursive references. ``kinds`` records
    the ``$defs`` entry each copied schema object came from, so that an error inside
    "duration" can be phrased as a duration problem.
    """
    if isinstance(node, list):
        return [_inline(item, kind, kinds) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is not None:
        name = ref.removeprefix("#/$defs/")
        target = _inline(SCHEMA["$defs"][name], name, kinds)
        merged = target | {k: _inline(v, kind, kinds) for k, v in node.items() if k != "$ref"}
        kinds[id(merged)] = (name, merged)  # holding the object keeps its id unique
        return merged
    copy = {k: _inline(v, kind, kinds) for k, v in node.items() if k != "$defs"}
    if kind is not None:
        kinds[id(copy)] = (kind, copy)
    return copy


# id of an inlined schema object -> ($defs name, the object). The object is held so that
# no id is reused by a later object while the entry exists (ids of freed objects are).
_KIND: dict[int, tuple[str, object]] = {}
# Built once: compiling the schema costs more than validating a config with it.
_VALIDATOR = Draft202012Validator(_inline(SCHEMA, None, _KIND))


def subschema(path: str) -> dict[str, Any]:
    """The schema of a key, by dotted path; ``[]`` steps into a list's items.

    ``subschema("rules[].risk.timeout")``; ``$ref`` resolved, and for a key that is
    a scalar or a mapping (``require``) the mapping's schema. KeyError for a key the
    schema lacks.
    """
    node = SCHEMA
    for part in path.replace("[]", ".[]").split("."):
        node = _object(node)
        node = node["items"] if part == "[]" else node["properties"][part]
    return _object(node) | {k: v for k, v in node.items() if k != "$ref"}


def _object(node: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node)
    if "properties" not in node and "else" in node:  # "none" or a mapping
        return _resolve(node["else"])
    return node


def default(path: str) -> Any:
    """The schema's ``default`` of a key (KeyError when it has none)."""
    return subschema(path)["default"]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    prefix = "#/$defs/"
    if not ref.startswith(prefix):  # pragma: no cover - the schema only refers to $defs
        raise KeyError(ref)
    resolved: dict[str, Any] = SCHEMA["$defs"][ref[len(prefix) :]]
    return resolved


def key_path_text(path: KeyPath) -> str:
    """``("rules", 0, "require")`` -> ``"rules[0].require"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else ""


@dataclass(frozen=True, slots=True)
class Where:
    """Where a key is in the YAML file: the key's line, the value's line, its text."""

    key_line: int | None
    value_line: int
    text: str  # a scalar's text after interpolation, as the operator sees it; else ""
    raw: str = ""  # a scalar's text as written, before interpolation


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    path: KeyPath
    message: str
    line: int | None


# Past this many nodes (aliases can multiply a small file) only the builders check it.
MAX_NODES = 1_000_000
# Deeper than any configuration; a deeper value is left to the builders.
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(slots=True)
class Document:
    """The composed YAML as plain values, and where each key path is in the file."""

    value: object
    where: dict[KeyPath, Where]
    opaque: list[KeyPath]  # values that could not be read; the builders report them


def document(
    root: Node, read_scalar: Callable[[ScalarNode, str], tuple[object, str] | None]
) -> Document | None:
    """Plain values for :func:`check`; None when the file is too big to check this way.

    ``read_scalar(node, key_path)`` interpolates and types a scalar, or returns None
    when it cannot (an unset variable, no value, an unsupported tag). It must not
    record problems: the builders report those, with today's words.
    """
    if _expanded_size(root, {}, ()) > MAX_NODES:
        return None
    doc = Document(None, {}, [])
    constructor = SafeConstructor()

    def convert(node: Node, path: KeyPath, key_line: int | None, stack: tuple[int, ...]) -> object:
        doc.where[path] = Where(key_line, node.start_mark.line + 1, "")
        if id(node) in stack or len(stack) > MAX_DEPTH:
            doc.opaque.append(path)
            return None
        inner = (*stack, id(node))
        if isinstance(node, SequenceNode):
            return [convert(item, (*path, i), None, inner) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            pairs = _pairs(node, constructor)
            if pairs is None:
                doc.opaque.append(path)
                return None
            return {
                key.value: convert(value, (*path, key.value), key.start_mark.line + 1, inner)
                for key, value in pairs
            }
        if not isinstance(node, ScalarNode):  # pragma: no cover - YAML has no other nodes
            doc.opaque.append(path)
            return None
        read = read_scalar(node, key_path_text(path))
        if read is None:
            doc.opaque.append(path)
            return None
        value, text = read
        doc.where[path] = Where(key_line, node.start_mark.line + 1, text, node.value)
        return value

    try:
        doc.value = convert(root, (), None, ())
    except RecursionError:  # pragma: no cover - MAX_DEPTH stops well before
        return None
    return doc


def _expanded_size(node: Node, sizes: dict[int, int], stack: tuple[int, ...]) -> int:
    """How many nodes ``node`` has once aliases are expanded; linear in the file's size."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in stack or len(stack) > MAX_DEPTH:
        return 1  # a cycle or too deep: convert() leaves it opaque
    size = 1
    if isinstance(node, SequenceNode | MappingNode):
        inner = (*stack, id(node))
        for child in node.value:
            pair = child if isinstance(child, tuple) else (child,)
            size += sum(_expanded_size(part, sizes, inner) for part in pair)
            if size > MAX_NODES:
                break
    sizes[id(node)] = size
    return size


def _pairs(node: MappingNode, constructor: SafeConstructor) -> list[tuple[ScalarNode, Node]] | None:
    """A mapping's (key, value) pairs as the builders take them: string keys, the first
    of duplicates, explicit keys before ``<<`` merged ones. None: a broken merge key."""
    pairs: dict[str, tuple[ScalarNode, Node]] = {}
    explicit = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
    merged: list[tuple[Node, Node]] = []
    if len(explicit) != len(node.value):
        flat = MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
        try:
            constructor.flatten_mapping(flat)
        except (yaml.YAMLError, RecursionError):
            return None
        merged = flat.value
    for key, value in [*explicit, *merged]:
        if isinstance(key, ScalarNode) and key.value not in pairs:
            pairs[key.value] = (key, value)
    return list(pairs.values())


def check(
    document: object, where: Mapping[KeyPath, Where], opaque: Sequence[KeyPath]
) -> list[SchemaProblem]:
    """Validate the plain ``document`` against the schema; one problem per key path.

    ``opaque`` are the paths whose values could not be read (an unset variable, no
    value, an unsupported tag); the builders report those, so the schema is quiet there.
    """
    found: dict[KeyPath, tuple[int, SchemaProblem]] = {}
    for error in _VALIDATOR.iter_errors(document):
        for problem in _problems(error, where):
            if any(problem.path[: len(p)] == p for p in opaque):
                continue
            rank = _PRIORITY.index(error.validator) if error.validator in _PRIORITY else 99
            if problem.path not in found or rank < found[problem.path][0]:
                found[problem.path] = (rank, problem)
    return [problem for _rank, problem in found.values()]


def _problems(error: ValidationError, where: Mapping[KeyPath, Where]) -> Iterator[SchemaProblem]:
    path: KeyPath = tuple(error.absolute_path)
    place = where.get(path)
    keyword = str(error.validator)
    schema = error.schema if isinstance(error.schema, dict) else {}
    instance = error.instance
    if keyword == "required" and isinstance(instance, dict):
        line = place.value_line if place else None
        for key in schema.get("required", ()):
            if key not in instance:
                yield SchemaProblem((*path, key), _missing(path, key, instance), line)
        return
    if keyword == "additionalProperties" and isinstance(instance, dict):
        known = list(schema.get("properties", {}))
        for key in instance:
            if key not in known:
                key_place = where.get((*path, key))
                line = key_place.key_line if key_place else None
                yield SchemaProblem(
                    (*path, key), f"unknown key {key!r}" + suggest(key, known), line
                )
        return
    text = place.text if place else ""
    line = place.value_line if place else None
    if keyword == "enum" and place is not None and text in schema.get("enum", ()):
        # YAML 1.1 reads an unquoted `off` (or on, yes, no) as a boolean; the builders
        # read a choice's text (Validator.choice), so `dpop: off` is the string.
        return
    if keyword == "type" and schema.get("type") == "array" and _shape(instance) is None:
        raw = place.raw if place else ""  # as written: an interpolated value may be a secret
        yield SchemaProblem(path, f"expected a list (write [{raw}])", line)
        return
    kind = _KIND.get(id(error.schema))
    message = _message(keyword, kind[0] if kind else None, schema, instance, text)
    yield SchemaProblem(path, message, line)


def _missing(path: KeyPath, key: str, instance: Mapping[str, object]) -> str:
    if not path:
        return "required section is missing"
    if key == "level" and path[-1] == "require":
        if "max_age" in instance:
            return "max_age needs a level: the level that must have been proven recently"
        return "required key is missing (use require: none for no sign-in)"
    return "required key is missing"


def _shape(instance: object) -> str | None:
    if isinstance(instance, dict):
        return "a mapping"
    if isinstance(instance, list):
        return "a list"
    return None


_WHAT = {
    "text": "a string",
    "scalar": "a string",
    "name": "a string",
    "method": "a string",
    "secrets": "a string",
    "duration": "a duration",
    "positive_duration": "a duration",
    "timeout": "a duration",
    "size": "a size",
    "budget": "a size",
    "workers": "an integer",
    "ratio": "a number from 0 to 1",
    "condition": "a condition",
    "require": "'none' or {level: NAME}",
}


RATIO_HINT = "a number from 0 to 1 (0.1: one trace in ten)"


def _message(
    keyword: str, kind: str | None, schema: Mapping[str, Any], instance: Any, text: str
) -> str:
    shape = _shape(instance)
    if keyword == "type" and schema.get("type") == "object":
        keys = ", ".join(schema.get("properties", {}))
        what = f"a mapping with keys {keys}" if keys else "a mapping"
        return f"expected {what}, got {shape or 'a single value'}"
    if keyword == "type" and schema.get("type") == "array":
        return "expected a list"
    if keyword == "minItems":
        return "must not be an empty list"
    if keyword == "minProperties":
        return "at least one upstream is needed (name: URL)"
    if keyword == "enum":
        known = [str(value) for value in schema["enum"]]
        if shape is not None:
            return f"expected one of {', '.join(known)}, got {shape}"
        return f"unknown value {text!r}" + suggest(text, known)
    if schema.get("type") == "boolean":
        return "expected true or false" + (f", got {shape}" if shape else "")
    what = _WHAT.get(kind or "", "an integer" if schema.get("type") == "integer" else "a value")
    if shape is not None:
        return f"expected {what}, got {shape}"
    if kind in ("text", "scalar", "name", "method", "secrets"):
        if not text.strip():
            return "must not be empty"
        if kind == "name":
            return f"invalid name {text!r}: use {NAME_HINT}"
        if kind == "method":
            return f"invalid method {text!r} (RFC 7230 token)"
    if kind in ("duration", "positive_duration", "timeout"):
        if isinstance(instance, float) and kind == "timeout":
            return "must be a positive number of seconds"
        if parse_duration_s(text.strip()) == 0 and kind != "duration":
            return "must be longer than 0 seconds"
        return f"invalid duration {text!r}: {_DURATION_HINT}"
    if kind == "budget":
        return (
            "use a size between 1 byte and 4GiB, in bytes (67108864) or with a unit "
            f"(64MiB) (got {text!r})"
        )
    if kind == "size":
        if keyword in ("minimum", "maximum"):
            return f"must be between 1 byte and {MAX_SIZE_BYTES} bytes (64MiB)"
        return f"invalid size {text!r}: {_SIZE_HINT}"
    if kind == "ratio":
        return f"expected {RATIO_HINT}"
    if kind == "workers":
        return "must be at least 1" if keyword == "minimum" else "expected an integer"
    if schema.get("type") == "integer":
        if keyword in ("minimum", "maximum"):
            low, high = schema.get("minimum"), schema.get("maximum")
            return f"must be between {low} and {high} (got {instance})"
        return "expected an integer"
    if kind == "require":
        return f"expected 'none' or a mapping like {{level: NAME, max_age: 5m}} (got {text!r})"
    return f"invalid value ({keyword})"  # never the value: it may be a secret
