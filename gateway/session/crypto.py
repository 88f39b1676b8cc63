"""Authenticated encryption of small JSON payloads for cookies.

A sealed value is ``urlsafe_b64(version || nonce || ciphertext || tag)`` without
padding, where the AES-256-GCM key is derived from a configured secret with
HKDF-SHA256 (RFC 5869) using the *purpose* as ``info``. One secret therefore
yields unrelated keys for session cookies and transaction cookies, and a value
sealed for one purpose never opens as the other (the purpose is also bound as
associated data).

Pure: no I/O, no clock. Keys are derived once, in the constructor, because
``open`` runs on every request.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_VERSION = 1  # first byte of every sealed value; bump when the layout changes
KEY_BYTES = 32  # AES-256
# NIST SP 800-38D 8.2.2: random 96-bit IVs. 8.3 caps one key at 2**32 such
# encryptions; with a save at most once a minute per active session that is years
# of traffic for a large site, and rotating the secret resets the count.
NONCE_BYTES = 12
TAG_BYTES = 16  # AESGCM's full 128-bit tag
MIN_SECRET_BYTES = 32  # as much entropy as the AES-256 key it feeds (config checks this)
# Nothing we seal comes near this; refusing larger input early bounds the work an
# attacker can make us do per request (a whole Cookie header is ~8 KB in most servers).
MAX_TOKEN_CHARS = 16_384

_VERSION_BYTE = bytes([FORMAT_VERSION])
_OVERHEAD_BYTES = 1 + NONCE_BYTES + TAG_BYTES


def sealed_length(plaintext_bytes: int) -> int:
    """Length in characters of the sealed value of a plaintext of this many bytes."""
    raw = plaintext_bytes + _OVERHEAD_BYTES
    return (raw * 4 + 2) // 3  # unpadded base64


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    """A 256-bit key for ``purpose`` from ``secret`` (HKDF-SHA256, RFC 5869)."""
    # No salt: RFC 5869 3.1 allows it when the input keying material is already a
    # uniformly random secret, which the config requires (>= 32 bytes).
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose)
    return hkdf.derive(secret)


_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _b64encode(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes | None:
    """Strict, canonical unpadded base64url: one byte string has exactly one encoding.

    The decoder is lenient (it skips characters outside the alphabet and ignores
    the unused low bits of the last character), so the result is re-encoded and
    must give back exactly the input. That also rejects "=", "+", "/" and
    whitespace.
    """
    try:
        data = text.encode("ascii")
        raw = binascii.a2b_base64(data.translate(_TO_STANDARD) + b"=" * (-len(data) % 4))
    except (UnicodeEncodeError, binascii.Error):
        return None
    if _b64encode(raw) != text:
        return None
    return raw


class Sealer:
    """Seal and open JSON objects with AES-256-GCM.

    ``secrets``: the first one seals; all are tried, in order, when opening, so a
    new secret can be put first while values sealed with the old one still open.
    ``purpose``: domain separation; a value sealed for one purpose does not open
    for another.
    """

    __slots__ = ("_aad", "_ciphers", "purpose")

    def __init__(self, secrets: Sequence[bytes], purpose: str) -> None:
        if not secrets:
            raise ValueError("Sealer needs at least one secret")
        for secret in secrets:
            if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
                raise ValueError(f"every secret must be at least {MIN_SECRET_BYTES} bytes")
        if not purpose:
            raise ValueError("Sealer needs a purpose")
        self.purpose = purpose
        info = purpose.encode("utf-8")
        self._aad = _VERSION_BYTE + info
        self._ciphers = tuple(AESGCM(derive_key(secret, info)) for secret in secrets)

    def seal(self, payload: Mapping[str, object]) -> str:
        """Encrypt ``payload`` (a JSON-serialisable mapping) into a cookie-safe string."""
        plaintext = _JSON.encode(payload).encode("utf-8")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[0].encrypt(nonce, plaintext, self._aad)
        return _b64encode(_VERSION_BYTE + nonce + sealed)

    def open(self, token: str) -> dict[str, object] | None:
        """The payload sealed in ``token``, or None if it is not one of ours.

        Never raises: malformed base64, a wrong version byte, a truncated or
        tampered value, an unknown key, another purpose or non-object JSON all
        give None.
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return None
        raw = _b64decode(token)
        if raw is None or len(raw) < _OVERHEAD_BYTES or raw[:1] != _VERSION_BYTE:
            return None
        nonce = raw[1 : 1 + NONCE_BYTES]
        sealed = raw[1 + NONCE_BYTES :]
        for cipher in self._ciphers:
            try:
                plaintext = cipher.decrypt(nonce, sealed, self._aad)
            except InvalidTag:
                continue
            return _parse_object(plaintext)
        return None


def _parse_object(plaintext: bytes) -> dict[str, object] | None:
    # Only reachable with data we sealed ourselves, but "never raises" holds anyway.
    try:
        value = json.loads(plaintext.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    return value
