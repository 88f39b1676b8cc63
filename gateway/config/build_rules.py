"""Building the access policy: assurance levels, rules, step-up and assertion settings.

What the schema cannot check is checked here, in code: a level or upstream a rule
names must exist, globs compile, a rule an earlier one always matches first is
refused, ``when`` parses, ``require.once`` has one place to record consumed proofs.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway import model
from gateway.cel import parse_when
from gateway.conditions import MAX_DEPTH as MAX_CONDITION_DEPTH
from gateway.conditions import (
    ConditionError,
    is_field_name,
)
from gateway.config.defaults import (
    CREDENTIALS,
    DEFAULT_RISK_CACHE_S,
    DEFAULT_RISK_ON_ERROR,
    DEFAULT_RISK_TIMEOUT_S,
    MAX_RISK_TIMEOUT_S,
    ONCE_NEEDS_ONE_CONSUMER,
    REGISTERED_METHODS,
    RISK_ON_ERROR,
)
from gateway.config.loader import (
    _TOKEN,
    _Invalid,
    _Map,
    _Reader,
)
from gateway.config.schema import suggest as _suggest
from gateway.oidc import profiles
from gateway.paths import canonical_rule_host
from gateway.rules import compile_glob


class _RuleBuilders(_Reader):
    # The names rules may give in `provider` (gateway.config.build_providers sets them).
    provider_names: frozenset[str] = frozenset({model.DEFAULT_PROVIDER})

    def rule_provider(self, node: Node, path: str) -> str:
        name = self.name(node, path)
        if name not in self.provider_names:
            known = ", ".join(sorted(self.provider_names))
            raise self.fail(path, f"unknown provider {name!r} (known: {known})", node)
        return name

    def assurance(self, node: Node, path: str, profile: profiles.Profile) -> model.AssuranceConfig:
        m = self.mapping(node, path, ("levels",))
        levels_node = m.get("levels")
        if levels_node is None:
            if profile.default_levels:
                return model.AssuranceConfig(levels=profile.default_levels)
            raise self.fail(
                m.child("levels"), "required key is missing (or set oidc.profile)", node
            )
        return self.level_list(levels_node, m.child("levels"), profile)

    def level_list(
        self,
        levels_node: Node,
        levels_path: str,
        profile: profiles.Profile,
        profile_path: str = "oidc.profile",
    ) -> model.AssuranceConfig:
        """``levels``: a list of levels, weakest first, that ``profile``'s provider asserts."""
        before = len(self.problems)
        levels: list[model.Level] = []
        seen: dict[str, int] = {}
        for item_path, item in self.items(levels_node, levels_path):
            try:
                level = self.level(item, item_path, rank=len(levels))
            except _Invalid:
                continue
            if level.name in seen:
                self.note(
                    f"{item_path}.name",
                    f"duplicate level name {level.name!r} (also levels[{seen[level.name]}])",
                    item,
                )
                continue
            seen[level.name] = len(levels)
            levels.append(level)
        if len(self.problems) > before:
            raise _Invalid  # rules are then not checked against a partial list of levels
        # A level the profile's provider never asserts would be a step-up that can
        # never succeed: refused here rather than discovered by a locked-out user.
        items = [item for _path, item in self.items(levels_node, levels_path)]
        for index, key, message in profiles.level_problems(profile, levels):
            item_node = items[index] if index < len(items) else None
            self.note(
                f"{levels_path}[{index}].{key}",
                f"{message} ({profile_path}: {profile.name})",
                item_node,
            )
        if len(self.problems) > before:
            raise _Invalid
        return model.AssuranceConfig(levels=tuple(levels))

    def level(self, node: Node, path: str, rank: int) -> model.Level:
        m = self.mapping(node, path, ("name", "acr", "amr_any"))
        # acr values are taken as written: Keycloak's are numbers ("1", "2").
        level = model.Level(
            name=self.required(m, "name", self.name, ""),
            rank=rank,
            acr=self.optional(m, "acr", self.texts, ()),
            amr_any=self.optional(m, "amr_any", self.texts, ()),
        )
        if m.get("acr") is None and m.get("amr_any") is None:
            raise self.fail(path, "a level needs acr or amr_any (or both)", node)
        return level

    def rules(
        self,
        node: Node,
        path: str,
        assurance: model.AssuranceConfig | None,
        upstreams: dict[str, model.UpstreamConfig] | None,
    ) -> tuple[model.Rule, ...]:
        rules: list[model.Rule] = []
        first_index: dict[str, int] = {}
        # The earlier rules by (canonical path, host): check_reachable looks up only
        # the few patterns that could cover a rule, so 10,000 rules load in seconds.
        earlier: dict[tuple[str, str | None], list[model.Rule]] = {}
        entries = self.items(node, path)
        if not entries:
            return ()
        for index, (item_path, item) in enumerate(entries):
            try:
                rule = self.rule(item, item_path, index, assurance, upstreams)
            except _Invalid:
                continue
            if rule.name in first_index:
                self.note(
                    f"{item_path}.name",
                    f"duplicate rule name {rule.name!r} (also rules[{first_index[rule.name]}])",
                    item,
                )
                continue
            first_index[rule.name] = index
            canonical = compile_glob(rule.match.path).canonical
            self.check_reachable(rule, canonical, earlier, item_path, item)
            if rule.when is None:  # a rule with when leaves the requests it skips to later ones
                earlier.setdefault((canonical, rule.match.host), []).append(rule)
            rules.append(rule)
        return tuple(rules)

    def rule(
        self,
        node: Node,
        path: str,
        index: int,
        assurance: model.AssuranceConfig | None,
        upstreams: dict[str, model.UpstreamConfig] | None,
    ) -> model.Rule:
        m = self.mapping(
            node,
            path,
            (
                "name",
                "match",
                "when",
                "require",
                "risk",
                "upstream",
                "allow_method_override",
                "upstream_challenge",
                "credentials",
                "provider",
            ),
        )
        before = len(self.problems)
        provider = self.optional(m, "provider", self.rule_provider, model.DEFAULT_PROVIDER)
        if assurance is not None:
            assurance = assurance.for_provider(provider)  # its levels are the ones to name
        credentials_node = m.get("credentials")
        if credentials_node is not None:
            self.credential_nodes.append((m.child("credentials"), credentials_node))
        rule = model.Rule(
            name=self.required(m, "name", self.name, ""),
            index=index,
            match=self.required(m, "match", self.match, model.Match(path="/**")),
            require=self.required(
                m,
                "require",
                lambda n, p: self.requirement(n, p, assurance),
                model.Requirement(level=None),
            ),
            upstream=self.rule_upstream(m, upstreams),
            allow_method_override=self.optional(m, "allow_method_override", self.boolean, False),
            upstream_challenge=self.optional(m, "upstream_challenge", self.boolean, False),
            when=self.optional(m, "when", self.when, None),
            risk=self.optional(m, "risk", self.risk, None),
            credentials=self.optional(
                m, "credentials", lambda n, p: self.choice(n, p, CREDENTIALS), "any"
            ),
            provider=provider,
        )
        if rule.when is not None and rule.require.level is None:
            self.note(
                m.child("when"),
                "a rule with when must require a level: a condition that cannot be evaluated "
                "counts as true (fail closed), so when is for the stricter rule placed before "
                "an ordinary one, never for one that needs no sign-in",
                m.get("when"),
            )
        if len(self.problems) > before:
            raise _Invalid
        return rule

    def match(self, node: Node, path: str) -> model.Match:
        m = self.mapping(node, path, ("path", "methods", "host"))
        return model.Match(
            path=self.required(m, "path", self.glob, "/**"),
            methods=self.optional(m, "methods", self.methods, None),
            host=self.optional(m, "host", self.rule_host, None),
        )

    def glob(self, node: Node, path: str) -> str:
        text = self.text(node, path)
        try:
            compile_glob(text)
        except ValueError as exc:
            raise self.fail(path, str(exc), node) from None
        return text

    def methods(self, node: Node, path: str) -> frozenset[str]:
        methods: list[str] = []
        for item_path, item in self.items(node, path):
            try:
                method = self.text(item, item_path)
            except _Invalid:
                continue
            if not _TOKEN.fullmatch(method):
                self.note(item_path, f"invalid method {method!r} (RFC 7230 token)", item)
                continue
            # Methods are case-sensitive (RFC 9110 9.1): a rule naming "post" would never
            # match a POST, so the typo would silently leave POSTs to a weaker rule.
            if method != method.upper():
                self.note(
                    item_path,
                    f"{method!r} must be upper case (did you mean {method.upper()!r}?)",
                    item,
                )
                continue
            if method not in REGISTERED_METHODS:
                close = difflib.get_close_matches(method, sorted(REGISTERED_METHODS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.note(
                    item_path,
                    f"unknown method {method!r}{hint}: a rule may name the methods of the "
                    "IANA HTTP Method Registry",
                    item,
                )
                continue
            methods.append(method)
        return frozenset(methods)

    def rule_host(self, node: Node, path: str) -> str:
        text = self.text(node, path).strip()
        if "/" in text or "@" in text or "?" in text or "#" in text:
            # "https://bank.example.com" or "bank.example.com/api" would never equal a
            # Host header, so the rule would silently never apply.
            bare = urlsplit(text if "//" in text else "//" + text).netloc.rpartition("@")[2]
            hint = f" (did you mean {bare!r}?)" if bare else ""
            raise self.fail(path, f"must be a host name, not a URL or a path: {text!r}{hint}", node)
        try:
            return canonical_rule_host(text, self.public_scheme)
        except ValueError as exc:
            hint = ""
            if not text.isascii():
                # Hosts arrive in their IDNA A-label form; one spelling is compared.
                with contextlib.suppress(UnicodeError):
                    hint = f" (did you mean {text.encode('idna').decode('ascii')!r}?)"
            raise self.fail(path, f"invalid host {text!r}: {exc}{hint}", node) from None

    def requirement(
        self, node: Node, path: str, assurance: model.AssuranceConfig | None
    ) -> model.Requirement:
        if isinstance(node, ScalarNode):
            text = self.scalar(node, path, "'none' or {level: NAME}").text
            if text == "none":
                return model.Requirement(level=None)
            raise self.fail(
                path,
                f"expected 'none' or a mapping like {{level: NAME, max_age: 5m}} (got {text!r})",
                node,
            )
        m = self.mapping(node, path, ("level", "max_age", "once", "bind"))
        level_node = m.get("level")
        if level_node is None:
            if m.get("max_age") is not None:
                message = "max_age needs a level: the level that must have been proven recently"
            else:
                message = "required key is missing (use require: none for no sign-in)"
            raise self.fail(m.child("level"), message, node)
        level = self.required(m, "level", lambda n, p: self.level_name(n, p, assurance), "")
        once = self.optional(m, "once", self.boolean, False)
        once_node = m.get("once")
        max_age_s = self.optional(m, "max_age", self.duration_s, None)
        if max_age_s == 0:
            # max_age is measured without leeway and a proof is always a round trip old
            # when the browser is back, so "proven 0 s ago" means what README promised:
            # a new sign-in for every request, which is exactly a one-time rule.
            once, max_age_s, once_node = True, None, m.get("max_age")
            once_path = m.child("max_age")
        else:
            once_path = m.child("once")
        if once and once_node is not None:
            self.once_nodes.append((once_path, once_node))
        return model.Requirement(
            level=level,
            max_age_s=max_age_s,
            once=once,
            bind=self.optional(m, "bind", self.field_names, ()),
        )

    def field_names(self, node: Node, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for item_path, item in self.items(node, path):
            try:
                name = self.text(item, item_path)
            except _Invalid:
                continue
            if not is_field_name(name):
                self.note(
                    item_path,
                    f"invalid field name {name!r}: use [A-Za-z_][A-Za-z0-9_.-]* "
                    "(a dot reaches into a JSON object: beneficiary.iban)",
                    item,
                )
            elif name in names:
                self.note(item_path, f"{name!r} is listed twice", item)
            else:
                names.append(name)
        return tuple(names)

    def check_once(self, server: model.ServerConfig, session: model.SessionConfig) -> None:
        """require.once is only as good as the one place that records consumed proofs."""
        if server.workers == 1 or session.store == "redis" or session.redis_url is not None:
            return
        for path, node in self.once_nodes:
            self.note(path, ONCE_NEEDS_ONE_CONSUMER, node)

    def check_forward_auth(self, rules: tuple[model.Rule, ...], node: Node | None) -> None:
        """server.mode forward_auth: a front proxy's check carries no body.

        nginx auth_request (and every forward-auth protocol but Envoy's opt-in)
        sends the method, URL and headers only, so a rule reading body fields
        (``when`` on fields, ``bind``) could never be judged: refused here, as
        the gateway refuses such a request at ``/auth`` (fail closed).
        """
        for rule in rules:
            reads = sorted(set(rule.require.bind) | (rule.when.fields() if rule.when else set()))
            if reads:
                self.note(
                    f"rules[{rule.index}]",
                    f"rule {rule.name!r} reads request fields ({', '.join(reads)}), but "
                    "server.mode is forward_auth and a front proxy's check carries no body. "
                    "Route this path through the gateway (server.mode: both, with the "
                    "proxy sending this route to the gateway) or drop the fields",
                    node,
                )

    def when(self, node: Node, path: str) -> Any:
        """A ``when`` value: CEL, or the old syntax (:func:`gateway.cel.parse_when`)."""
        value = self.plain(node, path, 0)
        try:
            return parse_when(value)
        except ConditionError as exc:
            where_path, where_node = self.locate(node, path, exc.where)
            raise self.fail(where_path, exc.message, where_node) from None

    def plain(self, node: Node, path: str, depth: int) -> object:
        """YAML to plain lists, dicts and scalars (interpolated), for the condition parser."""
        if depth > MAX_CONDITION_DEPTH:
            raise self.fail(path, "nested too deeply", node)
        if isinstance(node, SequenceNode):
            return [
                self.plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value)
            ]
        if isinstance(node, MappingNode):
            m = self.mapping(node, path, None)
            return {
                key: self.plain(value, m.child(key), depth + 1)
                for key, (_key_node, value) in m.entries.items()
            }
        scalar = self.scalar(node, path, "a condition")
        return scalar.text if isinstance(scalar.value, str) else scalar.value

    @staticmethod
    def locate(node: Node, path: str, where: Sequence[str | int]) -> tuple[str, Node]:
        """The key path and node of a part of a ``when`` (for the line number)."""
        for step in where:
            if isinstance(step, int) and isinstance(node, SequenceNode):
                if not 0 <= step < len(node.value):
                    break
                node, path = node.value[step], f"{path}[{step}]"
            elif isinstance(step, str) and isinstance(node, MappingNode):
                found = [v for k, v in node.value if isinstance(k, ScalarNode) and k.value == step]
                if not found:
                    break
                node, path = found[0], f"{path}.{step}"
            else:
                break
        return path, node

    def risk(self, node: Node, path: str) -> model.RiskConfig:
        m = self.mapping(node, path, ("url", "timeout", "on_error", "cache"))
        return model.RiskConfig(
            url=self.required(m, "url", self.risk_url, ""),
            timeout_s=self.optional(m, "timeout", self.risk_timeout, DEFAULT_RISK_TIMEOUT_S),
            on_error=self.optional(
                m, "on_error", lambda n, p: self.choice(n, p, RISK_ON_ERROR), DEFAULT_RISK_ON_ERROR
            ),
            cache_s=self.optional(m, "cache", self.duration_s, DEFAULT_RISK_CACHE_S),
        )

    def risk_url(self, node: Node, path: str) -> str:
        text, _parts = self.http_url(node, path, what="risk URL")
        return text

    def risk_timeout(self, node: Node, path: str) -> float:
        seconds = self.timeout_s(node, path)
        if seconds > MAX_RISK_TIMEOUT_S:
            raise self.fail(
                path,
                f"at most {MAX_RISK_TIMEOUT_S:g}s (got {seconds:g}s): every request of the "
                "rule waits for the risk engine",
                node,
            )
        return seconds

    def level_name(self, node: Node, path: str, assurance: model.AssuranceConfig | None) -> str:
        text = self.text(node, path)
        if assurance is not None and assurance.level(text) is None:
            known = ", ".join(level.name for level in assurance.levels)
            raise self.fail(path, f"unknown level {text!r} (known: {known})", node)
        return text

    def rule_upstream(self, m: _Map, upstreams: dict[str, model.UpstreamConfig] | None) -> str:
        node = m.get("upstream")
        if node is None:
            if upstreams is None:
                return ""
            if len(upstreams) == 1:
                return next(iter(upstreams))
            names = ", ".join(upstreams)
            self.note(
                m.child("upstream"),
                f"required when there are several upstreams (one of: {names})",
                m.node,
            )
            return ""
        path = m.child("upstream")
        try:
            name = self.text(node, path)
        except _Invalid:
            return ""
        if upstreams is not None and name not in upstreams:
            self.note(path, f"unknown upstream {name!r}" + _suggest(name, list(upstreams)), node)
        return name

    def check_reachable(
        self,
        rule: model.Rule,
        path_pattern: str,
        earlier: Mapping[tuple[str, str | None], Sequence[model.Rule]],
        path: str,
        node: Node,
    ) -> None:
        """Refuse a rule that an earlier one always matches first: it could never apply.

        Only the certain cases: same or broader ``/prefix/**`` path, any host or the same
        host, any method or a superset. ``path_pattern`` is the rule's canonical path,
        ``earlier`` the rules before it keyed by (canonical path, host).
        """
        # The patterns that cover path_pattern: itself, and "X/**" for every "X/" it
        # starts with or equals ("/api/**" covers "/api" itself and all below "/api/").
        covering = {path_pattern, path_pattern + "/**"}
        for position, char in enumerate(path_pattern):
            if char == "/":
                covering.add(path_pattern[: position + 1] + "**")
        hosts = {None, rule.match.host}
        first: model.Rule | None = None
        for pattern in covering:
            for host in hosts:
                for before in earlier.get((pattern, host), ()):
                    if first is not None and before.index >= first.index:
                        break  # each list is in rule order
                    if before.match.methods is not None and (
                        rule.match.methods is None or not rule.match.methods <= before.match.methods
                    ):
                        continue
                    first = before
                    break
        if first is not None:
            self.note(
                path,
                f"rule {rule.name!r} can never match: rules[{first.index}] "
                f"{first.name!r} (path {first.match.path!r}) matches all its requests first; "
                "put the more specific rule earlier",
                node,
            )
