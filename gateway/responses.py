"""What the gateway answers with itself: challenges, error pages, redirects.

Pure functions from values to status, headers and bodies; :mod:`gateway.app`
wraps them into aiohttp responses.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from gateway.model import Level

NAVIGATION_METHODS = frozenset({"GET", "HEAD"})


def is_navigation(method: str, headers: Mapping[str, str]) -> bool:
    """A browser page load: it can follow a redirect to the provider and back.

    Contract: GET/HEAD with ``Accept`` containing ``text/html``, or
    ``Sec-Fetch-Mode: navigate``. Everything else (XHR, fetch, API clients,
    non-GET) gets a 401 challenge it can act on instead.
    """
    if method not in NAVIGATION_METHODS:
        return False
    if headers.get("Sec-Fetch-Mode", "").lower() == "navigate":
        return True
    return wants_html(headers)


def wants_html(headers: Mapping[str, str]) -> bool:
    return "text/html" in headers.get("Accept", "").lower()


def safe_return_to(target: str | None, fallback: str = "/") -> str:
    """Only a same-origin relative URL is ever a redirect target.

    Refuses absolute URLs, scheme-relative ``//host``, ``/\\host`` (browsers treat a
    backslash as a slash), control characters, and the same shapes hidden behind
    percent-encoding (decoded up to three times).
    """
    if not target or not target.startswith("/"):
        return fallback
    candidate = target
    for _ in range(4):
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in candidate):
            return fallback
        if "\\" in candidate or candidate.startswith("//"):
            return fallback
        parts = urlsplit(candidate)
        if parts.scheme or parts.netloc or not candidate.startswith("/"):
            return fallback
        decoded = unquote(candidate)
        if decoded == candidate:
            break
        candidate = decoded
    else:
        return fallback
    return target


def same_origin_path(url: str | None, origin: str) -> str:
    """The path and query of ``url`` when it is on ``origin`` (a Referer), else ``/``."""
    if not url:
        return "/"
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}".lower() != origin.lower():
        return "/"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return safe_return_to(target)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def www_authenticate(
    required: Level | None, max_age_s: int | None, acr_values: tuple[str, ...] = ()
) -> str:
    """The ``WWW-Authenticate`` value for a 401.

    Without a session: plain ``Bearer``. Under-assured: RFC 9470 section 3's
    ``insufficient_user_authentication`` with the ``acr_values`` and ``max_age``
    a client needs to obtain a sufficient authentication.
    """
    if required is None:
        return "Bearer"
    params = [
        'error="insufficient_user_authentication"',
        f'error_description="{_quote(describe_need(required, max_age_s))}"',
    ]
    if acr_values:
        params.append(f'acr_values="{_quote(" ".join(acr_values))}"')
    if max_age_s is not None:
        params.append(f"max_age={max_age_s}")
    return "Bearer " + ", ".join(params)


def describe_need(required: Level, max_age_s: int | None) -> str:
    if max_age_s is None:
        return f"This action needs a sign-in at level '{required.name}'"
    return (
        f"This action needs a sign-in at level '{required.name}' "
        f"within the last {format_duration(max_age_s)}"
    )


def format_duration(seconds: int) -> str:
    if seconds == 0:
        return "moment (a fresh sign-in)"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;
line-height:1.5}}h1{{font-size:1.4rem}}.muted{{color:#555}}</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>
"""


# Every page of the gateway's own says what happened and offers a way on: its own
# link when it has one (go back, sign in again), else the application's front page.
BACK_TO_APP = '<p class="muted"><a href="/">Back to the application</a></p>'


def page(title: str, paragraphs: list[str], *, raw_html: str = "") -> str:
    """A small, self-contained HTML page; every text is escaped."""
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs) + raw_html
    if "<a href=" not in raw_html:
        body += BACK_TO_APP
    return PAGE.format(title=html.escape(title), body=body)


def json_error(error: str, message: str, request_id: str, **extra: object) -> str:
    return json.dumps({"error": error, "message": message, "request_id": request_id, **extra})
