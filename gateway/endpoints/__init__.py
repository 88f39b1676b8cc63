"""The gateway's own endpoints, one module each, and the one table that routes to them.

Paths under ``server.internal_prefix`` (default ``/_gateway``) are the
gateway's and never reach an upstream; any other path there is 404.
``/favicon.ico`` and ``/robots.txt`` are answered by the gateway too (GET and
HEAD), unless a rule names the path: then the rules decide, as for any path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

from aiohttp import web

from gateway.context import Context
from gateway.decision import site_paths
from gateway.endpoints import callback, forward_auth, logout, ops, stepup
from gateway.model import Rule

Handler = Callable[[Context, web.BaseRequest], Awaitable[web.StreamResponse]]

# Under the internal prefix: path -> handler.
ROUTES: Mapping[str, Handler] = {
    "/callback": callback.callback,
    "/logout": logout.logout,
    "/logged-out": logout.logged_out,
    "/backchannel-logout": logout.backchannel_logout,
    "/step-up": stepup.step_up,
    "/resume": stepup.resume,
    "/healthz": ops.healthz,
    "/readyz": ops.readyz,
    "/metrics": ops.metrics,
    "/jwks.json": ops.jwks,
    "/auth": forward_auth.auth,
    "/start": forward_auth.start,
}


def route(sub_path: str) -> Handler | None:
    """The handler for ``sub_path`` under the internal prefix (None: 404).

    Envoy's ext_authz appends the checked request's path to ``/auth/envoy``.
    """
    handler = ROUTES.get(sub_path)
    if handler is None and sub_path.startswith(forward_auth.ENVOY_PREFIX + "/"):
        return forward_auth.auth
    return handler


# At the site's root, for GET and HEAD, when no rule names the path
# (:data:`gateway.decision.SITE_PATHS`).
SITE_ROUTES: Mapping[str, Handler] = {
    "/favicon.ico": ops.favicon,
    "/robots.txt": ops.robots,
}


def site_routes(rules: Iterable[Rule]) -> dict[str, Handler]:
    """:data:`SITE_ROUTES` less the paths a rule names."""
    answered = site_paths(rules)
    return {path: handler for path, handler in SITE_ROUTES.items() if path in answered}
