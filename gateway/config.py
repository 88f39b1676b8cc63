"""YAML configuration -> environment interpolation -> validated :class:`gateway.model.Config`.

The YAML is *composed* into nodes rather than loaded into Python objects, so every
value still knows the line it came from and every problem can point at it. The
whole file is validated in one pass and every problem is reported at once, as an
:class:`gateway.errors.ConfigError`; an operator never sees a traceback.

Unknown keys are errors, not warnings: a misspelt ``max_age`` or ``methods`` that
were silently ignored would weaken the policy without anyone noticing.

Apart from reading the config file (and the secret files it names) nothing here
does I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from gateway import model
from gateway.cel import parse_when
from gateway.conditions import MAX_DEPTH as MAX_CONDITION_DEPTH
from gateway.conditions import (
    ConditionError,
    is_field_name,
    parse_duration_s,
)
from gateway.errors import ConfigError, ConfigProblem
from gateway.model import MAX_ASSERTION_TTL_S
from gateway.paths import canonical_rule_host
from gateway.rules import compile_glob
from gateway.session.crypto import MIN_SECRET_BYTES
from gateway.session.redis_url import REDIS_SCHEMES, is_sentinel_url, parse_sentinel_url, scheme_of

T = TypeVar("T")

# --- Defaults, and why -------------------------------------------------------------
# (tests/test_config.py checks that these agree with the defaults in gateway/model.py)

# Under a leading underscore so it is unlikely to collide with an application's paths.
DEFAULT_INTERNAL_PREFIX = "/_gateway"
# Kubernetes' default terminationGracePeriodSeconds is 30 s; draining must finish first.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# Trust no proxy: X-Forwarded-For from an untrusted peer is whatever the client wrote.
DEFAULT_TRUSTED_PROXIES: tuple[model.IPNetwork, ...] = ()
# One event loop per process; scale out with replicas, or raise this on big hosts.
DEFAULT_WORKERS = 1
# A healthy upstream on the same network accepts a connection in milliseconds.
DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S = 5.0
# nginx's proxy_read_timeout default is 60 s; apps behind proxies are tuned for it.
DEFAULT_UPSTREAM_TIMEOUT_S = 60.0
DEFAULT_ACCESS_LOG = True
# Client connections one process holds before it stops accepting (new ones then wait
# in the kernel's listen backlog): nginx's worker_connections in its shipped config.
# Each may also hold an upstream and a Redis connection: the process raises its open
# file limit to the hard limit at start and warns when this does not fit.
DEFAULT_MAX_CONNECTIONS = 1024
# Apache mod_reqtimeout's header=20 (nginx's client_header_timeout is 60 s): a
# browser sends its request head in one packet; 20 s is 8 KiB at 500 bytes/s.
DEFAULT_HEADER_TIMEOUT_S = 20.0
# Apache mod_reqtimeout's body=20,MinRate=500 (see gateway.connections).
DEFAULT_BODY_TIMEOUT_S = 20.0
# nginx's keepalive_timeout default: longer than the 60 s idle timeout of common load
# balancers, so the balancer closes an idle connection first (a backend closing first
# races the balancer's next request on it, which then fails).
DEFAULT_KEEPALIVE_TIMEOUT_S = 75.0
# nginx's keepalive_requests default (since 1.19.10).
DEFAULT_KEEPALIVE_REQUESTS = 1000
# After a worker restarts or a replica is added, keep-alive clients stay where they
# are until their connection ends: at 10 s, load is spread again within seconds,
# for one TCP handshake (well under a millisecond on a LAN) per connection per 10 s.
# nginx's keepalive_time (1 h) bounds memory, not balance.
DEFAULT_KEEPALIVE_MAX_AGE_S = 10.0
MAX_CONNECTIONS_LIMIT = 100_000
# Each Redis command holds one pooled connection for well under a millisecond, so a
# quarter of the client connections in Redis at once is already a burst; six
# processes of 256 stay far below Redis's maxclients (10,000).
REDIS_POOL_SHARE = 4
# A Redis that answers but whose pool is busy: wait this long, then answer 503 with
# Retry-After (back-pressure). A Redis that does not answer fails faster (0.5 s).
DEFAULT_REDIS_POOL_TIMEOUT_S = 5.0
MAX_REDIS_POOL_SIZE = 10_000
DEFAULT_LOG_LEVEL = "info"
# OIDC Core 5.4: profile and email fill X-Auth-Email and the name shown on pages.
DEFAULT_SCOPES = ("openid", "profile", "email")
# OIDC Core 9 / RFC 7591 2: client_secret_basic is the default token_endpoint_auth_method.
DEFAULT_CLIENT_AUTH = "client_secret_basic"
# OIDC Core 5.5.1.1: an essential acr makes some providers fail the login outright instead
# of doing their best; the gateway checks the acr it gets back either way.
DEFAULT_ESSENTIAL_ACR = False
# An email the provider has not verified is whatever the user typed; forwarding it as
# X-Auth-Email lets anyone claim anyone's address (the "nOAuth" takeovers of 2023).
DEFAULT_ASSUME_EMAIL_VERIFIED = False
# OIDC Core 3.1.3.7 asks for "a small leeway" on iat/exp for clock skew.
DEFAULT_CLOCK_SKEW_S = 60
# RFC 7518 3.1 asymmetric algorithms (RS256 is mandatory, OIDC Core 15.1). Never "none",
# never HS*: an HMAC id token is keyed with the client secret, which the gateway shares.
DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "RS384", "RS512", "EdDSA")
# Discovery, JWKS and token requests; a provider slower than this is effectively down.
DEFAULT_HTTP_TIMEOUT_S = 10.0
# Stateless: the session lives in the sealed cookie, no extra service to run.
DEFAULT_STORE = "cookie"
DEFAULT_REDIS_PREFIX = "stepup:"  # lets the gateway share a Redis database with others
MAX_REDIS_PREFIX_CHARS = 64  # part of every key; a long prefix only costs memory
# Cookies without Secure leak over plain http; turn off only for local plain-http use.
DEFAULT_COOKIE_SECURE = True
# "__Host-" is prepended when cookie_secure (RFC 6265bis 4.1.3.2).
DEFAULT_COOKIE_NAME = "stepup_session"
# NIST SP 800-63B 4.2.3 (AAL2): re-authenticate after 30 minutes of inactivity ...
DEFAULT_IDLE_TIMEOUT_S = 30 * 60
# ... and at least once every 12 hours.
DEFAULT_LIFETIME_S = 12 * 60 * 60
# Time to finish a sign-in at the provider before its state cookie expires.
DEFAULT_TRANSACTION_TTL_S = 10 * 60
# Contract: X-Auth-Assertion expires within 60 s.
DEFAULT_ASSERTION_TTL_S = 60
DEFAULT_HEADER_PREFIX = "X-Auth-"
# A risk engine sits in the request path: a second of latency is already a lot.
DEFAULT_RISK_TIMEOUT_S = 1.0
# Unknown risk is high risk: ask for the strongest level rather than refuse outright.
DEFAULT_RISK_ON_ERROR = "step_up"
# Ask the engine for every request unless the operator accepts stale answers.
DEFAULT_RISK_CACHE_S = 0
# Payment and form posts are kilobytes; 1 MiB is nginx's client_max_body_size default.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# RFC 9396 authorization_details "type" for rules that bind fields (PSD2 payments).
DEFAULT_AUTHORIZATION_DETAILS_TYPE = "payment_initiation"
# Requests kept across a step-up, all together, per process: 64 forms at the 1 MiB
# body limit, thousands of ordinary ones. Past it new ones get 503 + Retry-After.
DEFAULT_KEEP_BUDGET_BYTES = 64 * 1024 * 1024
# A user rarely has more than a few step-ups in flight (five transaction cookies at
# most); eight per session, or per client address without one, leaves room.
DEFAULT_KEEP_PER_CLIENT = 8
MAX_KEEP_PER_CLIENT = 1000

# --- Limits --------------------------------------------------------------------------

# A skew larger than this would keep accepting expired id tokens for too long.
MAX_CLOCK_SKEW_S = 5 * 60
MAX_PORT = 65535
# Past this, a slow engine holds connections long enough to look like an outage.
MAX_RISK_TIMEOUT_S = 10.0
# Bodies are held in memory while a rule's conditions and bindings read them.
MAX_BODY_LIMIT_BYTES = 64 * 1024 * 1024
# Kept requests, all together, in one process (or in Redis, per process).
MAX_KEEP_BUDGET_BYTES = 4 * 1024 * 1024 * 1024
MAX_DETAILS_TYPE_CHARS = 200

STORES = ("cookie", "memory", "redis")
TOKEN_KINDS = ("jwt", "introspection")
DPOP_MODES = ("off", "allowed", "required")
CREDENTIALS = ("session", "token", "any")
# RFC 9449 11.1: a proof is good for a short window around its iat; a minute either way
# absorbs ordinary clock drift while keeping the jti records (and replays) short-lived.
DEFAULT_DPOP_MAX_AGE_S = 60
MAX_DPOP_MAX_AGE_S = 5 * 60
# RFC 7662 4: a cached answer may outlive a revocation; a minute bounds that window.
DEFAULT_INTROSPECTION_CACHE_S = 60
MAX_INTROSPECTION_CACHE_S = 10 * 60
# Verified tokens (and introspection answers) kept per process, each a few hundred bytes.
DEFAULT_TOKEN_CACHE_ENTRIES = 10_000
MAX_TOKEN_CACHE_ENTRIES = 1_000_000
# DPoP proofs: asymmetric only (RFC 9449 4.2: no MAC, no none).
DEFAULT_DPOP_ALGORITHMS = ("ES256", "ES384", "EdDSA", "PS256", "RS256")
RISK_ON_ERROR = ("step_up", "deny")
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
LOG_LEVELS = ("debug", "info", "warning", "error")
# RFC 7518 3.1 and RFC 8037 3.1 signature algorithms an id token may use.
KNOWN_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

# A single-use proof is consumed in the process that sees it; with several workers a
# replay could reach another one unless the consumption records live in Redis.
ONCE_NEEDS_ONE_CONSUMER = (
    "require.once needs server.workers: 1 or a Redis (session.store: redis or "
    "session.redis_url) so a proof is consumed once across workers"
)

# Names of levels, rules and upstreams end up in headers, query strings and JWT claims.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_HINT = "letters, digits, '.', '_' and '-', starting with a letter or digit"
# The IANA HTTP Method Registry (RFC 9110 16.1.1, WebDAV, DeltaV, CalDAV, ...), and
# PURGE that caches use: a rule may name these; anything else is most likely a typo
# that would leave the requests it meant to protect to a weaker rule.
REGISTERED_METHODS: frozenset[str] = frozenset(
    {
        *("ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "CONNECT", "COPY"),
        *("DELETE", "GET", "HEAD", "LABEL", "LINK", "LOCK", "MERGE", "MKACTIVITY"),
        *("MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE", "MOVE", "OPTIONS"),
        *("ORDERPATCH", "PATCH", "POST", "PRI", "PROPFIND", "PROPPATCH", "PURGE", "PUT"),
        *("QUERY", "REBIND", "REPORT", "SEARCH", "TRACE", "UNBIND", "UNCHECKOUT"),
        *("UNLINK", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL"),
    }
)
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
_SIZE = re.compile(r"([0-9]{1,12})\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?")
_SIZE_UNIT = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))


def load_config(path: str, environ: Mapping[str, str] | None = None) -> model.Config:
    """Read and validate the config file at ``path``; raise ConfigError listing every problem.

    Relative ``secret_file``-style paths are resolved against the file's directory.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("(file)", "file not found", path)]) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
        raise ConfigError([ConfigProblem("(file)", message, path)]) from None
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        raise ConfigError([ConfigProblem("(file)", message, path)]) from None
    return load_config_text(text, path, environ, base_dir=os.path.dirname(path) or ".")


