"""The request body, read at most once and only when something needs its fields.

:class:`RequestBody` for a live request (bounded by ``step_up.max_body``),
:class:`KeptBody` for a request kept across a step-up and replayed.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from gateway.conditions import extract_fields, media_type
from gateway.errors import PayloadTooLarge
from gateway.transactional import KeptRequest

# Bodies read for their fields; others (uploads, binaries) are never buffered for a rule.
FIELD_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "application/json"}
)


class RequestBody:
    """The request's body, read at most once, bounded, and only when something needs it.

    Read when a rule's ``when`` or ``bind`` needs its fields, or when a form post
    must be kept across a step-up; the upstream then gets exactly these bytes.
    """

    def __init__(self, request: web.BaseRequest, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.data: bytes | None = None
        self.consumed = False  # part of the stream was read: it can no longer be forwarded
        self._fields: dict[str, object] | None = None

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
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._limit:
                raise PayloadTooLarge(
                    "This request is too large to hold while you sign in. Sign in first, "
                    "then send it again.",
                    reason="body_too_large",
                )
            chunks.append(chunk)
        self.data = b"".join(chunks)
        return self.data

    async def fields(self) -> dict[str, object]:
        """Form, JSON or multipart text fields, then the query's (see extract_fields)."""
        if self._fields is None:
            kind = media_type(self.content_type)
            request = self._request
            if kind not in FIELD_TYPES and request.body_exists:
                # A body of another type may carry the same names (an upstream may parse
                # it anyway): nothing is known, so conditions fail closed and the
                # stricter rule applies; the query alone must not decide.
                self._fields = {}
            elif (request.content_length or 0) > self._limit and self.data is None:
                # Too large to read for a condition: nothing is known either, and the
                # body still streams to the upstream untouched.
                self._fields = {}
            else:
                body = await self.read() if kind in FIELD_TYPES else b""
                self._fields = extract_fields(self.content_type, body, request.query)
        return self._fields


class KeptBody:
    """The fields of a kept request, for judging it again when it is replayed."""

    def __init__(self, kept: KeptRequest) -> None:
        self._kept = kept

    async def fields(self) -> dict[str, object]:
        query = MultiDict(parse_qsl(self._kept.path_qs.partition("?")[2], keep_blank_values=True))
        return extract_fields(self._kept.content_type, self._kept.body, query)
