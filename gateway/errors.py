"""The gateway's error tree.

Lower layers raise these; :mod:`gateway.app` is the one place that turns them
into responses (a small HTML page for browsers, JSON for everything else).

    GatewayError                 any refusal with an HTTP status
    ├── BadRequest               400: malformed path, smuggling shapes, bad callback
    ├── MethodNotAllowed         405: non-standard method no rule names
    ├── Forbidden                403: no rule matches, or the rule denies
    ├── NotFound                 404: unknown internal endpoint
    ├── MisdirectedRequest       421: a Host the configuration does not know
    ├── RequestTimeout           408: the client sent its body too slowly
    ├── ProviderError            502/503: the OpenID Provider failed or is unreachable
    ├── UpstreamError            502: the upstream could not be reached
    │   └── UpstreamTimeout      504: the upstream did not answer in time
    ├── StoreUnavailable         503: the session store does not answer
    │   └── StoreBusy            503 + Retry-After: it answers, but every connection
    │                            to it stayed busy too long (back-pressure)
    ├── Busy                     503 + Retry-After: a bounded store is full for now
    └── Unauthorized             401 + WWW-Authenticate: an API client's access token is
                                 missing, invalid or under-assured (RFC 6750, 9449, 9470)

    ConfigError                  not an HTTP error: the config file is invalid
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """A refusal. ``message`` is safe to show to the client; ``reason`` is for logs."""

    status = 500
    title = "Gateway error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).__name__


class BadRequest(GatewayError):
    status = 400
    title = "Bad request"


class MethodNotAllowed(GatewayError):
    status = 405
    title = "Method not allowed"


class Forbidden(GatewayError):
    status = 403
    title = "Forbidden"


class NotFound(GatewayError):
    status = 404
    title = "Not found"


class MisdirectedRequest(GatewayError):
    """RFC 9110 15.5.20: this server will not answer for the request's host.

    Chosen over 400 because the request itself is well-formed: it was sent to a
    host (an IP, a port, another name) the gateway's rules do not speak for, and
    421 tells a client that reused a connection to retry on a new one.
    """

    status = 421
    title = "Misdirected request"


class RequestTimeout(GatewayError):
    """The client sent its request too slowly; the connection is closed after the answer."""

    status = 408
    title = "Request timeout"


class ProviderError(GatewayError):
    status = 502
    title = "Identity provider error"


class ProviderUnavailable(ProviderError):
    status = 503
    title = "Identity provider unavailable"


class UpstreamError(GatewayError):
    status = 502
    title = "Upstream unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    title = "Upstream timeout"


class StoreUnavailable(GatewayError):
    status = 503
    title = "Session store unavailable"


class StoreBusy(StoreUnavailable):
    """A subclass, so routes that need no session keep working here too."""

    title = "Busy"

    def __init__(self, message: str, *, reason: str | None = None, retry_after_s: int) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class Unauthorized(GatewayError):
    """401 for an API client, with the challenge it acts on.

    ``error`` is the RFC 6750 3.1 / RFC 9449 7.1 / RFC 9470 3 code in the body and the
    challenge; ``challenge`` the ``WWW-Authenticate`` value; ``dpop_nonce`` a
    ``DPoP-Nonce`` to send (RFC 9449 9).
    """

    status = 401
    title = "Unauthorized"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        error: str,
        challenge: str,
        dpop_nonce: str | None = None,
        status: int = 401,
    ) -> None:
        super().__init__(message, reason=reason)
        self.error = error
        self.challenge = challenge
        self.dpop_nonce = dpop_nonce
        self.status = status  # 400 for invalid_request (RFC 6750 3.1)

    def response_headers(self) -> dict[str, str]:
        """The headers of its response: the challenge, and the nonce when there is one."""
        out = {"WWW-Authenticate": self.challenge, "Cache-Control": "no-store"}
        if self.dpop_nonce is not None:
            out["DPoP-Nonce"] = self.dpop_nonce
        return out


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file, phrased so an operator can fix it."""

    key_path: str  # e.g. "rules[2].require.level"
    message: str
    source: str = "<config>"
    line: int | None = None  # 1-based

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where} {self.key_path}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class PayloadTooLarge(GatewayError):
    status = 413
    title = "Request too large"


class Gone(GatewayError):
    status = 410
    title = "Already used"


class Busy(GatewayError):
    """A bounded store is full: refuse new work (503 with ``Retry-After``) rather than
    forget what it holds (RFC 9110 15.6.4 and 10.2.3)."""

    status = 503
    title = "Try again shortly"

    def __init__(self, message: str, *, reason: str | None = None, retry_after_s: int) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = max(int(retry_after_s), 1)
