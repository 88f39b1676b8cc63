"""Builders of the ``oidc`` section: the provider, the client's credentials, its provider
profile (:mod:`gateway.oidc.profiles`) and the FAPI 2.0 client settings. Pure, like the
rest of :mod:`gateway.config`, but for reading the client key file once to check it."""

from __future__ import annotations

from pathlib import Path

from yaml.nodes import Node

from gateway import model
from gateway.config.defaults import (
    CLIENT_AUTH_METHODS,
    DEFAULT_ALGORITHMS,
    DEFAULT_ASSUME_EMAIL_VERIFIED,
    DEFAULT_CLIENT_AUTH,
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_ESSENTIAL_ACR,
    DEFAULT_HTTP_TIMEOUT_S,
    DEFAULT_PROFILE,
    DEFAULT_SCOPES,
    MAX_CLOCK_SKEW_S,
)
from gateway.config.loader import (
    _TOKEN,
    _Invalid,
    _Map,
    _Reader,
)
from gateway.oidc import fapi, profiles


class _OidcBuilders(_Reader):
    def oidc(self, node: Node, path: str, *, named: bool = False) -> model.OidcConfig:
        # The top-level block also holds `providers` (gateway.config.build_providers);
        # a named provider also its own `levels`.
        more = ("levels",) if named else ("providers",)
        m = self.mapping(
            node,
            path,
            (
                "issuer",
                "client_id",
                "client_secret",
                "client_secret_file",
                "scopes",
                "client_auth",
                "essential_acr",
                "profile",
                "client_key_file",
                "par",
                "dpop",
                "assume_email_verified",
                "clock_skew",
                "algorithms",
                "http_timeout",
                *more,
            ),
        )
        profile = self.optional(m, "profile", self.profile, DEFAULT_PROFILE)
        fapi2 = profile == "fapi2"
        # FAPI 2.0 Security Profile 5.3: private_key_jwt (or mTLS), PAR and sender-
        # constrained tokens; the profile turns them on and refuses weaker settings.
        client_auth = self.optional(
            m,
            "client_auth",
            lambda n, p: self.choice(n, p, CLIENT_AUTH_METHODS),
            "private_key_jwt" if fapi2 else DEFAULT_CLIENT_AUTH,
        )
        par = self.optional(m, "par", self.boolean, fapi2)
        dpop = self.optional(m, "dpop", self.boolean, fapi2)
        if fapi2:
            for key, value, wanted in (
                ("client_auth", client_auth, "private_key_jwt"),
                ("par", par, True),
                ("dpop", dpop, True),
            ):
                if value != wanted:
                    self.note(
                        m.child(key),
                        f"profile fapi2 needs {key}: {str(wanted).lower()} "
                        "(FAPI 2.0 Security Profile 5.3)",
                        m.get(key),
                    )
        private_key_jwt = client_auth == "private_key_jwt"
        key_file = self.optional(m, "client_key_file", self.client_key_file, None)
        if private_key_jwt and key_file is None and m.get("client_key_file") is None:
            self.note(
                m.child("client_key_file"), "required with client_auth: private_key_jwt", m.node
            )
        return model.OidcConfig(
            issuer=self.required(m, "issuer", self.issuer, ""),
            client_id=self.required(m, "client_id", self.text, ""),
            client_secret="" if private_key_jwt else self.client_secret(m),
            scopes=self.optional(m, "scopes", self.scopes, DEFAULT_SCOPES),
            client_auth=client_auth,
            client_key_file=key_file,
            par=par,
            dpop=dpop,
            essential_acr=self.optional(m, "essential_acr", self.boolean, DEFAULT_ESSENTIAL_ACR),
            profile=profile,
            assume_email_verified=self.optional(
                m, "assume_email_verified", self.boolean, DEFAULT_ASSUME_EMAIL_VERIFIED
            ),
            clock_skew_s=self.optional(m, "clock_skew", self.clock_skew, DEFAULT_CLOCK_SKEW_S),
            algorithms=self.optional(m, "algorithms", self.algorithms, DEFAULT_ALGORITHMS),
            http_timeout_s=self.optional(m, "http_timeout", self.timeout_s, DEFAULT_HTTP_TIMEOUT_S),
        )

    def profile(self, node: Node, path: str) -> str:
        return self.choice(node, path, profiles.NAMES)

    def client_key_file(self, node: Node, path: str) -> str:
        """Read and checked now (a broken key is a config error, not a failed sign-in);
        the gateway re-reads it when it changes (gateway.oidc.client_keys)."""
        file_path = self.resolve_path(self.text(node, path))
        try:
            fapi.load_pem_keys(Path(file_path).read_bytes())
        except OSError as exc:
            raise self.fail(path, f"cannot read {file_path}: {exc.strerror or exc}", node) from None
        except fapi.ClientKeyError as exc:
            raise self.fail(path, f"{file_path}: {exc}", node) from None
        return file_path

    def issuer(self, node: Node, path: str) -> str:
        # Kept verbatim, trailing slash included: OIDC Core 3.1.3.7 compares the id
        # token's iss with it exactly, and some providers (Auth0) end theirs with "/".
        text, _parts = self.http_url(node, path, what="issuer")
        return text

    def client_secret(self, m: _Map) -> str:
        # Secrets are never quoted in messages.
        inline, from_file = m.get("client_secret"), m.get("client_secret_file")
        if inline is not None and from_file is not None:
            self.note(
                m.child("client_secret_file"),
                "give client_secret or client_secret_file, not both",
                from_file,
            )
            return ""
        if from_file is not None:
            try:
                secret = self.file_text(from_file, m.child("client_secret_file")).strip()
            except _Invalid:
                return ""
            if not secret:
                self.note(m.child("client_secret_file"), "the file is empty", from_file)
            return secret
        if inline is None:
            self.note(
                m.child("client_secret"), "required key is missing (or client_secret_file)", m.node
            )
            return ""
        return self.optional(m, "client_secret", self.text, "")

    def scopes(self, node: Node, path: str) -> tuple[str, ...]:
        scopes = self.texts(node, path)
        for scope in scopes:
            if not _TOKEN.fullmatch(scope):
                self.note(path, f"invalid scope {scope!r}: one scope per list item", node)
        if scopes and "openid" not in scopes:
            raise self.fail(path, "must include 'openid' (OIDC Core 3.1.2.1)", node)
        return tuple(dict.fromkeys(scopes))

    def clock_skew(self, node: Node, path: str) -> int:
        seconds = self.duration_s(node, path)
        if seconds > MAX_CLOCK_SKEW_S:
            raise self.fail(
                path,
                f"{seconds}s is too long: expired id tokens would stay valid that much longer "
                f"(at most {MAX_CLOCK_SKEW_S}s)",
                node,
            )
        return seconds
