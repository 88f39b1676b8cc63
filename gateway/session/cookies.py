"""Cookie names and attributes shared by the session and transaction cookies.

Every gateway cookie is host-only, ``Path=/``, ``HttpOnly`` and
``SameSite=Lax``: no script reads it, no other host receives it, and it is sent
on the top-level GET navigation back from the provider (the callback) but not
on cross-site subrequests or POSTs. With ``secure`` the name gets the
``__Host-`` prefix (RFC 6265bis 4.1.3.2), which makes browsers refuse the
cookie unless it is Secure, has ``Path=/`` and no ``Domain``, so a sibling
subdomain cannot plant or shadow it.
"""

from __future__ import annotations

from typing import TypedDict

HOST_PREFIX = "__Host-"
SAMESITE = "Lax"


class SetCookieKwargs(TypedDict, total=False):
    """Keyword arguments for aiohttp's ``StreamResponse.set_cookie``."""

    path: str
    httponly: bool
    samesite: str
    secure: bool
    max_age: int


class DelCookieKwargs(TypedDict):
    """Keyword arguments for aiohttp's ``StreamResponse.del_cookie``."""

    path: str
    httponly: bool
    samesite: str
    secure: bool


def cookie_name(base: str, secure: bool) -> str:
    """``__Host-<base>`` when the cookie is Secure, else ``base``."""
    return HOST_PREFIX + base if secure else base


def set_cookie_kwargs(secure: bool, max_age: int | None) -> SetCookieKwargs:
    """Attributes for ``response.set_cookie(name, value, **set_cookie_kwargs(...))``.

    No ``domain`` on purpose (host-only; required by ``__Host-``). ``max_age``
    None makes a browser-session cookie.
    """
    kwargs: SetCookieKwargs = {
        "path": "/",
        "httponly": True,
        "samesite": SAMESITE,
        "secure": secure,
    }
    if max_age is not None:
        kwargs["max_age"] = max_age
    return kwargs


def delete_cookie_kwargs(secure: bool) -> DelCookieKwargs:
    """Attributes for ``response.del_cookie(name, **delete_cookie_kwargs(...))``.

    The expiring Set-Cookie must carry the same ``Secure``/``Path`` as the
    original, or browsers ignore it for ``__Host-`` names.
    """
    return {"path": "/", "httponly": True, "samesite": SAMESITE, "secure": secure}
