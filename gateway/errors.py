"""The gateway's error tree.

Lower layers raise these; :mod:`gateway.app` is the one place that turns them
into responses (a small HTML page for browsers, JSON for everything else).

    GatewayError                 any refusal with an HTTP status
    ├── BadRequest               400: malformed path, smuggling shapes, bad callback
    ├── MethodNotAllowed         405: non-standard method no rule names
    ├── Forbidden                403: no rule matches, or the rule denies
    ├── NotFound                 404: unknown internal endpoint
    ├── RequestTimeout           408: the client sent its body too slowly
    ├── ProviderError            502/503: the OpenID Provider failed or is unreachable
    ├── UpstreamError            502: the upstream could not be reached
    │   └── UpstreamTimeout      504: the upstream did not answer in time
    └── StoreUnavailable         503: the session store does not answer
        └── StoreBusy            503 + Retry-After: it answers, but every connection
                                 to it stayed busy too long (back-pressure)

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
