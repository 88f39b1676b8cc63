"""The configuration's defaults, limits and choices, and why each is what it is.

The default values themselves live in gateway/config.schema.json (each key's
``default``, also the README's "default" column); they are read from it here, once, at
import, so a default is written in one place.
"""

from __future__ import annotations

import ipaddress
import re

from gateway import model
from gateway.conditions import (
    parse_duration_s,
)
from gateway.config.schema import default


def _default_s(key: str) -> int:
    """A duration default from the schema, in seconds."""
    seconds = parse_duration_s(str(default(key)))
    if seconds is None:  # pragma: no cover - tests/test_config_schema.py reads them all
        raise ValueError(f"config.schema.json: default of {key} is not a duration")
    return seconds


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


def _parse_size(text: str) -> int | None:
    """``"65536"``, ``"512KiB"``, ``"1MiB"``, ``"2 MB"`` -> bytes; else None."""
    match = _SIZE.fullmatch(text.strip())
    return None if match is None else int(match.group(1)) * _SIZE_UNIT[match.group(2)]


def _default_bytes(key: str) -> int:
    """A size default from the schema, in bytes."""
    size = _parse_size(str(default(key)))
    if size is None:  # pragma: no cover
        raise ValueError(f"config.schema.json: default of {key} is not a size")
    return size


# --- Defaults, and why -------------------------------------------------------------
# The values live in gateway/config.schema.json (its "default"s), the reasons here.
# (tests/test_config.py checks that these agree with the defaults in gateway/model.py)

