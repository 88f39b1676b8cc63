"""aiohttp wiring: one request, top to bottom.

    normalise -> internal endpoint? -> match rule -> load session -> decide
              -> forward | challenge | deny

This module is the only place where errors become responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import ipaddress
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from gateway import assurance, headers, logs, responses
from gateway.assertion import AssertionKeyError, AssertionSigner, load_or_generate_key
from gateway.conditions import Facts
from gateway.connections import ConnectionPolicy, GuardedHandler, GuardedServer, body_deadline
from gateway.errors import (
    BadRequest,
    Busy,
    ConfigError,
    ConfigProblem,
    Forbidden,
    GatewayError,
    Gone,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    PayloadTooLarge,
    ProviderError,
    ProviderUnavailable,
    RequestTimeout,
    StoreBusy,
    StoreUnavailable,
    Unauthorized,
)
from gateway.fields import (
    RequestFields,
    ambiguous,
    binding_digest,
    binding_values,
    media_type,
    read_fields,
)
from gateway.memo import (
    HEADER_MEMO_BYTES,
    HEADER_MEMO_ENTRIES,
    HEADER_OVERHEAD_BYTES,
    Memo,
    header_set_size,
)
from gateway.metrics import Metrics
from gateway.model import Config, Level, Rule
from gateway.oidc.flow import (
    LOGOUT_TOKEN_MAX_AGE_S,
    IdTokenError,
    authorization_url,
    end_session_url,
    new_pkce,
    parse_callback,
    verified_email,
)
from gateway.oidc.flow import random_token as new_random
from gateway.oidc.provider import ProviderClient
from gateway.paths import canonical_host, normalize_path, split_request_target
from gateway.policy import Allow, Challenge, Deny, decide
from gateway.proxy import UpstreamIntercepted, Upstreams
from gateway.reload import restart_needed
from gateway.risk import RiskClient, RiskFacts, effective_requirement
from gateway.rules import RuleSet
from gateway.session.aux import AuxStore, LocalAux
from gateway.session.cookies import (
    SetCookieKwargs,
    cookie_name,
    delete_cookie_kwargs,
    set_cookie_kwargs,
)
from gateway.session.model import Proof, Session, new_proof_id
from gateway.session.redis_store import RedisStore, eviction_problem
from gateway.session.stores import CookieStore, SessionStore, make_store
from gateway.session.transaction import (
    Transaction,
    TransactionCodec,
    bounded_return_to,
    cookie_pair_bytes,
    tx_cookie_name,
    tx_cookies_to_drop,
)
from gateway.tokens.gate import Presented, TokenGate, judged_url, presented_token
from gateway.transactional import (
    KeptLedger,
    KeptRequest,
    authorization_details,
    binding_message,
    client_key,
    echoed_binding,
    is_form_post,
    kept_size_bytes,
    level_for_acr_values,
    max_age_of,
    parse_bearer_challenge,
    popup_page,
    same_origin_refusal,
)

log = structlog.get_logger("gateway")
audit = structlog.get_logger("gateway.audit")

# Several tabs may each have a sign-in in flight; beyond this, the oldest is dropped
# so a page that loops cannot grow the Cookie header without bound.
MAX_TRANSACTIONS_IN_FLIGHT = 5
# Header sets built for recent (session, level, rule) triples, while their assertion
# may be reused: at most this many (each a signed token and a few short values).
ASSURANCE_MEMO_ENTRIES = 4096
ASSURANCE_MEMO_BYTES = 8 * 1024 * 1024
# Before sending a browser to the provider: is it there? A healthy provider answers its
# discovery document in milliseconds; while it answers, ask again at most every 10 s.
PROVIDER_PROBE_TIMEOUT_S = 2.0
PROVIDER_PROBE_TTL_S = 10.0
# A logout token is a few hundred bytes; anything far larger is not one.
MAX_LOGOUT_REQUEST_BYTES = 64 * 1024
# One header field, at most. aiohttp's default, like nginx's and Apache's, is 8 KB; the
# gateway's own cookies stay under that (session <= ~3.9 KB, sign-ins in flight <= 3 KB),
# and twice as much leaves the application's cookies room, so /healthz and /callback
# still answer when a Cookie header has grown past 8 KB. Upstreams never get the
# gateway's cookies, so they see a shorter header than this.
MAX_HEADER_FIELD_BYTES = 16 * 1024
# Replicas' clocks differ a little; a revocation outlives the session by this much.
REVOCATION_MARGIN_S = 60
# Bodies read for their fields; others (uploads, binaries) are never buffered for a rule.
FIELD_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "application/json"}
)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

PROVIDER_ERROR_TEXT = {
    "access_denied": "The sign-in was cancelled or refused at the identity provider.",
    "login_required": "The identity provider needs you to sign in again.",
    "interaction_required": "The identity provider needs you to interact with it.",
    "consent_required": "The identity provider needs your consent.",
    "unmet_authentication_requirements": (
        "Your account has no sign-in method strong enough for this action."
    ),
    "temporarily_unavailable": "The identity provider is temporarily unavailable.",
}


class RequestBody:
    """The request's body, read at most once, bounded, and only when something needs it.

    Read when a rule's ``when`` or ``bind`` needs its fields, or when a form post
    must be kept across a step-up; the upstream then gets exactly these bytes.
    """

    def __init__(
        self, request: web.BaseRequest, limit: int, query: str | None, timeout_s: float
    ) -> None:
        self._request = request
        self._limit = limit
        self._query = query or ""  # raw, as the upstream gets it
        self._timeout_s = timeout_s
        self.data: bytes | None = None
        self.consumed = False  # part of the stream was read: it can no longer be forwarded
        self._fields: RequestFields | None = None

    @property
    def content_type(self) -> str:
        return self._request.headers.get("Content-Type", "")

    async def read(self) -> bytes:
        if self.data is not None:
            return self.data
        request = self._request
        if not request.body_exists:
            self.data = b""
            return self.data
        if (request.content_length or 0) > self._limit:
            raise PayloadTooLarge(
                "This request is too large to hold while you sign in. Sign in first "
                "(open any page of this site), then send it again.",
                reason="body_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        self.consumed = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # One timer for the whole body, moved per chunk (see body_deadline).
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(
                        body_deadline(
                            started=started,
                            now=loop.time(),
                            received_bytes=size,
                            timeout_s=self._timeout_s,
                        )
                    )
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self._limit:
                        raise PayloadTooLarge(
                            "This request is too large to hold while you sign in. Sign in "
                            "first, then send it again.",
                            reason="body_too_large",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            log.info("client_timeout", phase="body", received_bytes=size)
            raise RequestTimeout(
                "The request body arrived too slowly.", reason="request_body_timeout"
            ) from None
        self.data = b"".join(chunks)
        return self.data

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        """Form, JSON or multipart fields, then the query's (see read_fields).

        Raises BadRequest when a field in ``reading`` is given twice or read
        differently by upstreams.
        """
        if self._fields is None:
            kind = media_type(self.content_type)
            request = self._request
            if kind not in FIELD_TYPES and request.body_exists:
                # A body of another type may carry the same names (an upstream may parse
                # it anyway): nothing is known, so conditions fail closed and the
                # stricter rule applies; the query alone must not decide.
                log.info("body_not_read", reason="other_type", content_type=kind)
                self._fields = RequestFields()
            elif (request.content_length or 0) > self._limit and self.data is None:
                # Too large to read for a condition: nothing is known either, and the
                # body still streams to the upstream untouched.
                log.info("body_not_read", reason="too_large", content_type=kind)
                self._fields = RequestFields()
            else:
                body = await self.read() if kind in FIELD_TYPES else b""
                self._fields = read_fields(self.content_type, body, self._query)
                if not self._fields.readable:
                    # Malformed, or a shape parsers could split differently: no fields,
                    # so conditions on them count as true (gateway.fields).
                    log.info("body_not_read", reason="unreadable", content_type=kind)
        return certain(self._fields, reading)


class KeptBody:
    """The fields of a kept request, for judging it again when it is replayed."""

    def __init__(self, kept: KeptRequest) -> None:
        self._kept = kept

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        kept = self._kept
        query = kept.path_qs.partition("?")[2]
        return certain(read_fields(kept.content_type, kept.body, query), reading)


def certain(fields: RequestFields, reading: Iterable[str]) -> Mapping[str, object]:
    """``fields.values``, unless a field a rule reads is ambiguous: then 400.

    A field given twice (in the body, in body and query, or under a name an
    upstream folds onto it) or whose value parsers read differently could be
    judged as one value while the upstream acts on another.
    """
    unsure = fields.unsure(reading)
    if unsure:
        log.warning("ambiguous_field", fields=list(unsure))  # names only, never values
        raise ambiguous(unsure)
    return fields.values


class ReloadRefused(Exception):
    """A new config that cannot be applied live; the old one stays in force."""


class Gateway:
    """One gateway instance: configuration, shared clients and the request handler."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        assertion_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self.store: SessionStore = make_store(config.session)
        self.kept_ledger = KeptLedger(
            budget_bytes=config.step_up.keep_budget_bytes,
            per_client=config.step_up.keep_per_client,
        )
        if assertion_key is None:
            assertion_key, self.key_generated = load_or_generate_key(config.assertion.key_file)
        else:
            self.key_generated = False
        self._assertion_key = assertion_key
        self._apply(config)
        self.upstreams = self._make_upstreams(config)
        self._http: aiohttp.ClientSession | None = None
        self._provider: ProviderClient | None = None
        self._provider_ok_until = 0.0
        self.aux: AuxStore = LocalAux(clock=clock)  # replaced in start()
        self.server: GuardedServer | None = None  # set by make_server
        self.metrics.watch_connections(self.open_connections, self.accepting)
        self.metrics.watch_store_pool(self.store_pool)
        self._aux_redis: RedisStore | None = None
        self._internal: dict[str, Callable[[web.BaseRequest], Any]] = {
            "/callback": self.callback,
            "/logout": self.logout,
            "/logged-out": self.logged_out,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics_endpoint,
            "/jwks.json": self.jwks,
            "/step-up": self.step_up,
            "/backchannel-logout": self.backchannel_logout,
            "/resume": self.resume,
        }

    def _apply(self, config: Config) -> None:
        """Set ``config`` and everything derived from it, with no await in between."""
        self.config = config
        self.rules = RuleSet.for_config(config)
        self.kept_ledger.budget_bytes = config.step_up.keep_budget_bytes
        self.kept_ledger.per_client = config.step_up.keep_per_client
        self.tx_codec = TransactionCodec(config.session.secrets)
        secure = config.session.cookie_secure
        self.secure = secure
        self.session_cookie = cookie_name(config.session.cookie_name, secure)
        self.tx_base = f"{config.session.cookie_name}_tx"
        self.scheme = urlsplit(config.server.public_url).scheme
        self.public_host = canonical_host(urlsplit(config.server.public_url).netloc, self.scheme)
        # The resource server for API clients' access tokens (None: cookies only).
        self.tokens = (
            TokenGate(config.api, config.oidc, config.session.secrets[0])
            if config.api is not None
            else None
        )
        self.prefix = config.server.internal_prefix
        self.redirect_uri = f"{config.server.public_url}{self.prefix}/callback"
        self.header_prefix = config.assertion.header_prefix
        self.signer = AssertionSigner(
            self._assertion_key, config.server.public_url, config.assertion.ttl_s
        )
        # What the assurance headers are made of -> those headers, while their signed
        # assertion may be reused (the signer's own cache, one level up: building the
        # claims and their key costs more than this lookup).
        self._assurance_headers: Memo[
            tuple[object, ...], tuple[float, tuple[tuple[str, str], ...]]
        ] = Memo(max_entries=ASSURANCE_MEMO_ENTRIES, max_bytes=ASSURANCE_MEMO_BYTES)
        self._request_headers: Memo[tuple[object, ...], CIMultiDict[str]] = Memo(
            max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
        )
        self._framing_passed: Memo[tuple[object, ...], bool] = Memo(
            max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
        )
        base = config.session.cookie_name
        # Both spellings: an upstream must neither see nor set the gateway's cookies.
        self.gateway_cookies = frozenset({base, cookie_name(base, True)})
        self.gateway_cookie_prefixes = (f"{self.tx_base}_", cookie_name(f"{self.tx_base}_", True))
        # Probes hit these every few seconds; an access-log line each would drown the rest.
        self.quiet_paths = frozenset({f"{self.prefix}/healthz", f"{self.prefix}/readyz"})
        server = config.server
        self._connection_policy = ConnectionPolicy(
            max_connections=server.max_connections,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            keepalive_timeout_s=server.keepalive_timeout_s,
            keepalive_requests=server.keepalive_requests,
            keepalive_max_age_s=server.keepalive_max_age_s,
        )

    def _make_upstreams(self, config: Config) -> Upstreams:
        return Upstreams(
            config.upstreams,
            connect_timeout_s=config.server.upstream_connect_timeout_s,
            timeout_s=config.server.upstream_timeout_s,
            gateway_cookies=self.gateway_cookies,
            gateway_cookie_prefixes=self.gateway_cookie_prefixes,
            body_idle_timeout_s=config.server.body_timeout_s,
        )

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.key_generated:
            log.warning(
                "assertion_key_generated",
                hint="set assertion.key_file so every process and restart signs with one key",
            )
        await self.upstreams.start()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.oidc.http_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._provider = ProviderClient(
            self.config.oidc, self._http, on_error=self._count_provider_error
        )
        self.risk = RiskClient(self._http)
        self.aux = self._make_aux()
        await self.check_redis_eviction()
        session = self.config.session
        if (
            session.store == "cookie"
            and session.redis_url is None
            and self.config.server.workers > 1
        ):
            log.warning(
                "session_revocation_per_process",
                hint="with the cookie store and several workers, a signed-out session is "
                "refused only by the worker that signed it out; set session.redis_url",
            )
        try:
            await self._provider.load()
        except ProviderError as exc:
            # Not fatal: /readyz reports it and step-ups answer 503 until it loads.
            log.warning("provider_not_loaded", reason=exc.reason)

    async def close(self) -> None:
        await self.upstreams.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None:
            await close_store()
        if self._aux_redis is not None:
            await self._aux_redis.close()
        if self._http is not None:
            await self._http.close()

    async def reload(self, new: Config) -> None:
        """Apply a new, already validated config without dropping a connection.

        Raises :class:`ReloadRefused` (and changes nothing) when ``new`` changes
        what only a restart can (listeners, worker count, the session store) or
        when a changed provider cannot be loaded. Sessions keep their proofs;
        their levels are re-evaluated against the new level definitions on the
        next request. In-flight sign-ins survive as long as the secret that
        sealed them is still listed.
        """
        old = self.config
        blockers = restart_needed(old, new)
        if blockers:
            raise ReloadRefused("needs a restart: " + ", ".join(blockers))
        provider = self._provider
        if new.oidc != old.oidc:
            assert self._http is not None
            provider = ProviderClient(new.oidc, self._http, on_error=self._count_provider_error)
            try:
                await provider.load()
            except ProviderError as exc:
                raise ReloadRefused(f"the new provider cannot be loaded ({exc.reason})") from exc
        store = self.store
        if new.session.store_settings != old.session.store_settings:
            store = make_store(new.session)  # cookie store only (see restart_needed)
        key = self._assertion_key
        if new.assertion.key_file != old.assertion.key_file and new.assertion.key_file:
            try:
                key, _ = load_or_generate_key(new.assertion.key_file)
            except AssertionKeyError as exc:
                raise ReloadRefused(str(exc)) from exc
        old_upstreams = self.upstreams
        pool_settings = (
            (
                c.upstreams,
                c.server.upstream_timeout_s,
                c.server.upstream_connect_timeout_s,
                c.session.cookie_name,
            )
            for c in (old, new)
        )
        new_pools = next(pool_settings) != next(pool_settings)
        # From here on nothing awaits until every piece is swapped.
        self._assertion_key = key
        self._apply(new)
        self.store = store
        self._provider = provider
        if new_pools:
            self.upstreams = self._make_upstreams(new)
            # Requests still streaming through the old pools finish first.
            asyncio.get_running_loop().call_later(
                new.server.shutdown_timeout_s + 1,
                lambda: asyncio.ensure_future(old_upstreams.close()),
            )
        log.info("config_reloaded", rules=len(new.rules), source=new.source)

    def _make_aux(self) -> AuxStore:
        """Where one-time claims and kept requests live: the Redis store when there is
        one (shared by workers and replicas), else this process."""
        session = self.config.session
        if isinstance(self.store, RedisStore):
            return self.store
        if session.redis_url is not None:
            self._aux_redis = RedisStore.from_url(
                session.redis_url,
                session.secrets,
                idle_timeout_s=session.idle_timeout_s,
                lifetime_s=session.lifetime_s,
                prefix=session.redis_prefix,
                pool_size=session.redis_pool_size,
                pool_timeout_s=session.redis_pool_timeout_s,
            )
            return self._aux_redis
        return LocalAux(clock=self.clock)

    async def check_redis_eviction(self) -> None:
        """Refuse to start on a Redis that may evict one-time records (see
        :func:`gateway.session.redis_store.eviction_problem`)."""
        redis = self.store if isinstance(self.store, RedisStore) else self._aux_redis
        if redis is None:
            return
        try:
            settings = await redis.eviction_settings()
        except StoreUnavailable:
            log.warning("redis_eviction_unchecked", reason="store_down")
            return
        if settings is None:
            # Managed services (ElastiCache, Memorystore, Azure Cache) forbid CONFIG:
            # the gateway cannot know; it runs, and says what the operator must check.
            log.warning(
                "redis_eviction_unchecked",
                reason="config_refused",
                hint="make sure maxmemory-policy is noeviction",
            )
            return
        policy, maxmemory = settings
        problem = eviction_problem(policy, maxmemory)
        if problem is not None:
            log.error("redis_eviction_unsafe", policy=policy, maxmemory=maxmemory)
            raise ConfigError([ConfigProblem("session.redis_url", problem, self.config.source)])
        log.info("redis_eviction_checked", policy=policy, maxmemory=maxmemory)

    # -- connections (gateway.connections) ------------------------------------------

    def connection_policy(self) -> ConnectionPolicy:
        return self._connection_policy

    def connection_closed(self, reason: str) -> None:
        self.metrics.connections_closed.labels(reason).inc()

    def client_timed_out(self, phase: str) -> None:
        self.metrics.client_timeouts.labels(phase).inc()

    @property
    def draining(self) -> bool:
        """SIGTERM received: finishing what is in flight, taking nothing new."""
        return self.server is not None and self.server.draining

    def open_connections(self) -> int:
        return self.server.open_connections if self.server is not None else 0

    def accepting(self) -> int:
        listener = self.server.listener if self.server is not None else None
        return 0 if listener is None or listener.paused else 1

    def store_pool(self) -> RedisStore | None:
        """The Redis store whose pool /metrics shows (sessions, or one-time records)."""
        if isinstance(self.store, RedisStore):
            return self.store
        return self._aux_redis

    @property
    def provider(self) -> ProviderClient:
        assert self._provider is not None, "Gateway.start() was not awaited"
        return self._provider

    def _count_provider_error(self, kind: str) -> None:
        self.metrics.provider_errors.labels(kind).inc()

    # -- the request -------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        inbound_id = request.headers.get("X-Request-Id")
        if inbound_id is not None and REQUEST_ID_RE.fullmatch(inbound_id):
            request_id = inbound_id
        else:
            request_id = new_request_id()
        logs.bind_request_id(request_id)
        started = time.perf_counter()
        rule_name: str | None = None
        path = "-"
        try:
            self.check_framing(request)
            raw_path, query = split_request_target(request.raw_path)
            path = normalize_path(raw_path)
            if path == self.prefix or path.startswith(self.prefix + "/"):
                response = await self.internal(request, path[len(self.prefix) :] or "/")
            else:
                rule_name, response = await self.proxied(request, path, query, request_id)
        except GatewayError as exc:
            if isinstance(exc, BadRequest | MethodNotAllowed):
                self.metrics.rejected.labels(exc.reason).inc()
            elif isinstance(exc, RequestTimeout):
                self.client_timed_out("body")
            response = self.error_response(request, exc)
            if isinstance(exc, headers.FramingError | RequestTimeout):
                response.force_close()  # the connection's framing can't be trusted
                if isinstance(request.protocol, GuardedHandler):
                    request.protocol.linger_briefly()
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        if self.config.server.access_log and path not in self.quiet_paths:
            logs.access(
                request.method,
                path,  # normalised, never the query (it may carry codes or tokens)
                response.status,
                rule_name,
                round((time.perf_counter() - started) * 1000, 2),
            )
        return response

    async def proxied(
        self, request: web.BaseRequest, path: str, query: str | None, request_id: str
    ) -> tuple[str | None, web.StreamResponse]:
        """A request for the upstreams: choose the rule, decide, act. (rule name, response)"""
        rules, config = self.rules, self.config  # one consistent view across a reload
        rules.require_known_method(request.method)
        host = self.judged_host(request, rules)
        store_down: StoreUnavailable | None = None
        tokens = self.tokens
        # An access token, when there is one, is the credential: never a cookie beside it.
        presented = presented_token(request.headers) if tokens is not None else None
        if presented is not None:
            session: Session | None = await self.token_session(presented, request, host, path)
        else:
            try:
                session = await self.load_session(request)
            except StoreUnavailable as exc:
                # Only requests that need a session fail (closed, with a 503 below);
                # routes that need no sign-in keep working while the store is down.
                session, store_down = None, exc
        now = self.clock()
        body = RequestBody(
            request, config.step_up.max_body_bytes, query, config.server.body_timeout_s
        )
        # The common case, the first matching rule has no condition, without a coroutine.
        rule = rules.match(request.method, host, path)
        if rule is not None and rule.when is not None:
            rule = await self.choose_rule(request, rules, host, path, session, body, now)
        rule_name = rule.name if rule is not None else None
        if tokens is not None and tokens.ignores_cookie(rule, presented):
            session, store_down = None, None  # rules[].credentials: token
        if store_down is not None and (rule is None or rule.require.level is not None):
            raise store_down
        judged = rule
        if rule is not None and rule.risk is not None:
            judged = await self.apply_risk(request, rule, session, body, path, now)
            if judged is None:
                self.metrics.requests.labels(rule.name, "deny").inc()
                return rule_name, self.deny(request, Deny(403, "risk_engine_denied"))
        binding = None
        if judged is not None and judged.require.bind:
            bound = await body.fields(judged.require.bind)
            binding = binding_digest(judged.require.bind, bound)
        decision = decide(judged, session, config.assurance, now, binding=binding)
        if isinstance(decision, Allow) and judged is not None and judged.require.once:
            decision = await self.consume_proof(decision, session, now)
        self.metrics.requests.labels(rule_name or "", DECISION_LABEL[type(decision)]).inc()
        path_qs = path if query is None else f"{path}?{query}"
        if isinstance(decision, Allow):
            return rule_name, await self.forward(
                request, decision, session, path_qs, request_id, body=body, by_token=bool(presented)
            )
        if isinstance(decision, Challenge):
            if tokens is not None and tokens.answers_challenge(decision, presented):
                raise tokens.step_up_needed(decision, presented)  # RFC 9470: never a redirect
            return rule_name, await self.challenge(request, decision, path_qs, body, session)
        return rule_name, self.deny(request, decision)

    async def token_session(
        self, presented: Presented, request: web.BaseRequest, host: str | None, path: str
    ) -> Session:
        """The session-shaped value of the request's access token (:mod:`gateway.tokens`)."""
        assert self.tokens is not None
        return await self.tokens.authenticate(
            presented,
            method=request.method,
            url=judged_url(self.scheme, host, self.public_host or "", path),
            now=self.clock(),
            provider=self.provider,
            aux=self.aux,
        )

    async def choose_rule(
        self,
        request: web.BaseRequest,
        rules: RuleSet,
        host: str | None,
        path: str,
        session: Session | None,
        body: RequestBody | KeptBody,
        now: float,
        *,
        method: str | None = None,
    ) -> Rule | None:
        """The first matching rule whose ``when`` holds (or that has none)."""
        client_ip = self.client_ip(request)
        for candidate in rules.candidates_for(method or request.method, host, path):
            condition = candidate.when
            if condition is None:
                return candidate
            facts = Facts(
                fields=await body.fields(condition.fields()) if condition.fields() else {},
                client_ip=client_ip,
                proven_ip=session.ip if session is not None else None,
                auth_age_s=now - session.auth_time if session is not None else None,
            )
            verdict = condition.evaluate(facts)
            if verdict is None:  # fail closed: the stricter rule applies; say why
                unknown = sorted(condition.unknowns(facts))
                log.info("when_unknown", rule=candidate.name, unknown=unknown)
            if verdict is not False:
                return candidate
        return None

    async def apply_risk(
        self,
        request: web.BaseRequest,
        rule: Rule,
        session: Session | None,
        body: RequestBody,
        path: str,
        now: float,
    ) -> Rule | None:
        """``rule`` with what its risk engine adds; None when the engine says deny."""
        assert rule.risk is not None
        wanted = set(rule.require.bind) | (set(rule.when.fields()) if rule.when else set())
        fields = binding_values(sorted(wanted), await body.fields(wanted)) if wanted else {}
        held = assurance.highest(self.config.assurance.levels, session.proofs) if session else None
        facts = RiskFacts(
            subject=session.sub if session else None,
            rule=rule.name,
            method=request.method,
            path=path,
            client_ip=self.client_ip(request),
            fields=fields,
            level=held.name if held else None,
            level_age_s=now - session.auth_time if session else None,
        )
        outcome = await self.risk.assess(
            rule,
            facts,
            assurance=self.config.assurance,
            session_id=session.id if session else None,
            now=now,
        )
        audit.info(
            "risk_assessed",
            rule=rule.name,
            decision=outcome.decision,
            level=outcome.level,
            reason=outcome.reason,
        )
        requirement = effective_requirement(rule.require, outcome, self.config.assurance)
        return None if requirement is None else dataclasses.replace(rule, require=requirement)

    async def consume_proof(
        self, decision: Allow, session: Session | None, now: float
    ) -> Allow | Challenge:
        """A one-time rule: the proof is used up by this request, atomically."""
        proof = decision.proof
        if session is None or proof is None:
            return decision
        # The step-up that made the proof names it; proofs saved before ids existed
        # fall back to what they are made of.
        made_by = proof.id if proof.id is not None else f"{proof.acr}:{proof.auth_time}"
        name = f"proof:{session.id}:{made_by}"
        if await self.aux.claim_once(name, self.config.session.lifetime_s):
            audit.info("proof_consumed", rule=decision.rule.name, sub=session.sub)
            return decision
        required = self.config.assurance.level(decision.rule.require.level or "")
        assert required is not None  # a once rule always names a level (config check)
        return Challenge(
            decision.rule, required, decision.rule.require.max_age_s, "proof_used", decision.level
        )

    def judged_host(self, request: web.BaseRequest, rules: RuleSet) -> str | None:
        """The canonical Host the rules judge; refused when host-scoped rules don't know it."""
        host = canonical_host(request.headers.get("Host"), self.scheme)
        if not rules.host_known(host):
            # A spelling the host's rules skip (":8443", an IP, another name) must not
            # fall through to a weaker catch-all rule.
            raise MisdirectedRequest(
                "This gateway does not serve that host.", reason="unknown_host"
            )
        return host

    def client_ip(self, request: web.BaseRequest) -> str | None:
        """The client's address: the TCP peer, or from X-Forwarded-For via a trusted proxy.

        The first hop of :func:`gateway.headers.client_chain`: read from every
        X-Forwarded-For line (or Forwarded), exactly the chain the upstream is sent.
        """
        peer = request.remote or None
        if peer is None:
            return None
        return self.client_hops(request, peer)[0]

    def client_hops(self, request: web.BaseRequest, peer: str) -> tuple[str, ...]:
        return headers.client_chain(
            request.headers.items(),
            peer=peer,
            peer_trusted=self.peer_trusted(peer),
            is_trusted=self.peer_trusted,
        )

    async def load_session(self, request: web.BaseRequest) -> Session | None:
        value = cookie_value(request, self.session_cookie)
        if not value:
            return None
        try:
            session = await self.store.load(value, self.clock())
        except (OSError, ConnectionError) as exc:  # a remote store that does not answer
            raise StoreUnavailable(
                "The session store is not answering; try again shortly.", reason="store_down"
            ) from exc
        if session is None:
            log.info("session_rejected", reason="invalid_or_expired")
        elif isinstance(self.store, CookieStore) and await self.revoked(session):
            log.info("session_rejected", reason="revoked")
            return None
        return session

    # -- revocation (cookie store) ---------------------------------------------------
    #
    # A cookie-store session cannot be deleted: a saved copy of the cookie would
    # stay valid until it expires (CWE-613). Signing out records the session id, and
    # a back-channel logout the subject or provider session with its time, beside the
    # one-time claims (this process, or Redis with session.redis_url), until every
    # session they name has expired.

    @staticmethod
    def _revocation_names(session: Session) -> list[str]:
        names = [f"revoked:id:{session.id}", f"revoked:sub:{session.sub}"]
        if session.provider_sid is not None:
            names.append(f"revoked:sid:{session.provider_sid}")
        return names

    async def revoked(self, session: Session) -> bool:
        marks = await self.aux.get_records(self._revocation_names(session))
        if marks[0] is not None:
            return True
        # By subject or provider session: every session created up to that moment.
        return any(at is not None and session.created_at <= at for at in marks[1:])

    async def revoke(
        self,
        *,
        session: Session | None = None,
        sub: str | None = None,
        provider_sid: str | None = None,
    ) -> None:
        """Record a sign-out until every session it covers has expired anyway."""
        now = self.clock()
        lifetime_s = self.config.session.lifetime_s + REVOCATION_MARGIN_S
        if session is not None:
            left_s = session.created_at + lifetime_s - now
            await self.aux.put_record(f"revoked:id:{session.id}", now, max(left_s, 1))
        if sub is not None and provider_sid is None:
            await self.aux.put_record(f"revoked:sub:{sub}", now, lifetime_s)
        if provider_sid is not None:
            await self.aux.put_record(f"revoked:sid:{provider_sid}", now, lifetime_s)

    async def forward(
        self,
        request: web.BaseRequest,
        decision: Allow,
        session: Session | None,
        path_qs: str,
        request_id: str,
        *,
        body: RequestBody | None = None,
        kept: KeptRequest | None = None,
        by_token: bool = False,
    ) -> web.StreamResponse:
        """Send the request (or a ``kept`` one, replayed) upstream with assurance headers.
        ``by_token``: judged by an access token (its ``session`` is the token's, unsaved)."""
        rule = decision.rule
        websocket = is_websocket(request)
        upstream_headers = self.upstream_request_headers(request, rule, request_id, websocket)
        if session is not None:
            # update() replaces: none of these came from the client (prefix stripped).
            upstream_headers.update(self.assurance_headers(session, decision.level, rule))
        if by_token and not self.config.upstreams[rule.upstream].pass_authorization:
            # The token's audience is the gateway (README: upstreams pass_authorization).
            upstream_headers.popall("Authorization", None)
            upstream_headers.popall("DPoP", None)
        refreshed: str | None = None
        now = self.clock()
        if session is not None and not by_token and session.touch_due(now):
            refreshed = await self.store.save(
                session.touched(now), now, previous=cookie_value(request, self.session_cookie)
            )
        extra: list[tuple[str, str]] = []
        if refreshed is not None:
            extra.append(("Set-Cookie", self.session_set_cookie(refreshed)))
        if websocket:
            return await self.upstreams.forward_websocket(
                request,
                rule.upstream,
                path_qs=path_qs,
                headers=upstream_headers,
                extra_response_headers=extra,
            )
        method: str | None = None
        data: bytes | None = None
        if kept is not None:
            method, data = kept.method, kept.body
            upstream_headers["Content-Type"] = kept.content_type
            upstream_headers["Content-Length"] = str(len(kept.body))
            # As the form was sent, not as the redirect back from the provider was:
            # an upstream's own CSRF check judges the original request.
            for name, value in (("Origin", kept.origin), ("Sec-Fetch-Site", kept.fetch_site)):
                upstream_headers.popall(name, None)
                if value is not None:
                    upstream_headers[name] = value
        intercept = None
        if kept is None:
            form = rule.upstream_challenge and is_form_post(request.method, request.headers)
            if form and body is not None:
                # Keep a copy of the form so the request can be replayed after a step-up
                # the upstream asks for; a body over the limit streams without that option.
                try:
                    await body.read()
                except PayloadTooLarge:
                    if body.consumed:
                        raise  # part of it is read: forwarding the rest would cut it
                    log.info("upstream_challenge_body_too_large", rule=rule.name)
            if body is not None and body.data is not None and request.body_exists:
                data = body.data  # the bytes the rule engine read, sent as they came
            # Only browsers are stepped up for the upstream; API clients (and any request
            # with an access token) get its challenge unchanged.
            if (
                rule.upstream_challenge
                and not by_token
                and (
                    (form and data is not None)
                    or responses.is_navigation(request.method, request.headers)
                )
            ):
                intercept = self.upstream_asks_step_up
        latency = self.metrics.upstream_latency.labels(rule.upstream)
        started = time.perf_counter()
        try:
            return await self.upstreams.forward(
                request,
                rule.upstream,
                path_qs=path_qs,
                headers=upstream_headers,
                extra_response_headers=extra,
                on_headers=lambda: latency.observe(time.perf_counter() - started),
                method=method,
                body=data,
                intercept=intercept,
            )
        except UpstreamIntercepted as asked:
            return await self.upstream_step_up(request, rule, session, path_qs, body, asked)

    def check_framing(self, request: web.BaseRequest) -> None:
        """:func:`gateway.headers.check_framing`, remembering header sets that passed."""
        raw = request.raw_headers
        key = (raw, request.version)
        if self._framing_passed.get(key) is None:
            headers.check_framing(raw, http_version=request.version)
            self._framing_passed.put(key, True, header_set_size(raw) // 2)

    def upstream_request_headers(
        self, request: web.BaseRequest, rule: Rule, request_id: str, websocket: bool
    ) -> CIMultiDict[str]:
        """:func:`gateway.headers.upstream_request_headers` for ``request``, remembered.

        The result depends on the client's headers, its address and the rule's
        upstream and method-override setting (the rest is this configuration's),
        so it is kept under exactly those; only the request id differs.
        """
        raw = request.raw_headers
        peer = request.remote or ""
        key = (raw, peer, rule.allow_method_override, rule.upstream)
        built = self._request_headers.get(key)
        if built is None:
            built = headers.upstream_request_headers(
                request.headers.items(),
                prefix=self.header_prefix,
                allow_method_override=rule.allow_method_override,
                strip_cookies=self.gateway_cookies,
                strip_cookie_prefixes=self.gateway_cookie_prefixes,
                client_ip=peer,
                peer_trusted=self.peer_trusted(peer),
                hops=self.client_hops(request, peer),
                scheme=self.scheme,
                # The canonical host the rules judged (known, since they judged it).
                host=canonical_host(request.headers.get("Host"), self.scheme) or "",
                request_id="",
                upstream_host=self.upstreams.host_of(rule.upstream),
                websocket=websocket,  # from the same headers: covered by the key
            )
            self._request_headers.put(key, built, header_set_size(raw) + len(peer))
        out = built.copy()
        out["X-Request-Id"] = request_id
        return out

    def upstream_asks_step_up(self, response: aiohttp.ClientResponse) -> str | None:
        """The upstream's RFC 9470 challenge, when its answer is one (the first, of several)."""
        if response.status != 401:
            return None
        return next(
            (
                value
                for value in response.headers.getall("WWW-Authenticate", [])
                if parse_bearer_challenge(value) is not None
            ),
            None,
        )

    async def upstream_step_up(
        self,
        request: web.BaseRequest,
        rule: Rule,
        session: Session | None,
        path_qs: str,
        body: RequestBody | None,
        asked: UpstreamIntercepted,
    ) -> web.StreamResponse:
        """The upstream answered a browser with an RFC 9470 challenge: step up, then replay."""
        value = asked.challenge
        params = parse_bearer_challenge(value) or {}
        level = level_for_acr_values(self.config.assurance.levels, params.get("acr_values", ""))
        max_age_s = max_age_of(params)
        if level is None or max_age_s is False:
            # Only levels this config defines can be asked for; pass the challenge on.
            log.warning(
                "upstream_challenge_unknown",
                rule=rule.name,
                acr_values=params.get("acr_values"),
                max_age=params.get("max_age"),
            )
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": value, "Cache-Control": "no-store"},
                text=responses.json_error(
                    "insufficient_user_authentication",
                    "The application asks for a stronger sign-in.",
                    request_id_of(),
                ),
                content_type="application/json",
            )
        assert max_age_s is not False
        audit.info("upstream_challenge", rule=rule.name, need=level.name, max_age_s=max_age_s)
        decision = Challenge(
            rule,
            level,
            max_age_s,
            "upstream_challenge",
            assurance.highest(self.config.assurance.levels, session.proofs) if session else None,
        )
        return await self.challenge(request, decision, path_qs, body, session)

    def assurance_headers(
        self, session: Session, level: Level | None, rule: Rule
    ) -> tuple[tuple[str, str], ...]:
        """The contract's assurance headers for ``session`` on ``rule``, as (name, value)."""
        now = self.clock()
        key = (
            session.sub,
            session.acr,
            session.amr,
            session.auth_time,
            session.email,
            level.name if level is not None else None,
            rule.name,
            rule.upstream,
        )
        cached = self._assurance_headers.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        p = self.header_prefix
        # Claims percent-encoded (headers.claim_header_value): whatever a provider
        # sent, or a session from before the callback refused it, stays one header.
        # Level and rule names are safe by config validation.
        encode = headers.claim_header_value
        out = {
            f"{p}Subject": encode(session.sub),
            f"{p}Acr": encode(session.acr or ""),
            f"{p}Amr": ",".join(encode(value) for value in session.amr),
            f"{p}Time": str(int(session.auth_time)),
            f"{p}Level": level.name if level is not None else "",
            f"{p}Rule": rule.name,
        }
        if session.email:
            out[f"{p}Email"] = encode(session.email)
        claims: dict[str, Any] = {
            "sub": session.sub,
            "acr": session.acr,
            "amr": list(session.amr),
            "auth_time": int(session.auth_time),
            "level": out[f"{p}Level"],
            "rule": rule.name,
        }
        if session.email:
            claims["email"] = session.email
        out[f"{p}Assertion"], reuse_until = self.signer.sign_reusable(
            claims, audience=rule.upstream, now=now
        )
        pairs = tuple(out.items())
        size = sum(HEADER_OVERHEAD_BYTES + len(name) + len(value) for name, value in pairs)
        self._assurance_headers.put(key, (reuse_until, pairs), size)
        return pairs

    def peer_trusted(self, peer: str) -> bool:
        trusted = self.config.server.trusted_proxies
        if not trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in trusted)

    # -- challenges --------------------------------------------------------------

    async def challenge(
        self,
        request: web.BaseRequest,
        decision: Challenge,
        path_qs: str,
        body: RequestBody | None,
        session: Session | None,
    ) -> web.StreamResponse:
        rule = decision.rule
        acr_values = assurance.acr_values_for(decision.required)
        log.info(
            "step_up_needed",
            rule=rule.name,
            need=decision.required.name,
            have=decision.held.name if decision.held else None,
            reason=decision.reason,
            max_age_s=decision.max_age_s,
        )
        navigation = responses.is_navigation(request.method, request.headers)
        form = is_form_post(request.method, request.headers)
        if form:
            # A form the browser sent from another site: keeping it and replaying it
            # after a silent sign-in at the provider would complete a CSRF for the
            # other site. Refused, never kept (the same check guards logout).
            refusal = same_origin_refusal(request.headers, self.public_origin())
            if refusal is not None:
                audit.info(
                    "cross_site_request_refused",
                    rule=rule.name,
                    method=request.method,
                    reason=refusal,
                )
                raise Forbidden(
                    "This form was not sent from a page of this site, so it was not kept "
                    "and nothing was sent. Open the page on this site and send it again.",
                    reason="cross_site_form",
                )
        if not navigation and not form:
            if decision.reason == "no_session":
                # With api: every scheme the client may use (RFC 9110 11.6.1, RFC 9449 7.1).
                value = (
                    self.tokens.accepted if self.tokens else responses.www_authenticate(None, None)
                )
                message = "Sign-in required"
                error = "unauthorized"
            else:
                # A one-time rule needs a new authentication: max_age=0, as the gateway
                # itself asks the provider for browsers.
                max_age_s = 0 if rule.require.once else decision.max_age_s
                value = responses.www_authenticate(decision.required, max_age_s, acr_values)
                message = responses.describe_need(decision.required, max_age_s)
                error = "insufficient_user_authentication"
            return web.Response(
                status=401,
                text=responses.json_error(error, message, request_id_of()),
                content_type="application/json",
                headers={"WWW-Authenticate": value, "Cache-Control": "no-store"},
            )
        binding: str | None = None
        values: dict[str, str | None] | None = None
        if rule.require.bind:
            assert body is not None
            fields = await body.fields(rule.require.bind)
            values = binding_values(rule.require.bind, fields)
            missing = [name for name, value in values.items() if value is None]
            if missing:
                raise BadRequest(
                    f"The request must carry exactly one value for: {', '.join(missing)}.",
                    reason="binding_field_missing",
                )
            binding = binding_digest(rule.require.bind, fields)
        kept_id: str | None = None
        return_to = path_qs
        if form:
            assert body is not None
            return_to = responses.same_origin_path(
                request.headers.get("Referer"), self.public_origin()
            )
            # Without a session, a form is kept only when its rule makes the step-up
            # about this very request (once: a new sign-in; bind: the user approves
            # its values). Otherwise the browser comes back to the form's page after
            # signing in, and nothing a stranger sends is held.
            if session is not None or rule.require.once or rule.require.bind:
                kept_id = await self.keep(request, rule, session, path_qs, body)
            else:
                log.info("request_not_kept", rule=rule.name, reason="no_session")
        try:
            return await self.start_round_trip(
                request,
                return_to=responses.safe_return_to(return_to),
                rule=rule.name,
                level=decision.required,
                max_age_s=decision.max_age_s,
                kept=kept_id,
                binding=binding,
                binding_values=values,
                fresh=rule.require.once,
            )
        except BaseException:
            if kept_id is not None:  # no round trip: nobody can resume it
                await self.aux.take_blob(f"kept:{kept_id}")
                self.kept_ledger.release(f"kept:{kept_id}")
            raise

    async def keep(
        self,
        request: web.BaseRequest,
        rule: Rule,
        session: Session | None,
        path_qs: str,
        body: RequestBody,
    ) -> str:
        """Hold the form across the step-up, within the budget; the id it is kept under.

        Counted against step_up.keep_budget (this process) and keep_per_client (this
        session, or this client address without one) before its body is read; when
        either is spent, 503 with Retry-After, and nothing is held.
        """
        step_up = self.config.step_up
        ttl_s = self.config.session.transaction_ttl_s
        kept_id = new_random()
        name = f"kept:{kept_id}"
        owner = client_key(session.id if session is not None else None, self.client_ip(request))
        # Counted at the size it says it has (a body without Content-Length: at the
        # largest one allowed) before a byte of it is read.
        declared = request.content_length
        largest = step_up.max_body_bytes
        if declared is not None and declared > largest:
            await body.read()  # 413, before anything is counted or held
        estimate = kept_size_bytes(min(largest if declared is None else declared, largest), path_qs)
        now = self.clock()
        refused = self.kept_ledger.admit(name, estimate, owner, now, ttl_s)
        if refused is not None:
            reason, retry_s = refused
            log.warning(
                "request_not_kept",
                rule=rule.name,
                reason=reason,
                held_bytes=self.kept_ledger.total_bytes,
                held=len(self.kept_ledger),
            )
            raise Busy(
                "Too many requests are waiting for a sign-in right now, so this one was "
                "not kept and nothing was sent. Try again in a little while.",
                reason=reason,
                retry_after_s=int(retry_s) + 1,
            )
        try:
            data = await body.read()
            kept = KeptRequest(
                method=request.method,
                path_qs=path_qs,
                content_type=body.content_type,
                body=data,
                session_id=session.id if session is not None else None,
                rule=rule.name,
                origin=request.headers.get("Origin"),
                fetch_site=request.headers.get("Sec-Fetch-Site"),
            )
            # The estimate was for the declared (or the largest) body: count what it is.
            self.kept_ledger.release(name)
            self.kept_ledger.admit(name, kept.size_bytes, owner, now, ttl_s)
            await self.aux.put_blob(name, kept.to_dict(), ttl_s)
        except BaseException:
            self.kept_ledger.release(name)
            raise
        audit.info("request_kept", rule=rule.name, method=request.method, bytes=len(kept.body))
        return kept_id

    async def start_round_trip(
        self,
        request: web.BaseRequest,
        *,
        return_to: str,
        rule: str | None,
        level: Level,
        max_age_s: int | None,
        kept: str | None = None,
        binding: str | None = None,
        binding_values: dict[str, str | None] | None = None,
        fresh: bool = False,
        mode: str = "redirect",
    ) -> web.StreamResponse:
        try:
            meta = await self.provider.metadata()
        except ProviderError as exc:
            self.metrics.challenges.labels("failed", level.name).inc()
            raise ProviderUnavailable(
                "The identity provider cannot be reached, so a sign-in cannot start. "
                "Try again shortly.",
                reason=exc.reason,
            ) from exc
        if not await self.provider_reachable():
            self.metrics.challenges.labels("failed", level.name).inc()
            raise ProviderUnavailable(
                "The identity provider is not answering, so a sign-in cannot start. "
                "Try again shortly.",
                reason="provider_unreachable",
            )
        now = self.clock()
        verifier, challenge = new_pkce()
        sealed_return_to = bounded_return_to(return_to)
        if sealed_return_to != return_to:
            # A longer URL would make a cookie the browser drops (RFC 6265 6.1), and
            # the sign-in could never finish; the user comes back to its path.
            log.info(
                "return_to_shortened",
                chars=len(return_to),
                kept="path" if sealed_return_to != "/" else "root",
            )
        tx = Transaction(
            state=new_random(),
            nonce=new_random(),
            code_verifier=verifier,
            return_to=sealed_return_to,
            rule=rule,
            level=level.name,
            max_age_s=max_age_s,
            created_at=now,
            mode=mode,
            kept=kept,
            binding=binding,
            fresh=fresh,
        )
        extra: dict[str, str] = {}
        if binding_values is not None:
            details_type = self.config.step_up.authorization_details_type
            extra["authorization_details"] = json.dumps(
                authorization_details(details_type, binding_values), separators=(",", ":")
            )
            extra["binding_message"] = binding_message(binding_values)
        url = authorization_url(
            meta,
            self.config.oidc,
            redirect_uri=self.redirect_uri,
            state=tx.state,
            nonce=tx.nonce,
            code_challenge=challenge,
            acr_values=assurance.acr_values_for(level),
            max_age_s=tx.requested_max_age_s,
            extra=extra or None,
        )
        response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
        ttl_s = self.config.session.transaction_ttl_s
        tx_name = tx_cookie_name(self.tx_base, tx.state, self.secure)
        tx_value = self.tx_codec.seal(tx)
        stale = tx_cookies_to_drop(
            request.cookies,
            self.tx_codec,
            base=self.tx_base,
            secure=self.secure,
            now=now,
            ttl_s=ttl_s,
            max_in_flight=MAX_TRANSACTIONS_IN_FLIGHT,
            new_bytes=cookie_pair_bytes(tx_name, tx_value),
        )
        for name in stale:
            response.del_cookie(name, **delete_cookie_kwargs(self.secure))
        put_tx = getattr(self.store, "put_tx", None)
        if put_tx is not None:
            # Server-side too: the callback may land on any worker or replica, and a
            # replayed callback finds nothing (taken once, below).
            await put_tx(tx, ttl_s)
        response.set_cookie(tx_name, tx_value, **set_cookie_kwargs(self.secure, ttl_s))
        self.metrics.challenges.labels("issued", level.name).inc()
        audit.info(
            "step_up_challenge",
            rule=rule,
            need=level.name,
            max_age_s=max_age_s,
            bound=binding is not None,
            kept=kept is not None,
            once=fresh,
        )
        return response

    async def provider_reachable(self) -> bool:
        """Whether the provider answers now (cached briefly), before sending a browser there.

        Metadata and keys come from the cache, so a provider outage would otherwise
        show up as a browser error page at the provider's address instead of a clear
        503 here. Checked at most every PROVIDER_PROBE_TTL_S while it answers.
        """
        now = self.clock()
        if now < self._provider_ok_until:
            return True
        assert self._http is not None
        url = f"{self.config.oidc.issuer.rstrip('/')}/.well-known/openid-configuration"
        try:
            async with self._http.get(
                url,
                timeout=aiohttp.ClientTimeout(total=PROVIDER_PROBE_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                ok = resp.status < 500
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            self._provider_ok_until = now + PROVIDER_PROBE_TTL_S
        else:
            self.metrics.provider_errors.labels("probe_unreachable").inc()
        return ok

    # -- internal endpoints ------------------------------------------------------

    async def internal(self, request: web.BaseRequest, sub_path: str) -> web.StreamResponse:
        handler = self._internal.get(sub_path)
        if handler is None:
            raise NotFound("No such gateway endpoint", reason="unknown_internal_path")
        response: web.StreamResponse = await handler(request)
        return response

    async def callback(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("The callback takes GET", reason="callback_method")
        params = request.query
        state = params.get("state", "")
        now = self.clock()
        cookie = tx_cookie_name(self.tx_base, state, self.secure) if state else ""
        tx = (
            self.tx_codec.open(
                request.cookies.get(cookie, ""), state, now, self.config.session.transaction_ttl_s
            )
            if state
            else None
        )
        take_tx = getattr(self.store, "take_tx", None)
        if tx is not None and take_tx is not None and await take_tx(state) is None:
            tx = None  # already used: a replayed callback
        if tx is None:
            self.metrics.challenges.labels("failed", "").inc()
            audit.info("step_up_failure", reason="unknown_transaction")
            return self.page_response(
                request,
                400,
                "Sign-in expired",
                [
                    "This sign-in link is unknown or has expired. Nothing was changed.",
                    "Go back to the page you were on and try again.",
                ],
                error="unknown_transaction",
            )
        level = self.config.assurance.level(tx.level) if tx.level else None
        level_name = level.name if level else ""

        def finish(response: web.StreamResponse) -> web.StreamResponse:
            response.del_cookie(cookie, **delete_cookie_kwargs(self.secure))
            response.headers["Cache-Control"] = "no-store"
            return response

        try:
            meta = await self.provider.metadata()
        except ProviderError as exc:
            self.metrics.challenges.labels("failed", level_name).inc()
            raise ProviderError(
                "The identity provider cannot be reached.", reason=exc.reason
            ) from exc
        try:
            answer = parse_callback(meta, params)
        except BadRequest as exc:
            return finish(self.step_up_failed(request, tx, level_name, exc.reason))
        if answer.error is not None:
            known = answer.error if answer.error in PROVIDER_ERROR_TEXT else "other"
            self.metrics.provider_errors.labels(f"callback_{known}").inc()
            text = PROVIDER_ERROR_TEXT.get(
                answer.error, "The identity provider refused the sign-in."
            )
            status = 403 if known in ("access_denied", "unmet_authentication_requirements") else 502
            return finish(
                self.step_up_failed(
                    request, tx, level_name, f"provider_{known}", status=status, text=text
                )
            )
        assert answer.code is not None  # parse_callback guarantees code when no error
        try:
            tokens = await self.provider.exchange_code(
                code=answer.code, redirect_uri=self.redirect_uri, code_verifier=tx.code_verifier
            )
            id_token = tokens.get("id_token")
            if not isinstance(id_token, str):
                raise ProviderError("no id_token in the token response", reason="no_id_token")
            claims = await self.provider.verify(
                id_token,
                nonce=tx.nonce,
                now=now,
                require_auth_time=tx.requested_max_age_s is not None,
            )
        except IdTokenError as exc:
            text = "The sign-in answer could not be verified."
            if exc.reason == "claim_value":
                log.warning("id_token_claim_refused", claim=exc.claim)
                text = (
                    "The sign-in answer could not be verified: the identity provider sent "
                    "a user identifier, email address or sign-in method that the gateway "
                    "cannot pass on (control characters, or too long)."
                )
            reason = f"id_token_{exc.reason}"
            return finish(self.step_up_failed(request, tx, level_name, reason, text=text))
        except ProviderError as exc:
            if exc.reason == "invalid_grant":
                # A code used twice (back button, reload) or bound to another
                # transaction's PKCE verifier: the user's doing, not an outage.
                return finish(self.step_up_failed(request, tx, level_name, "invalid_grant"))
            self.metrics.challenges.labels("failed", level_name).inc()
            audit.info("step_up_failure", rule=tx.rule, need=level_name, reason=exc.reason)
            raise

        if claims.auth_time is None:
            log.info("auth_time_missing", fallback="iat", iss=claims.iss)
        stated = claims.auth_time if claims.auth_time is not None else claims.iat
        # The skew was allowed for by the token checks; from here on the proof is
        # dated no later than its arrival, and max_age is compared without leeway.
        auth_time = assurance.proven_at(float(stated), now)
        if tx.requested_max_age_s == 0 and stated < math.floor(tx.created_at):
            # max_age=0 (a one-time rule, or a challenge asking for it) wants a new
            # authentication, after this request. auth_time has whole seconds, hence
            # the floor; no leeway beyond it, or an earlier sign-in would pass as new.
            log.info(
                "not_reauthenticated",
                auth_time=stated,
                requested_at=round(tx.created_at, 3),
            )
            return finish(
                self.step_up_failed(
                    request,
                    tx,
                    level_name,
                    "not_reauthenticated",
                    status=403,
                    text="The identity provider did not ask you to sign in again, and this "
                    "action needs a new sign-in each time.",
                )
            )
        approved: str | None = None
        if tx.binding is not None:
            approved = self.check_binding(tx, id_token)
            if approved is None:
                return finish(
                    self.step_up_failed(
                        request,
                        tx,
                        level_name,
                        "binding_mismatch",
                        status=403,
                        text="What the identity provider approved differs from this request.",
                    )
                )
        # Named by this step-up, so a one-time rule consumes this proof and no other.
        proof = Proof(acr=claims.acr, amr=claims.amr, auth_time=auth_time, id=new_proof_id())
        # The session keeps only an address the provider vouched for, so X-Auth-Email
        # and the assertion's email are never one the user merely typed.
        email = verified_email(claims, assume_verified=self.config.oidc.assume_email_verified)
        if claims.email is not None and email is None:
            log.info("email_not_forwarded", email_verified=claims.email_verified)
        previous_cookie = cookie_value(request, self.session_cookie)
        previous = await self.load_session(request)
        if previous is not None and previous.sub != claims.sub:
            # A different person signed in at the provider: never merge proofs across
            # subjects; start a new session for the new subject.
            log.info("session_subject_changed")
            previous = None
        client_ip = self.client_ip(request)
        # The same subject steps up in place; anyone else starts a new session.
        record: Callable[..., Session] = (
            previous.with_proof if previous is not None else Session.start
        )
        session = record(
            proof,
            sub=claims.sub,
            email=email,
            name=claims.name,
            provider_sid=claims.sid,
            id_token=id_token,
            now=now,
            ip=client_ip,
            binding=approved,
        )
        value = await self.store.save(
            session, now, rotate=True, previous=previous_cookie if previous else None
        )
        proven = assurance.level_of(self.config.assurance.levels, claims.acr, claims.amr)
        # Did the provider honour max_age? Measured now, with no leeway, as every later
        # request will be: a proof that passes here but is stale on the way back would
        # send the browser round again. max_age 0 was checked above, against the request.
        max_age_s = tx.max_age_s or None
        if level is not None and not assurance.satisfies(
            self.config.assurance.levels, [proof], level, max_age_s, now
        ):
            too_old = assurance.satisfies(self.config.assurance.levels, [proof], level, None, now)
            self.metrics.challenges.labels("failed", level_name).inc()
            audit.info(
                "step_up_failure",
                rule=tx.rule,
                need=level_name,
                got=proven.name if proven else None,
                acr=claims.acr,
                amr=list(claims.amr),
                sub=claims.sub,
                reason="too_old" if too_old else "too_weak",
                age_s=round(now - auth_time, 3),
            )
            paragraphs = [
                f"This action needs the level '{level_name}'"
                + (
                    f" proven within {responses.format_duration(tx.max_age_s)}"
                    if tx.max_age_s is not None
                    else ""
                )
                + ".",
                "The identity provider signed you in with "
                + (f"the level '{proven.name}'" if proven else "no recognised level")
                + f" (acr {claims.acr or 'none'}, amr {', '.join(claims.amr) or 'none'}).",
                "You are still signed in as before. Use a stronger method, such as a "
                "passkey or security key, and try again.",
            ]
            response = self.page_response(
                request,
                403,
                "A stronger sign-in is needed",
                paragraphs,
                error="insufficient_user_authentication",
                raw_html=self.popup_script(tx, ok=False),
            )
            response.set_cookie(self.session_cookie, value, **self.session_cookie_kwargs())
            return finish(response)
        self.metrics.challenges.labels("completed", level_name).inc()
        audit.info(
            "step_up_success",
            rule=tx.rule,
            need=level_name,
            level=proven.name if proven else None,
            acr=claims.acr,
            amr=list(claims.amr),
            sub=claims.sub,
            bound=approved is not None,
        )
        location = responses.safe_return_to(tx.return_to)
        if tx.kept is not None:
            location = await self.rekeep(tx.kept, session)
        if tx.mode == "popup":
            response = web.Response(
                text=popup_page(
                    self.public_origin(), True, {"level": proven.name if proven else None}
                ),
                content_type="text/html",
            )
        else:
            response = web.Response(status=303, headers={"Location": location})
        response.set_cookie(self.session_cookie, value, **self.session_cookie_kwargs())
        return finish(response)

    def check_binding(self, tx: Transaction, id_token: str) -> str | None:
        """The approved binding digest, or None when the provider approved something else.

        The gateway's own record (the digest in the transaction) is what counts; when
        the provider echoes ``authorization_details`` in the ID token it must agree.
        """
        rule = next((r for r in self.rules.rules if r.name == tx.rule), None)
        if rule is None or not rule.require.bind:
            return None
        claims = jwt.decode(id_token, options={"verify_signature": False})  # verified above
        echoed = echoed_binding(claims, rule.require.bind)
        if echoed is False:
            log.info("binding_not_echoed", rule=rule.name)
            return tx.binding
        return tx.binding if echoed == tx.binding else None

    async def rekeep(self, kept_id: str, session: Session) -> str:
        """Bind the kept request to the session that just stepped up; where to resume it."""
        data = await self.aux.take_blob(f"kept:{kept_id}")
        self.kept_ledger.release(f"kept:{kept_id}")
        kept = KeptRequest.from_dict(data)
        if kept is None or kept.session_id not in (None, session.id):
            return f"{self.prefix}/resume?r=expired"
        new_id = new_random()
        bound = kept.with_session(session.id)
        ttl_s = self.config.session.transaction_ttl_s
        owner = client_key(session.id, None)
        if self.kept_ledger.admit(f"kept:{new_id}", bound.size_bytes, owner, self.clock(), ttl_s):
            log.warning("request_not_kept", rule=kept.rule, reason="keep_per_client")
            return f"{self.prefix}/resume?r=expired"
        await self.aux.put_blob(f"kept:{new_id}", bound.to_dict(), ttl_s)
        return f"{self.prefix}/resume?r={new_id}"

    def popup_script(self, tx: Transaction, *, ok: bool) -> str:
        if tx.mode != "popup":
            return ""
        page = popup_page(self.public_origin(), ok, {"level": None})
        return page[page.index("<script>") : page.index("</script>") + len("</script>")]

    async def resume(self, request: web.BaseRequest) -> web.StreamResponse:
        """Replay a request kept across a step-up: once, for the session it belongs to."""
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("Resume takes GET", reason="resume_method")
        kept_id = request.query.get("r", "")
        data = await self.aux.take_blob(f"kept:{kept_id}") if kept_id else None
        self.kept_ledger.release(f"kept:{kept_id}")
        kept = KeptRequest.from_dict(data)
        if kept is None:
            audit.info("kept_request_gone")
            raise Gone(
                "This action was already sent, or waited too long. It was not sent again; "
                "check the result in the application before trying again.",
                reason="kept_request_gone",
            )
        session = await self.load_session(request)
        if session is None or kept.session_id != session.id:
            audit.info("kept_request_refused", reason="other_session")
            raise Forbidden("This action belongs to another sign-in.", reason="kept_other_session")
        now = self.clock()
        config = self.config
        path = kept.path_qs.partition("?")[0]
        host = self.judged_host(request, self.rules)
        body = KeptBody(kept)
        rule = await self.choose_rule(
            request, self.rules, host, path, session, body, now, method=kept.method
        )
        binding = None
        if rule is not None and rule.require.bind:
            bound = await body.fields(rule.require.bind)
            binding = binding_digest(rule.require.bind, bound)
        decision = decide(rule, session, config.assurance, now, binding=binding)
        if isinstance(decision, Allow) and rule is not None and rule.require.once:
            decision = await self.consume_proof(decision, session, now)
        self.metrics.requests.labels(
            rule.name if rule else "", DECISION_LABEL[type(decision)]
        ).inc()
        if not isinstance(decision, Allow):
            # Never another round trip from here: that is how loops start.
            audit.info("kept_request_refused", reason=getattr(decision, "reason", "deny"))
            raise Forbidden(
                "The sign-in did not allow this action, so it was not sent.",
                reason="kept_not_allowed",
            )
        audit.info("kept_request_replayed", rule=decision.rule.name, method=kept.method)
        return await self.forward(
            request, decision, session, kept.path_qs, request_id_of(), kept=kept
        )

    def step_up_failed(
        self,
        request: web.BaseRequest,
        tx: Transaction,
        level_name: str,
        reason: str,
        *,
        status: int = 400,
        text: str = "The sign-in answer could not be verified.",
    ) -> web.StreamResponse:
        self.metrics.challenges.labels("failed", level_name).inc()
        audit.info("step_up_failure", rule=tx.rule, need=level_name, reason=reason)
        signed_in = bool(cookie_value(request, self.session_cookie))
        too_weak = reason == "provider_unmet_authentication_requirements"
        title = "A stronger sign-in is needed" if too_weak else "Sign-in did not complete"
        paragraphs = [text]
        if too_weak and level_name:
            paragraphs.append(f"This action needs the level '{level_name}'.")
        paragraphs.append(
            "You are still signed in as before; nothing was changed."
            if signed_in
            else "You are not signed in; nothing was changed."
        )
        return self.page_response(
            request,
            status,
            title,
            paragraphs,
            error=reason,
            raw_html=f'<p><a href="{html.escape(tx.return_to, quote=True)}">Go back</a> · '
            '<a href="/">Home</a></p>',
        )

    async def step_up(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("The step-up endpoint takes GET", reason="step_up_method")
        if "level" in request.query:
            level = self.config.assurance.level(request.query["level"])
        else:
            # The acr_values of an RFC 9470 challenge, as a script received them.
            levels = self.config.assurance.levels
            level = level_for_acr_values(levels, request.query.get("acr_values", ""))
        if level is None:
            known = ", ".join(lv.name for lv in self.config.assurance.levels)
            raise BadRequest(f"Unknown level (known: {known})", reason="step_up_level")
        max_age_raw = request.query.get("max_age")
        max_age_s: int | None = None
        if max_age_raw is not None:
            if not max_age_raw.isdigit() or len(max_age_raw) > 9:
                raise BadRequest("max_age must be a number of seconds", reason="step_up_max_age")
            max_age_s = int(max_age_raw)
        mode = request.query.get("mode", "redirect")
        if mode not in ("redirect", "popup"):
            raise BadRequest("mode must be redirect or popup", reason="step_up_mode")
        return await self.start_round_trip(
            request,
            return_to=responses.safe_return_to(request.query.get("rd")),
            rule=None,
            level=level,
            max_age_s=max_age_s,
            mode=mode,
        )

    async def backchannel_logout(self, request: web.BaseRequest) -> web.StreamResponse:
        """OpenID Connect Back-Channel Logout 1.0: the provider ends sessions here.

        Answers per section 2.8: 200 on success, 400 with a JSON error otherwise,
        never cached. Every session of the token's ``sid`` or ``sub`` is deleted
        from the (server-side) store, so every worker and replica sees it.
        """
        no_store = {"Cache-Control": "no-store"}
        if request.method != "POST":
            raise MethodNotAllowed("Back-channel logout takes POST", reason="bcl_method")
        delete_by = getattr(self.store, "delete_by", None)
        session_cfg = self.config.session
        if delete_by is None and session_cfg.redis_url is None and self.config.server.workers > 1:
            # Cookie sessions are refused by revocation records; kept in one worker's
            # memory they would hold in that worker only. Say so rather than 200.
            return web.json_response(
                {
                    "error": "not_supported",
                    "error_description": "back-channel logout with the cookie store and "
                    "several workers needs session.redis_url",
                },
                status=501,
                headers=no_store,
            )
        if (request.content_length or 0) > MAX_LOGOUT_REQUEST_BYTES:
            raise BadRequest("The logout request is too large.", reason="bcl_too_large")
        form = await request.post()
        token = form.get("logout_token")
        if not isinstance(token, str):
            return web.json_response(
                {"error": "invalid_request", "error_description": "logout_token is missing"},
                status=400,
                headers=no_store,
            )
        now = self.clock()
        try:
            claims = await self.provider.verify_logout(token, now=now)
            first_use = await self.aux.claim_once(
                f"jti:{claims.jti}", LOGOUT_TOKEN_MAX_AGE_S + 2 * self.config.oidc.clock_skew_s
            )
        except IdTokenError as exc:
            audit.info("backchannel_logout_refused", reason=exc.reason)
            return web.json_response(
                {"error": "invalid_request", "error_description": f"logout_token: {exc.reason}"},
                status=400,
                headers=no_store,
            )
        if not first_use:
            audit.info("backchannel_logout_refused", reason="jti_replayed")
            return web.json_response(
                {"error": "invalid_request", "error_description": "logout_token replayed"},
                status=400,
                headers=no_store,
            )
        if delete_by is not None:
            deleted = await delete_by(sub=claims.sub, provider_sid=claims.sid)
        else:
            await self.revoke(sub=claims.sub, provider_sid=claims.sid)
            deleted = None  # cookie sessions: unknown; every one of them is refused now
        audit.info(
            "backchannel_logout",
            sub=claims.sub,
            sid_given=claims.sid is not None,
            sessions_deleted=deleted,
        )
        return web.Response(status=200, headers=no_store)

    async def logout(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method in ("GET", "HEAD"):
            form = (
                f'<form method="post" action="{self.prefix}/logout">'
                '<button type="submit">Sign out</button></form>'
            )
            return self.page_response(
                request, 200, "Sign out", ["Sign out of this site?"], raw_html=form, force_html=True
            )
        if request.method != "POST":
            raise MethodNotAllowed("Logout takes GET or POST", reason="logout_method")
        # Only the confirm page above (or another page of this site) may sign out:
        # Origin "null" (a sandboxed frame, a redirect from elsewhere) is another site.
        refusal = same_origin_refusal(request.headers, self.public_origin())
        if refusal is not None:
            audit.info("cross_site_request_refused", rule=None, method="POST", reason=refusal)
            raise Forbidden(
                "Sign-out was not asked for by a page of this site; you are still signed in. "
                f"To sign out, open {self.prefix}/logout on this site.",
                reason="logout_origin",
            )
        session = await self.load_session(request)
        value = cookie_value(request, self.session_cookie)
        if value:
            await self.store.delete(value)
        if session is not None and isinstance(self.store, CookieStore):
            await self.revoke(session=session)
        location = f"{self.config.server.public_url}{self.prefix}/logged-out"
        try:
            meta = await self.provider.metadata()
        except ProviderError:
            meta = None  # sign out here anyway; the provider session stays
        if meta is not None:
            location = (
                end_session_url(
                    meta,
                    client_id=self.config.oidc.client_id,
                    id_token_hint=session.id_token if session is not None else None,
                    post_logout_redirect_uri=location,
                )
                or location
            )
        audit.info("logout", sub=session.sub if session else None)
        response = web.Response(
            status=303, headers={"Location": location, "Cache-Control": "no-store"}
        )
        response.del_cookie(self.session_cookie, **delete_cookie_kwargs(self.secure))
        return response

    async def logged_out(self, request: web.BaseRequest) -> web.StreamResponse:
        return self.page_response(
            request,
            200,
            "Signed out",
            ["You are signed out."],
            raw_html='<p><a href="/">Sign in again</a></p>',
            force_html=True,
        )

    async def healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.draining:
            # Load balancers that probe take the process out before its listener
            # closes (Kubernetes also removes a terminating pod on its own).
            self.metrics.ready.set(0)
            return web.json_response({"ready": False, "draining": True}, status=503)
        provider_ready = self.provider.ready
        if not provider_ready:
            try:
                await self.provider.load()
                provider_ready = self.provider.ready
            except ProviderError:
                provider_ready = False
        try:
            store_ready = await self.store.ping()
        except (StoreUnavailable, OSError, ConnectionError):
            store_ready = False
        ready = provider_ready and store_ready
        self.metrics.ready.set(1 if ready else 0)
        return web.json_response(
            {"ready": ready, "provider": provider_ready, "store": store_ready},
            status=200 if ready else 503,
        )

    async def metrics_endpoint(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.config.server.metrics_listen is not None:
            raise NotFound("Metrics are served on the metrics listener", reason="metrics_moved")
        return self.metrics_response()

    def metrics_response(self) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def jwks(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response(self.signer.jwks(), headers={"Cache-Control": "max-age=300"})

    # -- responses ---------------------------------------------------------------

    def public_origin(self) -> str:
        parts = urlsplit(self.config.server.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    def session_cookie_kwargs(self) -> SetCookieKwargs:
        # The cookie outlives neither the absolute lifetime nor the idle timeout's
        # enforcement, which lives inside the sealed payload (or the store).
        return set_cookie_kwargs(self.secure, self.config.session.lifetime_s)

    def session_set_cookie(self, value: str) -> str:
        morsel = web.Response()
        morsel.set_cookie(self.session_cookie, value, **self.session_cookie_kwargs())
        return morsel.cookies[self.session_cookie].OutputString()

    def deny(self, request: web.BaseRequest, decision: Deny) -> web.StreamResponse:
        log.info("request_denied", reason=decision.reason)
        return self.page_response(
            request,
            decision.status,
            "Access denied",
            ["No rule allows this request."],
            error=decision.reason,
        )

    def error_response(self, request: web.BaseRequest, exc: GatewayError) -> web.StreamResponse:
        log_fn = log.warning if exc.status >= 500 else log.info
        log_fn("request_refused", status=exc.status, reason=exc.reason)
        if isinstance(exc, Unauthorized):  # an API client: JSON and the challenge it acts on
            unauthorized = web.Response(
                status=exc.status,
                text=responses.json_error(exc.error, exc.message, request_id_of()),
                content_type="application/json",
                headers={"WWW-Authenticate": exc.challenge, "Cache-Control": "no-store"},
            )
            if exc.dpop_nonce is not None:
                unauthorized.headers["DPoP-Nonce"] = exc.dpop_nonce
            return unauthorized
        response = self.page_response(
            request, exc.status, exc.title, [exc.message], error=exc.reason
        )
        if isinstance(exc, StoreBusy):
            self.metrics.store_busy.inc()
        if isinstance(exc, Busy | StoreBusy):
            response.headers["Retry-After"] = str(exc.retry_after_s)  # RFC 9110 10.2.3
        return response

    def page_response(
        self,
        request: web.BaseRequest,
        status: int,
        title: str,
        paragraphs: list[str],
        *,
        error: str = "error",
        raw_html: str = "",
        force_html: bool = False,
    ) -> web.Response:
        if force_html or responses.wants_html(request.headers):
            return web.Response(
                status=status,
                text=responses.page(title, paragraphs, raw_html=raw_html),
                content_type="text/html",
                headers={"Cache-Control": "no-store"},
            )
        return web.Response(
            status=status,
            text=responses.json_error(error, " ".join(paragraphs), request_id_of()),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )


DECISION_LABEL: dict[type, str] = {Allow: "allow", Challenge: "challenge", Deny: "deny"}


def cookie_value(request: web.BaseRequest, name: str) -> str | None:
    """Cookie ``name`` (the last one, as ``request.cookies`` gives it), without parsing
    every cookie in the header: this runs on every request."""
    prefix = name + "="
    found = None
    for header in request.headers.getall("Cookie", ()):
        if prefix in header:
            for pair in header.split(";"):
                pair = pair.strip(" \t")
                if pair.startswith(prefix):
                    found = pair[len(prefix) :]
    return found


def request_id_of() -> str:
    return logs.request_id()


def new_request_id() -> str:
    """16 hex digits for a request that brought no id of its own.

    An id only correlates log lines and answers: it needs to be unique, not
    secret, so it comes from ``random`` (reseeded in every forked worker), not
    from the operating system's generator, which costs a system call each.
    """
    return f"{random.getrandbits(64):016x}"


def is_websocket(request: web.BaseRequest) -> bool:
    return headers.is_websocket_upgrade(request.headers.items())


class _RequestHandler(GuardedHandler):
    """The connection handler (limits and timeouts: :mod:`gateway.connections`), with
    aiohttp's error answers replaced by ours.

    aiohttp answers requests its HTTP parser refuses (bad method, smuggling shapes,
    malformed headers) itself, with a text body that echoes the offending bytes —
    which may hold a cookie or token — and a traceback in the log. Here they get a
    short JSON or HTML answer, a structured log line and a metric instead.
    """

    gateway: Gateway

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        logs.bind_request_id(new_request_id())
        error: GatewayError
        if isinstance(exc, BadHttpMethod):
            # RFC 9110 9.1: methods are case-sensitive; `post` is not POST.
            error = MethodNotAllowed("This method is not allowed here.", reason="unknown_method")
        elif isinstance(exc, LineTooLong):
            error = HeadersTooLarge(
                "A request header is too large (often: too many cookies for this site). "
                "Remove this site's cookies in the browser and try again.",
                reason="header_too_large",
            )
        elif status >= 500:
            log.error("internal_error", error=type(exc).__name__ if exc else None, exc_info=exc)
            error = GatewayError("Something went wrong in the gateway.", reason="internal_error")
        else:
            error = BadRequest("The request is malformed.", reason="malformed_request")
        self.gateway.metrics.rejected.labels(error.reason).inc()
        response = self.gateway.error_response(request, error)
        response.force_close()
        return response


class HeadersTooLarge(GatewayError):
    status = 431  # RFC 6585 5
    title = "Request headers too large"


class _Server(GuardedServer):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__(
            gateway.handle,
            gateway.connection_policy,
            on_close=gateway.connection_closed,
            on_timeout=gateway.client_timed_out,
            handler_cancellation=True,
            max_field_size=MAX_HEADER_FIELD_BYTES,
        )
        self._gateway = gateway
        gateway.server = self

    def __call__(self) -> RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self.handler_kwargs())
        handler.gateway = self._gateway
        return handler


def make_server(gateway: Gateway) -> GuardedServer:
    """The low-level aiohttp server: one handler, no router, no middleware chain."""
    return _Server(gateway)
