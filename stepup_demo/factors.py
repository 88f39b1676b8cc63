"""Pure decisions of the development identity provider.

Who the demo users are, whether a password or one-time code is right, what an
``acr_values``/``claims`` request asks for, and which factor to prompt for next.
Nothing here does I/O or reads the clock: times come in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

# The levels this provider can assert, weakest first. The two URNs are the demo's own;
# "phr" is the phishing-resistant class registered by OpenID's EAP ACR values 1.0 §2.
ACR_PASSWORD = "urn:stepup:loa:1"
ACR_MFA = "urn:stepup:loa:2"
ACR_PHISHING_RESISTANT = "phr"
ACR_STRENGTH: Mapping[str, int] = {ACR_PASSWORD: 1, ACR_MFA: 2, ACR_PHISHING_RESISTANT: 3}
ACR_WORDS: Mapping[str, str] = {
    ACR_PASSWORD: "password sign-in",
    ACR_MFA: "two-step verification (password and one-time code)",
    ACR_PHISHING_RESISTANT: "phishing-resistant sign-in",
}

# RFC 8176 authentication method references.
AMR_PASSWORD = "pwd"
AMR_OTP = "otp"
AMR_HARDWARE_KEY = "hwk"
AMR_SOFTWARE_KEY = "swk"

TOTP_DIGITS = 6  # RFC 4226 5.3: at least six digits
TOTP_STEP_S = 30  # RFC 6238 5.2: "We RECOMMEND a default time-step size of 30 seconds"
TOTP_DRIFT_STEPS = 1  # RFC 6238 5.2/6: accept one step of clock drift either way
# A passkey may be added only after a one-time code proven in the same sign-in, this
# recently: a stolen password alone must never be enough to add a stronger factor.
ENROL_WINDOW_S = 5 * 60


class UsersFileError(ValueError):
    """The users file is not what :func:`load_users_text` expects."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    username: str
    name: str
    email: str
    password: str
    totp_secret: str | None = None  # base32, RFC 4648 (as authenticator apps expect)

    @property
    def sub(self) -> str:
        return self.username

    def check_password(self, password: str) -> bool:
        return hmac.compare_digest(self.password.encode(), password.encode())

    def otpauth_uri(self, issuer: str) -> str | None:
        """The ``otpauth://`` URI an authenticator app can import (as a QR code or text)."""
        if self.totp_secret is None:
            return None
        return _totp(self.totp_secret).get_provisioning_uri(self.username, issuer)


def load_users_text(text: str, source: str = "users.yaml") -> dict[str, DemoUser]:
    """Parse a users file (see ``users.yaml``); raise :class:`UsersFileError` if invalid."""
    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsersFileError(f"{source}: not valid YAML: {exc}") from None
    users = root.get("users") if isinstance(root, dict) else None
    if not isinstance(users, dict) or not users:
        raise UsersFileError(f"{source}: expected a mapping 'users:' with at least one user")
    result: dict[str, DemoUser] = {}
    for username, entry in users.items():
        where = f"{source}: users.{username}"
        if not isinstance(username, str) or not username.isascii() or not username.isalnum():
            raise UsersFileError(f"{where}: user names are ASCII letters and digits")
        if not isinstance(entry, dict):
            raise UsersFileError(f"{where}: expected a mapping")
        fields = {key: _text(entry, key, where) for key in ("name", "email", "password")}
        secret = entry.get("totp_secret")
        if secret is not None and (not isinstance(secret, str) or _totp_key(secret) is None):
            raise UsersFileError(f"{where}.totp_secret: expected base32 of at least 16 bytes")
        result[username] = DemoUser(username=username, totp_secret=secret, **fields)
    return result


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise UsersFileError(f"{where}.{key}: expected a non-empty string")
    return value


def _totp_key(secret: str) -> bytes | None:
    cleaned = secret.replace(" ", "").upper()
    try:
        key = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        return None
    # RFC 4226 4 R6: the shared secret MUST be at least 128 bits.
    return key if len(key) >= 16 else None


def _totp(secret: str) -> TOTP:
    key = _totp_key(secret)
    if key is None:
        raise ValueError("invalid TOTP secret")
    return TOTP(key, TOTP_DIGITS, SHA1(), TOTP_STEP_S)  # noqa: S303 - RFC 6238 apps use SHA-1


