"""Provider profiles: how each identity provider is asked for a level, and how it answers.

OpenID Connect leaves step-up to ``acr_values``, ``acr`` and ``amr`` (OIDC Core
3.1.2.1, 2), and the major providers each speak their own dialect of it. A profile
(``oidc.profile``) captures one dialect as plain data, so the request, the reading of
the ID token, the "this user cannot meet it" errors and the configuration checks are
pure functions here. Everything vendor-specific cites the vendor's documentation.

Pages relied on (titles as published; checked December 2026):

- Microsoft Entra: "Developer guide to Conditional Access authentication context"
  (learn.microsoft.com/entra/identity-platform/developer-guide-conditional-access-
  authentication-context), "ID token claims reference", "Access token claims
  reference" (``acrs``), "Microsoft identity platform and OpenID Connect protocol"
  (authorization request parameters), "Microsoft Entra authentication and
  authorization error codes" (AADSTS53000-53004).
- Okta: "Step-up authentication using ACR values"
  (developer.okta.com/docs/guides/step-up-authentication/main/) and the OpenID
  Connect & OAuth 2.0 API reference (``acr_values`` enum, ``amr``).
- Auth0: "Configure Step-up Authentication for Web Apps"
  (auth0.com/docs/secure/multi-factor-authentication/step-up-authentication/
  configure-step-up-authentication-for-web-apps): ``amr`` must contain ``mfa``;
  the multi-factor ``acr_values`` URI is acted on by an Action.
- Keycloak: Server Administration Guide, "Creating a browser login flow with
  step-up mechanism" and "ACR to Level of Authentication (LoA) Mapping"; Securing
  Applications guide, ``acr_values`` and the ``claims`` parameter.
- PingOne: PingOne Platform APIs, "OpenID Connect/OAuth 2" (``acr_values``: sign-on
  policy names, in order of preference, assigned to the application) and
  "Application Sign-On Policy Assignments".
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.model import Level

# RFC 8176 2 (the IANA "Authentication Method Reference Values" registry as of 2026).
RFC8176_AMR = frozenset(
    {
        "face", "fpt", "geo", "hwk", "iris", "kba", "mca", "mfa", "otp", "pin", "pop",
        "pwd", "rba", "retina", "sc", "sms", "swk", "tel", "user", "vbm", "wia",
    }
)  # fmt: skip

# The acr the gateway records for a verified sign-in whose ID token asserts no level at
# all. Entra's v2.0 ID tokens carry neither acr nor amr ("ID token claims reference":
# both are v1.0-only), and Auth0's carry neither after a password login; without a
# value no level could stand for "signed in", and every rule would need a step-up.
# Only the gateway writes it, and only for the weakest default level.
SIGNED_IN_ACR = "urn:stepup-gateway:signed-in"

# "OpenID Connect Core Error Code unmet_authentication_requirements" (and OpenID
# Connect EAP ACR Values 1.0, which requires it): the provider could not authenticate
# the user as the request's acr demanded.
UNMET = "unmet_authentication_requirements"

# Entra authentication contexts are the ids c1 ... c99 (Graph
# "authenticationContextClassReference": "Supported values are c1 through c99").
ENTRA_CONTEXT = re.compile(r"c(?:[1-9]|[1-9][0-9])")
# Entra error codes, in error_description ("AADSTS53003: ...") and in the token
# endpoint's error_codes: Conditional Access refused this user or device, and no
# retry will change that (error code reference: 53000 device not compliant, 53001
# not domain joined, 53002 app not approved, 53003 blocked by Conditional Access,
# 53004 MFA registration blocked by risk).
ENTRA_UNMET_CODES = frozenset({53000, 53001, 53002, 53003, 53004})
_AADSTS = re.compile(r"AADSTS(\d{5,6})\b")

# Okta's predefined acr_values (step-up guide, "Predefined parameter values").
OKTA_ACR = (
    "urn:okta:loa:1fa:any",
    "urn:okta:loa:1fa:pwd",
    "urn:okta:loa:2fa:any",
    "urn:okta:loa:2fa:any:ifpossible",
    "phr",
    "phrh",
)
# "Any two factors, if possible ... otherwise any one factor is presented", and "the
# authorization server chooses one and reflects the chosen value in any resulting
# tokens": an ID token with this acr may come from a one-factor login.
OKTA_IFPOSSIBLE = "urn:okta:loa:2fa:any:ifpossible"

# Auth0's step-up guide: request MFA with this acr_values URI (an Action must act on
# it); the ID token then carries it as acr and "mfa" in amr.
AUTH0_MFA_ACR = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


@dataclass(frozen=True, slots=True)
class Profile:
    """One provider's step-up dialect."""

    name: str
    # How a level is asked for: "acr_values" (OIDC Core 3.1.2.1), "acr_values+claims"
    # (also an essential acr in the claims parameter, OIDC Core 5.5.1.1), "claims_acr"
    # (the essential acr alone, no acr_values) or "claims_acrs" (Entra: an essential
    # acrs value, no acr_values).
    asks_with: str
    # Where the level is read from: "acr" or "acrs" (Entra).
    reads: str
    # How max_age is sent: "max_age" (OIDC Core 3.1.2.1) or "prompt_login".
    max_age: str
    # amr values the provider documents sending; None = any (operator-configured).
    amr_values: frozenset[str] | None
    # acr values the provider can assert; None = any (operator-defined names).
    acr_values: tuple[str, ...] | None
    default_levels: tuple[Level, ...]
    # Record SIGNED_IN_ACR for a verified token that asserts no level.
    signed_in_acr: bool = False
    note: str = ""


