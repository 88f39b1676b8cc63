"""Validated configuration values.

Everything here is frozen and built once, at start-up, by :mod:`gateway.config`.
The rest of the gateway never sees raw YAML.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

MAX_ASSERTION_TTL_S = 60  # contract: an X-Auth-Assertion expires within 60 s
DEFAULT_PROVIDER = "default"  # the provider the top-level oidc block configures

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen_host: str
    listen_port: int
    public_url: str  # no trailing slash, e.g. "https://bank.example.com"
    internal_prefix: str = "/_gateway"  # starts with "/", no trailing slash
    metrics_listen: tuple[str, int] | None = None
    shutdown_timeout_s: float = 30.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    workers: int = 1
    upstream_connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 60.0
    access_log: bool = True
    log_level: str = "info"  # debug | info | warning | error
    # Canonical hosts (gateway.paths.canonical_rule_host) the gateway answers for, besides
    # public_url's and the rules' own: with host-scoped rules, other hosts are refused.
    hosts: tuple[str, ...] = ()
    # Match rules' paths ignoring ASCII case, for every upstream (see UpstreamConfig).
    case_insensitive_paths: bool = False
    # Client connections (gateway.connections): see the defaults' reasons in config.py.
    max_connections: int = 1024
    header_timeout_s: float = 20.0
    body_timeout_s: float = 20.0
    keepalive_timeout_s: float = 75.0
    keepalive_requests: int = 1000
    keepalive_max_age_s: float = 10.0
    # proxy | forward_auth | both: whether front proxies may ask /auth (and /start).
    mode: str = "proxy"
    # gateway.decision_memo: an Allow reused for at most this long (0: never), this many.
    decision_memo_s: int = 1
    decision_memo_entries: int = 10_000
    # Also listen on this unix socket (a front proxy on the same host), with this mode;
    # its connections are trusted proxies only with "unix" in trusted_proxies.
    unix_socket: str | None = None
    unix_socket_mode: int = 0o660
    trust_unix_socket: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str  # scheme://host[:port][/base], no trailing slash
    # The upstream routes /API/Transfers to its /api/transfers handler (Express, IIS,
    # ASP.NET...): rules routing to it compare paths ignoring ASCII case.
    case_insensitive_paths: bool = False
    # A request judged by its access token: does this upstream get the client's
    # Authorization (and DPoP) header? No by default: the token was meant for the
    # gateway (its audience), and an upstream that never sees it cannot leak or replay it.
    pass_authorization: bool = False


@dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    client_auth: str = "client_secret_basic"  # client_secret_post | private_key_jwt
    essential_acr: bool = False
    # gateway.oidc.profiles: how this provider is asked for a level and how it answers.
    profile: str = "generic"
    # FAPI 2.0 client parts (gateway.oidc.fapi).
    client_key_file: str | None = None  # private_key_jwt signing key(s), PEM; first signs
    par: bool = False  # RFC 9126 pushed authorization requests
    dpop: bool = False  # RFC 9449 DPoP-bound tokens at the token endpoint
    # OIDC Core 5.1: email_verified false or absent means the provider vouches for no
    # such thing; true takes an ID token without the claim as verified (see README).
    assume_email_verified: bool = False
    clock_skew_s: int = 60
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "ES384", "RS384", "RS512", "EdDSA")
    http_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class SessionConfig:
    secrets: tuple[bytes, ...]  # first one writes, all read (rotation)
    store: str = "cookie"  # cookie | memory | redis
    redis_url: str | None = None
    redis_prefix: str = "stepup:"  # every key the gateway writes starts with it
    cookie_secure: bool = True
    cookie_name: str = "stepup_session"
    idle_timeout_s: int = 30 * 60
    lifetime_s: int = 12 * 60 * 60
    transaction_ttl_s: int = 10 * 60
    redis_pool_size: int = 256  # Redis commands in flight per process, at most (0: derived)
    redis_pool_timeout_s: float = 5.0  # the longest wait for one of them

    @property
    def store_settings(self) -> tuple[object, ...]:
        """What the session store is built from (``factory.make_store``): a reload
        needs a new store object exactly when this changes."""
        if self.store == "memory":
            return ("memory", self.idle_timeout_s, self.lifetime_s)
        return (
            self.store,
            self.secrets,
            self.idle_timeout_s,
            self.lifetime_s,
            self.redis_url,
            self.redis_prefix,
            self.redis_pool_size,
            self.redis_pool_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    rank: int  # 0 = weakest
    acr: tuple[str, ...] = ()
    amr_any: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AssuranceConfig:
    levels: tuple[Level, ...]  # weakest first
    # Named providers' own levels (oidc.providers.NAME.levels, or their profile's):
    # a rule of provider NAME is judged by these. Absent: the levels above.
    providers: tuple[tuple[str, AssuranceConfig], ...] = ()

    def for_provider(self, name: str) -> AssuranceConfig:
        """The levels rules of provider ``name`` are judged by."""
        for provider, levels in self.providers:
            if provider == name:
                return levels
        return self

    def level(self, name: str) -> Level | None:
        for level in self.levels:
            if level.name == name:
                return level
        return None


@dataclass(frozen=True, slots=True)
class Match:
    path: str  # glob
    methods: frozenset[str] | None = None  # None = any
    host: str | None = None  # canonical (lower case, no trailing dot, no default port)


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a rule needs. ``level is None`` means no sign-in is needed."""

    level: str | None
    max_age_s: int | None = None
    once: bool = False  # each matching request consumes its own step-up
    bind: tuple[str, ...] = ()  # request fields the proof is bound to (PSD2 dynamic linking)


