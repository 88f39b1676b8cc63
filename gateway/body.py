"""The request body, read at most once and only when something needs its fields.

:class:`RequestBody` for a live request (bounded by ``step_up.max_body`` and
``server.body_timeout``), :class:`KeptBody` for a request kept across a step-up and
replayed. Both give a rule only fields it can be sure of (:func:`certain`).
:class:`LiveReader` is what the decision unit reads a live request through (its fields
and client address, each once), and :func:`cookie_value` reads one cookie of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import structlog
from aiohttp import web

from gateway.connections import body_deadline
from gateway.errors import PayloadTooLarge, RequestTimeout
from gateway.fields import RequestFields, ambiguous, media_type, read_fields
from gateway.transactional import KeptRequest

log = structlog.get_logger("gateway")  # the name these lines had in app.py

# Bodies read for their fields; others (uploads, binaries) are never buffered for a rule.
FIELD_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "application/json"}
)


class RequestBody:
    """The request's body, read at most once, bounded, and only when something needs it.

    Read when a rule's ``when`` or ``bind`` needs its fields, or when a form post
    must be kept across a step-up; the upstream then gets exactly these bytes.
    """

    def __init__(
        self, request: web.BaseRequest, limit: int, query: str | None, timeout_s: float
    ) -> None:
        self._request = request
        self._limit = limit
        self._query = query or ""  # raw, as the upstream gets it
        self._timeout_s = timeout_s
        self.data: bytes | None = None
        self.consumed = False  # part of the stream was read: it can no longer be forwarded
        self._fields: RequestFields | None = None

    @property
    def content_type(self) -> str:
        return self._request.headers.get("Content-Type", "")

    async def read(self) -> bytes:
        if self.data is not None:
            return self.data
        request = self._request
        if not request.body_exists:
            self.data = b""
            return self.data
        if (request.content_length or 0) > self._limit:
            raise PayloadTooLarge(
                "This request is too large to hold while you sign in. Sign in first "
                "(open any page of this site), then send it again.",
                reason="body_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        self.consumed = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # One timer for the whole body, moved per chunk (see body_deadline).
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(
                        body_deadline(
                            started=started,
                            now=loop.time(),
                            received_bytes=size,
                            timeout_s=self._timeout_s,
                        )
                    )
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self._limit:
                        raise PayloadTooLarge(
                            "This request is too large to hold while you sign in. Sign in "
                            "first, then send it again.",
                            reason="body_too_large",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            log.info("client_timeout", phase="body", received_bytes=size)
            raise RequestTimeout(
                "The request body arrived too slowly.", reason="request_body_timeout"
            ) from None
        self.data = b"".join(chunks)
        return self.data

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        """Form, JSON or multipart fields, then the query's (see read_fields).

        Raises BadRequest when a field in ``reading`` is given twice or read
        differently by upstreams.
        """
        if self._fields is None:
            kind = media_type(self.content_type)
            request = self._request
            if kind not in FIELD_TYPES and request.body_exists:
                # A body of another type may carry the same names (an upstream may parse
                # it anyway): nothing is known, so conditions fail closed and the
                # stricter rule applies; the query alone must not decide.
                log.info("body_not_read", reason="other_type", content_type=kind)
                self._fields = RequestFields()
            elif (request.content_length or 0) > self._limit and self.data is None:
                # Too large to read for a condition: nothing is known either, and the
                # body still streams to the upstream untouched.
                log.info("body_not_read", reason="too_large", content_type=kind)
                self._fields = RequestFields()
            else:
                body = await self.read() if kind in FIELD_TYPES else b""
                self._fields = read_fields(self.content_type, body, self._query)
                if not self._fields.readable:
                    # Malformed, or a shape parsers could split differently: no fields,
                    # so conditions on them count as true (gateway.fields).
                    log.info("body_not_read", reason="unreadable", content_type=kind)
        return certain(self._fields, reading)


class KeptBody:
    """The fields of a kept request, for judging it again when it is replayed."""

    def __init__(self, kept: KeptRequest) -> None:
        self._kept = kept

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        kept = self._kept
        query = kept.path_qs.partition("?")[2]
        return certain(read_fields(kept.content_type, kept.body, query), reading)


def certain(fields: RequestFields, reading: Iterable[str]) -> Mapping[str, object]:
    """``fields.values``, unless a field a rule reads is ambiguous: then 400.

    A field given twice (in the body, in body and query, or under a name an
    upstream folds onto it) or whose value parsers read differently could be
    judged as one value while the upstream acts on another.
    """
    unsure = fields.unsure(reading)
    if unsure:
        log.warning("ambiguous_field", fields=list(unsure))  # names only, never values
        raise ambiguous(unsure)
    return fields.values


class LiveReader:
    """:class:`gateway.decision.RequestReader` for a live request: read on demand, once."""

    __slots__ = ("_body", "_client_ip", "_client_ip_of", "_request")

    def __init__(
        self,
        client_ip_of: Callable[[web.BaseRequest], str | None],
        request: web.BaseRequest,
        body: RequestBody,
    ) -> None:
        self._client_ip_of = client_ip_of
        self._request = request
        self._body = body
        self._client_ip: tuple[str | None] | None = None

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        return await self._body.fields(reading)

    def client_ip(self) -> str | None:
        if self._client_ip is None:
            self._client_ip = (self._client_ip_of(self._request),)
        return self._client_ip[0]


def cookie_value(request: web.BaseRequest, name: str) -> str | None:
    """Cookie ``name`` (the last one, as ``request.cookies`` gives it), without parsing
    every cookie in the header: this runs on every request."""
    prefix = name + "="
    found = None
    for header in request.headers.getall("Cookie", ()):
        if prefix in header:
            for pair in header.split(";"):
                pair = pair.strip(" \t")
                if pair.startswith(prefix):
                    found = pair[len(prefix) :]
    return found