# Under a leading underscore so it is unlikely to collide with an application's paths.
DEFAULT_INTERNAL_PREFIX: str = default("server.internal_prefix")
# Kubernetes' default terminationGracePeriodSeconds is 30 s; draining must finish first.
DEFAULT_SHUTDOWN_TIMEOUT_S = float(_default_s("server.shutdown_timeout"))
# Trust no proxy: X-Forwarded-For from an untrusted peer is whatever the client wrote.
DEFAULT_TRUSTED_PROXIES: tuple[model.IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr) for cidr in default("server.trusted_proxies")
)
# Owner and group (php-fpm's listen.mode): put the front proxy's user in the group.
DEFAULT_UNIX_SOCKET_MODE: int = int(default("server.unix_socket_mode"), 8)
# sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_UNIX_SOCKET_PATH_BYTES = 107
# One event loop per process; scale out with replicas, or raise this on big hosts.
DEFAULT_WORKERS: int = default("server.workers")
# A healthy upstream on the same network accepts a connection in milliseconds.
DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S = float(_default_s("server.upstream_connect_timeout"))
# nginx's proxy_read_timeout default is 60 s; apps behind proxies are tuned for it.
DEFAULT_UPSTREAM_TIMEOUT_S = float(_default_s("server.upstream_timeout"))
DEFAULT_ACCESS_LOG: bool = default("server.access_log")
# Client connections one process holds before it stops accepting (new ones then wait
# in the kernel's listen backlog): nginx's worker_connections in its shipped config.
# Each may also hold an upstream and a Redis connection: the process raises its open
# file limit to the hard limit at start and warns when this does not fit.
DEFAULT_MAX_CONNECTIONS: int = default("server.max_connections")
# Apache mod_reqtimeout's header=20 (nginx's client_header_timeout is 60 s): a
# browser sends its request head in one packet; 20 s is 8 KiB at 500 bytes/s.
DEFAULT_HEADER_TIMEOUT_S = float(_default_s("server.header_timeout"))
# Apache mod_reqtimeout's body=20,MinRate=500 (see gateway.connections).
DEFAULT_BODY_TIMEOUT_S = float(_default_s("server.body_timeout"))
# nginx's keepalive_timeout default: longer than the 60 s idle timeout of common load
# balancers, so the balancer closes an idle connection first (a backend closing first
# races the balancer's next request on it, which then fails).
DEFAULT_KEEPALIVE_TIMEOUT_S = float(_default_s("server.keepalive_timeout"))
# nginx's keepalive_requests default (since 1.19.10).
DEFAULT_KEEPALIVE_REQUESTS: int = default("server.keepalive_requests")
# After a worker restarts or a replica is added, keep-alive clients stay where they
# are until their connection ends: at 10 s, load is spread again within seconds,
# for one TCP handshake (well under a millisecond on a LAN) per connection per 10 s.
# nginx's keepalive_time (1 h) bounds memory, not balance.
DEFAULT_KEEPALIVE_MAX_AGE_S = float(_default_s("server.keepalive_max_age"))
# An Allow remembered for a second: a sign-out elsewhere (another worker, a replica)
# is seen within that, while the requests of a page load or an API burst are answered
# from memory; enough entries for every session active within that second.
DEFAULT_DECISION_MEMO_S: int = _default_s("server.decision_memo")
DEFAULT_DECISION_MEMO_ENTRIES: int = default("server.decision_memo_entries")
MAX_DECISION_MEMO_ENTRIES = 1_000_000
MAX_CONNECTIONS_LIMIT = 100_000
# Each Redis command holds one pooled connection for well under a millisecond, so a
# quarter of the client connections in Redis at once is already a burst; six
# processes of 256 stay far below Redis's maxclients (10,000).
REDIS_POOL_SHARE = 4
# A Redis that answers but whose pool is busy: wait this long, then answer 503 with
# Retry-After (back-pressure). A Redis that does not answer fails faster (0.5 s).
DEFAULT_REDIS_POOL_TIMEOUT_S = float(_default_s("session.redis_pool_timeout"))
MAX_REDIS_POOL_SIZE = 10_000
DEFAULT_LOG_LEVEL: str = default("server.log_level")
# OIDC Core 5.4: profile and email fill X-Auth-Email and the name shown on pages.
DEFAULT_SCOPES: tuple[str, ...] = tuple(default("oidc.scopes"))
# OIDC Core 9 / RFC 7591 2: client_secret_basic is the default token_endpoint_auth_method.
DEFAULT_CLIENT_AUTH: str = default("oidc.client_auth")
# OIDC Core 5.5.1.1: an essential acr makes some providers fail the login outright instead
# of doing their best; the gateway checks the acr it gets back either way.
DEFAULT_ESSENTIAL_ACR: bool = default("oidc.essential_acr")
# gateway.oidc.profiles: plain OpenID Connect acr_values / acr / amr.
DEFAULT_PROFILE: str = default("oidc.profile")
# An email the provider has not verified is whatever the user typed; forwarding it as
# X-Auth-Email lets anyone claim anyone's address (the "nOAuth" takeovers of 2023).
DEFAULT_ASSUME_EMAIL_VERIFIED: bool = default("oidc.assume_email_verified")
# OIDC Core 3.1.3.7 asks for "a small leeway" on iat/exp for clock skew.
DEFAULT_CLOCK_SKEW_S = _default_s("oidc.clock_skew")
# RFC 7518 3.1 asymmetric algorithms (RS256 is mandatory, OIDC Core 15.1). Never "none",
# never HS*: an HMAC id token is keyed with the client secret, which the gateway shares.
DEFAULT_ALGORITHMS: tuple[str, ...] = tuple(default("oidc.algorithms"))
# Discovery, JWKS and token requests; a provider slower than this is effectively down.
DEFAULT_HTTP_TIMEOUT_S = float(_default_s("oidc.http_timeout"))
# Stateless: the session lives in the sealed cookie, no extra service to run.
DEFAULT_STORE: str = default("session.store")
# Lets the gateway share a Redis database with others.
DEFAULT_REDIS_PREFIX: str = default("session.redis_prefix")
MAX_REDIS_PREFIX_CHARS = 64  # part of every key; a long prefix only costs memory
# Cookies without Secure leak over plain http; turn off only for local plain-http use.
DEFAULT_COOKIE_SECURE: bool = default("session.cookie_secure")
# "__Host-" is prepended when cookie_secure (RFC 6265bis 4.1.3.2).
DEFAULT_COOKIE_NAME: str = default("session.cookie_name")
# NIST SP 800-63B 4.2.3 (AAL2): re-authenticate after 30 minutes of inactivity ...
DEFAULT_IDLE_TIMEOUT_S = _default_s("session.idle_timeout")
# ... and at least once every 12 hours.
DEFAULT_LIFETIME_S = _default_s("session.lifetime")
# Time to finish a sign-in at the provider before its state cookie expires.
DEFAULT_TRANSACTION_TTL_S = _default_s("session.transaction_ttl")
# Contract: X-Auth-Assertion expires within 60 s.
DEFAULT_ASSERTION_TTL_S = _default_s("assertion.ttl")
DEFAULT_HEADER_PREFIX: str = default("assertion.header_prefix")
# A risk engine sits in the request path: a second of latency is already a lot.
DEFAULT_RISK_TIMEOUT_S = float(_default_s("rules[].risk.timeout"))
# Unknown risk is high risk: ask for the strongest level rather than refuse outright.
DEFAULT_RISK_ON_ERROR: str = default("rules[].risk.on_error")
# Ask the engine for every request unless the operator accepts stale answers.
DEFAULT_RISK_CACHE_S = _default_s("rules[].risk.cache")
# Payment and form posts are kilobytes; 1 MiB is nginx's client_max_body_size default.
DEFAULT_MAX_BODY_BYTES = _default_bytes("step_up.max_body")
# RFC 9396 authorization_details "type" for rules that bind fields (PSD2 payments).
DEFAULT_AUTHORIZATION_DETAILS_TYPE: str = default("step_up.authorization_details_type")
# Requests kept across a step-up, all together, per process: 64 forms at the 1 MiB
# body limit, thousands of ordinary ones. Past it new ones get 503 + Retry-After.
DEFAULT_KEEP_BUDGET_BYTES = _default_bytes("step_up.keep_budget")
MAX_KEEP_BUDGET_BYTES = 4 * 1024 * 1024 * 1024
# A user rarely has more than a few step-ups in flight (five transaction cookies at
# most); eight per session, or per client address without one, leaves room.
DEFAULT_KEEP_PER_CLIENT: int = default("step_up.keep_per_client")
MAX_KEEP_PER_CLIENT = 1000
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
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")
LOG_LEVELS = ("debug", "info", "warning", "error")
# proxy: the gateway forwards; forward_auth: a front proxy asks {internal_prefix}/auth
# (rules that read the body are refused); both: either, per route.
SERVER_MODES = ("proxy", "forward_auth", "both")
DEFAULT_SERVER_MODE = "proxy"
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
