"""Stand-ins for identity providers that cannot run here: Entra ID, Okta, Auth0,
Keycloak and PingOne.

Each is the test provider of :mod:`tests.support.op` taught one vendor's step-up
dialect, as that vendor documents it: the authorization parameters it reads, the ID
token claims it returns, the errors it sends. Where the documentation says nothing
(what a vendor does when the user simply lacks a method) the stand-in does the
conservative thing a provider may do, and says so: it signs the user in at the level
they reached, and the gateway must refuse it as too weak.

The documentation each follows is named on its class (titles as in
:mod:`gateway.oidc.profiles`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.support.op import OpenIdProvider, OpUser

ENTRA_BLOCKED = (
    "AADSTS53003: Access has been blocked by Conditional Access policies. "
    "The access policy does not allow token issuance."
)
OKTA_ACR = (
    "urn:okta:loa:1fa:any",
    "urn:okta:loa:1fa:pwd",
    "urn:okta:loa:2fa:any",
    "urn:okta:loa:2fa:any:ifpossible",
    "phr",
    "phrh",
)
AUTH0_MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


def _claims_request(params: Mapping[str, str]) -> dict[str, Any]:
    """The OIDC Core 5.5 ``claims`` request parameter, or {} (a bad one is ignored)."""
    try:
        value = json.loads(params.get("claims", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _requested(member: object) -> list[str]:
    """The values an individual claim request names (OIDC Core 5.5.1: value or values)."""
    if not isinstance(member, dict):
        return []
    if isinstance(member.get("value"), str):
        return [member["value"]]
    values = member.get("values")
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []


@dataclass
class VendorUser:
    """What this user's enrolled methods can reach, in the vendor's own terms."""

    reaches: set[str] = field(default_factory=set)


class EntraStandIn(OpenIdProvider):
    """Microsoft Entra ID, v2.0 endpoint ("Developer guide to Conditional Access
    authentication context"; "ID token claims reference"; error code reference).

    - Step-up is an authentication context requested with the ``claims`` parameter:
      ``{"id_token":{"acrs":{"essential":true,"value":"c1"}}}``; ``acr_values`` is
      not an Entra parameter and is ignored.
    - v2.0 ID tokens carry no ``acr`` and no ``amr``; a satisfied context comes back
      in ``acrs``; ``ver`` is "2.0", ``tid``/``oid`` name tenant and user.
    - A Conditional Access policy the user cannot satisfy: ``access_denied`` with an
      ``AADSTS53003`` description. No RFC 9207 ``iss`` on the redirect.
    """

    def __init__(self, issuer: str = "", **kw: Any) -> None:
        super().__init__(issuer, **kw)
        self.vendor = VendorUser(reaches={"c1"})
        self.behaviour.user = OpUser(acr=None, amr=None, email_verified=None)
        self.behaviour.omit_callback_iss = True
        self.behaviour.advertise_iss_parameter = False

    def discovery(self) -> dict[str, Any]:
        doc = super().discovery()
        doc.pop("acr_values_supported", None)
        doc["claims_supported"] = [c for c in doc["claims_supported"] if c not in ("acr", "amr")]
        doc["token_endpoint_auth_methods_supported"] = [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ]
        return doc

    def contexts(self, params: Mapping[str, str]) -> list[str]:
        id_token = _claims_request(params).get("id_token")
        return _requested(id_token.get("acrs")) if isinstance(id_token, dict) else []

    def refuse_authorization(self, params: Mapping[str, str]) -> dict[str, str] | None:
        missing = [c for c in self.contexts(params) if c not in self.vendor.reaches]
        if missing:
            return {"error": "access_denied", "error_description": ENTRA_BLOCKED}
        return None

    def id_token_claims(self, **kw: Any) -> dict[str, Any]:
        request = kw.get("request") or {}
        claims = super().id_token_claims(**kw)
        claims.pop("acr", None)
        claims.pop("amr", None)
        claims.update({"ver": "2.0", "tid": "tenant-1", "oid": "object-1"})
        contexts = self.contexts(request)
        if contexts:
            claims["acrs"] = contexts
        return claims


class OktaStandIn(OpenIdProvider):
    """Okta ("Step-up authentication using ACR values"; OpenID Connect API reference).

    - ``acr_values`` takes the predefined values; "multiple space-delimited values may
      be provided. The authorization server chooses one and reflects the chosen value
      in any resulting tokens".
    - ``amr`` lists the methods used (pwd, mfa, otp, hwk ...).
    - A user without the methods is signed in at what they reached (undocumented; the
      gateway must refuse it as too weak).
    """

    def __init__(self, issuer: str = "", **kw: Any) -> None:
        super().__init__(issuer, **kw)
        self.vendor = VendorUser(reaches={"urn:okta:loa:1fa:any", "urn:okta:loa:2fa:any"})

    def discovery(self) -> dict[str, Any]:
        doc = super().discovery()
        doc["acr_values_supported"] = list(OKTA_ACR)
        return doc

    def refuse_authorization(self, params: Mapping[str, str]) -> dict[str, str] | None:
        unknown = [v for v in params.get("acr_values", "").split() if v not in OKTA_ACR]
        if unknown:
            return {"error": "invalid_request", "error_description": "Invalid acr_values."}
        return None

    def id_token_claims(self, **kw: Any) -> dict[str, Any]:
        request = kw.get("request") or {}
        claims = super().id_token_claims(**kw)
        asked = request.get("acr_values", "").split()
        chosen = next((v for v in asked if v in self.vendor.reaches), None)
        if chosen is None:
            chosen = "urn:okta:loa:1fa:any"
        claims["acr"] = chosen
        claims["amr"] = {
            "urn:okta:loa:2fa:any": ["pwd", "mfa", "otp"],
            "phr": ["mfa", "hwk", "pop"],
            "phrh": ["mfa", "hwk", "pop"],
        }.get(chosen, ["pwd"])
        return claims


class Auth0StandIn(OpenIdProvider):
    """Auth0 ("Configure Step-up Authentication for Web Apps").

    - The issuer ends with "/" (``https://TENANT.auth0.com/``).
    - ``acr_values=http://schemas.openid.net/pape/policies/2007/06/multi-factor`` is
      acted on by an Action calling ``api.multifactor.enable``; the ID token then has
      that ``acr`` and ``amr: ["mfa"]``. A password login has neither claim.
    - When the Action denies (no factor to use), ``access_denied`` with its reason.
    """

    def __init__(self, issuer: str = "", **kw: Any) -> None:
        super().__init__(issuer, **kw)
        self.vendor = VendorUser(reaches={AUTH0_MFA})
        self.behaviour.user = OpUser(acr=None, amr=None)
        self.behaviour.omit_callback_iss = True
        self.behaviour.advertise_iss_parameter = False

    def discovery(self) -> dict[str, Any]:
        issuer = self.issuer
        self.issuer = issuer.rstrip("/")  # endpoints without a doubled slash
        try:
            doc = super().discovery()
        finally:
            self.issuer = issuer
        doc["issuer"] = issuer
        doc.pop("acr_values_supported", None)
        return doc

    def refuse_authorization(self, params: Mapping[str, str]) -> dict[str, str] | None:
        if AUTH0_MFA in params.get("acr_values", "").split() and AUTH0_MFA not in (
            self.vendor.reaches
        ):
            return {"error": "access_denied", "error_description": "MFA is required."}
        return None

    def id_token_claims(self, **kw: Any) -> dict[str, Any]:
        request = kw.get("request") or {}
        claims = super().id_token_claims(**kw)
        claims.pop("acr", None)
        claims.pop("amr", None)
        if AUTH0_MFA in request.get("acr_values", "").split():
            claims["acr"] = AUTH0_MFA
            claims["amr"] = ["mfa"]
        return claims


class KeycloakStandIn(OpenIdProvider):
    """Keycloak (Server Administration Guide: "Creating a browser login flow with
    step-up mechanism", "ACR to Level of Authentication (LoA) Mapping").

    - The level is asked for with ``acr_values`` or an (essential) ``acr`` in the
      ``claims`` parameter, the latter taking precedence; names map to LoA numbers
      by the realm's ACR-to-LoA mapping.
    - The ID token's ``acr`` is the requested name whose LoA was reached, else the
      LoA number: "1" for a full login. No ``amr`` without the AMR mapper.
    """

    LOA = {"silver": 1, "gold": 2, "1": 1, "2": 2}

    def __init__(self, issuer: str = "", **kw: Any) -> None:
        super().__init__(issuer, **kw)
        self.vendor = VendorUser(reaches={"1", "2"})
        self.behaviour.user = OpUser(acr="1", amr=None)

    def requested(self, params: Mapping[str, str]) -> list[str]:
        id_token = _claims_request(params).get("id_token")
        essential = _requested(id_token.get("acr")) if isinstance(id_token, dict) else []
        return essential or params.get("acr_values", "").split()

    def id_token_claims(self, **kw: Any) -> dict[str, Any]:
        request = kw.get("request") or {}
        claims = super().id_token_claims(**kw)
        top = max((int(v) for v in self.vendor.reaches), default=1)
        chosen = next(
            (v for v in self.requested(request) if self.LOA.get(v, 99) <= top),
            None,
        )
        claims["acr"] = chosen if chosen is not None else str(min(top, 1))
        claims.pop("amr", None)
        return claims


class PingOneStandIn(OpenIdProvider):
    """PingOne (Platform APIs, "OpenID Connect/OAuth 2": ``acr_values`` is one or
    more sign-on policy names, space-separated, in order of preference, which "must be
    assigned to the application"; "Application Sign-On Policy Assignments").

    - The ID token's ``acr`` names the sign-on policy the user completed.
    - A policy not assigned to the application is refused (``invalid_request``).
    """

    ASSIGNED = ("Single_Factor", "Multi_Factor")

    def __init__(self, issuer: str = "", **kw: Any) -> None:
        super().__init__(issuer, **kw)
        self.vendor = VendorUser(reaches={"Single_Factor", "Multi_Factor"})

    def refuse_authorization(self, params: Mapping[str, str]) -> dict[str, str] | None:
        if any(v not in self.ASSIGNED for v in params.get("acr_values", "").split()):
            return {
                "error": "invalid_request",
                "error_description": "acr_values names a policy not assigned to the application",
            }
        return None

    def id_token_claims(self, **kw: Any) -> dict[str, Any]:
        request = kw.get("request") or {}
        claims = super().id_token_claims(**kw)
        asked = request.get("acr_values", "").split() or ["Single_Factor"]
        chosen = next((v for v in asked if v in self.vendor.reaches), "Single_Factor")
        claims["acr"] = chosen
        claims["amr"] = ["pwd", "otp"] if chosen == "Multi_Factor" else ["pwd"]
        return claims


STAND_INS: dict[str, type[OpenIdProvider]] = {
    "entra": EntraStandIn,
    "okta": OktaStandIn,
    "auth0": Auth0StandIn,
    "keycloak": KeycloakStandIn,
    "pingone": PingOneStandIn,
}
