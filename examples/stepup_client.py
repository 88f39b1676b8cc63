"""An httpx auth flow for APIs behind stepup-gateway: RFC 9470 step-up, handled.

Copy this file into your client. It sends your access token (as a bearer token, or
DPoP-bound with a proof per request) and, when the API answers

    401  WWW-Authenticate: Bearer error="insufficient_user_authentication",
         acr_values="phr", max_age=300

it asks your code for a new access token from an authorization that used exactly
those ``acr_values`` and ``max_age`` (RFC 9470 section 4), then retries the request
once with it. How the user authenticates again is your app's business (a browser
window, a device prompt); this flow only carries the conversation::

    async def reauthorize(step_up: StepUp) -> str:
        # run the authorization code flow (PKCE) with step_up.acr_values and
        # step_up.max_age; return the new access token
        ...

    auth = StepUpAuth(token, reauthorize)
    async with httpx.AsyncClient(auth=auth) as client:
        response = await client.post("https://bank.example.com/api/transfers", json=...)

With DPoP (RFC 9449), pass ``proof=make_proof``: a function of (method, url, access
token) returning a new DPoP proof JWT signed with the key the token is bound to.

Requires httpx (0.27 or later). Synchronous clients work too when ``reauthorize``
returns the token directly.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from dataclasses import dataclass

import httpx

# One auth-param: name=token or name="quoted string" (RFC 9110 11.2).
_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')


@dataclass(frozen=True)
class StepUp:
    """What the API asked for: the authentication a new token must come from."""

    acr_values: tuple[str, ...]  # most preferred first
    max_age: int | None  # seconds; 0 = a new authentication now
    description: str


Reauthorize = Callable[[StepUp], "str | Awaitable[str]"]
Proof = Callable[[str, str, str], str]  # (method, url, access token) -> DPoP proof


def step_up_asked(response: httpx.Response) -> StepUp | None:
    """The RFC 9470 challenge in a 401, or None when the 401 is something else."""
    if response.status_code != 401:
        return None
    for value in response.headers.get_list("WWW-Authenticate"):
        params = {
            match.group(1).lower(): (
                match.group(3)
                if match.group(2) is None
                else re.sub(r"\\(.)", r"\1", match.group(2))
            )
            for match in _PARAM.finditer(value)
        }
        if params.get("error") != "insufficient_user_authentication":
            continue
        max_age = params.get("max_age")
        return StepUp(
            acr_values=tuple(params.get("acr_values", "").split()),
            max_age=int(max_age) if max_age is not None and max_age.isdigit() else None,
            description=params.get("error_description", ""),
        )
    return None


class StepUpAuth(httpx.Auth):
    """Bearer or DPoP access token, with one RFC 9470 step-up and retry per request."""

    def __init__(self, token: str, reauthorize: Reauthorize, *, proof: Proof | None = None):
        self.token = token
        self.reauthorize = reauthorize
        self.proof = proof

    def _authorize(self, request: httpx.Request) -> None:
        if self.proof is None:
            request.headers["Authorization"] = f"Bearer {self.token}"
        else:
            request.headers["Authorization"] = f"DPoP {self.token}"
            # A new proof for every attempt: the API refuses a proof it has seen.
            url = str(request.url.copy_with(query=None, fragment=None))
            request.headers["DPoP"] = self.proof(request.method, url, self.token)

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        self._authorize(request)
        response = yield request
        step_up = step_up_asked(response)
        if step_up is None:
            return
        token = self.reauthorize(step_up)
        if inspect.isawaitable(token):
            raise TypeError("use httpx.AsyncClient with an async reauthorize")
        self.token = token
        self._authorize(request)
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._authorize(request)
        response = yield request
        step_up = step_up_asked(response)
        if step_up is None:
            return
        token = self.reauthorize(step_up)
        self.token = await token if inspect.isawaitable(token) else token
        self._authorize(request)
        yield request
