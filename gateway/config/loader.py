"""Reading the YAML: composed nodes, ``${NAME}`` interpolation, typed readers, problems.

The YAML is *composed* into nodes rather than loaded into Python objects, so every
value still knows the line it came from and every problem can point at it.
:class:`_Reader` turns nodes into values (or records a problem naming the key path and
line), and runs the schema pass (:mod:`gateway.config.schema`) over the whole file.
The builders (:mod:`gateway.config.build`, :mod:`gateway.config.build_rules`) extend it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from gateway.conditions import (
    parse_duration_s,
)
from gateway.config.defaults import (
    KNOWN_ALGORITHMS,
    MAX_PORT,
)
from gateway.config.schema import NAME_HINT, document, key_path_text
from gateway.config.schema import check as check_schema
from gateway.config.schema import suggest as _suggest
from gateway.errors import ConfigProblem
from gateway.paths import canonical_rule_host

T = TypeVar("T")

# Names of levels, rules and upstreams end up in headers, query strings and JWT claims.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_HINT = NAME_HINT
# RFC 7230 3.2.6 token: methods and cookie names.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SECONDS = re.compile(r"[0-9]+")
_INTERPOLATION = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_INTERNAL_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))


def _merge_problems(
    built: Sequence[ConfigProblem], schema: Sequence[ConfigProblem]
) -> list[ConfigProblem]:
    """The schema's problems, and the builders' on keys the schema found no fault with.

    A schema problem takes the place of the builder's on the same key (or below it), so
    problems on one line keep the order the builders give them; the rest go by line.
    """
    faulted = {p.key_path: p for p in schema}
    placed: set[str] = set()
    merged: list[ConfigProblem] = []
    for problem in built:
        key = problem.key_path
        above = [key[:i] for i, char in enumerate(key) if char in ".["] + [key]
        claim = next((path for path in above if path in faulted), None)
        if claim is None:
            merged.append(problem)
        elif claim not in placed:
            placed.add(claim)
            merged.append(faulted[claim])
    merged += [p for path, p in faulted.items() if path not in placed]
    return sorted(merged, key=lambda p: p.line or 0)


class _Invalid(Exception):
    """A problem has been recorded; the caller falls back to a placeholder."""


@dataclass(frozen=True, slots=True)
class _Scalar:
    value: object  # None | bool | int | float | str, after interpolation
    text: str  # the scalar's text after interpolation


@dataclass(slots=True)
class _Map:
    node: Node
    path: str
    entries: dict[str, tuple[Node, Node]]  # key -> (key node, value node)

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> Node | None:
        entry = self.entries.get(key)
        return None if entry is None else entry[1]


class _Reader:
    """Reads YAML nodes: interpolation, typed readers, problems with lines; the schema pass."""

    def __init__(self, source: str, environ: Mapping[str, str], base_dir: str) -> None:
        self.source = source
        self.environ = environ
        self.base_dir = Path(base_dir)
        self.problems: list[ConfigProblem] = []
        # (key path, node) of every require.once: true, checked against the store.
        self.once_nodes: list[tuple[str, Node]] = []
        # (key path, node) of every rules[].credentials, checked against the api section.
        self.credential_nodes: list[tuple[str, Node]] = []
        # public_url's scheme once read: hosts in rules and server.hosts drop its default
        # port only (":80" under https is another origin); both 80 and 443 until then.
        self.public_scheme: str | None = None
        # PyYAML is untyped; this is the implicit-tag resolver SafeLoader uses.
        self._resolve: Callable[[type[Node], str, tuple[bool, bool]], str] = Resolver().resolve
        self._constructor = SafeConstructor()

    # --- recording ------------------------------------------------------------------

    def note(self, path: str, message: str, node: Node | None) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(ConfigProblem(path, message, self.source, line))

    def fail(self, path: str, message: str, node: Node | None) -> _Invalid:
        self.note(path, message, node)
        return _Invalid()

    # --- the schema pass ----------------------------------------------------------

    def schema_problems(self, root: Node) -> list[ConfigProblem]:
        """Check the file against gateway/config.schema.json (see gateway.config.schema)."""
        doc = document(root, self.read_scalar)
        if doc is None:
            return []  # aliases multiply it past any config: the builders alone check it
        return [
            ConfigProblem(key_path_text(p.path), p.message, self.source, p.line)
            for p in check_schema(doc.value, doc.where, doc.opaque)
        ]

    def read_scalar(self, node: ScalarNode, path: str) -> tuple[object, str] | None:
        """A scalar's value and text as the builders read it; None (and nothing
        recorded) when it has none: the builders then report why."""
        if node.tag == _STR and "$" not in node.value:
            return node.value, node.value  # most values: what scalar() would return
        problems, self.problems = self.problems, []
        try:
            scalar = self.scalar(node, path, "a value")
        except _Invalid:
            return None
        finally:
            self.problems = problems
        return scalar.value, scalar.text

    # --- YAML -----------------------------------------------------------------------

    def compose(self, text: str) -> Node | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            detail = exc.problem or exc.context or "syntax error"
            self.problems.append(
                ConfigProblem("yaml", f"invalid YAML: {detail}", self.source, line)
            )
            return None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            message = f"invalid YAML: character {exc.character!r} is not allowed"
            self.problems.append(ConfigProblem("yaml", message, self.source, line))
            return None
        except (yaml.YAMLError, RecursionError) as exc:
            message = f"invalid YAML: {type(exc).__name__}"
            if isinstance(exc, RecursionError):
                message = "invalid YAML: nested too deeply"
            self.problems.append(ConfigProblem("yaml", message, self.source, None))
            return None
        if root is None:
            self.problems.append(ConfigProblem("(top level)", "the file is empty", self.source, 1))
        return root

    def interpolate(self, text: str, path: str, node: Node) -> str:
        """Replace ``${NAME}`` and ``${NAME:-default}``; ``$${`` is a literal ``${``.

        As in a POSIX shell and docker compose, ``:-`` also applies when NAME is set
        but empty. Values are never echoed in messages; they may be secrets.
        """
        if "$" not in text:
            return text
        missing: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            body = match.group(1)
            variable = _VARIABLE.fullmatch(body) if body is not None else None
            if variable is None:  # not quoted: the value may be a secret
                raise self.fail(
                    path,
                    "malformed ${...}: write ${NAME} or ${NAME:-default} (or $${ for a literal ${)",
                    node,
                )
            name, default = variable.group(1), variable.group(2)
            value = self.environ.get(name)
            if default is not None and not value:
                return default
            if value is None:
                missing.append(name)
                return ""
            return value

        result = _INTERPOLATION.sub(replace, text)
        if missing:
            names = ", ".join(missing)
            noun = "variable" if len(missing) == 1 else "variables"
            raise self.fail(path, f"environment {noun} {names} not set (and no default)", node)
        return result

    def scalar(self, node: Node, path: str, what: str) -> _Scalar:
        if isinstance(node, MappingNode):
            raise self.fail(path, f"expected {what}, got a mapping", node)
        if isinstance(node, SequenceNode):
            raise self.fail(path, f"expected {what}, got a list", node)
        if not isinstance(node, ScalarNode):
            raise self.fail(path, f"expected {what}", node)
        text = self.interpolate(node.value, path, node)
        tag = node.tag
        if text != node.value and node.style is None:
            # An unquoted ${PORT} becomes whatever its value reads as (8080, true, ...).
            tag = self._resolve(ScalarNode, text, (True, False))
        if tag == _NULL:
            raise self.fail(
                path, f"expected {what}, got no value (remove the key for its default)", node
            )
        value: object = text
        if tag in (_BOOL, _INT, _FLOAT):
            try:
                value = self._constructor.construct_object(ScalarNode(tag, text))
            except (ValueError, yaml.YAMLError):
                raise self.fail(
                    path, f"expected {what}, got an invalid {tag[len(_TAG) :]}", node
                ) from None
        elif not tag.startswith(_TAG):
            raise self.fail(path, f"unsupported YAML tag {tag!r}", node)
        return _Scalar(value, text)

    def mapping(self, node: Node, path: str, keys: Sequence[str] | None) -> _Map:
        """A mapping with string keys; ``keys`` None means any key (e.g. upstream names)."""
        what = f"a mapping with keys {', '.join(keys)}" if keys else "a mapping"
        if not isinstance(node, MappingNode):
            kind = "a list" if isinstance(node, SequenceNode) else "a single value"
            if isinstance(node, ScalarNode) and node.tag == _NULL:
                kind = "no value"
            raise self.fail(path or "(top level)", f"expected {what}, got {kind}", node)
        entries: dict[str, tuple[Node, Node]] = {}
        explicit = [(k, v) for k, v in node.value if k.tag != _TAG + "merge"]
        for key_node, value_node in explicit:
            if not isinstance(key_node, ScalarNode):
                self.note(path or "(top level)", "keys must be plain strings", key_node)
                continue
            key = key_node.value
            child = f"{path}.{key}" if path else key
            if key in entries:
                first_line = entries[key][0].start_mark.line + 1
                self.note(child, f"duplicate key (first given on line {first_line})", key_node)
                continue
            if keys is not None and key not in keys:
                self.note(child, f"unknown key {key!r}" + _suggest(key, keys), key_node)
                continue
            entries[key] = (key_node, value_node)
        if len(explicit) != len(node.value):
            self._merge(node, path, keys, entries)
        return _Map(node, path, entries)

    def _merge(
        self,
        node: MappingNode,
        path: str,
        keys: Sequence[str] | None,
        entries: dict[str, tuple[Node, Node]],
    ) -> None:
        """YAML ``<<: *defaults`` merge keys; explicit keys win over merged ones."""
        flat = MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
        try:
            self._constructor.flatten_mapping(flat)
        except (yaml.YAMLError, RecursionError):
            self.note(path or "(top level)", "invalid merge key '<<'", node)
            return
        for key_node, value_node in flat.value:
            if not isinstance(key_node, ScalarNode) or key_node.value in entries:
                continue
            key = key_node.value
            if keys is not None and key not in keys:
                child = f"{path}.{key}" if path else key
                self.note(child, f"unknown key {key!r}" + _suggest(key, keys), key_node)
                continue
            entries[key] = (key_node, value_node)

    # --- typed readers: return the value or raise _Invalid after noting a problem ------

    def text(self, node: Node, path: str) -> str:
        text = self.scalar(node, path, "a string").text
        if not text.strip():
            raise self.fail(path, "must not be empty", node)
        return text

    def boolean(self, node: Node, path: str) -> bool:
        value = self.scalar(node, path, "true or false").value
        if not isinstance(value, bool):
            raise self.fail(path, "expected true or false", node)
        return value

    def integer(self, node: Node, path: str) -> int:
        value = self.scalar(node, path, "an integer").value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, "expected an integer", node)
        return value

    def choice(self, node: Node, path: str, known: Sequence[str]) -> str:
        text = self.scalar(node, path, "one of " + ", ".join(known)).text
        if text not in known:
            raise self.fail(path, f"unknown value {text!r}" + _suggest(text, known), node)
        return text

    def duration_s(self, node: Node, path: str) -> int:
        scalar = self.scalar(node, path, "a duration")
        value = scalar.value
        seconds = None
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        elif isinstance(value, str):
            seconds = parse_duration_s(value.strip())
        if seconds is None or seconds < 0:
            raise self.fail(
                path,
                f"invalid duration {scalar.text!r}: use whole seconds (300) or a number "
                "with a unit s, m, h or d (90s, 5m, 12h, 1d)",
                node,
            )
        return seconds

    def positive_duration_s(self, node: Node, path: str) -> int:
        seconds = self.duration_s(node, path)
        if seconds == 0:
            raise self.fail(path, "must be longer than 0 seconds", node)
        return seconds

    def timeout_s(self, node: Node, path: str) -> float:
        """A positive duration that may be fractional (``2.5``) when written as a number."""
        value = self.scalar(node, path, "a duration").value
        if isinstance(value, float):
            if not value > 0 or value == float("inf"):
                raise self.fail(path, "must be a positive number of seconds", node)
            return value
        return float(self.positive_duration_s(node, path))

    def items(self, node: Node, path: str, *, allow_empty: bool = False) -> list[tuple[str, Node]]:
        if not isinstance(node, SequenceNode):
            if isinstance(node, ScalarNode) and node.tag == _NULL:
                raise self.fail(path, "expected a list, got no value", node)
            hint = f" (write [{node.value}])" if isinstance(node, ScalarNode) else ""
            raise self.fail(path, f"expected a list{hint}", node)
        if not node.value and not allow_empty:
            raise self.fail(path, "must not be an empty list", node)
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]

    def texts(self, node: Node, path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        result: list[str] = []
        for item_path, item in self.items(node, path, allow_empty=allow_empty):
            with contextlib.suppress(_Invalid):
                result.append(self.text(item, item_path))
        return tuple(result)

    def http_url(self, node: Node, path: str, *, what: str = "URL") -> tuple[str, SplitResult]:
        text = self.text(node, path).strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise self.fail(path, f"invalid {what} {text!r}", node) from None
        del port
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise self.fail(path, f"{what} must start with http:// or https:// and a host", node)
        try:
            canonical_rule_host(parts.netloc.rpartition("@")[2])
        except ValueError as exc:
            raise self.fail(path, f"invalid host in {what}: {exc}", node) from None
        if parts.username is not None or parts.password is not None:
            raise self.fail(path, f"{what} must not contain a user name or password", node)
        if "?" in text or "#" in text:
            raise self.fail(path, f"{what} must not have a query or fragment", node)
        return text, parts

    def host_port(self, node: Node, path: str) -> tuple[str, int]:
        text = self.text(node, path).strip()
        example = "expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        bracketed = re.fullmatch(r"\[([^\]]*)\]:([0-9]+)", text)
        if bracketed:
            host, port_text = bracketed.group(1), bracketed.group(2)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise self.fail(path, f"invalid IPv6 address in {text!r}", node) from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or not _SECONDS.fullmatch(port_text):
                raise self.fail(path, f"{example} (got {text!r})", node)
            if ":" in host:
                raise self.fail(
                    path, f"put an IPv6 address in brackets: [{host}]:{port_text}", node
                )
            if not _HOSTNAME.fullmatch(host):
                raise self.fail(path, f"invalid host {host!r}", node)
        port = int(port_text)
        # Port 0 lets the OS pick a free port (tests, the demo).
        if port > MAX_PORT:
            raise self.fail(path, f"port {port} is out of range (0-{MAX_PORT})", node)
        return host, port

    def name(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if not _NAME.fullmatch(text):
            raise self.fail(path, f"invalid name {text!r}: use {_NAME_HINT}", node)
        return text

    def file_text(self, node: Node, path: str) -> str:
        """Read a file named in the config, relative to the config file's directory."""
        file_path = self.resolve_path(self.text(node, path))
        try:
            return Path(file_path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise self.fail(path, f"cannot read {file_path}: not UTF-8 text", node) from None
        except OSError as exc:
            raise self.fail(path, f"cannot read {file_path}: {exc.strerror or exc}", node) from None

    def resolve_path(self, text: str) -> str:
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else self.base_dir / path)

    # --- field helpers ----------------------------------------------------------------

    def required(self, m: _Map, key: str, read: Callable[[Node, str], T], fallback: T) -> T:
        node = m.get(key)
        if node is None:
            self.note(m.child(key), "required key is missing", m.node)
            return fallback
        try:
            return read(node, m.child(key))
        except _Invalid:
            return fallback

    def optional(self, m: _Map, key: str, read: Callable[[Node, str], T], default: T) -> T:
        node = m.get(key)
        if node is None:
            return default
        try:
            return read(node, m.child(key))
        except _Invalid:
            return default

    def section(self, m: _Map, key: str, read: Callable[[Node, str], T]) -> T | None:
        node = m.get(key)
        if node is None:
            self.note(key, "required section is missing", m.node)
            return None
        try:
            return read(node, key)
        except _Invalid:
            return None

    def bounded_integer(self, node: Node, path: str, low: int, high: int) -> int:
        value = self.integer(node, path)
        if not low <= value <= high:
            raise self.fail(path, f"must be between {low} and {high} (got {value})", node)
        return value

    def algorithms(self, node: Node, path: str) -> tuple[str, ...]:
        result: list[str] = []
        for item_path, item in self.items(node, path):
            try:
                alg = self.text(item, item_path)
            except _Invalid:
                continue
            if alg.lower() == "none":
                self.note(item_path, "'none' would accept unsigned id tokens", item)
            elif alg.upper().startswith("HS"):
                self.note(
                    item_path,
                    f"{alg!r} is refused: HMAC id tokens are keyed with the client secret, "
                    "which the gateway shares",
                    item,
                )
            elif alg not in KNOWN_ALGORITHMS:
                self.note(
                    item_path, f"unknown algorithm {alg!r}" + _suggest(alg, KNOWN_ALGORITHMS), item
                )
            else:
                result.append(alg)
        return tuple(dict.fromkeys(result))
