"""Builders of ``oidc.providers`` (several providers in one gateway) and ``rules[].provider``.

The top-level ``oidc`` block is the provider named ``default``; each entry under
``oidc.providers`` is another, fully independent one (its own client, profile and
levels). A rule names the provider whose sign-in it needs; the names are checked here.
"""

from __future__ import annotations

from gateway import model
from gateway.config.build_oidc import _OidcBuilders
from gateway.config.build_rules import _RuleBuilders
from gateway.config.loader import _NAME, _Invalid, _Map
from gateway.oidc import profiles

NamedOidc = tuple[tuple[str, model.OidcConfig], ...]
NamedLevels = tuple[tuple[str, model.AssuranceConfig], ...]


class _ProviderBuilders(_RuleBuilders, _OidcBuilders):
    def named_providers(self, top: _Map) -> tuple[NamedOidc, NamedLevels]:
        """The providers under ``oidc.providers``, and the levels of those that have their own."""
        oidc_node = top.get("oidc")
        if oidc_node is None:
            return (), ()
        try:
            block = self.mapping(oidc_node, "oidc", None)
        except _Invalid:
            return (), ()
        node = block.get("providers")
        if node is None:
            return (), ()
        try:
            entries = self.mapping(node, "oidc.providers", None).entries
        except _Invalid:
            return (), ()
        providers: list[tuple[str, model.OidcConfig]] = []
        levels: list[tuple[str, model.AssuranceConfig]] = []
        names = {model.DEFAULT_PROVIDER}
        for name, (key_node, value_node) in entries.items():
            path = f"oidc.providers.{name}"
            if not _NAME.fullmatch(name):
                # The name travels in sessions, logs and metrics: a simple token only.
                self.note(
                    path,
                    f"invalid provider name {name!r}: letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit",
                    key_node,
                )
                continue
            if name == model.DEFAULT_PROVIDER:
                self.note(
                    path,
                    "'default' is the provider of the top-level oidc keys; name this one otherwise",
                    key_node,
                )
                continue
            names.add(name)
            try:
                oidc = self.oidc(value_node, path, named=True)
                m = self.mapping(value_node, path, None)
            except _Invalid:
                continue
            providers.append((name, oidc))
            profile = profiles.get(oidc.profile)
            levels_node = m.get("levels")
            if levels_node is not None:
                try:
                    levels.append(
                        (
                            name,
                            self.level_list(
                                levels_node, f"{path}.levels", profile, f"{path}.profile"
                            ),
                        )
                    )
                except _Invalid:
                    continue
            elif profile.default_levels:
                levels.append((name, model.AssuranceConfig(levels=profile.default_levels)))
        self.provider_names = frozenset(names)
        return tuple(providers), tuple(levels)
