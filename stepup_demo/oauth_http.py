"""authlib's requests and responses, on aiohttp.

authlib is synchronous; aiohttp reads a request body with ``await``. So a handler
reads the request once into a :class:`RequestData` (:func:`read_request`), authlib
sees that as an :class:`AiohttpOAuth2Request`, and its ``(status, body, headers)``
comes back as an :class:`OAuthResponse`, which :meth:`OAuthResponse.to_web` turns
into an aiohttp response. This mirrors authlib's
``authlib/integrations/flask_oauth2/requests.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from authlib.oauth2 import OAuth2Request
from authlib.oauth2.rfc6749.requests import OAuth2Payload
from multidict import MultiDict, MultiDictProxy, MultiMapping


@dataclass(frozen=True, slots=True)
class RequestData:
    """What authlib needs from an HTTP request, read up front (the body is async)."""

    method: str
    uri: str
    headers: Mapping[str, str]
    query: MultiMapping[str]
    form: MultiMapping[str]
    cookies: Mapping[str, str] = field(default_factory=dict)


async def read_request(request: web.Request, issuer: str) -> RequestData:
    """Snapshot ``request``; the URI is rebuilt on ``issuer``, the provider's public URL.

    (authlib refuses plain-http URIs except on loopback, RFC 8252 7.3; judging the
    configured issuer rather than a Host header keeps that check honest.)
    """
    form: MultiDict[str] = MultiDict()
    if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
        for key, value in (await request.post()).items():
            if isinstance(value, str):
                form.add(key, value)
    return RequestData(
        method=request.method,
        uri=issuer + request.rel_url.path_qs,
        headers=request.headers,
        query=request.query,
        form=MultiDictProxy(form),
        cookies=dict(request.cookies),
    )


def replayed_request(issuer: str, path: str, params: Iterable[tuple[str, str]]) -> RequestData:
    """An authorization request rebuilt from its saved parameters, to finish it later."""
    query = MultiDictProxy(MultiDict(list(params)))
    return RequestData("GET", issuer + path, {}, query, MultiDictProxy(MultiDict()))


class AiohttpOAuth2Payload(OAuth2Payload):  # type: ignore[misc]
    """Query and form parameters together, like Flask's ``request.values``."""

    def __init__(self, data: RequestData) -> None:
        combined: MultiDict[str] = MultiDict(data.query)
        combined.extend(data.form)
        self._data = MultiDictProxy(combined)

    @property
    def data(self) -> MultiDictProxy[str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        values: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in self._data.items():
            values[key].append(value)
        return values


class AiohttpOAuth2Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, data: RequestData) -> None:
        super().__init__(method=data.method, uri=data.uri, headers=data.headers)
        self.payload = AiohttpOAuth2Payload(data)
        self.http = data
        # Set by the end-session handler once the user confirmed on our own page.
        self.logout_confirmed = False
        # Set by the end-session callback: the provider session it ended, if any.
        self.ended_session: Any = None

    @property
    def args(self) -> MultiMapping[str]:
        return self.http.query

    @property
    def form(self) -> MultiMapping[str]:
        return self.http.form


class OAuthResponse:
    """authlib's ``(status, body, headers)``; ``location`` is what IssuerParameter edits."""

    def __init__(self, status: int, body: Any, headers: Iterable[tuple[str, str]]) -> None:
        self.status = status
        self.body = body
        self.headers = list(headers)

    @property
    def location(self) -> str | None:
        for name, value in self.headers:
            if name.lower() == "location":
                return value
        return None

    @location.setter
    def location(self, value: str) -> None:
        self.headers = [(n, v) for n, v in self.headers if n.lower() != "location"]
        self.headers.append(("Location", value))

    def to_web(self) -> web.Response:
        body = self.body
        if isinstance(body, dict):
            body = json.dumps(body)
        headers = MultiDict(self.headers)
        headers.setdefault("Cache-Control", "no-store")
        return web.Response(status=self.status, text=body or None, headers=headers)
