"""Forwarding an allowed request: what the upstream gets, and what it may answer.

The client's headers cleaned and the gateway's added (:mod:`gateway.headers`),
the assurance headers and their signed assertion, a session refreshed on the
way, the bytes a rule already read sent as they came, and an upstream's own
RFC 9470 step-up challenge turned into a sign-in for a browser. The streaming
itself is :mod:`gateway.proxy`'s. The header sets are remembered here, in the
step they speed up, for as long as this configuration is in force.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway import headers, logs, responses
from gateway.assertion import AssertionSigner
from gateway.body import RequestBody
from gateway.challenge import upstream_step_up
from gateway.context import Context
from gateway.decision import DECISION_LABEL, Allow
from gateway.decision_memo import Prepared, allow_until, rememberable
from gateway.early_forward import Handover
from gateway.errors import GatewayError, PayloadTooLarge
from gateway.memo import (
    HEADER_MEMO_BYTES,
    HEADER_MEMO_ENTRIES,
    HEADER_OVERHEAD_BYTES,
    Memo,
    header_set_size,
)
from gateway.model import Config, Level, Rule
from gateway.paths import canonical_host
from gateway.proxy import UpstreamIntercepted
from gateway.session.model import Session
from gateway.transactional import KeptRequest, is_form_post, parse_bearer_challenge
from gateway.upstream_pool import request_head

log = structlog.get_logger("gateway")

# Header sets built for recent (session, level, rule) triples, while their assertion
# may be reused: at most this many (each a signed token and a few short values).
ASSURANCE_MEMO_ENTRIES = 4096
ASSURANCE_MEMO_BYTES = 8 * 1024 * 1024


class Forwarder:
    """Forwards for one configuration; made anew (memos empty) when it is reloaded."""

    def __init__(
        self,
        ctx: Context,
        config: Config,
        signer: AssertionSigner,
        *,
        gateway_cookies: frozenset[str],
        gateway_cookie_prefixes: tuple[str, ...],
        scheme: str,
    ) -> None:
        self._ctx = ctx  # store, upstreams and clock: read at each use (a reload swaps them)
        self.signer = signer
        self.header_prefix = config.assertion.header_prefix
        self.gateway_cookies = gateway_cookies
        self.gateway_cookie_prefixes = gateway_cookie_prefixes
        self.scheme = scheme
        # What the assurance headers are made of -> those headers, while their signed
        # assertion may be reused (the signer's own cache, one level up: building the
        # claims and their key costs more than this lookup).
        self._assurance_headers: Memo[
            tuple[object, ...], tuple[float, tuple[tuple[str, str], ...]]
        ] = Memo(max_entries=ASSURANCE_MEMO_ENTRIES, max_bytes=ASSURANCE_MEMO_BYTES)
        self._request_headers: Memo[tuple[object, ...], tuple[CIMultiDict[str], bool]] = Memo(
            max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
        )

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

        ``by_token``: judged by an access token (its ``session`` is the token's, unsaved).
        """
        ctx = self._ctx
        rule = decision.rule
        upstream_headers, websocket = self.upstream_request_headers(request, rule, request_id)
        reuse_until = 0.0
        if session is not None:
            # update() replaces: none of these came from the client (prefix stripped).
            reuse_until, assurance = self.assurance_headers_until(session, decision.level, rule)
            upstream_headers.update(assurance)
        if by_token and not ctx.config.upstreams[rule.upstream].pass_authorization:
            # The token's audience is the gateway (README: upstreams pass_authorization).
            upstream_headers.popall("Authorization", None)
            upstream_headers.popall("DPoP", None)
        refreshed: str | None = None
        now = ctx.clock()
        if session is not None and not by_token and session.touch_due(now):
            refreshed = await ctx.store.save(
                session.touched(now), now, previous=ctx.session_cookie_value(request)
            )
        extra: list[tuple[str, str]] = []
        if refreshed is not None:
            extra.append(("Set-Cookie", ctx.session_set_cookie(refreshed)))
        if websocket:
            return await ctx.upstreams.forward_websocket(
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
            # with an access token) get its challenge unchanged, even when a rule had to
            # read their body.
            if (
                rule.upstream_challenge
                and not by_token
                and (
                    (form and data is not None)
                    or responses.is_navigation(request.method, request.headers)
                )
            ):
                intercept = self.upstream_asks_step_up
        latency = ctx.metrics.upstream_latency.labels(rule.upstream)
        if (
            session is not None
            and ctx.tracing is None  # a traced request is decided (and traced) every time
            and refreshed is None
            and kept is None
            and intercept is None
            and data is None
            and not request.body_exists
            and not websocket
            and rememberable(decision, by_token=by_token)
        ):
            self._remember(request, decision, session, path_qs, upstream_headers, reuse_until)
        started = time.perf_counter()
        call = ctx.upstreams.forward(
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
        try:
            if ctx.tracing is not None:  # the upstream span's traceparent replaces the client's
                return await ctx.tracing.upstream(call, upstream_headers, rule.upstream)
            return await call
        except UpstreamIntercepted as asked:
            return await upstream_step_up(self._ctx, request, rule, session, path_qs, body, asked)

    def _remember(
        self,
        request: web.BaseRequest,
        decision: Allow,
        session: Session,
        path_qs: str,
        upstream_headers: CIMultiDict[str],
        reuse_until: float,
    ) -> None:
        """Remember this forward for the request's exact bytes (gateway.decision_memo),
        as long as the decision and the assertion sent with it may be reused."""
        ctx = self._ctx
        rule = decision.rule
        sent = upstream_headers.copy()
        del sent["X-Request-Id"]
        pooled = ctx.upstreams.pool_of(rule.upstream)
        head = None
        if pooled is not None:
            try:  # without its blank line: X-Request-Id comes last, a new one each time
                head = request_head(request.method, pooled[1] + path_qs, sent)[:-2]
            except ValueError:
                return  # refused when sent (a control character): never remembered
        prepared = Prepared(
            rule.name,
            request.method,
            path_qs.partition("?")[0],
            path_qs,
            rule.upstream,
            sent,
            ctx.metrics.requests.labels(rule.name, DECISION_LABEL[Allow]),
            ctx.metrics.upstream_latency.labels(rule.upstream),
            logs.own_request_id(request.headers.get("X-Request-Id")),
            head,
        )
        now = ctx.clock()
        until = min(allow_until(decision, session, ctx.config.session), reuse_until)
        ctx.decisions.remember_prepared(request, prepared, until, now)

    async def forward_prepared(
        self,
        request: web.BaseRequest,
        prepared: Prepared,
        request_id: str,
        handover: Handover | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` upstream as a remembered forward prepared it (the same bytes
        from the same peer were decided, allowed and forwarded so, and may still be),
        or answer with what a relay sent before aiohttp parsed it got (``handover``)."""
        if handover is not None:
            if isinstance(handover.outcome, GatewayError):
                raise handover.outcome
            return await self._ctx.upstreams.relay_pooled(
                request, prepared.upstream, handover.outcome
            )
        prepared.requests.inc()
        sent = prepared.headers.copy()
        sent["X-Request-Id"] = request_id
        latency, started = prepared.latency, time.perf_counter()
        return await self._ctx.upstreams.forward(
            request,
            prepared.upstream,
            path_qs=prepared.path_qs,
            headers=sent,
            on_headers=lambda: latency.observe(time.perf_counter() - started),
        )

    def upstream_request_headers(
        self, request: web.BaseRequest, rule: Rule, request_id: str
    ) -> tuple[CIMultiDict[str], bool]:
        """:func:`gateway.headers.upstream_request_headers` for ``request``, remembered,
        and whether the request is a WebSocket upgrade (read from the same headers).

        The result depends on the client's headers, its address and the rule's
        upstream and method-override setting (the rest is this configuration's),
        so it is kept under exactly those; only the request id differs.
        """
        ctx = self._ctx
        raw = request.raw_headers
        peer = request.remote or ""
        key = (raw, peer, rule.allow_method_override, rule.upstream)
        built = self._request_headers.get(key)
        if built is None:
            websocket = is_websocket(request)
            filtered = headers.upstream_request_headers(
                request.headers.items(),
                prefix=self.header_prefix,
                allow_method_override=rule.allow_method_override,
                strip_cookies=self.gateway_cookies,
                strip_cookie_prefixes=self.gateway_cookie_prefixes,
                client_ip=peer,
                peer_trusted=ctx.peer_trusted(peer),
                hops=ctx.client_hops(request, peer),
                scheme=self.scheme,
                # The canonical host the rules judged (known, since they judged it).
                host=canonical_host(request.headers.get("Host"), self.scheme) or "",
                request_id="",
                upstream_host=ctx.upstreams.host_of(rule.upstream),
                websocket=websocket,  # from the same headers: covered by the key
            )
            built = (filtered, websocket)
            self._request_headers.put(key, built, header_set_size(raw) + len(peer))
        out = built[0].copy()
        out["X-Request-Id"] = request_id
        return out, built[1]

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

    def assurance_headers_until(
        self, session: Session, level: Level | None, rule: Rule
    ) -> tuple[float, tuple[tuple[str, str], ...]]:
        """The contract's assurance headers for ``session`` on ``rule``, as (name, value),
        and until when they may be sent again (the assertion's reuse:
        :meth:`gateway.assertion.AssertionSigner.sign_reusable`)."""
        ctx = self._ctx
        now = ctx.clock()
        key = (
            session.sub,
            session.acr,
            session.amr,
            session.auth_time,
            session.email,
            level.name if level is not None else None,
            rule.name,
            rule.upstream,
            session.provider,
        )
        cached = self._assurance_headers.get(key)
        if cached is not None and now < cached[0]:
            return cached
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
        if ctx.config.providers:  # several providers: whose sign-in the claims are
            claims["idp"] = ctx.config.oidc_for(session.provider).issuer
        out[f"{p}Assertion"], reuse_until = self.signer.sign_reusable(
            claims, audience=rule.upstream, now=now
        )
        pairs = tuple(out.items())
        size = sum(HEADER_OVERHEAD_BYTES + len(name) + len(value) for name, value in pairs)
        self._assurance_headers.put(key, (reuse_until, pairs), size)
        return reuse_until, pairs


def is_websocket(request: web.BaseRequest) -> bool:
    return headers.is_websocket_upgrade(request.headers.items())
