"""Builders of the ``api`` section: what access tokens the gateway accepts as a resource
server (RFC 9068 JWTs, RFC 7662 introspection, RFC 9449 DPoP). Pure, like the rest of
:mod:`gateway.config`."""

from __future__ import annotations

import contextlib

from yaml.nodes import Node

from gateway import model
from gateway.config.defaults import (
    DEFAULT_ALGORITHMS,
    DEFAULT_DPOP_ALGORITHMS,
    DEFAULT_DPOP_MAX_AGE_S,
    DEFAULT_INTROSPECTION_CACHE_S,
    DEFAULT_TOKEN_CACHE_ENTRIES,
    DPOP_MODES,
    MAX_DPOP_MAX_AGE_S,
    MAX_INTROSPECTION_CACHE_S,
    MAX_TOKEN_CACHE_ENTRIES,
    TOKEN_KINDS,
)
from gateway.config.loader import _Invalid, _Reader


class _ApiBuilders(_Reader):
    # Set by gateway.config.build_providers before the api section is read.
    provider_names: frozenset[str] = frozenset({model.DEFAULT_PROVIDER})

    def api(self, node: Node, path: str) -> model.ApiConfig:
        m = self.mapping(
            node,
            path,
            (
                "audience",
                "tokens",
                "dpop",
                "algorithms",
                "dpop_algorithms",
                "dpop_nonce",
                "dpop_max_age",
                "introspection_cache",
                "cache_entries",
                "providers",
            ),
        )
        before = len(self.problems)
        config = model.ApiConfig(
            audience=self.required(m, "audience", self.text, ""),
            tokens=self.optional(m, "tokens", self.token_kinds, ("jwt",)),
            dpop=self.optional(m, "dpop", lambda n, p: self.choice(n, p, DPOP_MODES), "allowed"),
            algorithms=self.optional(m, "algorithms", self.algorithms, DEFAULT_ALGORITHMS),
            dpop_algorithms=self.optional(
                m, "dpop_algorithms", self.algorithms, DEFAULT_DPOP_ALGORITHMS
            ),
            dpop_nonce=self.optional(m, "dpop_nonce", self.boolean, False),
            dpop_max_age_s=self.optional(
                m,
                "dpop_max_age",
                lambda n, p: self.bounded_duration(n, p, 1, MAX_DPOP_MAX_AGE_S),
                DEFAULT_DPOP_MAX_AGE_S,
            ),
            introspection_cache_s=self.optional(
                m,
                "introspection_cache",
                lambda n, p: self.bounded_duration(n, p, 0, MAX_INTROSPECTION_CACHE_S),
                DEFAULT_INTROSPECTION_CACHE_S,
            ),
            cache_entries=self.optional(
                m,
                "cache_entries",
                lambda n, p: self.bounded_integer(n, p, 0, MAX_TOKEN_CACHE_ENTRIES),
                DEFAULT_TOKEN_CACHE_ENTRIES,
            ),
            providers=self.optional(m, "providers", self.token_providers, None),
        )
        if config.dpop_nonce and config.dpop == "off":
            self.note(m.child("dpop_nonce"), "needs dpop: allowed or required", m.get("dpop_nonce"))
        if len(self.problems) > before:
            raise _Invalid
        return config

    def token_kinds(self, node: Node, path: str) -> tuple[str, ...]:
        kinds: list[str] = []
        for item_path, item in self.items(node, path):
            with contextlib.suppress(_Invalid):
                kinds.append(self.choice(item, item_path, TOKEN_KINDS))
        return tuple(dict.fromkeys(kinds))

    def token_providers(self, node: Node, path: str) -> tuple[str, ...]:
        """``api.providers``: names of configured providers (``default``, ``oidc.providers``)."""
        names: list[str] = []
        for item_path, item in self.items(node, path):
            with contextlib.suppress(_Invalid):
                name = self.name(item, item_path)
                if name not in self.provider_names:
                    known = ", ".join(sorted(self.provider_names))
                    raise self.fail(item_path, f"unknown provider {name!r} (known: {known})", item)
                names.append(name)
        return tuple(dict.fromkeys(names))

    def bounded_duration(self, node: Node, path: str, low: int, high: int) -> int:
        # 0 where it is not allowed is refused as the schema's positive_duration says it.
        seconds = self.positive_duration_s(node, path) if low > 0 else self.duration_s(node, path)
        if not low <= seconds <= high:
            raise self.fail(path, f"must be between {low}s and {high}s", node)
        return seconds