def _levels(*spec: tuple[str, Sequence[str], Sequence[str]]) -> tuple[Level, ...]:
    return tuple(
        Level(name=name, rank=rank, acr=tuple(acr), amr_any=tuple(amr))
        for rank, (name, acr, amr) in enumerate(spec)
    )


_GENERIC = Profile(
    name="generic",
    asks_with="acr_values",
    reads="acr",
    max_age="max_age",
    amr_values=None,
    acr_values=None,
    default_levels=(),
)

PROFILES: Mapping[str, Profile] = {
    "generic": _GENERIC,
    # Entra: authentication contexts requested as an essential acrs claim, returned in
    # the acrs claim (developer guide, "claims request"); the v2.0 authorization
    # endpoint documents prompt=login, not max_age, to force a fresh sign-in.
    "entra": Profile(
        name="entra",
        asks_with="claims_acrs",
        reads="acrs",
        max_age="prompt_login",
        amr_values=frozenset(),
        acr_values=None,
        default_levels=_levels(
            ("signed-in", [SIGNED_IN_ACR], []),
            ("mfa", ["c1"], []),
            ("phishing-resistant", ["c2"], []),
        ),
        signed_in_acr=True,
        note="levels from acrs; asks with the claims parameter",
    ),
    # Okta: acr_values from the predefined list; the acr it chose is in the tokens.
    "okta": Profile(
        name="okta",
        asks_with="acr_values",
        reads="acr",
        max_age="max_age",
        amr_values=RFC8176_AMR,
        acr_values=OKTA_ACR,
        default_levels=_levels(
            ("password", ["urn:okta:loa:1fa:any", "urn:okta:loa:1fa:pwd", OKTA_IFPOSSIBLE], []),
            ("mfa", ["urn:okta:loa:2fa:any"], []),
            ("phishing-resistant", ["phr", "phrh"], []),
        ),
        note="levels from acr (urn:okta:loa:*, phr, phrh); asks with acr_values",
    ),
    # Auth0: MFA is the one level it can be asked for; amr holds "mfa" afterwards.
    "auth0": Profile(
        name="auth0",
        asks_with="acr_values",
        reads="acr",
        max_age="max_age",
        amr_values=frozenset({"mfa"}),
        acr_values=(AUTH0_MFA_ACR, SIGNED_IN_ACR),
        default_levels=_levels(
            ("signed-in", [SIGNED_IN_ACR], []),
            ("mfa", [AUTH0_MFA_ACR], ["mfa"]),
        ),
        signed_in_acr=True,
        note="levels from acr and amr mfa; asks with acr_values (needs the MFA Action)",
    ),
    # Keycloak: ACR names (or bare LoA numbers) from the realm's ACR-to-LoA mapping;
    # an essential acr in the claims parameter makes it fail rather than downgrade.
    # acr "0" is a login by SSO cookie, "1" a full login, when no mapping names them.
    "keycloak": Profile(
        name="keycloak",
        asks_with="acr_values+claims",
        reads="acr",
        max_age="max_age",
        amr_values=None,
        acr_values=None,
        default_levels=_levels(
            ("password", ["1", "0", "silver"], []),
            ("mfa", ["2", "gold"], []),
        ),
        note="levels from acr (LoA names or numbers); asks with acr_values and an essential acr",
    ),
    # PingOne: acr_values are sign-on policy names, the acr claim the policy applied.
    "pingone": Profile(
        name="pingone",
        asks_with="acr_values",
        reads="acr",
        max_age="max_age",
        amr_values=None,
        acr_values=None,
        default_levels=_levels(
            ("password", ["Single_Factor"], []),
            ("mfa", ["Multi_Factor"], []),
        ),
        note="levels from acr (sign-on policy names); asks with acr_values",
    ),
    # FAPI 2.0 Security Profile: the request travels by PAR; the level is asked for as
    # an essential acr claim (OIDC Core 5.5.1.1: the provider MUST meet it or fail),
    # without acr_values. acr_values only ask voluntarily (OIDC Core 3.1.2.1), and
    # node oidc-provider, the OpenID-certified FAPI 2.0 reference, lets acr_values
    # replace the claims parameter's acr request (lib/actions/authorization/claims.js,
    # assignClaims), so sending both would make the essential request voluntary and an
    # existing lower-level session would be answered without a step-up.
    "fapi2": dataclasses.replace(
        _GENERIC,
        name="fapi2",
        asks_with="claims_acr",
        note="pushed authorization requests, private_key_jwt, DPoP-bound tokens, "
        "PKCE S256 and the RFC 9207 iss are required; asks with an essential acr claim",
    ),
}

