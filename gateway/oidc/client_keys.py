"""The ``private_key_jwt`` key file, re-read when it changes.

Rotation without downtime: register the new public key at the provider next to the
old one, then replace the file (new key first); the next token or pushed request signs
with it. The file is checked by ``stat`` on each use (one system call), and re-read
only when its modification time, size or inode changed. A file that turns unreadable or
holds no usable key keeps the last good key in use and is logged, so a half-written
file during a deploy never stops sign-ins.
"""

from __future__ import annotations

import os

import structlog

from gateway.oidc.fapi import ClientKeyError, SigningKey, load_pem_keys

log = structlog.get_logger(__name__)


class ClientKeyFile:
    """The signing key from ``path``: the first PEM private key in the file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[int, int, int] | None = None  # a broken version, read once
        self._keys: tuple[SigningKey, ...] = ()
        self.current()  # fail at start-up, not at the first sign-in

    def current(self) -> SigningKey:
        """The key that signs now. Raises :class:`ClientKeyError` only if no key was
        ever loaded."""
        stamp = None
        try:
            info = os.stat(self._path)
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp not in (self._stamp, self._bad_stamp):
                with open(self._path, "rb") as handle:
                    keys = load_pem_keys(handle.read())
                if self._stamp is not None:
                    log.info("client_key_reloaded", kid=keys[0].kid, keys=len(keys))
                self._keys, self._stamp = keys, stamp
        except (OSError, ClientKeyError) as exc:
            if not self._keys:
                raise ClientKeyError(f"cannot use oidc.client_key_file: {exc}") from None
            if stamp is not None and stamp != self._bad_stamp:
                self._bad_stamp = stamp  # logged once per broken version, not per request
                log.warning("client_key_reload_failed", kept_kid=self._keys[0].kid)
        return self._keys[0]
