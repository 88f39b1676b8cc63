"""Building :class:`gateway.model.Config`: the top level, server, upstreams, oidc, session.

:class:`_Validator` is the whole builder (with :class:`_RuleBuilders` for the policy).
The schema pass has already checked types, enums, required and unknown keys; the
builders check values against each other and the world (URLs, addresses, secrets,
files, cookie security) and build the frozen model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway import model
from gateway.config.build_api import _ApiBuilders
from gateway.config.build_providers import _ProviderBuilders
from gateway.config.build_sections import _SectionBuilders
from gateway.config.defaults import (
    DEFAULT_ACCESS_LOG,
    DEFAULT_ASSERTION_TTL_S,
    DEFAULT_AUTHORIZATION_DETAILS_TYPE,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_COOKIE_NAME,
    DEFAULT_COOKIE_SECURE,
    DEFAULT_DECISION_MEMO_ENTRIES,
    DEFAULT_DECISION_MEMO_S,
    DEFAULT_HEADER_PREFIX,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_INTERNAL_PREFIX,
    DEFAULT_KEEP_BUDGET_BYTES,
    DEFAULT_KEEP_PER_CLIENT,
    DEFAULT_KEEPALIVE_MAX_AGE_S,
    DEFAULT_KEEPALIVE_REQUESTS,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    DEFAULT_LIFETIME_S,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REDIS_POOL_TIMEOUT_S,
    DEFAULT_REDIS_PREFIX,
    DEFAULT_SERVER_MODE,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_STORE,
    DEFAULT_TRANSACTION_TTL_S,
    DEFAULT_TRUSTED_PROXIES,
    DEFAULT_UNIX_SOCKET_MODE,
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S,
    DEFAULT_UPSTREAM_TIMEOUT_S,
    DEFAULT_WORKERS,
    LOG_LEVELS,
    MAX_CONNECTIONS_LIMIT,
    MAX_DECISION_MEMO_ENTRIES,
    MAX_REDIS_POOL_SIZE,
    MAX_REDIS_PREFIX_CHARS,
    REDIS_POOL_SHARE,
    SERVER_MODES,
    STORES,
)
from gateway.config.loader import (
    _INTERNAL_PREFIX,
    _NAME,
    _NAME_HINT,
    _TOKEN,
    _Invalid,
    _Map,
)
from gateway.oidc import profiles
from gateway.session.crypto import MIN_SECRET_BYTES
from gateway.session.redis_url import REDIS_SCHEMES, is_sentinel_url, parse_sentinel_url, scheme_of


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 6.3
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Validator(_ProviderBuilders, _SectionBuilders, _ApiBuilders):
    # --- sections ---------------------------------------------------------------------

    def config(self, root: Node) -> model.Config | None:
        try:
            top = self.mapping(
                root,
                "",
                (
                    "server",
                    "upstreams",
                    "oidc",
                    "session",
                    "assurance",
                    "rules",
                    "assertion",
                    "step_up",
                    "api",
                    "telemetry",
                ),
            )
        except _Invalid:
            return None
        server = self.section(top, "server", self.server)
        upstreams = self.section(top, "upstreams", self.upstreams)
        oidc = self.section(top, "oidc", self.oidc)
        session = self.section(top, "session", self.session)
        profile = profiles.get(oidc.profile if oidc is not None else "generic")
        if top.get("assurance") is None and profile.default_levels:
            # A provider profile ships levels its provider asserts out of the box.
            assurance: model.AssuranceConfig | None = model.AssuranceConfig(
                levels=profile.default_levels
            )
        else:
            assurance = self.section(
                top, "assurance", lambda node, path: self.assurance(node, path, profile)
            )
        providers, provider_levels = self.named_providers(top)  # before the rules name them
        if assurance is not None and provider_levels:
            assurance = dataclasses.replace(assurance, providers=provider_levels)
        rules = self.section(
            top, "rules", lambda node, path: self.rules(node, path, assurance, upstreams)
        )
        assertion = model.AssertionConfig(
            ttl_s=DEFAULT_ASSERTION_TTL_S, header_prefix=DEFAULT_HEADER_PREFIX
        )
        if top.get("assertion") is not None:
            assertion = self.section(top, "assertion", self.assertion) or assertion
        step_up = model.StepUpConfig(
            max_body_bytes=DEFAULT_MAX_BODY_BYTES,
            authorization_details_type=DEFAULT_AUTHORIZATION_DETAILS_TYPE,
            keep_budget_bytes=DEFAULT_KEEP_BUDGET_BYTES,
            keep_per_client=DEFAULT_KEEP_PER_CLIENT,
        )
        if top.get("step_up") is not None:
            step_up = self.section(top, "step_up", self.step_up) or step_up
        api = self.section(top, "api", self.api) if top.get("api") is not None else None
        telemetry = model.TelemetryConfig()
        if top.get("telemetry") is not None:
            telemetry = self.section(top, "telemetry", self.telemetry) or telemetry
        named, accepted = dict(providers), api.algorithms if api is not None else ()
        for name in (api.providers or sorted(self.provider_names)) if api is not None else ():
            given = oidc if name == model.DEFAULT_PROVIDER else named.get(name)
            outside = [alg for alg in accepted if given and alg not in given.algorithms]
            if outside:  # each issuer's keys are looked up under its algorithms (one cache)
                where = "oidc" if given is oidc else f"oidc.providers.{name}"
                self.note(
                    "api.algorithms",
                    f"{', '.join(outside)} not in {where}.algorithms: tokens signed so would "
                    "be refused; add them there too",
                    self.node_at(top, "api", "algorithms"),
                )
        if api is None and top.get("api") is None:
            for cred_path, cred_node in self.credential_nodes:
                self.note(
                    cred_path,
                    "needs the api section: without it the gateway accepts no access tokens",
                    cred_node,
                )
        if server is not None and session is not None:
            if session.redis_pool_size == 0:
                pool_size = max(1, server.max_connections // REDIS_POOL_SHARE)
                session = dataclasses.replace(session, redis_pool_size=pool_size)
            self.check_cookie_secure(server, session, top)
            self.check_once(server, session)
            if server.workers > 1 and session.store == "memory":
                self.note(
                    "server.workers",
                    f"is {server.workers} but session.store is memory: each worker would keep "
                    "its own sessions and a sign-in would work on one worker only. Use "
                    "store: cookie or redis, or workers: 1",
                    self.node_at(top, "server", "workers"),
                )
        if server is not None:
            self.check_unix_socket(server, self.node_at(top, "server", "trusted_proxies"))
        if server is not None and rules is not None and server.mode == "forward_auth":
            self.check_forward_auth(rules, self.node_at(top, "server", "mode"))
        if (
            server is None
            or upstreams is None
            or oidc is None
            or session is None
            or assurance is None
            or rules is None
        ):
            return None
        return model.Config(
            server=server,
            upstreams=upstreams,
            oidc=oidc,
            session=session,
            assurance=assurance,
            rules=rules,
            assertion=assertion,
            source=self.source,
            step_up=step_up,
            api=api,
            telemetry=telemetry,
            providers=providers,
        )

    def server(self, node: Node, path: str) -> model.ServerConfig:
        m = self.mapping(
            node,
            path,
            (
                "listen",
                "public_url",
                "internal_prefix",
                "metrics_listen",
                "shutdown_timeout",
                "trusted_proxies",
                "workers",
                "upstream_connect_timeout",
                "upstream_timeout",
                "access_log",
                "log_level",
                "hosts",
                "case_insensitive_paths",
                "max_connections",
                "header_timeout",
                "body_timeout",
                "keepalive_timeout",
                "keepalive_requests",
                "keepalive_max_age",
                "mode",
                "decision_memo",
                "decision_memo_entries",
                "unix_socket",
                "unix_socket_mode",
            ),
        )
        listen_host, listen_port = self.required(m, "listen", self.host_port, ("", 0))
        metrics_listen = self.optional(m, "metrics_listen", self.host_port, None)
        trusted = self.optional(
            m, "trusted_proxies", self.trusted_proxies, (DEFAULT_TRUSTED_PROXIES, False)
        )
        return model.ServerConfig(
            listen_host=listen_host,
            listen_port=listen_port,
            public_url=self.required(m, "public_url", self.public_url, ""),
            internal_prefix=self.optional(
                m, "internal_prefix", self.internal_prefix, DEFAULT_INTERNAL_PREFIX
            ),
            metrics_listen=metrics_listen,
            shutdown_timeout_s=self.optional(
                m, "shutdown_timeout", self.timeout_s, DEFAULT_SHUTDOWN_TIMEOUT_S
            ),
            trusted_proxies=trusted[0],
            trust_unix_socket=trusted[1],
            workers=self.optional(m, "workers", self.workers, DEFAULT_WORKERS),
            upstream_connect_timeout_s=self.optional(
                m, "upstream_connect_timeout", self.timeout_s, DEFAULT_UPSTREAM_CONNECT_TIMEOUT_S
            ),
            upstream_timeout_s=self.optional(
                m, "upstream_timeout", self.timeout_s, DEFAULT_UPSTREAM_TIMEOUT_S
            ),
            access_log=self.optional(m, "access_log", self.boolean, DEFAULT_ACCESS_LOG),
            log_level=self.optional(
                m, "log_level", lambda n, p: self.choice(n, p, LOG_LEVELS), DEFAULT_LOG_LEVEL
            ),
            hosts=self.optional(m, "hosts", self.hosts, ()),
            case_insensitive_paths=self.optional(m, "case_insensitive_paths", self.boolean, False),
            max_connections=self.optional(
                m,
                "max_connections",
                lambda n, p: self.bounded_integer(n, p, 1, MAX_CONNECTIONS_LIMIT),
                DEFAULT_MAX_CONNECTIONS,
            ),
            header_timeout_s=self.optional(
                m, "header_timeout", self.timeout_s, DEFAULT_HEADER_TIMEOUT_S
            ),
            body_timeout_s=self.optional(m, "body_timeout", self.timeout_s, DEFAULT_BODY_TIMEOUT_S),
            keepalive_timeout_s=self.optional(
                m, "keepalive_timeout", self.timeout_s, DEFAULT_KEEPALIVE_TIMEOUT_S
            ),
            keepalive_requests=self.optional(
                m,
                "keepalive_requests",
                lambda n, p: self.bounded_integer(n, p, 1, 2**31 - 1),
                DEFAULT_KEEPALIVE_REQUESTS,
            ),
            keepalive_max_age_s=self.optional(
                m, "keepalive_max_age", self.timeout_s, DEFAULT_KEEPALIVE_MAX_AGE_S
            ),
            mode=self.optional(
                m, "mode", lambda n, p: self.choice(n, p, SERVER_MODES), DEFAULT_SERVER_MODE
            ),
            decision_memo_s=self.optional(
                m, "decision_memo", self.duration_s, DEFAULT_DECISION_MEMO_S
            ),
            decision_memo_entries=self.optional(
                m,
                "decision_memo_entries",
                lambda n, p: self.bounded_integer(n, p, 1, MAX_DECISION_MEMO_ENTRIES),
                DEFAULT_DECISION_MEMO_ENTRIES,
            ),
            unix_socket=self.optional(m, "unix_socket", self.unix_socket, None),
            unix_socket_mode=self.optional(
                m, "unix_socket_mode", self.unix_socket_mode, DEFAULT_UNIX_SOCKET_MODE
            ),
        )

    def hosts(self, node: Node, path: str) -> tuple[str, ...]:
        """``server.hosts``: more names (and IP spellings) the gateway answers for."""
        result: list[str] = []
        for item_path, item in self.items(node, path, allow_empty=True):
            with contextlib.suppress(_Invalid):
                result.append(self.rule_host(item, item_path))
        return tuple(result)

    def public_url(self, node: Node, path: str) -> str:
        text, parts = self.http_url(node, path, what="public_url")
        if parts.path not in ("", "/"):
            raise self.fail(
                path,
                f"public_url must not have a path ({parts.path!r}): the gateway serves "
                "the whole origin",
                node,
            )
        # Kept as written otherwise: the redirect_uri built from it must match, byte for
        # byte, the one registered at the provider.
        self.public_scheme = parts.scheme.lower()
        return text.rstrip("/")

    def internal_prefix(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        prefix = text.rstrip("/") if text != "/" else text
        if not prefix.startswith("/"):
            raise self.fail(path, f"must start with '/' (got {text!r})", node)
        if prefix == "/":
            raise self.fail(
                path, "must not be '/': the gateway's endpoints would hide the app", node
            )
        segments = prefix.split("/")[1:]
        if not _INTERNAL_PREFIX.fullmatch(prefix) or {".", ".."} & set(segments):
            raise self.fail(
                path,
                f"invalid prefix {text!r}: use path segments of letters, digits, '-', '.', "
                "'_', '~' (e.g. /_gateway)",
                node,
            )
        return prefix

    def workers(self, node: Node, path: str) -> int:
        if isinstance(node, ScalarNode) and node.value == "auto":
            # One worker per core: a Python process uses one core.
            return max(1, os.cpu_count() or 1)
        workers = self.integer(node, path)
        if workers < 1:
            raise self.fail(path, "must be at least 1", node)
        return workers

    def upstreams(self, node: Node, path: str) -> dict[str, model.UpstreamConfig]:
        m = self.mapping(node, path, None)
        if not m.entries:
            raise self.fail(path, "at least one upstream is needed (name: URL)", node)
        before = len(self.problems)
        result: dict[str, model.UpstreamConfig] = {}
        for name, (key_node, value_node) in m.entries.items():
            child = m.child(name)
            if not _NAME.fullmatch(name):
                self.note(child, f"invalid upstream name {name!r}: use {_NAME_HINT}", key_node)
                continue
            try:
                result[name] = self.upstream(name, value_node, child)
            except _Invalid:
                continue
        if len(self.problems) > before:
            raise _Invalid  # rules are then not checked against a partial list of upstreams
        return result

    def upstream(self, name: str, node: Node, path: str) -> model.UpstreamConfig:
        """An upstream: its URL, or ``{url: URL, case_insensitive_paths: BOOL}``."""
        if not isinstance(node, MappingNode):
            return model.UpstreamConfig(name=name, url=self.upstream_url(node, path))
        m = self.mapping(node, path, ("url", "case_insensitive_paths", "pass_authorization"))
        url = self.required(m, "url", lambda n, p: self.upstream_url(n, p), "")
        case_insensitive = self.optional(m, "case_insensitive_paths", self.boolean, False)
        pass_authorization = self.optional(m, "pass_authorization", self.boolean, False)
        if not url:
            raise _Invalid
        return model.UpstreamConfig(
            name=name,
            url=url,
            case_insensitive_paths=case_insensitive,
            pass_authorization=pass_authorization,
        )

    def upstream_url(self, node: Node, path: str) -> str:
        text, _parts = self.http_url(node, path, what="upstream URL")
        return text.rstrip("/")

    def session(self, node: Node, path: str) -> model.SessionConfig:
        m = self.mapping(
            node,
            path,
            (
                "secret",
                "secret_file",
                "store",
                "redis_url",
                "redis_prefix",
                "cookie_secure",
                "cookie_name",
                "idle_timeout",
                "lifetime",
                "transaction_ttl",
                "redis_pool_size",
                "redis_pool_timeout",
            ),
        )
        store = self.optional(m, "store", lambda n, p: self.choice(n, p, STORES), DEFAULT_STORE)
        redis_url = self.optional(m, "redis_url", self.redis_url, None)
        if store == "redis" and redis_url is None and m.get("redis_url") is None:
            self.note(m.child("redis_url"), "required with store: redis", m.get("store"))
        return model.SessionConfig(
            secrets=self.session_secrets(m),
            store=store,
            redis_url=redis_url,
            redis_prefix=self.optional(m, "redis_prefix", self.redis_prefix, DEFAULT_REDIS_PREFIX),
            cookie_secure=self.optional(m, "cookie_secure", self.boolean, DEFAULT_COOKIE_SECURE),
            cookie_name=self.optional(m, "cookie_name", self.cookie_name, DEFAULT_COOKIE_NAME),
            idle_timeout_s=self.optional(
                m, "idle_timeout", self.positive_duration_s, DEFAULT_IDLE_TIMEOUT_S
            ),
            lifetime_s=self.optional(m, "lifetime", self.positive_duration_s, DEFAULT_LIFETIME_S),
            transaction_ttl_s=self.optional(
                m, "transaction_ttl", self.positive_duration_s, DEFAULT_TRANSACTION_TTL_S
            ),
            # 0: not given; sized from server.max_connections once both are read.
            redis_pool_size=self.optional(
                m,
                "redis_pool_size",
                lambda n, p: self.bounded_integer(n, p, 1, MAX_REDIS_POOL_SIZE),
                0,
            ),
            redis_pool_timeout_s=self.optional(
                m, "redis_pool_timeout", self.timeout_s, DEFAULT_REDIS_POOL_TIMEOUT_S
            ),
        )

    def session_secrets(self, m: _Map) -> tuple[bytes, ...]:
        """``secret: S``, ``secret: [NEW, OLD]`` or ``secret_file: PATH`` (one per line).

        The first secret seals new cookies; all of them open old ones (rotation).
        """
        inline, from_file = m.get("secret"), m.get("secret_file")
        if inline is not None and from_file is not None:
            self.note(m.child("secret_file"), "give secret or secret_file, not both", from_file)
            return ()
        if from_file is not None:
            path = m.child("secret_file")
            try:
                lines = self.file_text(from_file, path).splitlines()
            except _Invalid:
                return ()
            secrets = [line.strip() for line in lines if line.strip()]
            if not secrets:
                self.note(path, "the file holds no secret", from_file)
            for i, secret in enumerate(secrets):
                self.check_secret(secret, path, from_file, f"line {i + 1} of the file")
            return tuple(s.encode() for s in secrets)
        if inline is None:
            self.note(m.child("secret"), "required key is missing (or secret_file)", m.node)
            return ()
        path = m.child("secret")
        entries: list[tuple[str, Node]]
        if isinstance(inline, SequenceNode):
            try:
                entries = self.items(inline, path)
            except _Invalid:
                return ()
        else:
            entries = [(path, inline)]
        result: list[bytes] = []
        for item_path, item in entries:
            try:
                secret = self.scalar(item, item_path, "a string").text
            except _Invalid:
                continue
            self.check_secret(secret, item_path, item, "the secret")
            result.append(secret.encode())
        return tuple(result)

    def check_secret(self, secret: str, path: str, node: Node, what: str) -> None:
        size = len(secret.encode())
        if size < MIN_SECRET_BYTES:
            self.note(
                path,
                f"{what} is {size} bytes; at least {MIN_SECRET_BYTES} are needed "
                "(e.g. the output of: openssl rand -base64 32)",
                node,
            )

    def redis_url(self, node: Node, path: str) -> str:
        text = self.text(node, path).strip()  # may hold a password: never quoted
        try:
            scheme = scheme_of(text)
        except ValueError:  # urlsplit: an unbalanced "[" or "]"
            raise self.fail(path, "invalid Redis URL", node) from None
        if scheme not in REDIS_SCHEMES:
            raise self.fail(
                path,
                "must start with redis://, rediss://, unix:// or redis+sentinel:// "
                "(Redis Cluster is not supported)",
                node,
            )
        if is_sentinel_url(text):
            try:
                parse_sentinel_url(text)
            except ValueError as exc:
                raise self.fail(path, str(exc), node) from None
        return text

    def redis_prefix(self, node: Node, path: str) -> str:
        text = self.scalar(node, path, "a string").text
        if len(text) > MAX_REDIS_PREFIX_CHARS or not text.isprintable() or " " in text:
            raise self.fail(
                path, f"use up to {MAX_REDIS_PREFIX_CHARS} printable characters, no spaces", node
            )
        return text

    def cookie_name(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        if not _TOKEN.fullmatch(text):
            raise self.fail(path, f"invalid cookie name {text!r} (RFC 6265 token)", node)
        if text.lower().startswith(("__host-", "__secure-")):
            raise self.fail(path, "leave out the __Host- prefix: the gateway adds it", node)
        return text

    @staticmethod
    def node_at(top: _Map, section: str, key: str) -> Node | None:
        """The YAML node of ``section.key``, for a line number (None when absent)."""
        node: Node | None = top.get(section)
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == key:
                    found: Node = value_node
                    return found
        return node

    def check_cookie_secure(
        self, server: model.ServerConfig, session: model.SessionConfig, top: _Map
    ) -> None:
        """Secure cookies with a plain-http public_url: nobody could ever sign in.

        Loopback is the exception: browsers treat http://localhost and 127.0.0.0/8 as
        potentially trustworthy origins (W3C Secure Contexts 3.2) and do send Secure
        cookies there, which is what local plain-http use looks like.
        """
        parts = urlsplit(server.public_url)
        if not session.cookie_secure or parts.scheme.lower() != "http":
            return
        if _is_loopback(parts.hostname or ""):
            return
        node: Node | None = top.get("session")
        default = " (the default)"
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == "cookie_secure":
                    node, default = value_node, ""
        self.note(
            "session.cookie_secure",
            f"is true{default} but server.public_url is plain http: browsers never send "
            "Secure cookies over http, so nobody could sign in. Use an https public_url, "
            "or set cookie_secure: false for local plain-http use only",
            node,
        )
