"""OpenID Connect client: pure checks in :mod:`.flow` (the flow), :mod:`.tokens` (ID and
logout tokens) and :mod:`.profiles`, provider I/O in :mod:`.provider` (imported on first
use, so that ``check`` and ``explain``, which read profiles, load no HTTP client)."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name == "ProviderClient":
        from gateway.oidc.provider import ProviderClient

        return ProviderClient
    raise AttributeError(name)
