"""aiohttp wiring: one request, top to bottom, and the gateway's lifecycle.

    normalise -> own endpoint? (gateway.endpoints) -> load session
              -> decide (gateway.decision)
              -> forward (gateway.forward) | challenge (gateway.challenge) | deny

:class:`Gateway` holds the configuration and the shared clients (store, provider,
upstream pools), applies a reload, and is the :class:`gateway.context.Context`
the steps after the decision use. This module is the only place where errors
become responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import headers, logs, responses, tracing
from gateway.assertion import AssertionKeyError, AssertionSigner, load_or_generate_key
from gateway.body import LiveReader, RequestBody, cookie_value
from gateway.challenge import ProviderProbe, challenge
from gateway.connections import GuardedHandler, GuardedServer
from gateway.context import decided
from gateway.decision import (
    SITE_PATH_METHODS,
    Allow,
    Challenge,
    Decision,
    Deny,
    RequestFacts,
    decide_plain,
    decide_request,
    judged_session,
)
from gateway.decision_memo import Prepared, RememberedDecisions
from gateway.early_forward import handover_for
from gateway.endpoints import route, site_routes
from gateway.errors import (
    BadRequest,
    Busy,
    GatewayError,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    ProviderError,
    RequestTimeout,
    StoreBusy,
    StoreUnavailable,
    Unauthorized,
)
from gateway.forward import Forwarder
from gateway.memo import HEADER_MEMO_BYTES, HEADER_MEMO_ENTRIES, Memo, header_set_size
from gateway.metrics import Metrics
from gateway.model import Config, Rule
from gateway.oidc.provider import ProviderClient
from gateway.oidc.providers import ProviderSet
from gateway.paths import canonical_host, normalize_path, split_request_target
from gateway.peers import TrustedPeers
from gateway.proxy import Upstreams
from gateway.reload import restart_needed, upstream_pools_changed
from gateway.risk import RiskClient, RiskFacts, RiskOutcome
from gateway.rules import RuleSet
from gateway.serve_http import ConnectionHooks
from gateway.serve_http import make_server as make_server  # re-exported: the entry point
from gateway.session import factory, revocation
from gateway.session.aux import AuxStore, LocalAux
from gateway.session.cookies import SetCookieKwargs, cookie_name, set_cookie_kwargs
from gateway.session.model import Session
from gateway.session.redis_store import RedisStore
from gateway.session.stores import CookieStore, SessionStore
from gateway.session.transaction import TransactionCodec
from gateway.tokens.gate import presented_token, token_gate
from gateway.transactional import KeptLedger

log = structlog.get_logger("gateway")
audit = structlog.get_logger("gateway.audit")


class ReloadRefused(Exception):
    """A new config that cannot be applied live; the old one stays in force."""


class Gateway(ConnectionHooks):
    """One gateway instance: configuration, shared clients and the request handler."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        assertion_key: ec.EllipticCurvePrivateKey | None = None,
        tracer: tracing.Tracing | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self.store: SessionStore = factory.make_store(config.session)
        self.tracing = tracing.load(config.telemetry, self.store, given=tracer)
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
        self._providers: ProviderSet | None = None
        self._provider_probes: dict[str, ProviderProbe] = {}
        self.aux: AuxStore = LocalAux(clock=clock)  # replaced in start()
        self.server: GuardedServer | None = None  # set by make_server
        self.metrics.watch_connections(self.open_connections, self.accepting)
        self.metrics.watch_store_pool(self.store_pool)
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
        self.tokens = token_gate(config, self.rules)  # API clients' tokens (None: cookies only)
        self.prefix = config.server.internal_prefix
        self.auth_target = f"{self.prefix}/auth".encode()
        self.redirect_uri = f"{config.server.public_url}{self.prefix}/callback"
        self.signer = AssertionSigner(
            self._assertion_key, config.server.public_url, config.assertion.ttl_s
        )
        self._framing_passed: Memo[tuple[object, ...], bool] = Memo(
            max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
        )
        base = config.session.cookie_name
        # Both spellings: an upstream must neither see nor set the gateway's cookies.
        self.gateway_cookies = frozenset({base, cookie_name(base, True)})
        self.gateway_cookie_prefixes = (f"{self.tx_base}_", cookie_name(f"{self.tx_base}_", True))
        self.forwarder = Forwarder(
            self,
            config,
            self.signer,
            gateway_cookies=self.gateway_cookies,
            gateway_cookie_prefixes=self.gateway_cookie_prefixes,
            scheme=self.scheme,
        )
        self.site_routes = site_routes(config.rules)
        self.peer_trusted = TrustedPeers(
            config.server.trusted_proxies, unix=config.server.trust_unix_socket
        )
        self.decisions = RememberedDecisions(config.server, config.session, self.metrics)
        # Probes hit these every few seconds; an access-log line each would drown the rest.
        self.quiet_paths: frozenset[str] = frozenset(
            {f"{self.prefix}/healthz", f"{self.prefix}/readyz"}
        )
        self.apply_connection_settings(config.server)

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
            trace_configs=[self.tracing.client_trace()] if self.tracing is not None else None,
        )
        self._providers = ProviderSet.for_config(
            self.config, self._http, on_error=self._count_provider_error, wall_clock=self.clock
        )
        self.risk = RiskClient(self._http)
        self.aux, self._aux_redis = factory.make_aux(self.config.session, self.store, self.clock)
        if self.tracing is not None:
            self.tracing.instrument_aux(self._aux_redis)  # the store's own: traced already
        redis = self.store if isinstance(self.store, RedisStore) else self._aux_redis
        await factory.check_redis_eviction(redis, self.config.source)
        factory.warn_if_revocation_per_process(self.config)
        # Not fatal: /readyz reports it and step-ups answer 503 until it loads.
        await self._providers.load_all(log)

    async def close(self) -> None:
        await self.upstreams.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None:
            await close_store()
        if self._aux_redis is not None:
            await self._aux_redis.close()
        if self._http is not None:
            await self._http.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)

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
        assert self._http is not None
        providers = ProviderSet.for_config(
            new,
            self._http,
            on_error=self._count_provider_error,
            wall_clock=self.clock,
            previous=self._providers,
        )
        try:
            await providers.load_fresh()
        except ProviderError as exc:
            raise ReloadRefused(f"the new provider cannot be loaded ({exc.reason})") from exc
        store = self.store
        if new.session.store_settings != old.session.store_settings:
            store = factory.make_store(new.session)  # cookie store only (see restart_needed)
        key = self._assertion_key
        if new.assertion.key_file != old.assertion.key_file and new.assertion.key_file:
            try:
                key, _ = load_or_generate_key(new.assertion.key_file)
            except AssertionKeyError as exc:
                raise ReloadRefused(str(exc)) from exc
        old_upstreams = self.upstreams
        new_pools = upstream_pools_changed(old, new)
        # From here on nothing awaits until every piece is swapped.
        self._assertion_key = key
        self._apply(new)
        self.store = store
        self._providers = providers
        if new_pools:
            self.upstreams = self._make_upstreams(new)
            # Requests still streaming through the old pools finish first.
            asyncio.get_running_loop().call_later(
                new.server.shutdown_timeout_s + 1,
                lambda: asyncio.ensure_future(old_upstreams.close()),
            )
        log.info("config_reloaded", rules=len(new.rules), source=new.source)

    @property
    def provider(self) -> ProviderClient:  # the default one (the top-level oidc)
        return self.providers.default

    @property
    def providers(self) -> ProviderSet:
        assert self._providers is not None, "Gateway.start() was not awaited"
        return self._providers

    def _count_provider_error(self, kind: str) -> None:
        self.metrics.provider_errors.labels(kind).inc()

    # -- the request -------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # The same bytes from the same peer, decided and forwarded a moment ago? Perhaps
        # sent upstream already, before aiohttp parsed them (gateway.early_forward).
        handover = handover_for(request)
        prepared: Prepared | None
        if handover is not None:
            prepared, request_id, started = handover.prepared, handover.request_id, handover.started
        else:
            prepared = self.decisions.prepared_for(request, self.clock())
            request_id = logs.request_id_for(request.headers.get("X-Request-Id"))
            started = time.perf_counter()
        logs.bind_request_id(request_id)
        rule_name: str | None = None
        path = "-"
        try:
            if prepared is not None:
                rule_name, path = prepared.rule_name, prepared.path
                response = await self.forwarder.forward_prepared(
                    request, prepared, request_id, handover
                )
            else:
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
        """A request for the upstreams: decide, then forward | challenge | deny.

        Returns (the name of the rule that decided, the response).
        """
        rules, config = self.rules, self.config  # one consistent view across a reload
        rules.require_known_method(request.method)
        host = self.judged_host(request, rules)
        store_down: StoreUnavailable | None = None
        tokens = self.tokens
        presented = presented_token(request.headers) if tokens is not None else None
        memo = self.decisions  # gateway.decision_memo: an Allow remembered for this request?
        cookie = self.session_cookie_value(request) if presented is None else None
        key, remembered = memo.find(cookie, request.method, host, path, self.clock())
        if tokens is not None and presented is not None:
            # An access token, when there is one, is the credential: never a cookie beside it.
            session: Session | None = await tokens.session_for(
                presented, request.method, host, path, self.clock(), self.providers, self.aux
            )
        elif remembered is not None:
            session = remembered[1]
        else:
            try:
                session = await self.load_session(request)
            except StoreUnavailable as exc:
                session, store_down = None, exc  # decided below: fatal only if one is needed
        by_token = presented is not None
        now = self.clock()  # after the session is loaded: a proof's age is never understated
        body = RequestBody(
            request, config.step_up.max_body_bytes, query, config.server.body_timeout_s
        )
        started_ns = self.tracing.mark() if self.tracing is not None else 0
        if remembered is not None:
            decision: Decision | None = remembered[0]
        else:
            rule = rules.match(request.method, host, path)
            decision = decide_plain(
                rule, session, config.assurance, now, session_error=store_down, by_token=by_token
            )
            memo.remember(key, decision, session, now, by_token=by_token)
        if decision is None:
            reader = LiveReader(self.client_ip, request, body)
            facts = RequestFacts(request.method, host, path, session, reader, by_token)
            decision = await decide_request(
                facts,
                rules,
                config.assurance,
                now,
                risk=self.ask_risk_engine,
                claim_once=self.claim_once,
                session_error=store_down,
            )
        decided(self, decision, started_ns, presented)
        rule_name = decision.rule.name if decision.rule is not None else None
        session = judged_session(session, decision.rule)  # the rule's provider's sign-in
        path_qs = path if query is None else f"{path}?{query}"
        if isinstance(decision, Allow):
            return rule_name, await self.forwarder.forward(
                request, decision, session, path_qs, request_id, body=body, by_token=by_token
            )
        if isinstance(decision, Challenge):
            return rule_name, await challenge(self, request, decision, path_qs, body, session)
        return rule_name, self.deny(request, decision)

    async def ask_risk_engine(
        self, rule: Rule, facts: RiskFacts, session_id: str | None, now: float
    ) -> RiskOutcome:
        """:class:`gateway.decision.RiskEngine`: the engine's answer, audited."""
        outcome = await self.risk.assess(
            rule,
            facts,
            assurance=self.config.assurance.for_provider(rule.provider),
            session_id=session_id,
            now=now,
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
        return self.checked_host(canonical_host(request.headers.get("Host"), self.scheme), rules)

    def checked_host(self, host: str | None, rules: RuleSet | None = None) -> str | None:
        """``host`` (canonical), refused (421) when host-scoped rules don't know it."""
        if not (rules or self.rules).host_known(host):
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
            is_trusted=self.peer_trusted.hop,
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
            return None
        sealed, several = isinstance(self.store, CookieStore), bool(self.config.providers)
        return await revocation.unrevoked(self.aux, session, sealed=sealed, several=several)

    async def revoke(
        self,
        *,
        session: Session | None = None,
        sub: str | None = None,
        provider_sid: str | None = None,
    ) -> None:
        """:func:`gateway.session.revocation.revoke`, now, under this configuration."""
        await revocation.revoke(
            self.aux,
            self.clock(),
            self.config.session.lifetime_s,
            session=session,
            sub=sub,
            provider_sid=provider_sid,
        )

    def check_framing(self, request: web.BaseRequest) -> None:
        """:func:`gateway.headers.check_framing`, remembering header sets that passed."""
        raw = request.raw_headers
        key = (raw, request.version)
        if self._framing_passed.get(key) is None:
            headers.check_framing(raw, http_version=request.version)
            self._framing_passed.put(key, True, header_set_size(raw) // 2)

    async def provider_reachable(self, name: str = "default") -> bool:
        """:meth:`gateway.challenge.ProviderProbe.reachable`, for provider ``name``, now."""
        assert self._http is not None
        probe = self._provider_probes.setdefault(name, ProviderProbe())
        return await probe.reachable(
            self._http, self.providers.get(name).config.issuer, self.clock(), self.metrics
        )

    # -- internal endpoints ------------------------------------------------------

    async def internal(self, request: web.BaseRequest, sub_path: str) -> web.StreamResponse:
        handler = route(sub_path)
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
        if isinstance(exc, Unauthorized):  # an API client: JSON and the challenge it acts on
            text = responses.json_error(exc.error, exc.message, logs.request_id())
            return web.json_response(text=text, status=exc.status, headers=exc.response_headers())
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
            text=responses.json_error(error, " ".join(paragraphs), logs.request_id()),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
