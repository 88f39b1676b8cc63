"""Moving bytes to the upstream and back: the one place the gateway talks to upstreams.

Bodies stream both ways without being buffered: the request body is the server
request's own stream, the response goes back in chunks as it arrives. Which
headers go either way is decided by :mod:`gateway.headers`; the request body's
stream and what its failures mean are :mod:`gateway.request_stream`'s, a
WebSocket's frames :mod:`gateway.proxy_websocket`'s.

Failures before the response has started are raised as :class:`errors.UpstreamError`
(502) or :class:`errors.UpstreamTimeout` (504) for :mod:`gateway.app` to answer.
After the status line has gone out there is nothing left to say to the client:
the connection is closed, so the client sees a truncated response, and the
reason is logged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import TracebackType

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import errors
from gateway.headers import (
    upstream_response_headers,
)
from gateway.memo import HEADER_MEMO_BYTES, HEADER_MEMO_ENTRIES, Memo, header_set_size
from gateway.model import UpstreamConfig
from gateway.proxy_websocket import forward_websocket
from gateway.request_stream import BODY_IDLE_TIMEOUT_S, RequestBodyStream, translate_send_error
from gateway.upstream_pool import PooledResponse, UpstreamPool

log = structlog.get_logger(__name__)

# 64 KiB: the size of aiohttp's own stream buffers (its StreamReader high-water
# mark), so one chunk is one read and one write, and memory per request stays flat.
CHUNK_SIZE = 64 * 1024
# Connections per upstream. Enough for thousands of requests/s with keep-alive;
# more would only queue in the upstream's accept backlog.
POOL_LIMIT = 256
# Seconds a resolved upstream address is reused; upstreams behind DNS (Kubernetes
# services) move rarely, and re-resolving per request costs a round trip.
DNS_CACHE_TTL_S = 300
# Seconds an idle pooled connection is kept. Below the common server idle timeouts
# (nginx keepalive_timeout 75 s, gunicorn 2 s is the outlier) so we rarely reuse
# a connection the upstream is closing at the same moment.
KEEPALIVE_TIMEOUT_S = 15.0

# Requests without a body in these methods go through the upstream's UpstreamPool
# (aiohttp's client sends them with no Content-Length or Content-Type of its own,
# so the upstream sees the same request either way); the rest through ClientSession.
POOLED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# A response with a Content-Length up to this is read whole and goes to the client
# in one write, head and body together; a longer or unsized one is streamed.
BUFFERED_BODY_MAX_BYTES = CHUNK_SIZE

# What aiohttp's client would add on its own; the upstream gets the client's, or none.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _Upstream:
    __slots__ = ("base_path", "host_header", "http_base", "name", "pool", "session", "ws_base")

    def __init__(
        self,
        name: str,
        http_base: str,
        ws_base: str,
        host_header: str,
        base_path: str,
        pool: UpstreamPool | None,
    ) -> None:
        self.name = name
        self.http_base = http_base
        self.ws_base = ws_base
        self.host_header = host_header
        self.base_path = base_path
        self.pool = pool  # plain http only; TLS upstreams use the ClientSession
        self.session: aiohttp.ClientSession | None = None


class UpstreamIntercepted(Exception):
    """The upstream's answer was taken over by the gateway (see ``forward(intercept=)``)."""

    def __init__(self, status: int, challenge: str) -> None:
        super().__init__(status)
        self.status = status
        self.challenge = challenge  # the WWW-Authenticate value ``intercept`` took over


