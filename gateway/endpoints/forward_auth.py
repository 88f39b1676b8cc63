"""``/auth`` and ``/start``: deciding for a front proxy that forwards itself (forward-auth).

nginx ``auth_request`` (and ingress-nginx ``auth-url``) describes the request
with ``X-Original-Method`` + ``X-Original-URL``; Traefik ``ForwardAuth`` and
Caddy ``forward_auth`` with ``X-Forwarded-Method``/``-Proto``/``-Host``/``-Uri``;
Envoy's HTTP ``ext_authz`` sends the request's own method and ``Host`` to
``/auth/envoy`` + the original path. Those headers are believed only from a
``server.trusted_proxies`` peer. The described request is normalised and judged
exactly as in proxy mode (:func:`gateway.paths.normalize_path`, the canonical
host and its 421, the method checks, :func:`gateway.decision.decide_request`).

Answers, all with an empty body (nginx drops the keep-alive connection to the
auth service after an answer with a body): ``200`` with the assurance headers
and the signed assertion for the proxy to copy upstream; ``401`` when a sign-in
or step-up is needed (RFC 9470 ``WWW-Authenticate`` when under-assured); ``403``
denied. Traefik, Caddy and Envoy hand a non-2xx answer to the client, so a
browser navigation described by them gets the ``302`` to the provider at once;
nginx cannot pass a redirect on, so it sends the browser to ``/start?rd=URL``.

An API client's access token (the ``api`` section) is judged as in proxy mode,
from the ``Authorization`` and ``DPoP`` headers the proxy forwards
(:mod:`gateway.endpoints.forward_tokens`): the same 401s (RFC 6750, 9449, 9470),
never a redirect, and on Allow the same headers derived from the token.

The proxy sends no body, so a rule that reads body fields (``when`` on fields,
``bind``) cannot be judged here: such a request is refused (fail closed), and
``check`` refuses such a rule when ``server.mode`` is ``forward_auth``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import structlog
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from gateway import assurance, logs, responses
from gateway.challenge import start_round_trip
from gateway.context import Context, decided
from gateway.decision import (
    DECISION_LABEL,
    Allow,
    Challenge,
    Decision,
    RequestFacts,
    decide_plain,
    decide_request,
    judged_session,
    log_step_up_needed,
)
from gateway.decision_memo import Answer, allow_until, exact_key, rememberable
from gateway.endpoints.forward_tokens import TokenFacts, token_facts
from gateway.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, StoreUnavailable
from gateway.paths import (
    canonical_host,
    canonical_rule_host,
    is_method_token,
    normalize_path,
    split_request_target,
)
from gateway.session.model import Session

log = structlog.get_logger("gateway")
audit = structlog.get_logger("gateway.audit")

# The assurance headers' names after the prefix (gateway.forward.Forwarder.assurance_headers_until).
ASSURANCE_NAMES = ("Subject", "Email", "Acr", "Amr", "Time", "Level", "Rule", "Assertion")
# Envoy ext_authz (HTTP) appends the original path to its path_prefix.
ENVOY_PREFIX = "/auth/envoy"
NO_BODY_MESSAGE = (
    "This route's rule reads the request body, which a forward-auth check never sees; "
    "route it through the gateway's proxy mode."
)


# What aiohttp adds after the handler's headers (web_response._prepare_headers).
_SERVER_TAIL = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Described:
    """The request a front proxy asks about. ``host`` canonical, ``path`` normalised."""

    method: str
    scheme: str
    host: str | None
    path: str
    query: str | None
    redirects: bool  # the proxy hands a 3xx answer to the client (not nginx auth_request)

    @property
    def path_qs(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"


class _NoBody:
    """:class:`gateway.decision.RequestReader` without a body: reading one fails closed."""

    __slots__ = ("_client_ip",)

    def __init__(self, client_ip: str | None) -> None:
        self._client_ip = client_ip

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        log.warning("forward_auth_needs_body", fields=len(tuple(reading)))
        raise Forbidden(NO_BODY_MESSAGE, reason="forward_auth_needs_body")

    def client_ip(self) -> str | None:
        return self._client_ip


def enabled(ctx: Context) -> None:
    """404 unless ``server.mode`` lets front proxies ask (``forward_auth`` or ``both``)."""
    if ctx.config.server.mode == "proxy":
        raise NotFound("No such gateway endpoint", reason="forward_auth_disabled")


def trusted_peer(ctx: Context, request: web.BaseRequest) -> None:
    """The describing headers are believed only from ``server.trusted_proxies``."""
    peer = request.remote or ""
    if not ctx.peer_trusted(peer):
        log.warning("forward_auth_untrusted_peer", peer=peer)
        raise Forbidden(
            "Only a trusted proxy may ask this gateway to decide.",
            reason="forward_auth_untrusted_peer",
        )


def _one(request: web.BaseRequest, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} was sent more than once.", reason="forward_auth_header_repeated")
    return values[0] if values else None


def describe(ctx: Context, request: web.BaseRequest, sub_path: str) -> Described:
    """The request the proxy describes, in the canonical forms the rules judge."""
    if sub_path.startswith(ENVOY_PREFIX + "/"):
        # Envoy keeps the method and Host of the request it checks.
        _, query = split_request_target(request.raw_path)
        raw_path = sub_path[len(ENVOY_PREFIX) :]
        return _canonical(
            ctx,
            request.method,
            _one(request, "X-Forwarded-Proto") or _public_scheme(ctx),
            _one(request, "Host"),
            raw_path,
            query,
            redirects=True,
        )
    original = _one(request, "X-Original-URL")
    if original is not None:
        parts = urlsplit(original)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise BadRequest("X-Original-URL must be an absolute URL.", reason="forward_auth_url")
        target = original[len(f"{parts.scheme}://{parts.netloc}") :] or "/"
        raw_path, query = split_request_target(target)
        method = _one(request, "X-Original-Method") or ""
        host = parts.netloc.rpartition("@")[2]
        return _canonical(ctx, method, parts.scheme, host, raw_path, query, redirects=False)
    uri = _one(request, "X-Forwarded-Uri")
    if uri is None:
        raise BadRequest(
            "Describe the request with X-Original-Method and X-Original-URL, or "
            "X-Forwarded-Method, -Proto, -Host and -Uri.",
            reason="forward_auth_undescribed",
        )
    raw_path, query = split_request_target(uri)
    return _canonical(
        ctx,
        _one(request, "X-Forwarded-Method") or "",
        _one(request, "X-Forwarded-Proto") or _public_scheme(ctx),
        _one(request, "X-Forwarded-Host"),
        raw_path,
        query,
        redirects=True,
    )


def _public_scheme(ctx: Context) -> str:
    return urlsplit(ctx.config.server.public_url).scheme


def _canonical(
    ctx: Context,
    method: str,
    scheme: str,
    host: str | None,
    raw_path: str,
    query: str | None,
    *,
    redirects: bool,
) -> Described:
    if not is_method_token(method):
        raise BadRequest("The described method is missing or invalid.", reason="bad_method")
    if scheme not in ("http", "https"):
        raise BadRequest("The described scheme must be http or https.", reason="forward_auth_url")
    if not raw_path.startswith("/"):
        raise BadRequest("The described path must start with '/'.", reason="not_origin_form")
    # Exactly as in proxy mode: the method checks, the one normal form, the host's 421.
    ctx.rules.require_known_method(method)
    path = normalize_path(raw_path)
    if path == ctx.prefix or path.startswith(ctx.prefix + "/"):
        raise BadRequest("The gateway's own paths are not forward-auth targets.", reason="own_path")
    canonical = canonical_host(host, scheme)
    return Described(method, scheme, ctx.checked_host(canonical), path, query, redirects)


def remember(
    ctx: Context,
    request: web.BaseRequest,
    decision: Allow,
    session: Session,
    out: web.Response,
    now: float,
    reuse_until: float,
    *,
    by_token: bool,
) -> None:
    """Remember ``out`` for the very same request (gateway.decision_memo).

    Keyed by the request's exact bytes (a whole head without a body, which came
    alone: :meth:`gateway.early.EarlyHandler.exact_head`) and the peer that sent them, so
    every header a rule or the framing checks read is in the key. Answered again
    by :func:`answer_early` before aiohttp parses the same bytes again.
    """
    memo = ctx.decisions.auth
    if not memo.enabled or not rememberable(decision, by_token=by_token):
        return
    key = exact_key(request)
    if key is None:
        return  # not the bytes alone (pipelined, split, ...): decided every time
    until = min(allow_until(decision, session, ctx.config.session), reuse_until)
    pairs = out.headers.items()
    if any(_CONTROL.search(name) or _CONTROL.search(value) for name, value in pairs):
        return  # aiohttp refuses to send it (RFC 9110 5.5): never remember what was not sent
    try:
        encoded = "".join(f"{name}: {value}\r\n" for name, value in pairs).encode()
    except UnicodeEncodeError:
        return
    answer = Answer(
        b"HTTP/1.1 200 OK\r\n" + encoded,
        request.method,
        normalize_path(split_request_target(request.raw_path)[0]),
        ctx.metrics.requests.labels(decision.rule.name, DECISION_LABEL[Allow]),
        logs.own_request_id(request.headers.get("X-Request-Id")),
    )
    size = 2 * len(key[1]) + len(answer.head) + len(answer.path)
    memo.put(key, answer, until=until, now=now, size=size)


def answer_early(ctx: Context, head: bytes, peer: str | None) -> bytes | None:
    """The remembered answer to the request ``head`` (its exact bytes), whole, or None
    (then aiohttp parses it and it is handled as usual)."""
    if not head.startswith(ctx.auth_target, head.find(b" ") + 1):
        return None  # not /auth (nor /auth/envoy/...) as remembered: judged as usual
    started = time.perf_counter()
    answer = ctx.decisions.auth.get((peer, head), ctx.clock())
    if answer is None:
        return None  # counted as a miss; aiohttp hands it to auth(), which may remember it
    request_id = answer.request_id or logs.new_request_id()
    logs.bind_request_id(request_id)
    answer.requests.inc()
    ctx.metrics.answered_early.counts["auth"] += 1
    if ctx.config.server.access_log:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        logs.access(answer.method, answer.path, 200, None, duration_ms)
    return b"".join(
        (
            answer.head,
            b"X-Request-Id: ",
            request_id.encode(),
            b"\r\nContent-Length: 0\r\nDate: ",
            rfc822_formatted_time().encode(),
            _SERVER_TAIL,
        )
    )


async def judge(
    ctx: Context, request: web.BaseRequest, described: Described, token: TokenFacts | None = None
) -> tuple[Decision, Session | None]:
    """The decision for the described request, by the proxy's own decision function.

    ``token``: the request's verified access token (:func:`token_facts`), judged
    instead of any cookie. With the ``api`` section, a step-up for a token (or on a
    ``credentials: token`` rule) and a token on a ``credentials: session`` rule are
    raised as proxy mode's :class:`gateway.errors.Unauthorized`.
    """
    rules, config = ctx.rules, ctx.config
    store_down: StoreUnavailable | None = None
    if token is not None:
        session: Session | None = token.session  # the credential: never a cookie beside it
    else:
        try:
            session = await ctx.load_session(request)  # from the Cookie the proxy forwarded
        except StoreUnavailable as exc:
            session, store_down = None, exc  # as in proxy mode: fatal only if one is needed
    by_token = token is not None
    now = ctx.clock()
    started_ns = ctx.tracing.mark() if ctx.tracing is not None else 0
    rule = rules.match(described.method, described.host, described.path)
    decision = decide_plain(
        rule, session, config.assurance, now, session_error=store_down, by_token=by_token
    )
    if decision is None:
        facts = RequestFacts(
            described.method,
            described.host,
            described.path,
            session,
            _NoBody(ctx.client_ip(request)),
            by_token,
        )
        decision = await decide_request(
            facts,
            rules,
            config.assurance,
            now,
            risk=ctx.ask_risk_engine,
            claim_once=ctx.claim_once,
            session_error=store_down,
        )
    decided(ctx, decision, started_ns, token.presented if token is not None else None)
    return decision, judged_session(session, decision.rule)  # the rule's provider's


async def auth(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    """``/auth`` (and ``/auth/envoy/...``): 200 with the headers, 401, 302 or 403."""
    enabled(ctx)
    trusted_peer(ctx, request)
    # The path the app routed here by (normalised once, as every path is).
    sub_path = normalize_path(split_request_target(request.raw_path)[0])[len(ctx.prefix) :]
    described = describe(ctx, request, sub_path)
    # The client's Authorization and DPoP, as the proxy forwarded them.
    token = await token_facts(ctx, request, described.method, described.host, described.path)
    decision, session = await judge(ctx, request, described, token)
    if isinstance(decision, Allow):
        out = web.Response(status=200, headers={"Cache-Control": "no-store"})
        # Every name, empty when there is nothing to say: a proxy that copies a header
        # the answer lacks must not keep what the client sent (Caddy 2.6 copies its
        # placeholder's text instead); nginx does not send an empty header upstream.
        prefix = ctx.config.assertion.header_prefix
        for name in ASSURANCE_NAMES:
            out.headers[prefix + name] = ""
        if session is not None:
            reuse_until, pairs = ctx.forwarder.assurance_headers_until(
                session, decision.level, decision.rule
            )
            for name, value in pairs:
                out.headers[name] = value
            now = ctx.clock()
            if token is None and session.touch_due(now):  # a token's session is never saved
                # The idle timeout slides as in proxy mode; the proxy hands the cookie
                # to the client (nginx: auth_request_set + add_header Set-Cookie).
                refreshed = await ctx.store.save(
                    session.touched(now), now, previous=ctx.session_cookie_value(request)
                )
                out.headers["Set-Cookie"] = ctx.session_set_cookie(refreshed)
            else:
                remember(
                    ctx,
                    request,
                    decision,
                    session,
                    out,
                    now,
                    reuse_until,
                    by_token=token is not None,
                )
        return out
    if isinstance(decision, Challenge):
        log_step_up_needed(decision, decision.max_age_s)
        if described.redirects and responses.is_navigation(described.method, request.headers):
            return await _round_trip(ctx, request, decision, described.path_qs)
        return _unauthorized(decision)
    log.info("request_denied", reason=decision.reason)
    return web.Response(status=decision.status, headers={"Cache-Control": "no-store"})


def _unauthorized(decision: Challenge) -> web.Response:
    if decision.reason == "no_session":
        value = responses.www_authenticate(None, None)
    else:
        # A one-time rule needs a new authentication: max_age=0 (as challenge.py asks).
        max_age_s = 0 if decision.rule.require.once else decision.max_age_s
        acr_values = assurance.acr_values_for(decision.required)
        value = responses.www_authenticate(decision.required, max_age_s, acr_values)
    return web.Response(
        status=401, headers={"WWW-Authenticate": value, "Cache-Control": "no-store"}
    )


async def _round_trip(
    ctx: Context, request: web.BaseRequest, decision: Challenge, path_qs: str
) -> web.StreamResponse:
    rule = decision.rule
    return await start_round_trip(
        ctx,
        request,
        return_to=responses.safe_return_to(path_qs),
        rule=rule.name,
        level=decision.required,
        max_age_s=decision.max_age_s,
        fresh=rule.require.once,
        provider=rule.provider,
    )


async def start(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    """``/start?rd=URL``: the sign-in or step-up URL's rule needs, then back to URL.

    The level comes from the rule that judges ``rd`` (never from the query); ``rd``
    must be on the gateway's public origin, where the sign-in's cookie is set.
    """
    enabled(ctx)
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("The start endpoint takes GET", reason="start_method")
    path_qs = _on_site(ctx, _rd(request))
    raw_path, query = split_request_target(path_qs)
    public = urlsplit(ctx.config.server.public_url)
    described = _canonical(
        ctx, "GET", public.scheme, public.netloc, raw_path, query, redirects=True
    )
    decision, _ = await judge(ctx, request, described)
    if isinstance(decision, Allow):
        # Already enough (another tab finished first): straight back.
        return web.Response(
            status=302, headers={"Location": described.path_qs, "Cache-Control": "no-store"}
        )
    if isinstance(decision, Challenge):
        return await _round_trip(ctx, request, decision, described.path_qs)
    raise Forbidden("No rule allows this request.", reason=decision.reason)


def _rd(request: web.BaseRequest) -> str:
    """``rd``: the rest of the query after ``rd=``, as nginx writes ``rd=$request_uri``.

    nginx cannot percent-encode a variable, so the URL comes raw, with its own
    ``?`` and ``&``; a proxy that encodes it (``rd=%2Fpath%3Fq``) is decoded once.
    """
    query = split_request_target(request.raw_path)[1] or ""
    if not query.startswith("rd="):
        raise BadRequest("start takes ?rd=URL", reason="start_rd")
    rd = query[3:]
    if rd[:3].upper() == "%2F" or rd[:7].lower() in ("http%3a", "https%3"):
        rd = unquote(rd)
    return rd


def _on_site(ctx: Context, rd: str) -> str:
    """``rd``'s path and query when it is on the gateway's public origin; else 400."""
    public = urlsplit(ctx.config.server.public_url)
    parts = urlsplit(rd)
    if parts.scheme or parts.netloc:
        try:
            same = (
                parts.scheme == public.scheme
                and parts.netloc != ""
                and canonical_rule_host(parts.netloc.rpartition("@")[2], parts.scheme)
                == canonical_rule_host(public.netloc, public.scheme)
                and "@" not in parts.netloc
            )
        except ValueError:
            same = False
        if not same:
            log.warning("start_refused", reason="off_site_rd")
            raise BadRequest("rd must be a URL of this site.", reason="off_site_rd")
        rd = rd[len(f"{parts.scheme}://{parts.netloc}") :] or "/"
    safe = responses.safe_return_to(rd, fallback="")
    if not safe:
        log.warning("start_refused", reason="off_site_rd")
        raise BadRequest("rd must be a URL of this site.", reason="off_site_rd")
    return safe
