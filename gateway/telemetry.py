"""OpenTelemetry spans for one gateway: the request, its decision, and the calls it makes.

Imported only when tracing is on (:func:`gateway.tracecontext.load`): it needs the
optional ``otel`` extra. Spans, all in one trace with the client's (a well-formed
``traceparent`` is the parent of the server span):

    HTTP {method}           server span; gateway.rule, gateway.decision, status code
      decision              gateway.rule, gateway.required_level, gateway.decision,
                            gateway.reason, gateway.level
      oidc.token | oidc.par | oidc.jwks | oidc.discovery | introspection
                            client spans to the provider, each sending a traceparent
      session.load | session.save | session.delete      (Redis store)
      store.get_records | store.put_record | store.claim_once | store.put_blob |
      store.take_blob       Redis calls for revocations, one-time proofs, kept requests
      upstream              client span; the upstream gets a traceparent naming it

Never recorded: a token, a cookie, a header's value, a query string, a session id
or a path (a path may carry a token, e.g. a magic link). Attributes are the names
the configuration gives (rules, levels, upstreams), decision reasons and statuses.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceFlags, TraceState

from gateway import tracecontext
from gateway.model import TelemetryConfig
from gateway.policy import Allow, Challenge, Decision
from gateway.session.redis_store import RedisStore

DEFAULT_SERVICE_NAME = "stepup-gateway"
INSTRUMENTATION = "stepup_gateway"
# gateway.oidc.provider names each of its requests (aiohttp's trace_request_ctx).
PROVIDER_SPANS = {
    "token": "oidc.token",
    "par": "oidc.par",
    "jwks": "oidc.jwks",
    "discovery": "oidc.discovery",
    "introspection": "introspection",
}
# RFC 9110 9.3 and WebDAV; any other method is "_OTHER" (OpenTelemetry HTTP conventions):
# a span name must not be a client's free text.
KNOWN_METHODS = frozenset(
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PROPFIND PROPPATCH MKCOL COPY "  # noqa: SIM905
    "MOVE LOCK UNLOCK".split()
)
STORE_METHODS = ("load", "save", "delete")
# gateway.session.aux.AuxStore: revocation marks (asked on every cookie-session request
# with session.redis_url), one-time claims and kept requests.
AUX_METHODS = ("get_records", "put_record", "claim_once", "put_blob", "take_blob")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _tracestate(value: str | None) -> TraceState:
    return TraceState.from_header([value]) if value else TraceState()


def parent_context(inbound: tracecontext.TraceContext | None) -> otel_context.Context | None:
    """The client's span as the parent (None: a new trace)."""
    if inbound is None:
        return None
    span_context = SpanContext(
        inbound.trace_id,
        inbound.parent_id,
        is_remote=True,
        trace_flags=TraceFlags(inbound.flags),
        trace_state=_tracestate(inbound.tracestate),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


class Tracing:
    """Spans for one gateway; built only when tracing is on."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def exporting(cls, config: TelemetryConfig) -> Tracing:
        """Spans batched to the OTLP/HTTP endpoint the configuration or ``OTEL_*`` names."""
        endpoint = None
        if config.otlp_endpoint is not None:
            endpoint = config.otlp_endpoint.rstrip("/") + "/v1/traces"  # as the variable does
        provider = make_provider(config)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left (blocks, up to the exporter's timeout)."""
        self.provider.shutdown()

    # -- the request -----------------------------------------------------------------

    def serving(self, handler: Handler, quiet_paths: Callable[[], frozenset[str]]) -> Handler:
        """``handler`` inside a server span (probes of ``quiet_paths()`` are not traced)."""

        async def traced(request: web.BaseRequest) -> web.StreamResponse:
            if request.path in quiet_paths():
                return await handler(request)
            method = request.method if request.method in KNOWN_METHODS else "_OTHER"
            parent = parent_context(tracecontext.inbound_of(request.headers.items()))
            with self.tracer.start_as_current_span(
                f"HTTP {method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method},
                record_exception=False,
            ) as span:
                response = await handler(request)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                return response

        return traced

    def mark(self) -> int:
        """Now, for a span recorded after the fact (:meth:`decision`)."""
        return time.time_ns()

    def decision(self, started_ns: int, decision: Decision) -> None:
        """A ``decision`` span from ``started_ns`` to now; the request's span is labelled too."""
        rule = decision.rule
        kind = type(decision).__name__.lower()
        attributes: dict[str, str | int] = {"gateway.decision": kind}
        if rule is not None:
            attributes["gateway.rule"] = rule.name
            if rule.require.level is not None:
                attributes["gateway.required_level"] = rule.require.level
        if isinstance(decision, Allow):
            if decision.level is not None:
                attributes["gateway.level"] = decision.level.name
        elif isinstance(decision, Challenge):
            attributes["gateway.required_level"] = decision.required.name
            attributes["gateway.reason"] = decision.reason
            if decision.held is not None:
                attributes["gateway.level"] = decision.held.name
        else:
            attributes["gateway.reason"] = decision.reason
            attributes["http.response.status_code"] = decision.status
        request_span = trace.get_current_span()
        if rule is not None:
            request_span.set_attribute("gateway.rule", rule.name)
        request_span.set_attribute("gateway.decision", kind)
        self.tracer.start_span("decision", attributes=attributes, start_time=started_ns).end()

    async def upstream(
        self,
        call: Awaitable[web.StreamResponse],
        headers: CIMultiDict[str],
        upstream: str,
    ) -> web.StreamResponse:
        """Await ``call`` (the forward, not yet started) inside an ``upstream`` span.

        ``headers`` (the upstream's, which ``call`` sends) get a traceparent naming
        that span in place of the client's.
        """
        with self.tracer.start_as_current_span(
            "upstream",
            kind=SpanKind.CLIENT,
            attributes={"gateway.upstream": upstream},
            record_exception=False,
        ) as span:
            self.inject(headers)
            response = await call
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    def inject(
        self, headers: CIMultiDict[str], context: otel_context.Context | None = None
    ) -> None:
        """Replace any trace headers in ``headers`` with the current span's (or ``context``'s)."""
        headers.popall(tracecontext.TRACEPARENT, None)
        headers.popall(tracecontext.TRACESTATE, None)
        self._propagator.inject(headers, context=context)

    # -- calls the gateway makes ---------------------------------------------------------

    def client_trace(self) -> aiohttp.TraceConfig:
        """For the provider's HTTP session: a client span per request made while serving one.

        Each request carries a traceparent naming its span. Requests outside a
        request's trace (loading the provider at start-up, readiness probes) are not
        traced: they would each start a trace of their own.
        """
        config = aiohttp.TraceConfig()

        async def start(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
        ) -> None:
            if not trace.get_current_span().get_span_context().is_valid:
                return
            endpoint = ctx.trace_request_ctx
            name = (
                PROVIDER_SPANS.get(endpoint, "http.client")
                if isinstance(endpoint, str)
                else ("http.client")
            )
            url = params.url
            attributes: dict[str, str | int] = {"http.request.method": params.method}
            if url.host is not None:
                attributes["server.address"] = url.host
            if url.port is not None:
                attributes["server.port"] = url.port
            span = self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
            ctx.otel_span = span
            self.inject(params.headers, trace.set_span_in_context(span))

        async def end(
            _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
        ) -> None:
            span = getattr(ctx, "otel_span", None)
            if span is not None:
                span.set_attribute("http.response.status_code", params.response.status)
                if params.response.status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()

        async def failed(
            _: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestExceptionParams,
        ) -> None:
            span = getattr(ctx, "otel_span", None)
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, type(params.exception).__name__))
                span.end()

        config.on_request_start.append(start)
        config.on_request_end.append(end)
        config.on_request_exception.append(failed)
        return config

    def instrument_store(self, store: object) -> None:
        """Spans around a Redis store's ``load``/``save``/``delete`` (no argument recorded).

        The cookie and memory stores do no I/O: a span would cost more than the call.
        """
        if not isinstance(store, RedisStore):
            return
        for method in STORE_METHODS:
            setattr(store, method, self._traced_call(f"session.{method}", getattr(store, method)))
        self.instrument_aux(store)

    def instrument_aux(self, aux: object) -> None:
        """Spans around a Redis aux store's calls (:data:`AUX_METHODS`, no argument
        recorded); the in-process one does no I/O."""
        if not isinstance(aux, RedisStore):
            return
        for method in AUX_METHODS:
            setattr(aux, method, self._traced_call(f"store.{method}", getattr(aux, method)))

    def _traced_call(
        self, name: str, call: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def traced(*args: Any, **kwargs: Any) -> Any:
            with self.tracer.start_as_current_span(
                name,
                kind=SpanKind.CLIENT,
                attributes={"db.system.name": "redis"},
                record_exception=False,
            ):
                return await call(*args, **kwargs)

        return traced


def make_provider(config: TelemetryConfig) -> TracerProvider:
    """A tracer provider: service name and sampler from the configuration, else ``OTEL_*``.

    The service name is ``telemetry.service_name``, else ``OTEL_SERVICE_NAME``, else
    ``stepup-gateway``; ``telemetry.sample_ratio`` samples that share of new traces
    and follows the client's sampled flag (parent-based), else ``OTEL_TRACES_SAMPLER``
    decides (the SDK's default: parent-based, every trace).
    """
    resource = Resource.create(
        {SERVICE_NAME: config.service_name} if config.service_name is not None else {}
    )
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    sampler: Sampler | None = None
    if config.sample_ratio is not None:
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
    return TracerProvider(resource=resource, sampler=sampler)
