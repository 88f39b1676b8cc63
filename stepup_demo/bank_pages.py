"""Demo Bank's page frame and its refusals.

Every answer is one page: the content, then what the gateway told Demo Bank (the
``X-Auth-*`` headers, and whether the assertion checked out). The refusals: no valid
assertion (``403``), and Demo Bank's own step-up challenge (``401`` with RFC 9470's
``WWW-Authenticate``). And the Content-Security-Policy that ``DemoBank`` sets on
them (:func:`content_security_policy`).
"""

from __future__ import annotations

from decimal import Decimal

from aiohttp import web

from stepup_demo.bank_model import (
    SAVINGS_STEP_UP_ABOVE,
    SAVINGS_STEP_UP_ACR,
    SAVINGS_STEP_UP_MAX_AGE_S,
    SHOWN_HEADERS,
    Seen,
)
from stepup_demo.pages import esc


def content_security_policy(form_targets: tuple[str, ...] = ()) -> str:
    """No scripts, no framing. ``form_targets``: origins a form post may be redirected to.

    The gateway in front may answer a form post with a redirect to the identity
    provider (a step-up; the post is kept and sent after it). Chrome checks
    ``form-action`` on every redirect of a form submission, so without the
    provider's origin here the browser would stop at the first hop.
    """
    targets = " ".join(("'self'", *form_targets))
    return (
        f"default-src 'none'; style-src 'self'; form-action {targets}; base-uri 'none';"
        " frame-ancestors 'none'"
    )


def refused(seen: Seen) -> web.Response:
    body = (
        "<p class='error' role='alert'>Refused: this request's X-Auth headers are not"
        " backed by a valid gateway assertion, so nothing was changed.</p>"
    )
    return page("Refused", body, seen, 403)


def page(title: str, body: str, seen: Seen, status: int = 200) -> web.Response:
    rows = "".join(
        f"<tr><th scope='row'>{esc(name)}</th><td><code>{esc(seen.headers.get(name, '-'))}</code>"
        "</td></tr>"
        for name in SHOWN_HEADERS
    )
    if seen.verified:
        status_line = "<p id='assertion-status' class='ok'>assertion verified</p>"
    else:
        status_line = (
            "<p id='assertion-status' class='error'>"
            f"assertion not verified: {esc(seen.problem)}</p>"
        )
    html = (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{esc(title)} - Demo Bank</title>\n"
        "<link rel='stylesheet' href='/public/demo.css'>\n</head>\n<body>\n"
        "<header><nav aria-label='Demo Bank'><a href='/'>Accounts</a>"
        "<a href='/transfers/new'>Transfer money</a><a href='/transfers'>Ledger</a>"
        "<a href='/standing-orders'>Standing orders</a><a href='/savings'>Savings</a>"
        "<a href='/payees'>Payees</a><a href='/admin'>Admin</a>"
        "<a href='/public/about'>About</a><a href='/_gateway/logout'>Sign out</a></nav></header>\n"
        f"<main>\n<h1>{esc(title)}</h1>\n{body}\n"
        "<section aria-labelledby='gateway-said'><h2 id='gateway-said'>What the gateway told"
        f" Demo Bank</h2>{status_line}<table id='auth-headers'>{rows}</table></section>\n"
        "</main>\n</body>\n</html>\n"
    )
    # The Content-Security-Policy header is DemoBank._security_headers' (it knows the
    # provider's origin).
    return web.Response(
        text=html, status=status, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


def step_up_needed(seen: Seen, amount: Decimal) -> web.Response:
    """RFC 9470 3: "this needs a stronger (and fresher) sign-in", with a page for people."""
    description = f"Moving more than {SAVINGS_STEP_UP_ABOVE:,.2f} needs a passkey"
    body = (
        f"<p class='error' role='alert'>{esc(description)}: EUR {amount:,.2f} was not moved."
        " Sign in with a passkey and send the form again.</p>"
    )
    response = page("A passkey is needed", body, seen, 401)
    response.headers["WWW-Authenticate"] = (
        f'Bearer error="insufficient_user_authentication", error_description="{description}",'
        f' acr_values="{SAVINGS_STEP_UP_ACR}", max_age={SAVINGS_STEP_UP_MAX_AGE_S}'
    )
    return response
