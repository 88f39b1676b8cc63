"""The provider's HTTP responses: HTML pages, redirects, JSON, and the headers on all.

Shared by every part of :mod:`stepup_demo.idp`; no state, no sign-in logic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

# Pages run only our own script; nothing may frame them (clickjacking). form-action
# is left out: Chrome applies it to the redirect back to the relying party too.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def html_response(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP},
    )


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def json_text(text: str) -> web.Response:
    return web.Response(
        text=text, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def json_error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": message}, status=status, headers={"Cache-Control": "no-store"}
    )


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response