def load_config_text(
    text: str,
    source: str,
    environ: Mapping[str, str] | None = None,
    base_dir: str = ".",
) -> model.Config:
    """Validate config ``text``; ``source`` names it in messages. Raises ConfigError."""
    validator = _Validator(source, os.environ if environ is None else environ, base_dir)
    root = validator.compose(text)
    config = None if root is None else validator.config(root)
    problems = sorted(validator.problems, key=lambda p: p.line or 0)
    if problems or config is None:
        raise ConfigError(problems or [ConfigProblem("(top level)", "invalid", source)])
    return config


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else ""


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 6.3
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class _Validator:
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

    # --- sections ---------------------------------------------------------------------

    def config(self, root: Node) -> model.Config | None:
        try:
            top = self.mapping(
                root,
                "",
                (
                    "server",
                    "upstreams",
                    "oidc",
                    "session",
                    "assurance",
                    "rules",
                    "assertion",
                    "step_up",
                    "api",
                ),
            )
        except _Invalid:
            return None
        server = self.section(top, "server", self.server)
        upstreams = self.section(top, "upstreams", self.upstreams)
        oidc = self.section(top, "oidc", self.oidc)
        session = self.section(top, "session", self.session)
        assurance = self.section(top, "assurance", self.assurance)
        rules = self.section(
            top, "rules", lambda node, path: self.rules(node, path, assurance, upstreams)
        )
        assertion = model.AssertionConfig(
            ttl_s=DEFAULT_ASSERTION_TTL_S, header_prefix=DEFAULT_HEADER_PREFIX
        )
        if top.get("assertion") is not None:
            assertion = self.section(top, "assertion", self.assertion) or assertion
        step_up = model.StepUpConfig(
            max_body_bytes=DEFAULT_MAX_BODY_BYTES,
            authorization_details_type=DEFAULT_AUTHORIZATION_DETAILS_TYPE,
            keep_budget_bytes=DEFAULT_KEEP_BUDGET_BYTES,
            keep_per_client=DEFAULT_KEEP_PER_CLIENT,
        )
        if top.get("step_up") is not None:
            step_up = self.section(top, "step_up", self.step_up) or step_up
        api = self.section(top, "api", self.api) if top.get("api") is not None else None
        if api is not None and oidc is not None:
            outside = [alg for alg in api.algorithms if alg not in oidc.algorithms]
            if outside:
                # The issuer's keys are looked up under oidc.algorithms (one JWKS cache).
                self.note(
                    "api.algorithms",
                    f"{', '.join(outside)} not in oidc.algorithms: tokens signed so would "
                    "be refused; add them there too",
                    self.node_at(top, "api", "algorithms"),
                )
        if api is None and top.get("api") is None:
            for cred_path, cred_node in self.credential_nodes:
                self.note(
                    cred_path,
                    "needs the api section: without it the gateway accepts no access tokens",
                    cred_node,
                )
        if server is not None and session is not None:
            if session.redis_pool_size == 0:
                pool_size = max(1, server.max_connections // REDIS_POOL_SHARE)
                session = dataclasses.replace(session, redis_pool_size=pool_size)
            self.check_cookie_secure(server, session, top)
            self.check_once(server, session)
            if server.workers > 1 and session.store == "memory":
                self.note(
                    "server.workers",
                    f"is {server.workers} but session.store is memory: each worker would keep "
                    "its own sessions and a sign-in would work on one worker only. Use "
                    "store: cookie or redis, or workers: 1",
                    self.node_at(top, "server", "workers"),
                )
        if (
            server is None
            or upstreams is None
            or oidc is None
            or session is None
            or assurance is None
            or rules is None
        ):
            return None
        return model.Config(
            server=server,
            upstreams=upstreams,
            oidc=oidc,
            session=session,
            assurance=assurance,
            rules=rules,
            assertion=assertion,
            source=self.source,
            step_up=step_up,
            api=api,
        )

    def server(self, node: Node, path: str) -> model.ServerConfig:
        m = self.mapping(
            node,
            path,
            (
                "listen",
                "public_url",
                "internal_prefix",
                "metrics_listen",
                "shutdown_timeout",
                "trusted_proxies",
                "workers",
                "upstream_connect_timeout",
                "upstream_timeout",
                "access_log",
                "log_level",
                "hosts",
                "case_insensitive_paths",
                "max_connections",
                "header_timeout",
                "body_timeout",
                "keepalive_timeout",
                "keepalive_requests",
                "keepalive_max_age",
            ),
        )
        listen_host, listen_port = self.required(m, "listen", self.host_port, ("", 0))
        metrics_listen = self.optional(m, "metrics_listen", self.host_port, None)
        return model.ServerConfig(
            listen_host=listen_host,
            listen_port=listen_port,
            public_url=self.required(m, "public_url", self.public_url, ""),
            internal_prefix=self.optional(
                m, "internal_prefix", self.internal_prefix, DEFAULT_INTERNAL_PREFIX
            ),
            metrics_listen=metrics_listen,
            shutdown_timeout_s=self.optional(
                m, "shutdown_timeout", self.timeout_s, DEFAULT_SHUTDOWN_TIMEOUT_S
            ),
            trusted_proxies=self.optional(
                m, "trusted_proxies", self.networks, DEFAULT_TRUSTED_PROXIES
            ),
            workers=self.optional(m, "workers", self.workers, DEFAULT_WORKERS),
            upstream_connect_timeout_s=self.optional(
                m, "upstream_connect_timeout", self.timeout_s, DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S
            ),
            upstream_timeout_s=self.optional(
                m, "upstream_timeout", self.timeout_s, DEFAULT_UPSTREAM_TIMEOUT_S
            ),
            access_log=self.optional(m, "access_log", self.boolean, DEFAULT_ACCESS_LOG),
            log_level=self.optional(
                m, "log_level", lambda n, p: self.choice(n, p, LOG_LEVELS), DEFAULT_LOG_LEVEL
            ),
            hosts=self.optional(m, "hosts", self.hosts, ()),
            case_insensitive_paths=self.optional(m, "case_insensitive_paths", self.boolean, False),
            max_connections=self.optional(
                m,
                "max_connections",
                lambda n, p: self.bounded_integer(n, p, 1, MAX_CONNECTIONS_LIMIT),
                DEFAULT_MAX_CONNECTIONS,
            ),
            header_timeout_s=self.optional(
                m, "header_timeout", self.timeout_s, DEFAULT_HEADER_TIMEOUT_S
            ),
            body_timeout_s=self.optional(m, "body_timeout", self.timeout_s, DEFAULT_BODY_TIMEOUT_S),
            keepalive_timeout_s=self.optional(
                m, "keepalive_timeout", self.timeout_s, DEFAULT_KEEPALIVE_TIMEOUT_S
            ),
            keepalive_requests=self.optional(
                m,
                "keepalive_requests",
                lambda n, p: self.bounded_integer(n, p, 1, 2**31 - 1),
                DEFAULT_KEEPALIVE_REQUESTS,
            ),
            keepalive_max_age_s=self.optional(
                m, "keepalive_max_age", self.timeout_s, DEFAULT_KEEPALIVE_MAX_AGE_S
            ),
        )

    def hosts(self, node: Node, path: str) -> tuple[str, ...]:
        """``server.hosts``: more names (and IP spellings) the gateway answers for."""
        result: list[str] = []
        for item_path, item in self.items(node, path):
            with contextlib.suppress(_Invalid):
                result.append(self.rule_host(item, item_path))
        return tuple(result)

    def bounded_integer(self, node: Node, path: str, low: int, high: int) -> int:
        value = self.integer(node, path)
        if not low <= value <= high:
            raise self.fail(path, f"must be between {low} and {high} (got {value})", node)
        return value

    def public_url(self, node: Node, path: str) -> str:
        text, parts = self.http_url(node, path, what="public_url")
        if parts.path not in ("", "/"):
            raise self.fail(
                path,
                f"public_url must not have a path ({parts.path!r}): the gateway serves "
                "the whole origin",
                node,
            )
        # Kept as written otherwise: the redirect_uri built from it must match, byte for
        # byte, the one registered at the provider.
        self.public_scheme = parts.scheme.lower()
        return text.rstrip("/")

    def internal_prefix(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        prefix = text.rstrip("/") if text != "/" else text
        if not prefix.startswith("/"):
            raise self.fail(path, f"must start with '/' (got {text!r})", node)
        if prefix == "/":
            raise self.fail(
                path, "must not be '/': the gateway's endpoints would hide the app", node
            )
        segments = prefix.split("/")[1:]
        if not _INTERNAL_PREFIX.fullmatch(prefix) or {".", ".."} & set(segments):
            raise self.fail(
                path,
                f"invalid prefix {text!r}: use path segments of letters, digits, '-', '.', "
                "'_', '~' (e.g. /_gateway)",
                node,
            )
        return prefix

    def networks(self, node: Node, path: str) -> tuple[model.IPNetwork, ...]:
        # An empty list is explicit and means the same as the default: trust no proxy.
        result: list[model.IPNetwork] = []
        for item_path, item in self.items(node, path, allow_empty=True):
            try:
                text = self.text(item, item_path).strip()
            except _Invalid:
                continue
            try:
                result.append(ipaddress.ip_network(text, strict=True))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    self.note(
                        item_path, f"not an IP network (CIDR like 10.0.0.0/8): {text!r}", item
                    )
                else:
                    self.note(item_path, f"{text!r} has host bits set; did you mean {loose}?", item)
        return tuple(result)

    def workers(self, node: Node, path: str) -> int:
        if isinstance(node, ScalarNode) and node.value == "auto":
            # One worker per core: a Python process uses one core.
            return max(1, os.cpu_count() or 1)
        workers = self.integer(node, path)
        if workers < 1:
            raise self.fail(path, "must be at least 1", node)
        return workers

    def upstreams(self, node: Node, path: str) -> dict[str, model.UpstreamConfig]:
        m = self.mapping(node, path, None)
        if not m.entries:
            raise self.fail(path, "at least one upstream is needed (name: URL)", node)
        before = len(self.problems)
        result: dict[str, model.UpstreamConfig] = {}
        for name, (key_node, value_node) in m.entries.items():
            child = m.child(name)
            if not _NAME.fullmatch(name):
                self.note(child, f"invalid upstream name {name!r}: use {_NAME_HINT}", key_node)
                continue
            try:
                result[name] = self.upstream(name, value_node, child)
            except _Invalid:
                continue
        if len(self.problems) > before:
            raise _Invalid  # rules are then not checked against a partial list of upstreams
        return result

    def upstream(self, name: str, node: Node, path: str) -> model.UpstreamConfig:
        """An upstream: its URL, or ``{url: URL, case_insensitive_paths: BOOL}``."""
        if not isinstance(node, MappingNode):
            return model.UpstreamConfig(name=name, url=self.upstream_url(node, path))
        m = self.mapping(node, path, ("url", "case_insensitive_paths", "pass_authorization"))
        url = self.required(m, "url", lambda n, p: self.upstream_url(n, p), "")
        case_insensitive = self.optional(m, "case_insensitive_paths", self.boolean, False)
        pass_authorization = self.optional(m, "pass_authorization", self.boolean, False)
        if not url:
            raise _Invalid
        return model.UpstreamConfig(
            name=name,
            url=url,
            case_insensitive_paths=case_insensitive,
            pass_authorization=pass_authorization,
        )

    def upstream_url(self, node: Node, path: str) -> str:
        text, _parts = self.http_url(node, path, what="upstream URL")
        return text.rstrip("/")

    def oidc(self, node: Node, path: str) -> model.OidcConfig:
        m = self.mapping(
            node,
            path,
            (
                "issuer",
                "client_id",
                "client_secret",
                "client_secret_file",
                "scopes",
                "client_auth",
                "essential_acr",
                "assume_email_verified",
                "clock_skew",
                "algorithms",
                "http_timeout",
            ),
        )
        return model.OidcConfig(
            issuer=self.required(m, "issuer", self.issuer, ""),
            client_id=self.required(m, "client_id", self.text, ""),
            client_secret=self.client_secret(m),
            scopes=self.optional(m, "scopes", self.scopes, DEFAULT_SCOPES),
            client_auth=self.optional(
                m,
                "client_auth",
                lambda n, p: self.choice(n, p, CLIENT_AUTH_METHODS),
                DEFAULT_CLIENT_AUTH,
            ),
            essential_acr=self.optional(m, "essential_acr", self.boolean, DEFAULT_ESSENTIAL_ACR),
            assume_email_verified=self.optional(
                m, "assume_email_verified", self.boolean, DEFAULT_ASSUME_EMAIL_VERIFIED
            ),
            clock_skew_s=self.optional(m, "clock_skew", self.clock_skew, DEFAULT_CLOCK_SKEW_S),
            algorithms=self.optional(m, "algorithms", self.algorithms, DEFAULT_ALGORITHMS),
            http_timeout_s=self.optional(m, "http_timeout", self.timeout_s, DEFAULT_HTTP_TIMEOUT_S),
        )

    def issuer(self, node: Node, path: str) -> str:
        # Kept verbatim, trailing slash included: OIDC Core 3.1.3.7 compares the id
        # token's iss with it exactly, and some providers (Auth0) end theirs with "/".
        text, _parts = self.http_url(node, path, what="issuer")
        return text

    def client_secret(self, m: _Map) -> str:
        # Secrets are never quoted in messages.
        inline, from_file = m.get("client_secret"), m.get("client_secret_file")
        if inline is not None and from_file is not None:
            self.note(
                m.child("client_secret_file"),
                "give client_secret or client_secret_file, not both",
                from_file,
            )
            return ""
        if from_file is not None:
            try:
                secret = self.file_text(from_file, m.child("client_secret_file")).strip()
            except _Invalid:
                return ""
            if not secret:
                self.note(m.child("client_secret_file"), "the file is empty", from_file)
            return secret
        if inline is None:
            self.note(
                m.child("client_secret"), "required key is missing (or client_secret_file)", m.node
            )
            return ""
        return self.optional(m, "client_secret", self.text, "")

    def scopes(self, node: Node, path: str) -> tuple[str, ...]:
        scopes = self.texts(node, path)
        for scope in scopes:
            if not _TOKEN.fullmatch(scope):
                self.note(path, f"invalid scope {scope!r}: one scope per list item", node)
        if scopes and "openid" not in scopes:
            raise self.fail(path, "must include 'openid' (OIDC Core 3.1.2.1)", node)
        return tuple(dict.fromkeys(scopes))

    def clock_skew(self, node: Node, path: str) -> int:
        seconds = self.duration_s(node, path)
        if seconds > MAX_CLOCK_SKEW_S:
            raise self.fail(
                path,
                f"{seconds}s is too long: expired id tokens would stay valid that much longer "
                f"(at most {MAX_CLOCK_SKEW_S}s)",
                node,
            )
        return seconds

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

    def session(self, node: Node, path: str) -> model.SessionConfig:
        m = self.mapping(
            node,
            path,
            (
                "secret",
                "secret_file",
                "store",
                "redis_url",
                "redis_prefix",
                "cookie_secure",
                "cookie_name",
                "idle_timeout",
                "lifetime",
                "transaction_ttl",
                "redis_pool_size",
                "redis_pool_timeout",
            ),
        )
        store = self.optional(m, "store", lambda n, p: self.choice(n, p, STORES), DEFAULT_STORE)
        redis_url = self.optional(m, "redis_url", self.redis_url, None)
        if store == "redis" and redis_url is None and m.get("redis_url") is None:
            self.note(m.child("redis_url"), "required with store: redis", m.get("store"))
        return model.SessionConfig(
            secrets=self.session_secrets(m),
            store=store,
            redis_url=redis_url,
            redis_prefix=self.optional(m, "redis_prefix", self.redis_prefix, DEFAULT_REDIS_PREFIX),
            cookie_secure=self.optional(m, "cookie_secure", self.boolean, DEFAULT_COOKIE_SECURE),
            cookie_name=self.optional(m, "cookie_name", self.cookie_name, DEFAULT_COOKIE_NAME),
            idle_timeout_s=self.optional(
                m, "idle_timeout", self.positive_duration_s, DEFAULT_IDLE_TIMEOUT_S
            ),
            lifetime_s=self.optional(m, "lifetime", self.positive_duration_s, DEFAULT_LIFETIME_S),
            transaction_ttl_s=self.optional(
                m, "transaction_ttl", self.positive_duration_s, DEFAULT_TRANSACTION_TTL_S
            ),
            # 0: not given; sized from server.max_connections once both are read.
            redis_pool_size=self.optional(
                m,
                "redis_pool_size",
                lambda n, p: self.bounded_integer(n, p, 1, MAX_REDIS_POOL_SIZE),
                0,
            ),
            redis_pool_timeout_s=self.optional(
                m, "redis_pool_timeout", self.timeout_s, DEFAULT_REDIS_POOL_TIMEOUT_S
            ),
        )

    def session_secrets(self, m: _Map) -> tuple[bytes, ...]:
        """``secret: S``, ``secret: [NEW, OLD]`` or ``secret_file: PATH`` (one per line).

        The first secret seals new cookies; all of them open old ones (rotation).
        """
        inline, from_file = m.get("secret"), m.get("secret_file")
        if inline is not None and from_file is not None:
            self.note(m.child("secret_file"), "give secret or secret_file, not both", from_file)
            return ()
        if from_file is not None:
            path = m.child("secret_file")
            try:
                lines = self.file_text(from_file, path).splitlines()
            except _Invalid:
                return ()
            secrets = [line.strip() for line in lines if line.strip()]
            if not secrets:
                self.note(path, "the file holds no secret", from_file)
            for i, secret in enumerate(secrets):
                self.check_secret(secret, path, from_file, f"line {i + 1} of the file")
            return tuple(s.encode() for s in secrets)
        if inline is None:
            self.note(m.child("secret"), "required key is missing (or secret_file)", m.node)
            return ()
        path = m.child("secret")
        entries: list[tuple[str, Node]]
        if isinstance(inline, SequenceNode):
            try:
                entries = self.items(inline, path)
            except _Invalid:
                return ()
        else:
            entries = [(path, inline)]
        result: list[bytes] = []
        for item_path, item in entries:
            try:
                secret = self.scalar(item, item_path, "a string").text
            except _Invalid:
                continue
            self.check_secret(secret, item_path, item, "the secret")
            result.append(secret.encode())
        return tuple(result)

    def check_secret(self, secret: str, path: str, node: Node, what: str) -> None:
        size = len(secret.encode())
        if size < MIN_SECRET_BYTES:
            self.note(
                path,
                f"{what} is {size} bytes; at least {MIN_SECRET_BYTES} are needed "
                "(e.g. the output of: openssl rand -base64 32)",
                node,
            )

    def redis_url(self, node: Node, path: str) -> str:
        text = self.text(node, path).strip()  # may hold a password: never quoted
        if scheme_of(text) not in REDIS_SCHEMES:
            raise self.fail(
                path,
                "must start with redis://, rediss://, unix:// or redis+sentinel:// "
                "(Redis Cluster is not supported)",
                node,
            )
        if is_sentinel_url(text):
            try:
                parse_sentinel_url(text)
            except ValueError as exc:
                raise self.fail(path, str(exc), node) from None
        return text

    def redis_prefix(self, node: Node, path: str) -> str:
        text = self.scalar(node, path, "a string").text
        if len(text) > MAX_REDIS_PREFIX_CHARS or not text.isprintable() or " " in text:
            raise self.fail(
                path, f"use up to {MAX_REDIS_PREFIX_CHARS} printable characters, no spaces", node
            )
        return text

    def cookie_name(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if not _TOKEN.fullmatch(text):
            raise self.fail(path, f"invalid cookie name {text!r} (RFC 6265 token)", node)
        if text.lower().startswith(("__host-", "__secure-")):
            raise self.fail(path, "leave out the __Host- prefix: the gateway adds it", node)
        return text

    @staticmethod
    def node_at(top: _Map, section: str, key: str) -> Node | None:
        """The YAML node of ``section.key``, for a line number (None when absent)."""
        node: Node | None = top.get(section)
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == key:
                    found: Node = value_node
                    return found
        return node

    def check_cookie_secure(
        self, server: model.ServerConfig, session: model.SessionConfig, top: _Map
    ) -> None:
        """Secure cookies with a plain-http public_url: nobody could ever sign in.

        Loopback is the exception: browsers treat http://localhost and 127.0.0.0/8 as
        potentially trustworthy origins (W3C Secure Contexts 3.2) and do send Secure
        cookies there, which is what local plain-http use looks like.
        """
        parts = urlsplit(server.public_url)
        if not session.cookie_secure or parts.scheme.lower() != "http":
            return
        if _is_loopback(parts.hostname or ""):
            return
        node: Node | None = top.get("session")
        default = " (the default)"
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == "cookie_secure":
                    node, default = value_node, ""
        self.note(
            "session.cookie_secure",
            f"is true{default} but server.public_url is plain http: browsers never send "
            "Secure cookies over http, so nobody could sign in. Use an https public_url, "
            "or set cookie_secure: false for local plain-http use only",
            node,
        )

    def assurance(self, node: Node, path: str) -> model.AssuranceConfig:
        m = self.mapping(node, path, ("levels",))
        levels_node = m.get("levels")
        if levels_node is None:
            raise self.fail(m.child("levels"), "required key is missing", node)
        before = len(self.problems)
        levels: list[model.Level] = []
        seen: dict[str, int] = {}
        for item_path, item in self.items(levels_node, m.child("levels")):
            try:
                level = self.level(item, item_path, rank=len(levels))
            except _Invalid:
                continue
            if level.name in seen:
                self.note(
                    f"{item_path}.name",
                    f"duplicate level name {level.name!r} (also levels[{seen[level.name]}])",
                    item,
                )
                continue
            seen[level.name] = len(levels)
            levels.append(level)
        if len(self.problems) > before:
            raise _Invalid  # rules are then not checked against a partial list of levels
        return model.AssuranceConfig(levels=tuple(levels))

    def level(self, node: Node, path: str, rank: int) -> model.Level:
        m = self.mapping(node, path, ("name", "acr", "amr_any"))
        # acr values are taken as written: Keycloak's are numbers ("1", "2").
        level = model.Level(
            name=self.required(m, "name", self.name, ""),
            rank=rank,
            acr=self.optional(m, "acr", self.texts, ()),
            amr_any=self.optional(m, "amr_any", self.texts, ()),
        )
        if m.get("acr") is None and m.get("amr_any") is None:
            raise self.fail(path, "a level needs acr or amr_any (or both)", node)
        return level

    def rules(
        self,
        node: Node,
        path: str,
        assurance: model.AssuranceConfig | None,
        upstreams: dict[str, model.UpstreamConfig] | None,
    ) -> tuple[model.Rule, ...]:
        rules: list[model.Rule] = []
        first_index: dict[str, int] = {}
        # The earlier rules by (canonical path, host): check_reachable looks up only
        # the few patterns that could cover a rule, so 10,000 rules load in seconds.
        earlier: dict[tuple[str, str | None], list[model.Rule]] = {}
        entries = self.items(node, path)
        if not entries:
            return ()
        for index, (item_path, item) in enumerate(entries):
            try:
                rule = self.rule(item, item_path, index, assurance, upstreams)
            except _Invalid:
                continue
            if rule.name in first_index:
                self.note(
                    f"{item_path}.name",
                    f"duplicate rule name {rule.name!r} (also rules[{first_index[rule.name]}])",
                    item,
                )
                continue
            first_index[rule.name] = index
            canonical = compile_glob(rule.match.path).canonical
            self.check_reachable(rule, canonical, earlier, item_path, item)
            if rule.when is None:  # a rule with when leaves the requests it skips to later ones
                earlier.setdefault((canonical, rule.match.host), []).append(rule)
            rules.append(rule)
        return tuple(rules)

    def rule(
        self,
        node: Node,
        path: str,
        index: int,
        assurance: model.AssuranceConfig | None,
        upstreams: dict[str, model.UpstreamConfig] | None,
    ) -> model.Rule:
        m = self.mapping(
            node,
            path,
            (
                "name",
                "match",
                "when",
                "require",
                "risk",
                "upstream",
                "allow_method_override",
                "upstream_challenge",
                "credentials",
            ),
        )
        before = len(self.problems)
        credentials_node = m.get("credentials")
        if credentials_node is not None:
            self.credential_nodes.append((m.child("credentials"), credentials_node))
        rule = model.Rule(
            name=self.required(m, "name", self.name, ""),
            index=index,
            match=self.required(m, "match", self.match, model.Match(path="/**")),
            require=self.required(
                m,
                "require",
                lambda n, p: self.requirement(n, p, assurance),
                model.Requirement(level=None),
            ),
            upstream=self.rule_upstream(m, upstreams),
            allow_method_override=self.optional(m, "allow_method_override", self.boolean, False),
            upstream_challenge=self.optional(m, "upstream_challenge", self.boolean, False),
            when=self.optional(m, "when", self.when, None),
            risk=self.optional(m, "risk", self.risk, None),
            credentials=self.optional(
                m, "credentials", lambda n, p: self.choice(n, p, CREDENTIALS), "any"
            ),
        )
        if rule.when is not None and rule.require.level is None:
            self.note(
                m.child("when"),
                "a rule with when must require a level: a condition that cannot be evaluated "
                "counts as true (fail closed), so when is for the stricter rule placed before "
                "an ordinary one, never for one that needs no sign-in",
                m.get("when"),
            )
        if len(self.problems) > before:
            raise _Invalid
        return rule

    def match(self, node: Node, path: str) -> model.Match:
        m = self.mapping(node, path, ("path", "methods", "host"))
        return model.Match(
            path=self.required(m, "path", self.glob, "/**"),
            methods=self.optional(m, "methods", self.methods, None),
            host=self.optional(m, "host", self.rule_host, None),
        )

    def glob(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        try:
            compile_glob(text)
        except ValueError as exc:
            raise self.fail(path, str(exc), node) from None
        return text

    def methods(self, node: Node, path: str) -> frozenset[str]:
        methods: list[str] = []
        for item_path, item in self.items(node, path):
            try:
                method = self.text(item, item_path)
            except _Invalid:
                continue
            if not _TOKEN.fullmatch(method):
                self.note(item_path, f"invalid method {method!r} (RFC 7230 token)", item)
                continue
            # Methods are case-sensitive (RFC 9110 9.1): a rule naming "post" would never
            # match a POST, so the typo would silently leave POSTs to a weaker rule.
            if method != method.upper():
                self.note(
                    item_path,
                    f"{method!r} must be upper case (did you mean {method.upper()!r}?)",
                    item,
                )
                continue
            if method not in REGISTERED_METHODS:
                close = difflib.get_close_matches(method, sorted(REGISTERED_METHODS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.note(
                    item_path,
                    f"unknown method {method!r}{hint}: a rule may name the methods of the "
                    "IANA HTTP Method Registry",
                    item,
                )
                continue
            methods.append(method)
        return frozenset(methods)

    def rule_host(self, node: Node, path: str) -> str:
        text = self.text(node, path).strip()
        if "/" in text or "@" in text or "?" in text or "#" in text:
            # "https://bank.example.com" or "bank.example.com/api" would never equal a
            # Host header, so the rule would silently never apply.
            bare = urlsplit(text if "//" in text else "//" + text).netloc.rpartition("@")[2]
            hint = f" (did you mean {bare!r}?)" if bare else ""
            raise self.fail(path, f"must be a host name, not a URL or a path: {text!r}{hint}", node)
        try:
            return canonical_rule_host(text, self.public_scheme)
        except ValueError as exc:
            hint = ""
            if not text.isascii():
                # Hosts arrive in their IDNA A-label form; one spelling is compared.
                with contextlib.suppress(UnicodeError):
                    hint = f" (did you mean {text.encode('idna').decode('ascii')!r}?)"
            raise self.fail(path, f"invalid host {text!r}: {exc}{hint}", node) from None

    def requirement(
        self, node: Node, path: str, assurance: model.AssuranceConfig | None
    ) -> model.Requirement:
        if isinstance(node, ScalarNode):
            text = self.scalar(node, path, "'none' or {level: NAME}").text
            if text == "none":
                return model.Requirement(level=None)
            raise self.fail(
                path,
                f"expected 'none' or a mapping like {{level: NAME, max_age: 5m}} (got {text!r})",
                node,
            )
        m = self.mapping(node, path, ("level", "max_age", "once", "bind"))
        level_node = m.get("level")
        if level_node is None:
            if m.get("max_age") is not None:
                message = "max_age needs a level: the level that must have been proven recently"
            else:
                message = "required key is missing (use require: none for no sign-in)"
            raise self.fail(m.child("level"), message, node)
        level = self.required(m, "level", lambda n, p: self.level_name(n, p, assurance), "")
        once = self.optional(m, "once", self.boolean, False)
        once_node = m.get("once")
        max_age_s = self.optional(m, "max_age", self.duration_s, None)
        if max_age_s == 0:
            # max_age is measured without leeway and a proof is always a round trip old
            # when the browser is back, so "proven 0 s ago" means what README promised:
            # a new sign-in for every request, which is exactly a one-time rule.
            once, max_age_s, once_node = True, None, m.get("max_age")
            once_path = m.child("max_age")
        else:
            once_path = m.child("once")
        if once and once_node is not None:
            self.once_nodes.append((once_path, once_node))
        return model.Requirement(
            level=level,
            max_age_s=max_age_s,
            once=once,
            bind=self.optional(m, "bind", self.field_names, ()),
        )

    def field_names(self, node: Node, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for item_path, item in self.items(node, path):
            try:
                name = self.text(item, item_path)
            except _Invalid:
                continue
            if not is_field_name(name):
                self.note(
                    item_path,
                    f"invalid field name {name!r}: use [A-Za-z_][A-Za-z0-9_.-]* "
                    "(a dot reaches into a JSON object: beneficiary.iban)",
                    item,
                )
            elif name in names:
                self.note(item_path, f"{name!r} is listed twice", item)
            else:
                names.append(name)
        return tuple(names)

    def check_once(self, server: model.ServerConfig, session: model.SessionConfig) -> None:
        """require.once is only as good as the one place that records consumed proofs."""
        if server.workers == 1 or session.store == "redis" or session.redis_url is not None:
            return
        for path, node in self.once_nodes:
            self.note(path, ONCE_NEEDS_ONE_CONSUMER, node)

    def when(self, node: Node, path: str) -> Any:
        """A ``when`` value: CEL, or the old syntax (:func:`gateway.cel.parse_when`)."""
        value = self.plain(node, path, 0)
        try:
            return parse_when(value)
        except ConditionError as exc:
            where_path, where_node = self.locate(node, path, exc.where)
            raise self.fail(where_path, exc.message, where_node) from None

    def plain(self, node: Node, path: str, depth: int) -> object:
        """YAML to plain lists, dicts and scalars (interpolated), for the condition parser."""
        if depth > MAX_CONDITION_DEPTH:
            raise self.fail(path, "nested too deeply", node)
        if isinstance(node, SequenceNode):
            return [
                self.plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value)
            ]
        if isinstance(node, MappingNode):
            m = self.mapping(node, path, None)
            return {
                key: self.plain(value, m.child(key), depth + 1)
                for key, (_key_node, value) in m.entries.items()
            }
        scalar = self.scalar(node, path, "a condition")
        return scalar.text if isinstance(scalar.value, str) else scalar.value

    @staticmethod
    def locate(node: Node, path: str, where: Sequence[str | int]) -> tuple[str, Node]:
        """The key path and node of a part of a ``when`` (for the line number)."""
        for step in where:
            if isinstance(step, int) and isinstance(node, SequenceNode):
                if not 0 <= step < len(node.value):
                    break
                node, path = node.value[step], f"{path}[{step}]"
            elif isinstance(step, str) and isinstance(node, MappingNode):
                found = [v for k, v in node.value if isinstance(k, ScalarNode) and k.value == step]
                if not found:
                    break
                node, path = found[0], f"{path}.{step}"
            else:
                break
        return path, node

    def risk(self, node: Node, path: str) -> model.RiskConfig:
        m = self.mapping(node, path, ("url", "timeout", "on_error", "cache"))
        return model.RiskConfig(
            url=self.required(m, "url", self.risk_url, ""),
            timeout_s=self.optional(m, "timeout", self.risk_timeout, DEFAULT_RISK_TIMEOUT_S),
            on_error=self.optional(
                m, "on_error", lambda n, p: self.choice(n, p, RISK_ON_ERROR), DEFAULT_RISK_ON_ERROR
            ),
            cache_s=self.optional(m, "cache", self.duration_s, DEFAULT_RISK_CACHE_S),
        )

    def risk_url(self, node: Node, path: str) -> str:
        text, _parts = self.http_url(node, path, what="risk URL")
        return text

    def risk_timeout(self, node: Node, path: str) -> float:
        seconds = self.timeout_s(node, path)
        if seconds > MAX_RISK_TIMEOUT_S:
            raise self.fail(
                path,
                f"at most {MAX_RISK_TIMEOUT_S:g}s (got {seconds:g}s): every request of the "
                "rule waits for the risk engine",
                node,
            )
        return seconds

    def api(self, node: Node, path: str) -> model.ApiConfig:
        m = self.mapping(
            node,
            path,
            (
                "audience",
                "tokens",
                "dpop",
                "algorithms",
                "dpop_algorithms",
                "dpop_nonce",
                "dpop_max_age",
                "introspection_cache",
                "cache_entries",
            ),
        )
        before = len(self.problems)
        config = model.ApiConfig(
            audience=self.required(m, "audience", self.text, ""),
            tokens=self.optional(m, "tokens", self.token_kinds, ("jwt",)),
            dpop=self.optional(m, "dpop", lambda n, p: self.choice(n, p, DPOP_MODES), "allowed"),
            algorithms=self.optional(m, "algorithms", self.algorithms, DEFAULT_ALGORITHMS),
            dpop_algorithms=self.optional(
                m, "dpop_algorithms", self.algorithms, DEFAULT_DPOP_ALGORITHMS
            ),
            dpop_nonce=self.optional(m, "dpop_nonce", self.boolean, False),
            dpop_max_age_s=self.optional(
                m,
                "dpop_max_age",
                lambda n, p: self.bounded_duration(n, p, 1, MAX_DPOP_MAX_AGE_S),
                DEFAULT_DPOP_MAX_AGE_S,
            ),
            introspection_cache_s=self.optional(
                m,
                "introspection_cache",
                lambda n, p: self.bounded_duration(n, p, 0, MAX_INTROSPECTION_CACHE_S),
                DEFAULT_INTROSPECTION_CACHE_S,
            ),
            cache_entries=self.optional(
                m,
                "cache_entries",
                lambda n, p: self.bounded_integer(n, p, 0, MAX_TOKEN_CACHE_ENTRIES),
                DEFAULT_TOKEN_CACHE_ENTRIES,
            ),
        )
        if m.get("audience") is not None and not config.audience.strip():
            self.note(m.child("audience"), "must not be empty", m.get("audience"))
        if config.dpop_nonce and config.dpop == "off":
            self.note(m.child("dpop_nonce"), "needs dpop: allowed or required", m.get("dpop_nonce"))
        if len(self.problems) > before:
            raise _Invalid
        return config

    def token_kinds(self, node: Node, path: str) -> tuple[str, ...]:
        kinds: list[str] = []
        for item_path, item in self.items(node, path):
            with contextlib.suppress(_Invalid):
                kinds.append(self.choice(item, item_path, TOKEN_KINDS))
        return tuple(dict.fromkeys(kinds))

    def bounded_duration(self, node: Node, path: str, low: int, high: int) -> int:
        seconds = self.duration_s(node, path)
        if not low <= seconds <= high:
            raise self.fail(path, f"must be between {low}s and {high}s", node)
        return seconds

    def step_up(self, node: Node, path: str) -> model.StepUpConfig:
        m = self.mapping(
            node,
            path,
            ("max_body", "authorization_details_type", "keep_budget", "keep_per_client"),
        )
        max_body = self.optional(m, "max_body", self.size_bytes, DEFAULT_MAX_BODY_BYTES)
        budget = self.optional(m, "keep_budget", self.keep_budget, DEFAULT_KEEP_BUDGET_BYTES)
        if budget < max_body:
            self.note(
                m.child("keep_budget"),
                f"is smaller than step_up.max_body ({max_body} bytes): a form at the body "
                "limit could never be kept",
                m.get("keep_budget"),
            )
        return model.StepUpConfig(
            max_body_bytes=max_body,
            authorization_details_type=self.optional(
                m,
                "authorization_details_type",
                self.details_type,
                DEFAULT_AUTHORIZATION_DETAILS_TYPE,
            ),
            keep_budget_bytes=budget,
            keep_per_client=self.optional(
                m, "keep_per_client", self.keep_per_client, DEFAULT_KEEP_PER_CLIENT
            ),
        )

    def keep_budget(self, node: Node, path: str) -> int:
        scalar = self.scalar(node, path, "a size")
        value = scalar.value
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match is not None:
                size = int(match.group(1)) * _SIZE_UNIT[match.group(2)]
        if size is None or not 1 <= size <= MAX_KEEP_BUDGET_BYTES:
            raise self.fail(
                path,
                f"use a size between 1 byte and 4GiB, in bytes (67108864) or with a unit "
                f"(64MiB) (got {scalar.text!r})",
                node,
            )
        return size

    def keep_per_client(self, node: Node, path: str) -> int:
        scalar = self.scalar(node, path, "a number")
        value = scalar.value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 1 <= value <= MAX_KEEP_PER_CLIENT
        ):
            raise self.fail(
                path,
                f"use a whole number from 1 to {MAX_KEEP_PER_CLIENT} (got {scalar.text!r})",
                node,
            )
        return value

    def size_bytes(self, node: Node, path: str) -> int:
        """Bytes as an integer, or a number with a unit: 512KiB, 1MiB, 2MB."""
        scalar = self.scalar(node, path, "a size")
        value = scalar.value
        size: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match is not None:
                size = int(match.group(1)) * _SIZE_UNIT[match.group(2)]
        if size is None:
            raise self.fail(
                path,
                f"invalid size {scalar.text!r}: use bytes (65536) or a number with a unit "
                "KiB, MiB, GiB, kB, MB or GB (512KiB, 1MiB)",
                node,
            )
        if not 1 <= size <= MAX_BODY_LIMIT_BYTES:
            raise self.fail(
                path, f"must be between 1 byte and {MAX_BODY_LIMIT_BYTES} bytes (64MiB)", node
            )
        return size

    def details_type(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if (
            len(text) > MAX_DETAILS_TYPE_CHARS
            or not text.isprintable()
            or any(char.isspace() for char in text)
        ):
            raise self.fail(
                path,
                f"use up to {MAX_DETAILS_TYPE_CHARS} printable characters, no spaces "
                "(RFC 9396 type, e.g. payment_initiation)",
                node,
            )
        return text

    def level_name(self, node: Node, path: str, assurance: model.AssuranceConfig | None) -> str:
        text = self.text(node, path)
        if assurance is not None and assurance.level(text) is None:
            known = ", ".join(level.name for level in assurance.levels)
            raise self.fail(path, f"unknown level {text!r} (known: {known})", node)
        return text

    def rule_upstream(self, m: _Map, upstreams: dict[str, model.UpstreamConfig] | None) -> str:
        node = m.get("upstream")
        if node is None:
            if upstreams is None:
                return ""
            if len(upstreams) == 1:
                return next(iter(upstreams))
            names = ", ".join(upstreams)
            self.note(
                m.child("upstream"),
                f"required when there are several upstreams (one of: {names})",
                m.node,
            )
            return ""
        path = m.child("upstream")
        try:
            name = self.text(node, path)
        except _Invalid:
            return ""
        if upstreams is not None and name not in upstreams:
            self.note(path, f"unknown upstream {name!r}" + _suggest(name, list(upstreams)), node)
        return name

    def check_reachable(
        self,
        rule: model.Rule,
        path_pattern: str,
        earlier: Mapping[tuple[str, str | None], Sequence[model.Rule]],
        path: str,
        node: Node,
    ) -> None:
        """Refuse a rule that an earlier one always matches first: it could never apply.

        Only the certain cases: same or broader ``/prefix/**`` path, any host or the same
        host, any method or a superset. ``path_pattern`` is the rule's canonical path,
        ``earlier`` the rules before it keyed by (canonical path, host).
        """
        # The patterns that cover path_pattern: itself, and "X/**" for every "X/" it
        # starts with or equals ("/api/**" covers "/api" itself and all below "/api/").
        covering = {path_pattern, path_pattern + "/**"}
        for position, char in enumerate(path_pattern):
            if char == "/":
                covering.add(path_pattern[: position + 1] + "**")
        hosts = {None, rule.match.host}
        first: model.Rule | None = None
        for pattern in covering:
            for host in hosts:
                for before in earlier.get((pattern, host), ()):
                    if first is not None and before.index >= first.index:
                        break  # each list is in rule order
                    if before.match.methods is not None and (
                        rule.match.methods is None or not rule.match.methods <= before.match.methods
                    ):
                        continue
                    first = before
                    break
        if first is not None:
            self.note(
                path,
                f"rule {rule.name!r} can never match: rules[{first.index}] "
                f"{first.name!r} (path {first.match.path!r}) matches all its requests first; "
                "put the more specific rule earlier",
                node,
            )

    def assertion(self, node: Node, path: str) -> model.AssertionConfig:
        m = self.mapping(node, path, ("key_file", "ttl", "header_prefix"))
        return model.AssertionConfig(
            key_file=self.optional(m, "key_file", self.key_file, None),
            ttl_s=self.optional(m, "ttl", self.assertion_ttl, DEFAULT_ASSERTION_TTL_S),
            header_prefix=self.optional(
                m, "header_prefix", self.header_prefix, DEFAULT_HEADER_PREFIX
            ),
        )

    def key_file(self, node: Node, path: str) -> str:
        # Only resolved here; gateway.assertion reads and checks the key at start-up.
        return self.resolve_path(self.text(node, path))

    def assertion_ttl(self, node: Node, path: str) -> int:
        seconds = self.positive_duration_s(node, path)
        if seconds > MAX_ASSERTION_TTL_S:
            raise self.fail(path, f"at most {MAX_ASSERTION_TTL_S}s (got {seconds}s)", node)
        return seconds

    def header_prefix(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if not _TOKEN.fullmatch(text):
            raise self.fail(path, f"invalid header name prefix {text!r} (RFC 7230 token)", node)
        return text