NAMES = tuple(PROFILES)


def get(name: str) -> Profile:
    """The profile called ``name`` (config validation keeps names known)."""
    return PROFILES.get(name, _GENERIC)


# ------------------------------------------------------------------- the request


def authorization_params(
    profile: Profile,
    acr_values: Sequence[str],
    max_age_s: int | None,
    *,
    essential_acr: bool = False,
) -> dict[str, str]:
    """The step-up part of an authorization request, in the profile's dialect."""
    params: dict[str, str] = {}
    wanted = [value for value in acr_values if value != SIGNED_IN_ACR]
    if wanted and profile.asks_with == "claims_acrs":
        # Entra's documented shape: {"id_token":{"acrs":{"essential":true,"value":"c1"}}};
        # several contexts use "values" (OIDC Core 5.5.1).
        member: dict[str, object] = {"essential": True}
        if len(wanted) == 1:
            member["value"] = wanted[0]
        else:
            member["values"] = list(wanted)
        params["claims"] = _compact_json({"id_token": {"acrs": member}})
    elif wanted and profile.asks_with == "claims_acr":
        claims = {"id_token": {"acr": {"essential": True, "values": list(wanted)}}}
        params["claims"] = _compact_json(claims)
    elif wanted:
        params["acr_values"] = " ".join(wanted)
        if essential_acr or profile.asks_with == "acr_values+claims":
            # OIDC Core 5.5.1.1: an essential acr request makes the provider fail
            # rather than silently log the user in at a lower level.
            claims = {"id_token": {"acr": {"essential": True, "values": list(wanted)}}}
            params["claims"] = _compact_json(claims)
    if max_age_s is not None:
        if profile.max_age == "prompt_login":
            # The gateway only sends max_age when its proof is stale, so a fresh
            # sign-in is what it needs; auth_time (an Entra optional claim) dates it.
            params["prompt"] = "login"
        else:
            params["max_age"] = str(max_age_s)
            if max_age_s == 0:
                # Some providers only honour max_age > 0.
                params["prompt"] = "login"
    return params


def _compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


