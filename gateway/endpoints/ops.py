"""``/healthz``, ``/readyz``, ``/metrics`` and ``/jwks.json``: for operators and upstreams.

Also the answers the gateway gives itself, outside the internal prefix, for
``/favicon.ico`` and ``/robots.txt`` when no rule names them: neither may
send a browser or a crawler to sign in.
"""

from __future__ import annotations

import contextlib

from aiohttp import web

from gateway.context import Context
from gateway.errors import NotFound, ProviderError, StoreUnavailable

# Crawlers are kept out of everything behind the gateway (RFC 9309): what they
# would find is sign-in pages. A rule naming /robots.txt lets the upstream answer.
ROBOTS_TXT = "User-agent: *\nDisallow: /\n"
# A day: both answers change only with the configuration.
OWN_ANSWER_MAX_AGE_S = 24 * 60 * 60


async def healthz(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    if ctx.draining:
        # Load balancers that probe take the process out before its listener
        # closes (Kubernetes also removes a terminating pod on its own).
        ctx.metrics.ready.set(0)
        return web.json_response({"ready": False, "draining": True}, status=503)
    provider_ready = True
    for _name, provider in ctx.providers:  # every provider (oidc.providers) must be loaded
        if not provider.ready:
            with contextlib.suppress(ProviderError):
                await provider.load()
        provider_ready = provider_ready and provider.ready
    try:
        store_ready = await ctx.store.ping()
    except (StoreUnavailable, OSError, ConnectionError):
        store_ready = False
    ready = provider_ready and store_ready
    ctx.metrics.ready.set(1 if ready else 0)
    return web.json_response(
        {"ready": ready, "provider": provider_ready, "store": store_ready},
        status=200 if ready else 503,
    )


async def metrics(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    if ctx.config.server.metrics_listen is not None:
        raise NotFound("Metrics are served on the metrics listener", reason="metrics_moved")
    return ctx.metrics_response()


async def jwks(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    return web.json_response(ctx.signer.jwks(), headers={"Cache-Control": "max-age=300"})


async def favicon(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    # No icon: 204 and no body, so the browser stops asking for a day.
    return web.Response(status=204, headers={"Cache-Control": f"max-age={OWN_ANSWER_MAX_AGE_S}"})


async def robots(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(
        text=ROBOTS_TXT,
        content_type="text/plain",
        headers={"Cache-Control": f"max-age={OWN_ANSWER_MAX_AGE_S}"},
    )