class Upstreams:
    """One pooled HTTP client per upstream, opened at start-up, closed at shutdown.

    Construction only reads the config; :meth:`start` (or the first request)
    opens the clients inside the running loop, :meth:`close` closes them. Also
    usable as ``async with Upstreams(...) as upstreams:``.

    ``gateway_cookies`` / ``gateway_cookie_prefixes`` name the gateway's own
    cookies: an upstream ``Set-Cookie`` for one of them is dropped, so an
    upstream cannot overwrite or delete the gateway's session.
    """

    def __init__(
        self,
        upstreams: Mapping[str, UpstreamConfig],
        *,
        connect_timeout_s: float,
        timeout_s: float,
        gateway_cookies: Collection[str] = (),
        gateway_cookie_prefixes: tuple[str, ...] = (),
        pool_limit: int = POOL_LIMIT,
        body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
    ) -> None:
        # sock_read bounds the wait for the response head after the body is sent
        # and every later read; no total: a 1 GiB transfer may take a while.
        # connect covers waiting for a free pooled connection as well.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=max(connect_timeout_s, timeout_s),
            sock_connect=connect_timeout_s,
            sock_read=timeout_s,
        )
        self._pool_limit = pool_limit
        self._gateway_cookies = frozenset(gateway_cookies)
        self._gateway_cookie_prefixes = tuple(gateway_cookie_prefixes)
        # Upstreams answer with the same headers for a while (Date changes once a
        # second): the filtered set is kept under the raw one it came from.
        self._relayed_headers: Memo[tuple[tuple[bytes, bytes], ...], CIMultiDict[str]] = Memo(
            max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
        )
        self._body_idle_timeout_s = body_idle_timeout_s
        self._closed = False
        self._upstreams: dict[str, _Upstream] = {}
        for name, cfg in upstreams.items():
            url = URL(cfg.url)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"upstream {name!r}: not an http(s) URL")
            base_path = url.raw_path.rstrip("/")
            origin = str(url.origin())
            ws_origin = ("wss" if url.scheme == "https" else "ws") + origin[len(url.scheme) :]
            pool = None
            # yarl gives the default port when none is written: the port test only narrows.
            if url.scheme == "http" and url.port is not None:
                pool = UpstreamPool(
                    url.host,
                    url.port,
                    limit=pool_limit,
                    connect_timeout_s=max(connect_timeout_s, timeout_s),
                    sock_connect_timeout_s=connect_timeout_s,
                    read_timeout_s=timeout_s,
                    keepalive_timeout_s=KEEPALIVE_TIMEOUT_S,
                    read_bufsize=CHUNK_SIZE,
                )
            self._upstreams[name] = _Upstream(
                name,
                http_base=origin + base_path,
                ws_base=ws_origin + base_path,
                host_header=url.host_port_subcomponent or url.host,
                base_path=base_path,
                pool=pool,
            )

    async def start(self) -> None:
        """Open every upstream's client (needs the running loop)."""
        for upstream in self._upstreams.values():
            self._open(upstream)

    def _open(self, upstream: _Upstream) -> aiohttp.ClientSession:
        if upstream.session is None:
            upstream.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._pool_limit,
                    ttl_dns_cache=DNS_CACHE_TTL_S,
                    keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                ),
                timeout=self._timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                trust_env=False,
                raise_for_status=False,
            )
        return upstream.session

    async def __aenter__(self) -> Upstreams:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for upstream in self._upstreams.values():
            if upstream.pool is not None:
                upstream.pool.close()
            if upstream.session is not None:
                await upstream.session.close()
                upstream.session = None

    def host_of(self, upstream: str) -> str:
        """The ``Host`` the upstream expects: its own ``host[:port]``."""
        target = self._upstreams.get(upstream)
        if target is None:
            raise errors.UpstreamError("The upstream is not available.", reason="unknown_upstream")
        return target.host_header

    def _session(self, name: str) -> tuple[_Upstream, aiohttp.ClientSession]:
        upstream = self._upstreams.get(name)
        if upstream is None or self._closed:
            raise errors.UpstreamError("The upstream is not available.", reason="unknown_upstream")
        return upstream, self._open(upstream)

    async def forward(
        self,
        request: web.BaseRequest,
        upstream: str,
        *,
        path_qs: str,
        headers: CIMultiDict[str],
        extra_response_headers: Sequence[tuple[str, str]] = (),
        on_headers: Callable[[], None] | None = None,
        method: str | None = None,
        body: bytes | None = None,
        intercept: Callable[[aiohttp.ClientResponse], str | None] | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` to ``upstream`` at ``path_qs`` and stream the answer back.

        ``method`` and ``body`` replace the request's own (a kept request replayed
        after a step-up, or a body the gateway had to read to judge the request);
        ``headers`` must then carry the matching Content-Type and Content-Length.
        When ``intercept`` returns a challenge for the upstream's response head,
        nothing is relayed and :class:`UpstreamIntercepted` carries it to the caller.

        ``path_qs`` is the normalized path plus ``?query`` (still percent-encoded),
        ``headers`` what :func:`gateway.headers.upstream_request_headers` built plus
        the assurance headers. The body goes only when the client sent one
        (Content-Length, or Transfer-Encoding: chunked). ``extra_response_headers``
        are added to the upstream's (the gateway's own Set-Cookie);
        ``on_headers`` is called when the upstream's response head has arrived.
        """
        target, session = self._session(upstream)
        if (
            target.pool is not None
            and method is None
            and body is None
            and intercept is None
            and request.method in POOLED_METHODS
            and not request.body_exists
        ):
            return await self._forward_pooled(
                request,
                target,
                target.pool,
                path_qs=path_qs,
                headers=headers,
                extra_response_headers=extra_response_headers,
                on_headers=on_headers,
            )
        url = URL(target.http_base + path_qs, encoded=True)
        data: RequestBodyStream | bytes | None
        if body is not None:
            data = body
        elif request.body_exists:
            data = RequestBodyStream(request, self._body_idle_timeout_s)
        else:
            data = None
        try:
            upstream_response = await session.request(
                method or request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        except Exception as exc:
            error = translate_send_error(
                exc, request, upstream, data if not isinstance(data, bytes) else None
            )
            if error is None:
                raise
            raise error from exc

        if on_headers is not None:
            on_headers()
        if intercept is not None:
            challenge = intercept(upstream_response)
            if challenge is not None:
                upstream_response.release()
                raise UpstreamIntercepted(upstream_response.status, challenge)
        try:
            return await self._relay(request, upstream, upstream_response, extra_response_headers)
        finally:
            upstream_response.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: str,
        upstream_response: aiohttp.ClientResponse,
        extra_response_headers: Sequence[tuple[str, str]],
    ) -> web.StreamResponse:
        response_headers = self._head(
            upstream,
            upstream_response.status,
            upstream_response.raw_headers,
            upstream_response.headers,
            extra_response_headers,
            abort=upstream_response.close,
        )
        try:
            response = web.StreamResponse(
                status=upstream_response.status,
                reason=upstream_response.reason or None,
                headers=response_headers,
            )
            await response.prepare(request)
        except ValueError as exc:
            upstream_response.close()
            raise _bad_response(upstream, exc) from exc
        await _stream(
            request, upstream, upstream_response.content, response, abort=upstream_response.close
        )
        return response

    def pool_of(self, upstream: str) -> tuple[UpstreamPool, str] | None:
        """``upstream``'s pool and base path, when requests without a body go over one."""
        target = self._upstreams.get(upstream)
        if target is None or target.pool is None or self._closed:
            return None
        return target.pool, target.base_path

    async def relay_pooled(
        self,
        request: web.BaseRequest,
        upstream: str,
        pooled: PooledResponse,
        extra_response_headers: Sequence[tuple[str, str]] = (),
    ) -> web.StreamResponse:
        """Answer ``request`` with ``upstream``'s answer in ``pooled``, then release it."""
        try:
            return await self._relay_pooled(request, upstream, pooled, extra_response_headers)
        finally:
            pooled.release()

    async def _forward_pooled(
        self,
        request: web.BaseRequest,
        target: _Upstream,
        pool: UpstreamPool,
        *,
        path_qs: str,
        headers: CIMultiDict[str],
        extra_response_headers: Sequence[tuple[str, str]],
        on_headers: Callable[[], None] | None,
    ) -> web.StreamResponse:
        """:meth:`forward` for a request without a body, over the upstream's pool."""
        try:
            pooled = await pool.request(request.method, target.base_path + path_qs, headers)
        except Exception as exc:
            error = translate_send_error(exc, request, target.name, None)
            if error is None:
                raise
            raise error from exc
        if on_headers is not None:
            on_headers()
        return await self.relay_pooled(request, target.name, pooled, extra_response_headers)

    async def _relay_pooled(
        self,
        request: web.BaseRequest,
        upstream: str,
        pooled: PooledResponse,
        extra_response_headers: Sequence[tuple[str, str]],
    ) -> web.StreamResponse:
        message = pooled.message
        response_headers = self._head(
            upstream,
            message.code,
            message.raw_headers,
            message.headers,
            extra_response_headers,
            abort=pooled.close,
        )
        length = response_headers.get("Content-Length")  # digits: llhttp checked it
        body: bytes | None = None
        truncated = False
        if length is not None and int(length) <= BUFFERED_BODY_MAX_BYTES:
            try:
                payload = pooled.payload
                # Usually the whole body came with the head: take it without waiting.
                body = payload.read_nowait() if payload.is_eof() else await payload.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                pooled.close()
                log.warning(
                    "upstream_response_aborted", upstream=upstream, error=type(exc).__name__
                )
                truncated = True
        response: web.StreamResponse
        try:
            if body is None:
                response = web.StreamResponse(
                    status=message.code, reason=message.reason or None, headers=response_headers
                )
            else:
                response = web.Response(
                    status=message.code,
                    reason=message.reason or None,
                    headers=response_headers,
                    body=body,
                )
            await response.prepare(request)  # a Response holds its head back for the body
        except ValueError as exc:
            pooled.close()
            raise _bad_response(upstream, exc) from exc
        if truncated:
            # As when streaming: the head is out and the connection closes, so the
            # client sees a truncated response, never a complete-looking one.
            if request.transport is not None:
                request.transport.close()
        elif body is None:
            await _stream(request, upstream, pooled.payload, response, abort=pooled.close)
        else:
            try:
                await response.write_eof()  # head and body in one write
            except (aiohttp.ClientError, OSError) as exc:
                if request.transport is not None:
                    request.transport.close()
                log.info("client_gone", upstream=upstream, error=type(exc).__name__)
        return response

    async def forward_websocket(
        self,
        request: web.BaseRequest,
        upstream: str,
        *,
        path_qs: str,
        headers: CIMultiDict[str],
        extra_response_headers: Sequence[tuple[str, str]] = (),
    ) -> web.StreamResponse:
        """Relay a WebSocket (:func:`gateway.proxy_websocket.forward_websocket`).

        ``headers`` must come from ``upstream_request_headers(..., websocket=True)``;
        ``extra_response_headers`` go on the client's handshake answer (the gateway's
        own Set-Cookie).
        """
        target, session = self._session(upstream)
        return await forward_websocket(
            request,
            session,
            URL(target.ws_base + path_qs, encoded=True),
            upstream,
            headers,
            extra_response_headers,
            self._response_headers,
        )

    def _head(
        self,
        upstream: str,
        status: int,
        raw: tuple[tuple[bytes, bytes], ...],
        parsed: Mapping[str, str],
        extra: Sequence[tuple[str, str]],
        *,
        abort: Callable[[], None],
    ) -> CIMultiDict[str]:
        """The headers to answer the client with, for either relay; ``abort`` drops
        the upstream connection when the answer cannot be relayed at all.

        Read-only: without ``extra`` it is the remembered set itself, which the
        response's constructor copies (aiohttp's StreamResponse and Response do).
        """
        if status == 101:
            # RFC 9110 15.2.2: no protocol switch unless the request asked for one
            # (WebSockets go through forward_websocket, never here).
            abort()
            raise _bad_response(upstream, "unrequested_101")
        response_headers = self.relayed(raw, parsed)
        if extra:
            response_headers = response_headers.copy()
            for name, value in extra:
                response_headers.add(name, value)
        return response_headers

    def relayed(
        self, raw: tuple[tuple[bytes, bytes], ...], parsed: Mapping[str, str]
    ) -> CIMultiDict[str]:
        """The upstream's response headers to relay (remembered: never to be changed).

        ``parsed`` is ``raw`` as aiohttp decoded it; the result depends on nothing
        else but this gateway's cookie names.
        """
        filtered = self._relayed_headers.get(raw)
        if filtered is None:
            filtered = self._response_headers(parsed.items())
            self._relayed_headers.put(raw, filtered, header_set_size(raw))
        return filtered

    def _response_headers(self, items: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
        return upstream_response_headers(
            items,
            strip_set_cookies=self._gateway_cookies,
            strip_set_cookie_prefixes=self._gateway_cookie_prefixes,
        )


async def _stream(
    request: web.BaseRequest,
    upstream: str,
    content: aiohttp.StreamReader,
    response: web.StreamResponse,
    *,
    abort: Callable[[], None],
) -> None:
    """Copy the upstream's body to the prepared ``response`` as it arrives.

    ``abort`` drops the upstream connection when the copy fails.
    """
    reading = True  # which side failed, if one does
    try:
        async for chunk in content.iter_chunked(CHUNK_SIZE):
            reading = False
            await response.write(chunk)
            reading = True
        reading = False
        await response.write_eof()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The status line is out: no error page is possible. Close the client's
        # connection so it sees a truncated response, never a complete-looking
        # one; drop the upstream connection rather than reuse it half-read.
        abort()
        if request.transport is not None:
            request.transport.close()
        if reading:
            log.warning("upstream_response_aborted", upstream=upstream, error=type(exc).__name__)
        else:
            log.info("client_gone", upstream=upstream, error=type(exc).__name__)


def _bad_response(upstream: str, cause: Exception | str) -> errors.UpstreamError:
    """A response head the gateway will not relay; nothing has gone out yet: a 502.

    ``cause``: aiohttp's ValueError for a status or reason it will not write (out of
    range, control characters), or a short description.
    """
    error = cause if isinstance(cause, str) else type(cause).__name__
    log.warning("upstream_bad_response", upstream=upstream, error=error)
    return errors.UpstreamError(
        "The upstream's response was invalid.", reason="upstream_bad_response"
    )
