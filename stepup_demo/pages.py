"""HTML of the development identity provider's pages.

Plain, accessible HTML: one ``<h1>`` per page, a label for every field, errors
announced with ``role="alert"``, no script except the passkey ceremony (served from
this package). Element ids are stable so browser tests can drive the pages:
``#username``, ``#password``, ``#totp``, ``#passkey-button``, ``#reason``,
``#error``, ``#approval``; buttons read "Sign in", "Verify", "Use passkey", "Create
passkey".
Every interpolated value goes through :func:`esc`.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from importlib import resources

STATIC_PREFIX = "/static"
DEV_WARNING = "Development identity provider: never use it for real accounts or in production."


def static_file(name: str) -> bytes:
    """A file from the package's ``static/`` directory (no CDN: everything is local)."""
    return resources.files("stepup_demo").joinpath("static", name).read_bytes()


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def layout(title: str, body: str, *, script: str | None = None) -> str:
    script_tag = f'<script src="{STATIC_PREFIX}/{esc(script)}" defer></script>' if script else ""
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)} - demo identity provider</title>\n"
        f'<link rel="stylesheet" href="{STATIC_PREFIX}/demo.css">\n{script_tag}\n</head>\n<body>\n'
        f'<p class="dev-warning" role="note">{esc(DEV_WARNING)}</p>\n'
        f"<main>\n<h1>{esc(title)}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def _reason(reason: str) -> str:
    return f'<p id="reason" class="reason">{esc(reason)}</p>'


def _approval(text: str | None) -> str:
    """What the sign-in approves (a payment, say), above everything else on the page."""
    if not text:
        return ""
    return (
        '<section id="approval" class="approval" aria-labelledby="approval-text">'
        f'<p id="approval-text" class="approval-text">{esc(text)}</p>'
        '<p class="help">Check the amount and the payee. Completing this step approves'
        " exactly this, and nothing else.</p></section>"
    )


def _error(error: str | None) -> str:
    return f'<p id="error" class="error" role="alert">{esc(error)}</p>' if error else ""


def _cancel(action: str, csrf_token: str) -> str:
    return (
        f'<form method="post" action="{esc(action)}" class="cancel">'
        f'{_hidden("csrf_token", csrf_token)}<button type="submit">Cancel</button></form>'
    )


def password_page(
    *,
    action: str,
    cancel_action: str,
    csrf_token: str,
    reason: str,
    username: str | None,
    error: str | None = None,
    approval: str | None = None,
) -> str:
    described = ' aria-describedby="error"' if error else ""
    autofocus_user = "" if username else " autofocus"
    autofocus_password = " autofocus" if username else ""
    body = (
        f"{_approval(approval)}{_reason(reason)}{_error(error)}"
        f'<form method="post" action="{esc(action)}">{_hidden("csrf_token", csrf_token)}'
        '<p><label for="username">User name</label>'
        f'<input id="username" name="username" autocomplete="username" required'
        f' value="{esc(username or "")}"{described}{autofocus_user}></p>'
        '<p><label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password"'
        f" required{described}{autofocus_password}></p>"
        '<p><button type="submit" id="sign-in">Sign in</button></p></form>'
        f"{_cancel(cancel_action, csrf_token)}"
    )
    return layout("Sign in", body)


def totp_page(
    *,
    action: str,
    cancel_action: str,
    csrf_token: str,
    reason: str,
    username: str,
    error: str | None = None,
    approval: str | None = None,
) -> str:
    described = "totp-help error" if error else "totp-help"
    body = (
        f"{_approval(approval)}{_reason(reason)}{_error(error)}"
        f'<form method="post" action="{esc(action)}">{_hidden("csrf_token", csrf_token)}'
        f"<p>Signed in as <strong>{esc(username)}</strong>.</p>"
        '<p><label for="totp">One-time code</label>'
        '<input id="totp" name="totp" inputmode="numeric" autocomplete="one-time-code"'
        f' pattern="[0-9]{{6}}" maxlength="6" required autofocus aria-describedby="{described}">'
        '<span id="totp-help" class="help">The six digits your authenticator app shows'
        " for this demo.</span></p>"
        '<p><button type="submit" id="verify">Verify</button></p></form>'
        f"{_cancel(cancel_action, csrf_token)}"
    )
    return layout("Enter your one-time code", body)


def passkey_page(
    *,
    create: bool,
    options_url: str,
    verify_url: str,
    fallback_url: str,
    cancel_action: str,
    csrf_token: str,
    reason: str,
    username: str,
    approval: str | None = None,
) -> str:
    """The WebAuthn ceremony page: ``passkey.js`` runs it when the button is pressed."""
    label = "Create passkey" if create else "Use passkey"
    title = "Create a passkey" if create else "Use your passkey"
    explain = (
        "Your one-time code is confirmed. Create a passkey on this device or on a"
        " security key; you will use it right after, and for actions that need it."
        if create
        else "Your browser will ask you to unlock your passkey (fingerprint, face or PIN)."
    )
    body = (
        f"{_approval(approval)}{_reason(reason)}"
        f"<p>Signed in as <strong>{esc(username)}</strong>. {esc(explain)}</p>"
        # Without JavaScript the button just reloads this page, which then says why.
        f'<form id="passkey-form" method="get" action="{esc(fallback_url)}"'
        f' data-ceremony="{"create" if create else "get"}" data-options-url="{esc(options_url)}"'
        f' data-verify-url="{esc(verify_url)}" data-csrf-token="{esc(csrf_token)}">'
        f'<p><button type="submit" id="passkey-button">{esc(label)}</button></p></form>'
        '<p id="passkey-status" role="status" aria-live="polite"></p>'
        "<noscript><p>Passkeys need JavaScript: please turn it on for this page.</p></noscript>"
        f"{_cancel(cancel_action, csrf_token)}"
    )
    return layout(title, body, script="passkey.js")


def message_page(title: str, paragraphs: Iterable[str]) -> str:
    return layout(title, "".join(f"<p>{esc(p)}</p>" for p in paragraphs))


def end_session_page(*, action: str, csrf_token: str, params: Iterable[tuple[str, str]]) -> str:
    fields = "".join(_hidden(k, v) for k, v in params)
    body = (
        "<p>Sign out of the demo identity provider? Apps you signed in to will ask you"
        " to sign in again.</p>"
        f'<form method="post" action="{esc(action)}">{_hidden("csrf_token", csrf_token)}{fields}'
        '<p><button type="submit" id="sign-out">Sign out</button></p></form>'
    )
    return layout("Sign out", body)