# ------------------------------------------------------------------- the answer


def asserted_acr(
    profile: Profile, acr: str | None, acrs: Sequence[str], levels: Sequence[Level]
) -> str | None:
    """The acr a verified ID token proves, read the profile's way.

    Entra: the ``acrs`` value of the strongest level that lists one (an ID token may
    hold several contexts), else the token's own ``acr``. Profiles whose provider
    asserts nothing for a plain sign-in get :data:`SIGNED_IN_ACR` then.
    """
    if profile.reads == "acrs":
        held = set(acrs)
        for level in reversed(levels):  # strongest first
            for value in level.acr:
                if value in held:
                    return value
    if acr is None and profile.signed_in_acr:
        return SIGNED_IN_ACR
    return acr


def token_acr(
    profile: Profile, payload: Mapping[str, object], levels: Sequence[Level]
) -> str | None:
    """:func:`asserted_acr` for any verified token's claims, access tokens included:
    Entra puts ``acrs`` in access tokens too ("Access token claims reference"), Okta and
    Keycloak put ``acr`` there. A claim of the wrong type counts as absent (fails closed:
    no level from it)."""
    acr = payload.get("acr")
    acrs = payload.get("acrs")
    contexts = tuple(v for v in acrs if isinstance(v, str)) if isinstance(acrs, list) else ()
    return asserted_acr(profile, acr if isinstance(acr, str) else None, contexts, levels)


def cannot_meet(
    profile: Profile,
    error: str | None,
    description: str | None = None,
    error_codes: Sequence[object] = (),
) -> bool:
    """Does this error mean the user cannot reach the level (no retry will help)?

    The gateway then shows a clear "a stronger sign-in is needed" page instead of
    sending the browser round again.
    """
    if error == UNMET:
        return True
    if profile.name == "entra":
        codes = {code for code in error_codes if isinstance(code, int)}
        match = _AADSTS.match(description or "")
        if match is not None:
            codes.add(int(match.group(1)))
        return bool(codes & ENTRA_UNMET_CODES)
    return False


# ------------------------------------------------------------------- checks


def level_problems(profile: Profile, levels: Sequence[Level]) -> list[tuple[int, str, str]]:
    """Levels this profile's provider would never assert: ``(index, key, message)``.

    A level the provider never asserts is a step-up that silently never succeeds.
    """
    problems: list[tuple[int, str, str]] = []
    for index, level in enumerate(levels):
        for value in level.acr:
            if value == SIGNED_IN_ACR:
                if not profile.signed_in_acr:
                    problems.append(
                        (index, "acr", f"{value} is only recorded by the entra and auth0 profiles")
                    )
                continue
            if profile.name == "entra" and not ENTRA_CONTEXT.fullmatch(value):
                problems.append(
                    (
                        index,
                        "acr",
                        f"{value!r} is not an Entra authentication context (c1..c99): "
                        "profile entra reads levels from the acrs claim only",
                    )
                )
            elif profile.acr_values is not None and value not in profile.acr_values:
                known = ", ".join(profile.acr_values)
                message = f"{value!r} is never asserted by {profile.name} (it asserts {known})"
                problems.append((index, "acr", message))
            if profile.name == "okta" and value == OKTA_IFPOSSIBLE and index > 0:
                problems.append(
                    (
                        index,
                        "acr",
                        f"{value} may be answered with one factor: "
                        "it proves no more than the weakest level",
                    )
                )
        if profile.amr_values is not None:
            for value in level.amr_any:
                if not profile.amr_values:
                    problems.append(
                        (
                            index,
                            "amr_any",
                            f"profile {profile.name}: the provider's ID tokens carry no amr",
                        )
                    )
                    break
                if value not in profile.amr_values:
                    known = ", ".join(sorted(profile.amr_values))
                    problems.append(
                        (
                            index,
                            "amr_any",
                            f"{value!r} is never sent by {profile.name} in amr (it sends {known})",
                        )
                    )
    return problems


def describe(profile: Profile) -> str:
    """One line for ``check``: what the profile implies."""
    if profile.note:
        return profile.note
    return "levels from acr and amr; asks with acr_values"
