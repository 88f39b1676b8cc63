"""OpenID Connect client: pure checks in :mod:`.flow` (the flow) and :mod:`.tokens` (ID and
logout tokens), provider I/O in :mod:`.provider`."""

from gateway.oidc.flow import (
    Callback,
    CallbackError,
    IdTokenClaims,
    IdTokenError,
    ProviderMetadata,
    authorization_url,
    check_callback_iss,
    end_session_url,
    new_pkce,
    parse_callback,
    random_token,
    verify_id_token,
)
from gateway.oidc.provider import ProviderClient

__all__ = [
    "Callback",
    "CallbackError",
    "IdTokenClaims",
    "IdTokenError",
    "ProviderClient",
    "ProviderMetadata",
    "authorization_url",
    "check_callback_iss",
    "end_session_url",
    "new_pkce",
    "parse_callback",
    "random_token",
    "verify_id_token",
]
