"""The access token a forward-auth request carries (the ``api`` section, in ``/auth``).

A front proxy forwards the client's own headers to ``/auth`` (nginx
``auth_request``, Traefik ``ForwardAuth``, Caddy ``forward_auth``, Envoy
``ext_authz`` with ``authorization`` allowed), so an API client's
``Authorization: Bearer|DPoP`` and ``DPoP`` proof arrive there as they were sent.
They are judged by the proxy mode's :class:`gateway.tokens.gate.TokenGate`, for
the request the proxy *describes*: a DPoP proof names that request's method and
URL (its canonical host and normalised path under the public scheme, as in proxy
mode), never ``/auth``'s.

Kept apart from :mod:`gateway.endpoints.forward_auth` on purpose: a request with
a token is judged by it, never by a cookie beside it, so anything that remembers
decisions by the cookie must skip (or key by) the ``Authorization`` and ``DPoP``
headers; a DPoP proof is good once, so its request is never answered from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.context import Context
from gateway.session.model import Session
from gateway.tokens.gate import Presented, presented_token


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """A verified access token: as presented, and the session-shaped value it proves."""

    presented: Presented
    session: Session


async def token_facts(
    ctx: Context, request: web.BaseRequest, method: str, host: str | None, path: str
) -> TokenFacts | None:
    """The described request's access token, verified as proxy mode verifies it.

    ``method``, ``host`` (canonical) and ``path`` (normalised) are the described
    request's. None when the ``api`` section is off or no ``Bearer``/``DPoP``
    ``Authorization`` came (the request is judged by its cookie); a token that
    fails is :class:`gateway.errors.Unauthorized` (RFC 6750 / 9449), an
    introspection that does not answer a 503, as in proxy mode.
    """
    tokens = ctx.tokens
    if tokens is None:
        return None
    presented = presented_token(request.headers)
    if presented is None:
        return None
    session = await tokens.session_for(
        presented, method, host, path, ctx.clock(), ctx.providers, ctx.aux
    )
    return TokenFacts(presented, session)
