"""The ``WWW-Authenticate`` challenges of a resource server. Pure.

RFC 6750 3 (Bearer), RFC 9449 7.1 (DPoP: the same error codes, plus ``algs``) and
RFC 9470 3 (``insufficient_user_authentication`` with ``acr_values`` and ``max_age``).
Shared by the request path (:mod:`gateway.tokens.gate`) and ``explain``.
"""

from __future__ import annotations

from gateway import assurance, model, responses
from gateway.policy import Challenge


def dpop_scheme(api: model.ApiConfig) -> str:
    """The DPoP challenge's start: the scheme and the proof algorithms accepted."""
    return f'DPoP algs="{" ".join(api.dpop_algorithms)}"'


def accepted_schemes(api: model.ApiConfig) -> str:
    """The 401 for a request with no credentials: every scheme the client may use, as
    several challenges in one field value (RFC 9110 11.6.1)."""
    if api.dpop == "off":
        return "Bearer"
    if api.dpop == "required":
        return dpop_scheme(api)
    return f"Bearer, {dpop_scheme(api)}"  # RFC 9449 7.1: both; the client picks


def invalid_token(api: model.ApiConfig, scheme: str, description: str) -> str:
    start = f"{dpop_scheme(api)}, " if scheme == "DPoP" else "Bearer "
    return f'{start}error="invalid_token", error_description="{description}"'


def step_up(api: model.ApiConfig, decision: Challenge, scheme: str) -> tuple[str, int | None]:
    """RFC 9470's challenge in the scheme the token used, and the ``max_age`` it names
    (0 for a one-time rule: a new authentication, as the gateway asks for browsers)."""
    rule = decision.rule
    max_age_s = 0 if rule.require.once else decision.max_age_s
    value = responses.www_authenticate(
        decision.required, max_age_s, assurance.acr_values_for(decision.required)
    )
    if scheme == "DPoP":
        value = f"{dpop_scheme(api)}, {value.removeprefix('Bearer ')}"
    return value, max_age_s
