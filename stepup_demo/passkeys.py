"""Passkeys (WebAuthn Level 3) for the development identity provider.

A thin layer over the ``webauthn`` package: options for the browser, verification
of what it sends back, and a small store (memory, optionally mirrored to a JSON
file). User verification is REQUIRED in both ceremonies: a passkey that only proves
presence is one factor, not the multi-factor, phishing-resistant sign-in ``phr``
promises.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import webauthn
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from stepup_demo.factors import passkey_amr

CEREMONY_TIMEOUT_MS = 120_000  # WebAuthn L3 5.4: recommended 300 000 max; two minutes is plenty
CHALLENGE_BYTES = 32  # WebAuthn L3 13.4.3: at least 16 random bytes


class PasskeyError(Exception):
    """The browser's answer did not verify; ``str(exc)`` is safe to show."""


@dataclass(frozen=True, slots=True)
class Passkey:
    credential_id: bytes
    public_key: bytes  # COSE_Key
    sign_count: int
    username: str
    user_handle: bytes
    amr: str  # "hwk" | "swk", see factors.passkey_amr
    attachment: str | None
    multi_device: bool
    transports: tuple[str, ...]
    created_at: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("credential_id", "public_key", "user_handle"):
            data[name] = bytes_to_base64url(data[name])
        data["transports"] = list(self.transports)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Passkey:
        return cls(
            credential_id=base64url_to_bytes(data["credential_id"]),
            public_key=base64url_to_bytes(data["public_key"]),
            sign_count=int(data["sign_count"]),
            username=str(data["username"]),
            user_handle=base64url_to_bytes(data["user_handle"]),
            amr=str(data["amr"]),
            attachment=data.get("attachment"),
            multi_device=bool(data["multi_device"]),
            transports=tuple(data.get("transports", ())),
            created_at=float(data["created_at"]),
        )


class PasskeyStore:
    """Passkeys by user, in memory; mirrored to ``path`` (JSON) when one is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_id: dict[bytes, Passkey] = {}
        self._handles: dict[str, bytes] = {}
        if path is not None and path.exists():
            try:
                records = json.loads(path.read_text(encoding="utf-8"))["passkeys"]
                for record in records:
                    self._remember(Passkey.from_json(record))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise PasskeyError(f"cannot read passkeys from {path}: {exc}") from None

    def _remember(self, passkey: Passkey) -> None:
        self._by_id[passkey.credential_id] = passkey
        self._handles.setdefault(passkey.username, passkey.user_handle)

    def for_user(self, username: str) -> list[Passkey]:
        return [p for p in self._by_id.values() if p.username == username]

    def get(self, credential_id: bytes) -> Passkey | None:
        return self._by_id.get(credential_id)

    def user_handle(self, username: str) -> bytes:
        """WebAuthn user.id: random, not the user name (WebAuthn L3 14.6.1)."""
        return self._handles.setdefault(username, secrets.token_bytes(32))

    def add(self, passkey: Passkey) -> None:
        self._remember(passkey)
        self._save()

    def used(self, passkey: Passkey, sign_count: int) -> None:
        self._by_id[passkey.credential_id] = replace(passkey, sign_count=sign_count)
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"passkeys": [p.to_json() for p in self._by_id.values()]}, indent=2)
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=".passkeys.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def _descriptors(passkeys: Sequence[Passkey]) -> list[PublicKeyCredentialDescriptor]:
    result = []
    for passkey in passkeys:
        transports = []
        for name in passkey.transports:
            try:
                transports.append(AuthenticatorTransport(name))
            except ValueError:
                continue
        result.append(
            PublicKeyCredentialDescriptor(id=passkey.credential_id, transports=transports or None)
        )
    return result


def registration_options(
    *,
    rp_id: str,
    rp_name: str,
    username: str,
    display_name: str,
    user_handle: bytes,
    existing: Sequence[Passkey],
    challenge: bytes,
) -> str:
    """``PublicKeyCredentialCreationOptions`` as JSON, for ``navigator.credentials.create``."""
    options = webauthn.generate_registration_options(
        rp_id=rp_id,
        rp_name=rp_name,
        user_name=username,
        user_id=user_handle,
        user_display_name=display_name,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        # No attestation: trusting one needs the vendors' roots (FIDO MDS); the hwk/swk
        # choice uses the attachment and backup hints instead (factors.passkey_amr).
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=_descriptors(existing),
    )
    return webauthn.options_to_json(options)


def verify_registration(
    credential: Mapping[str, Any],
    *,
    challenge: bytes,
    rp_id: str,
    origin: str,
    username: str,
    user_handle: bytes,
    now: float,
) -> Passkey:
    """Check the browser's ``create()`` answer; the new passkey, or PasskeyError."""
    try:
        verified = webauthn.verify_registration_response(
            credential=dict(credential),
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origin,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
        raise PasskeyError(f"the new passkey did not verify ({exc})") from None
    attachment = credential.get("authenticatorAttachment")
    attachment = attachment if attachment in ("platform", "cross-platform") else None
    response = credential.get("response")
    raw_transports = response.get("transports") if isinstance(response, Mapping) else None
    transports = tuple(t for t in (raw_transports or ()) if isinstance(t, str))
    multi_device = verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE
    return Passkey(
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        username=username,
        user_handle=user_handle,
        amr=passkey_amr(attachment, multi_device),
        attachment=attachment,
        multi_device=multi_device,
        transports=transports,
        created_at=now,
    )


def authentication_options(*, rp_id: str, passkeys: Sequence[Passkey], challenge: bytes) -> str:
    """``PublicKeyCredentialRequestOptions`` as JSON, for ``navigator.credentials.get``."""
    options = webauthn.generate_authentication_options(
        rp_id=rp_id,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        allow_credentials=_descriptors(passkeys),
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return webauthn.options_to_json(options)


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    passkey: Passkey
    sign_count: int
    amr: str


def verify_authentication(
    credential: Mapping[str, Any],
    *,
    challenge: bytes,
    rp_id: str,
    origin: str,
    passkeys: Sequence[Passkey],
) -> VerifiedAssertion:
    """Check the browser's ``get()`` answer against one of ``passkeys`` (the user's)."""
    raw_id = credential.get("rawId")
    try:
        credential_id = base64url_to_bytes(raw_id) if isinstance(raw_id, str) else b""
    except ValueError:
        credential_id = b""
    passkey = next((p for p in passkeys if p.credential_id == credential_id), None)
    if passkey is None:
        raise PasskeyError("that passkey is not registered for this user")
    try:
        verified = webauthn.verify_authentication_response(
            credential=dict(credential),
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origin,
            credential_public_key=passkey.public_key,
            credential_current_sign_count=passkey.sign_count,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
        raise PasskeyError(f"the passkey's answer did not verify ({exc})") from None
    # The backup-eligible flag cannot change over a credential's life (WebAuthn L3
    # 6.1.3), but take the weaker reading if an authenticator now claims otherwise.
    multi_device = passkey.multi_device or (
        verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE
    )
    return VerifiedAssertion(
        passkey=passkey,
        sign_count=verified.new_sign_count,
        amr=passkey_amr(passkey.attachment, multi_device),
    )