def totp_code(secret: str, now: float) -> str:
    """The code an authenticator app shows at ``now`` (for tests and the demo printout)."""
    return _totp(secret).generate(int(now)).decode()


def match_totp(secret: str, code: str, now: float, *, last_step: int | None) -> int | None:
    """The RFC 6238 time step ``code`` belongs to (allowing one step of drift), or None.

    Steps at or before ``last_step`` are refused: "the verifier MUST NOT accept the
    second attempt of the same OTP after the successful validation" (RFC 6238 5.2).
    """
    code = code.strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not (code.isascii() and code.isdigit()):
        return None
    totp = _totp(secret)
    current = int(now) // TOTP_STEP_S
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if last_step is not None and step <= last_step:
            continue
        if hmac.compare_digest(totp.generate(step * TOTP_STEP_S), code.encode()):
            return step
    return None


def passkey_amr(attachment: str | None, multi_device: bool) -> str:
    """RFC 8176 method for a passkey: ``hwk`` (hardware-bound) or ``swk``.

    Without attestation (the demo asks for none, and would need vendor roots to trust
    one) the relying party only has hints, so the rule claims the weaker method
    unless both hints point to hardware:

    * backup eligible (the BE flag: a synced passkey) -> ``swk``: the private key is
      copied between devices by a sync service, so no single piece of hardware holds it;
    * device-bound and on a roaming (``cross-platform``) authenticator, i.e. a
      security key -> ``hwk``;
    * anything else (a device-bound platform authenticator, or no attachment reported)
      -> ``swk``: we cannot tell whether the platform keeps the key in hardware.

    Either way the sign-in is phishing-resistant (the credential is bound to this
    origin), so both get ``acr=phr``; NIST SP 800-63B-4 counts synced passkeys as
    phishing-resistant at AAL2 and only non-exportable hardware keys reach AAL3.
    """
    if not multi_device and attachment == "cross-platform":
        return AMR_HARDWARE_KEY
    return AMR_SOFTWARE_KEY


class RequestError(ValueError):
    """A malformed authorization request parameter (answered with invalid_request)."""


@dataclass(frozen=True, slots=True)
class AcrRequest:
    """What the relying party asked for: acr values, most preferred first."""

    values: tuple[str, ...] = ()
    essential: bool = False