@dataclass(frozen=True, slots=True)
class RiskConfig:
    url: str
    timeout_s: float = 1.0
    on_error: str = "step_up"  # step_up (ask for the strongest level) | deny
    cache_s: int = 0  # per session; 0 = ask every time


@dataclass(frozen=True, slots=True)
class StepUpConfig:
    max_body_bytes: int = 1024 * 1024  # form posts kept across a step-up, and bound fields
    authorization_details_type: str = "payment_initiation"  # RFC 9396 type for bind rules
    keep_budget_bytes: int = 64 * 1024 * 1024  # all requests one process keeps, together
    keep_per_client: int = 8  # kept requests in flight per session (or client address)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    index: int  # position in the rules list; first match wins
    match: Match
    require: Requirement
    upstream: str
    allow_method_override: bool = False
    # An upstream's RFC 9470 401 to a browser starts a step-up instead of reaching it.
    upstream_challenge: bool = False
    when: Any = None  # gateway.conditions.Condition: the rule applies only when it holds
    risk: RiskConfig | None = None  # ask an external risk engine what this request needs
    credentials: str = "any"  # session | token | any: what this rule accepts (with api)
    provider: str = "default"  # oidc.providers: whose proof this rule needs


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The gateway as an OAuth 2.0 resource server (``api``): see :mod:`gateway.tokens`."""

    audience: str  # the ``aud`` every access token must carry (RFC 9068 4)
    tokens: tuple[str, ...] = ("jwt",)  # jwt (RFC 9068) and/or introspection (RFC 7662)
    dpop: str = "allowed"  # off | allowed | required (RFC 9449)
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "ES384", "RS384", "RS512", "EdDSA")
    dpop_algorithms: tuple[str, ...] = ("ES256", "ES384", "EdDSA", "PS256", "RS256")
    dpop_nonce: bool = False  # issue and require server nonces (RFC 9449 8)
    dpop_max_age_s: int = 60  # a proof's iat window (RFC 9449 11.1)
    introspection_cache_s: int = 60  # at most this long, and never past the token's exp
    cache_entries: int = 10_000  # verified tokens and introspection results kept per process
    # Whose tokens are accepted (oidc.providers names); None: every configured provider's.
    providers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AssertionConfig:
    key_file: str | None = None
    ttl_s: int = MAX_ASSERTION_TTL_S
    header_prefix: str = "X-Auth-"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """OpenTelemetry tracing (README "Tracing"); off while no OTLP endpoint is known."""

    otlp_endpoint: str | None = None  # base URL; spans go to {otlp_endpoint}/v1/traces
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "stepup-gateway"
    sample_ratio: float | None = None  # None: OTEL_TRACES_SAMPLER, else parent-based, all


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    upstreams: dict[str, UpstreamConfig]
    oidc: OidcConfig
    session: SessionConfig
    assurance: AssuranceConfig
    rules: tuple[Rule, ...]
    assertion: AssertionConfig = field(default_factory=AssertionConfig)
    source: str = "<memory>"
    step_up: StepUpConfig = field(default_factory=StepUpConfig)
    api: ApiConfig | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # oidc.providers: the named providers besides ``oidc`` itself (named "default").
    providers: tuple[tuple[str, OidcConfig], ...] = ()

    def oidc_for(self, name: str) -> OidcConfig:
        """The provider ``name`` (a name the rules were checked against)."""
        for provider, oidc in self.providers:
            if provider == name:
                return oidc
        return self.oidc

    @property
    def provider_names(self) -> tuple[str, ...]:
        return (DEFAULT_PROVIDER, *(name for name, _ in self.providers))
