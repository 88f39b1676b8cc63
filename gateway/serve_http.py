"""The low-level aiohttp server the gateway runs on: one handler, no router.

The HTTP parser is aiohttp's, the connections' limits and timeouts
:mod:`gateway.connections`'; here aiohttp's own error answers are replaced by the
gateway's, requests get an id when they bring none, and :class:`ConnectionHooks`
is what the server asks of the gateway about its connections (and what
``/metrics`` and ``/readyz`` read back).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway import early_forward, logs
from gateway.connections import ConnectionPolicy, GuardedServer
from gateway.early import EarlyAnswer, EarlyHandler, EarlyRelay, EarlyServer
from gateway.endpoints import forward_auth
from gateway.errors import BadRequest, GatewayError, MethodNotAllowed
from gateway.metrics import Metrics
from gateway.model import ServerConfig
from gateway.session.redis_store import RedisStore
from gateway.session.stores import SessionStore

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger("gateway")

# One header field, at most. aiohttp's default, like nginx's and Apache's, is 8 KB; the
# gateway's own cookies stay under that (session <= ~3.9 KB, sign-ins in flight <= 3 KB),
# and twice as much leaves the application's cookies room, so /healthz and /callback
# still answer when a Cookie header has grown past 8 KB. Upstreams never get the
# gateway's cookies, so they see a shorter header than this.
MAX_HEADER_FIELD_BYTES = 16 * 1024


class ConnectionHooks:
    """The :class:`gateway.app.Gateway`'s side of its connections (gateway.connections).

    The server reads the policy on each connection (so a reload applies to new
    ones), and reports closes and timeouts here for the metrics.
    """

    metrics: Metrics
    store: SessionStore
    server: GuardedServer | None  # set by make_server
    _aux_redis: RedisStore | None
    _connection_policy: ConnectionPolicy

    def apply_connection_settings(self, server: ServerConfig) -> None:
        self._connection_policy = ConnectionPolicy(
            max_connections=server.max_connections,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
            keepalive_timeout_s=server.keepalive_timeout_s,
            keepalive_requests=server.keepalive_requests,
            keepalive_max_age_s=server.keepalive_max_age_s,
        )

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


class _RequestHandler(EarlyHandler):
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
        logs.bind_request_id(logs.new_request_id())
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


class _Server(EarlyServer):
    def __init__(self, gateway: Gateway) -> None:
        tracing = gateway.tracing
        super().__init__(
            gateway.handle
            if tracing is None
            else tracing.serving(gateway.handle, lambda: gateway.quiet_paths),
            gateway.connection_policy,
            on_close=gateway.connection_closed,
            on_timeout=gateway.client_timed_out,
            handler_cancellation=True,
            max_field_size=MAX_HEADER_FIELD_BYTES,
        )
        self._gateway = gateway
        gateway.server = self
        self._answer_early = partial(forward_auth.answer_early, gateway)
        self._relay_early = partial(early_forward.relay_for, gateway)

    def follows_heads(self) -> bool:
        """While decisions are remembered (gateway.decision_memo): remembered forwards
        and ``/auth`` answers are found by a request's exact bytes."""
        return self._gateway.decisions.exact.enabled

    def early(self) -> EarlyAnswer | None:
        """Remembered ``/auth`` answers, while forward-auth is on."""
        if self._gateway.config.server.mode == "proxy":
            return None
        return self._answer_early

    def early_relay(self) -> EarlyRelay | None:
        """Remembered forwards, unless requests are traced (then none are remembered:
        gateway.forward; tracing is set at start-up, never by a reload)."""
        return None if self._gateway.tracing is not None else self._relay_early

    def __call__(self) -> RequestHandler:
        handler = _RequestHandler(self, loop=self._loop, **self.handler_kwargs())
        handler.gateway = self._gateway
        return handler


def make_server(gateway: Gateway) -> GuardedServer:
    """The low-level aiohttp server: one handler, no router, no middleware chain."""
    return _Server(gateway)
