"""Whether tracing is on, and the one guarded import of the optional ``otel`` extra.

Tracing is on when an OTLP endpoint is configured (``telemetry.otlp_endpoint``) or
named by the standard ``OTEL_*`` variables; only then is :mod:`gateway.telemetry`
(and with it the OpenTelemetry packages) imported, so the gateway runs, with
tracing off, without the extra installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.model import TelemetryConfig

if TYPE_CHECKING:
    from gateway.telemetry import Tracing as Tracing

# The OTLP exporter's own variables (OpenTelemetry specification, "OTLP Exporter").
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_endpoint(config: TelemetryConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: ``telemetry.otlp_endpoint``, else the standard ``OTEL_*`` variables.

    None means tracing is off (``OTEL_SDK_DISABLED=true`` turns it off too).
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if config.otlp_endpoint is not None:
        return config.otlp_endpoint
    for name in OTLP_ENDPOINT_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


class TelemetryUnavailable(Exception):
    """Tracing is configured but the ``otel`` extra is not installed."""


def tracing_status(config: TelemetryConfig) -> str | None:
    """What ``check`` and ``run`` say about tracing: None when it is off.

    Raises :class:`TelemetryUnavailable` when it is configured and the packages are
    missing: an operator who asked for traces gets an error at start-up, not silence.
    """
    endpoint = otlp_endpoint(config)
    if endpoint is None:
        return None
    try:
        import gateway.telemetry  # noqa: F401  (the optional extra's packages)
    except ImportError as exc:
        raise TelemetryUnavailable(
            f"telemetry: tracing is configured (OTLP endpoint {endpoint}) but the "
            f"OpenTelemetry packages are not installed (no module {exc.name or exc}): "
            "install the gateway with its otel extra (pip install 'stepup-gateway[otel]') "
            "or remove the endpoint"
        ) from exc
    return f"tracing: on, spans to {endpoint} (OTLP/HTTP)"


def load(config: TelemetryConfig, store: object, *, given: Tracing | None = None) -> Tracing | None:
    """The tracer given or configured (None: tracing is off), with ``store`` traced.

    Raises :class:`TelemetryUnavailable` as :func:`tracing_status` does.
    """
    tracing = given
    if tracing is None:
        if tracing_status(config) is None:
            return None
        from gateway import telemetry

        tracing = telemetry.Tracing.exporting(config)
    tracing.instrument_store(store)
    return tracing