def parse_acr_request(acr_values: str | None, claims: str | None) -> AcrRequest:
    """Read ``acr_values`` (OIDC Core 3.1.2.1) and ``claims.id_token.acr`` (5.5.1.1).

    Values named in the ``claims`` request take precedence over ``acr_values``.
    """
    values = tuple(acr_values.split()) if acr_values else ()
    essential = False
    if claims:
        try:
            parsed = json.loads(claims)
        except ValueError:
            raise RequestError("'claims' is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise RequestError("'claims' must be a JSON object")
        id_token = parsed.get("id_token")
        if not isinstance(id_token, dict | None):
            raise RequestError("'claims.id_token' must be a JSON object")
        acr = (id_token or {}).get("acr")
        if acr is not None:  # null asks for the claim with no particular value
            if not isinstance(acr, dict):
                raise RequestError("'claims.id_token.acr' must be a JSON object or null")
            essential = acr.get("essential") is True
            if "values" in acr:
                requested = acr["values"]
            elif "value" in acr:
                requested = [acr["value"]]
            else:
                requested = []
            if not isinstance(requested, list) or not all(isinstance(v, str) for v in requested):
                raise RequestError("'claims.id_token.acr' values must be strings")
            if requested:
                values = tuple(requested)
    return AcrRequest(values=values, essential=essential)


@dataclass(frozen=True, slots=True)
class Factors:
    """What a user can authenticate with."""

    totp: bool
    passkey: bool

    def reachable(self) -> frozenset[str]:
        acrs = {ACR_PASSWORD}
        if self.totp:
            acrs.add(ACR_MFA)
        if self.passkey or self.totp:  # without a passkey yet: enrol one after TOTP
            acrs.add(ACR_PHISHING_RESISTANT)
        return frozenset(acrs)


def choose_acr(request: AcrRequest, reachable: Iterable[str]) -> str | None:
    """The acr to authenticate at: the strongest requested value this user can reach.

    None means the request cannot be met (``unmet_authentication_requirements``).
    Values this provider does not know are ignored; a request naming none it knows gets
    the password level unless the acr claim was essential. A known value the user
    cannot reach is not silently downgraded, even when voluntary: the relying party
    could not use the weaker token anyway, and an explicit error lets it say why.
    """
    known = [value for value in request.values if value in ACR_STRENGTH]
    if not known:
        return None if request.essential and request.values else ACR_PASSWORD
    reachable_set = frozenset(reachable)
    candidates = [value for value in known if value in reachable_set]
    if not candidates:
        return None
    return max(candidates, key=lambda value: ACR_STRENGTH[value])


@dataclass(frozen=True, slots=True)
class Authentication:
    """One completed authentication: what an ID token will say about it."""

    acr: str
    amr: tuple[str, ...]
    auth_time: float


class Step(enum.Enum):
    PASSWORD = "password"
    TOTP = "totp"
    ENROL_PASSKEY = "enrol"
    PASSKEY = "passkey"
    DONE = "done"
    UNMET = "unmet"


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    target: str | None = None  # the acr being worked towards, once the user is known
    result: Authentication | None = None  # set when step is DONE


def strongest(authentications: Iterable[Authentication], target: str) -> Authentication | None:
    """The strongest authentication at ``target`` or above (the newest among equals)."""
    floor = ACR_STRENGTH[target]
    enough = [auth for auth in authentications if ACR_STRENGTH.get(auth.acr, 0) >= floor]
    if not enough:
        return None
    return max(enough, key=lambda auth: (ACR_STRENGTH[auth.acr], auth.auth_time))


def next_step(
    request: AcrRequest,
    *,
    factors: Factors | None,
    session: Sequence[Authentication],
    ceremony: Sequence[Authentication],
    force_login: bool,
    max_age_s: int | None,
    now: float,
    approval: bool = False,
) -> Decision:
    """What the sign-in needs next: only what the target level still misses.

    ``factors`` is None while the user is unknown. ``session`` holds the provider
    session's earlier authentications of this user (single sign-on), ``ceremony``
    those completed in this sign-in. ``force_login`` (``prompt=login``, ``max_age=0``)
    ignores the session, and ``max_age_s`` limits how old a session's authentication
    may be; what this sign-in proved counts as fresh (else ``max_age=0`` could never
    be met). ``auth_time`` of a level is when its last factor was proven.
    ``approval`` (the request asks the user to approve something, such as a payment):
    the target level's factor must be performed in this sign-in, on a page that shows
    what is approved; the session may still vouch for the password on the way.

    A passkey is a whole sign-in on its own: possession of a key bound to this origin,
    plus user verification (PIN or biometric), which makes it multi-factor and
    phishing-resistant (a multi-factor cryptographic authenticator in NIST SP
    800-63B-4 terms). So a known user with a passkey is asked for the passkey and
    nothing else, even by ``prompt=login``: the password proves nothing the passkey
    does not, and asking for it anyway teaches users to type passwords without
    thinking. A user without a passkey yet creates one after a one-time code in this
    sign-in; for that, the provider session's password (of any age) still says who
    the user is. ``mfa`` under ``force_login`` still asks for both of its factors
    again: the pair is what makes the level.
    """
    if factors is None:
        return Decision(Step.PASSWORD)
    target = choose_acr(request, factors.reachable())
    if target is None:
        return Decision(Step.UNMET)
    earlier = [] if force_login else list(session)
    fresh = [a for a in earlier if max_age_s is None or now - a.auth_time <= max_age_s]
    done = strongest(ceremony if approval else [*fresh, *ceremony], target)
    if done is not None:
        return Decision(Step.DONE, target, done)
    if target == ACR_PASSWORD:
        return Decision(Step.PASSWORD, target)
    if target == ACR_MFA:
        has_password = any(AMR_PASSWORD in auth.amr for auth in [*earlier, *ceremony])
        return Decision(Step.TOTP if has_password else Step.PASSWORD, target)
    if factors.passkey:
        return Decision(Step.PASSKEY, target)
    otp_in_ceremony = any(
        AMR_OTP in auth.amr and 0 <= now - auth.auth_time <= ENROL_WINDOW_S for auth in ceremony
    )
    if otp_in_ceremony:
        return Decision(Step.ENROL_PASSKEY, target)
    # Enrolment: who the user is comes from a password, this sign-in's or the session's.
    signed_in = any(AMR_PASSWORD in auth.amr for auth in [*session, *ceremony])
    return Decision(Step.TOTP if signed_in else Step.PASSWORD, target)
