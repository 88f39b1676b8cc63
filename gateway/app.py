"""aiohttp wiring: one request, top to bottom.

    normalise -> internal endpoint? -> match rule -> load session -> decide
              -> forward | challenge | deny

This module is the only place where errors become responses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from gateway import assurance, headers, logs, responses
from gateway.assertion import AssertionKeyError, AssertionSigner, load_or_generate_key
from gateway.body import RequestBody
from gateway.conditions import (
    binding_digest,
    binding_values,
)
from gateway.decision import (
    DECISION_LABEL,
    SITE_PATH_METHODS,
    Allow,
    Challenge,
    Deny,
    RequestFacts,
    decide_plain,
    decide_request,
)
from gateway.endpoints import ROUTES, site_routes
from gateway.errors import (
    BadRequest,
    Busy,
    ConfigError,
    ConfigProblem,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    PayloadTooLarge,
    ProviderError,
    ProviderUnavailable,
    StoreUnavailable,
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
    authorization_url,
    new_pkce,
)
from gateway.oidc.flow import random_token as new_random
from gateway.oidc.provider import ProviderClient
from gateway.paths import canonical_host, normalize_path, split_request_target
from gateway.proxy import UpstreamIntercepted, Upstreams
from gateway.reload import restart_needed
from gateway.risk import RiskClient, RiskFacts, RiskOutcome
from gateway.rules import RuleSet
from gateway.session.aux import AuxStore, LocalAux
from gateway.session.cookies import (
    SetCookieKwargs,
    cookie_name,
    delete_cookie_kwargs,
    set_cookie_kwargs,
)
from gateway.session.factory import make_store
from gateway.session.model import Session
from gateway.session.redis_store import RedisStore, eviction_problem
from gateway.session.stores import CookieStore, SessionStore
from gateway.session.transaction import (
    Transaction,
    TransactionCodec,
    bounded_return_to,
    cookie_pair_bytes,
    tx_cookie_name,
    tx_cookies_to_drop,
)
from gateway.transactional import (
    KeptLedger,
    KeptRequest,
    authorization_details,
    binding_message,
    client_key,
    is_form_post,
    kept_size_bytes,
    level_for_acr_values,
    max_age_of,
    parse_bearer_challenge,
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
# One header field, at most. aiohttp's default, like nginx's and Apache's, is 8 KB; the
# gateway's own cookies stay under that (session <= ~3.9 KB, sign-ins in flight <= 3 KB),
# and twice as much leaves the application's cookies room, so /healthz and /callback
# still answer when a Cookie header has grown past 8 KB. Upstreams never get the
# gateway's cookies, so they see a shorter header than this.
MAX_HEADER_FIELD_BYTES = 16 * 1024
# Replicas' clocks differ a little; a revocation outlives the session by this much.
REVOCATION_MARGIN_S = 60
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _RequestReader:
    """:class:`gateway.decision.RequestReader` for a live request: read on demand, once."""

    __slots__ = ("_body", "_client_ip", "_gateway", "_request")

    def __init__(self, gateway: Gateway, request: web.BaseRequest, body: RequestBody) -> None:
        self._gateway = gateway
        self._request = request
        self._body = body
        self._client_ip: tuple[str | None] | None = None

    async def fields(self) -> dict[str, object]:
        return await self._body.fields()

    def client_ip(self) -> str | None:
        if self._client_ip is None:
            self._client_ip = (self._gateway.client_ip(self._request),)
        return self._client_ip[0]


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
        self._aux_redis: RedisStore | None = None

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
        self.site_routes = site_routes(config.rules)
        # Probes hit these every few seconds; an access-log line each would drown the rest.
        self.quiet_paths = frozenset({f"{self.prefix}/healthz", f"{self.prefix}/readyz"})

    def _make_upstreams(self, config: Config) -> Upstreams:
        return Upstreams(
            config.upstreams,
            connect_timeout_s=config.server.upstream_connect_timeout_s,
            timeout_s=config.server.upstream_timeout_s,
            gateway_cookies=self.gateway_cookies,
            gateway_cookie_prefixes=self.gateway_cookie_prefixes,
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
            elif path in self.site_routes and request.method in SITE_PATH_METHODS:
                response = await self.site_routes[path](self, request)
            else:
                rule_name, response = await self.proxied(request, path, query, request_id)
        except GatewayError as exc:
            if isinstance(exc, BadRequest | MethodNotAllowed):
                self.metrics.rejected.labels(exc.reason).inc()
            response = self.error_response(request, exc)
            if isinstance(exc, headers.FramingError):
                response.force_close()  # the connection's framing can't be trusted
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
        """A request for the upstreams: decide, then forward | challenge | deny.

        Returns (the name of the rule that decided, the response).
        """
        rules, config = self.rules, self.config  # one consistent view across a reload
        rules.require_known_method(request.method)
        host = self.judged_host(request, rules)
        store_down: StoreUnavailable | None = None
        try:
            session = await self.load_session(request)
        except StoreUnavailable as exc:
            session, store_down = None, exc  # decided below: fatal only if a session is needed
        now = self.clock()
        body = RequestBody(request, config.step_up.max_body_bytes)
        rule = rules.match(request.method, host, path)
        decision = decide_plain(rule, session, config.assurance, now, session_error=store_down)
        if decision is None:
            facts = RequestFacts(
                request.method, host, path, session, _RequestReader(self, request, body)
            )
            decision = await decide_request(
                facts,
                rules,
                config.assurance,
                now,
                risk=self.ask_risk_engine,
                claim_once=self.claim_once,
                session_error=store_down,
            )
        rule_name = decision.rule.name if decision.rule is not None else None
        self.metrics.requests.labels(rule_name or "", DECISION_LABEL[type(decision)]).inc()
        path_qs = path if query is None else f"{path}?{query}"
        if isinstance(decision, Allow):
            return rule_name, await self.forward(
                request, decision, session, path_qs, request_id, body=body
            )
        if isinstance(decision, Challenge):
            return rule_name, await self.challenge(request, decision, path_qs, body, session)
        return rule_name, self.deny(request, decision)

    async def ask_risk_engine(
        self, rule: Rule, facts: RiskFacts, session_id: str | None, now: float
    ) -> RiskOutcome:
        """:class:`gateway.decision.RiskEngine`: the engine's answer, audited."""
        outcome = await self.risk.assess(
            rule, facts, assurance=self.config.assurance, session_id=session_id, now=now
        )
        audit.info(
            "risk_assessed",
            rule=rule.name,
            decision=outcome.decision,
            level=outcome.level,
            reason=outcome.reason,
        )
        return outcome

    async def claim_once(self, name: str, *, rule: str, sub: str) -> bool:
        """:class:`gateway.decision.ClaimOnce`: spend a one-time rule's proof, atomically."""
        if await self.aux.claim_once(name, self.config.session.lifetime_s):
            audit.info("proof_consumed", rule=rule, sub=sub)
            return True
        return False

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

    def session_cookie_value(self, request: web.BaseRequest) -> str | None:
        return cookie_value(request, self.session_cookie)

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
    ) -> web.StreamResponse:
        """Send the request (or a ``kept`` one, replayed) upstream with assurance headers."""
        rule = decision.rule
        websocket = is_websocket(request)
        upstream_headers = self.upstream_request_headers(request, rule, request_id, websocket)
        if session is not None:
            # update() replaces: none of these came from the client (prefix stripped).
            upstream_headers.update(self.assurance_headers(session, decision.level, rule))
        refreshed: str | None = None
        now = self.clock()
        if session is not None and session.touch_due(now):
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
            # Only browsers are stepped up for the upstream; API clients get its
            # challenge unchanged, even when a rule had to read their body.
            if rule.upstream_challenge and (
                (form and data is not None)
                or responses.is_navigation(request.method, request.headers)
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
                value = responses.www_authenticate(None, None)
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
            fields = await body.fields()
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
        handler = ROUTES.get(sub_path)
        if handler is None:
            raise NotFound("No such gateway endpoint", reason="unknown_internal_path")
        return await handler(self, request)

    def metrics_response(self) -> web.Response:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

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
        response = self.page_response(
            request, exc.status, exc.title, [exc.message], error=exc.reason
        )
        if isinstance(exc, Busy):
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


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, with its error answers replaced by ours.

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


class _Server(web.Server):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__(
            gateway.handle, handler_cancellation=True, max_field_size=MAX_HEADER_FIELD_BYTES
        )
        self._gateway = gateway

    def __call__(self) -> RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self._kwargs)
        handler.gateway = self._gateway
        return handler


def make_server(gateway: Gateway) -> web.Server:
    """The low-level aiohttp server: one handler, no router, no middleware chain."""
    return _Server(gateway)
