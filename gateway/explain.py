"""``stepup-gateway explain``: which rule a request matches and what it requires, as JSON.

The answer comes from the decision unit (:mod:`gateway.decision`), the one the proxy
and forward-auth use, fed with what the command line gives: the method and URL, a body,
a client address, the claims of an access token. Pure apart from the clock.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import TypeVar, cast
from urllib.parse import urlsplit

from gateway import assurance
from gateway.conditions import Facts
from gateway.decision import (
    SITE_PATH_METHODS,
    TOKEN_NOT_ACCEPTED,
    RequestFacts,
    decide_request,
    site_paths,
)
from gateway.errors import BadRequest
from gateway.fields import RequestFields, ambiguous, binding_values, read_fields, readable_body
from gateway.model import Config, Requirement, RiskConfig, Rule
from gateway.oidc import profiles
from gateway.oidc.flow import IdTokenError
from gateway.paths import canonical_host, normalize_path
from gateway.policy import Allow, Challenge, Deny
from gateway.rules import RuleSet
from gateway.tokens import challenges
from gateway.tokens.claims import (
    TokenError,
    check_claims,
    read_by_profile,
    read_claims,
    session_of,
)
from gateway.tokens.gate import issuer_for, issuers

EXIT_OK = 0
EXIT_REFUSED = 2  # a request the gateway would refuse before any rule is consulted
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
T = TypeVar("T")
UNKNOWN_NOTE = (
    "conditions on what is unknown count as true (fail closed); explain has no session, "
    "so auth_age and client_ip_changed are unknown"
)

# scheme://authority rest — parsed by hand: urllib drops tabs and newlines from a URL,
# which would explain a different path than the one the gateway would refuse.
_ABSOLUTE_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.S
)


def explain(
    config: Config,
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    content_type: str = FORM_CONTENT_TYPE,
    client_ip: str | None = None,
    token_claims: Mapping[str, object] | None = None,
    token_scheme: str = "Bearer",  # noqa: S107 - an auth scheme, not a secret
    now: float | None = None,
) -> tuple[dict[str, object], int]:
    """What the gateway would do with ``method url`` before looking at any session.

    Follows the request path in :mod:`gateway.app`: normalise the path, route the
    internal prefix, refuse unknown methods, canonicalise the host, then the same
    decision the gateway makes (:func:`gateway.decision.decide_request`).
    A path alone is taken as sent to ``server.public_url``'s host. Rules with
    ``when`` are tried in order against the body, the URL's query and
    ``client_ip``; with no session, ``auth_age`` and ``client_ip_changed`` count
    as true (as anything unknown does).

    With ``token_claims`` (and the ``api`` section) the request carries an access
    token with those claims: ``"token"`` in the result says how it is judged.
    """
    public = urlsplit(config.server.public_url)
    scheme = public.scheme.lower()
    absolute = _ABSOLUTE_URL.fullmatch(url)
    url_scheme = scheme
    if url.startswith("/"):
        raw_host, target = public.netloc, url
    elif absolute is not None and absolute.group("scheme").lower() in ("http", "https"):
        url_scheme = absolute.group("scheme").lower()
        raw_host, target = absolute.group("authority"), absolute.group("rest") or "/"
    else:
        message = "URL must be absolute (https://host/path) or a path starting with '/'"
        return {"rule": None, "error": message, "status": 400}, EXIT_REFUSED
    # Clients never send a fragment; the query plays no part in matching (only in when).
    raw_path, _, raw_query = target.partition("#")[0].partition("?")
    try:
        path = normalize_path(raw_path)
        # A client leaves out its URL's default port from Host; the gateway then
        # canonicalises Host against its own public scheme.
        host = canonical_host(canonical_host(raw_host, url_scheme), scheme)
    except BadRequest as exc:
        return {
            "rule": None,
            "error": exc.message,
            "reason": exc.reason,
            "status": 400,
        }, EXIT_REFUSED

    prefix = config.server.internal_prefix
    if path == prefix or path.startswith(prefix + "/"):
        return {
            "rule": None,
            "decision": "internal",
            "endpoint": path[len(prefix) :] or "/",
            "normalized_path": path,
            "host": host,
        }, EXIT_OK
    if path in site_paths(config.rules) and method in SITE_PATH_METHODS:
        return {
            "rule": None,
            "decision": "gateway",
            "endpoint": path,
            "normalized_path": path,
            "host": host,
        }, EXIT_OK
    rules = RuleSet.for_config(config)
    if not rules.host_known(host):
        return {
            "rule": None,
            "error": f"host {host!r} is refused with 421: some rules name a host, and this "
            "one is none of theirs, public_url's or server.hosts",
            "reason": "unknown_host",
            "status": 421,
        }, EXIT_REFUSED
    if not rules.method_known(method):
        return {
            "rule": None,
            "error": f"method {method!r} is refused with 405: it is not a standard method "
            "in upper case and no rule names it",
            "status": 405,
        }, EXIT_REFUSED
    facts, facts_note, fields = _facts(config, raw_query, body, content_type, client_ip)
    skipped: list[Rule] = []
    request_facts = RequestFacts(method, host, path, None, _ExplainReader(fields, client_ip))
    # The gateway's own decision, with no session and no risk engine asked: what it
    # names is the rule, whatever the session would then make of it.
    try:
        decision = _at_once(
            decide_request(
                request_facts,
                rules,
                config.assurance,
                time.time(),
                risk=None,
                claim_once=_no_claims,
                skipped=skipped,
                log_unknown=False,
            )
        )
    except BadRequest as refusal:
        # A field the rule being judged reads is ambiguous (gateway.fields): every
        # rule before it was skipped, so it is the next candidate.
        refused = list(rules.candidates_for(method, host, path))[len(skipped)]
        return {
            "rule": refused.name,
            "error": refusal.message,
            "reason": refusal.reason,
            "status": 400,
        }, EXIT_REFUSED
    rule = decision.rule
    read = frozenset[str]().union(*(_fields_read(seen) for seen in (*skipped, rule)))
    extra: dict[str, object] = {}
    if read:
        extra["fields"] = binding_values(sorted(read), facts.fields)
    if facts_note:
        extra["body"] = facts_note
    if skipped:
        extra["skipped"] = [
            {"rule": seen.name, "when": seen.when.describe() if seen.when is not None else None}
            for seen in skipped
        ]
    if rule is None:
        return {
            "rule": None,
            "decision": "deny",
            "status": 403,
            "method": method,
            "normalized_path": path,
            "host": host,
            **extra,
        }, EXIT_OK
    result: dict[str, object] = {
        "rule": rule.name,
        "require": _requirement(rule.require),
        "upstream": rule.upstream,
        "method": method,
        "normalized_path": path,
        "host": host,
    }
    if rule.when is not None:
        result["when"] = rule.when.describe()
        unknown = sorted(rule.when.unknowns(facts))
        if unknown:
            result["unknown"] = unknown
            result["note"] = UNKNOWN_NOTE
    if rule.risk is not None:
        result["risk"] = _risk(rule.risk)
    if rule.upstream_challenge:
        result["upstream_challenge"] = True
    if config.providers:  # several providers: whose sign-in the rule needs, and where
        result["provider"] = rule.provider
        result["issuer"] = config.oidc_for(rule.provider).issuer
    authorization = _authorization(config, rule)
    if authorization is not None:
        result["authorization"] = authorization
    if config.api is not None:
        result["credentials"] = rule.credentials
    if token_claims is not None and config.api is not None:
        result["token"] = judge_token(
            config,
            rules,
            request_facts,
            rule,
            token_claims,
            token_scheme,
            time.time() if now is None else now,
        )
    return {**result, **extra}, EXIT_OK


def _authorization(config: Config, rule: Rule) -> dict[str, str] | None:
    """The step-up parameters of the authorization request the rule's challenge sends,
    in its provider's profile dialect (the ones every request carries left out). Shown
    with a provider profile set, where they differ from plain ``acr_values``, and with
    several providers (``oidc.providers``)."""
    require, oidc = rule.require, config.oidc_for(rule.provider)
    levels = config.assurance.for_provider(rule.provider)
    level = levels.level(require.level) if require.level is not None else None
    if level is None or (oidc.profile == "generic" and not config.providers):
        return None
    max_age_s = 0 if require.once else require.max_age_s
    return profiles.authorization_params(
        profiles.get(oidc.profile),
        level.acr,
        max_age_s,
        essential_acr=oidc.essential_acr,
    )


def judge_token(
    config: Config,
    rules: RuleSet,
    facts: RequestFacts,
    explained: Rule,
    claims: Mapping[str, object],
    scheme: str,
    now: float,
) -> dict[str, object]:
    """How the gateway judges a token with ``claims`` (signature and DPoP proof taken
    as valid): the claim checks, then the decision unit with the token's session, as
    the request path does (:mod:`gateway.tokens.gate`). Its ``iss`` names the provider
    that judges it (none: an opaque token, judged by the rule's provider)."""
    api = config.api
    assert api is not None
    if (scheme == "DPoP" and api.dpop == "off") or (scheme == "Bearer" and api.dpop == "required"):
        reason = "dpop_disabled" if scheme == "DPoP" else "dpop_required"
        return {"decision": "invalid_token", "status": 401, "reason": reason}
    accepted = issuers(config)
    try:
        read = read_claims(claims)
        if read.iss is not None:
            issuer = issuer_for(accepted, read.iss, explained.provider)
        elif explained.provider in accepted:
            issuer = accepted[explained.provider]
        else:
            raise TokenError("provider")
        check_claims(
            read,
            issuer=issuer.oidc.issuer,
            audience=api.audience,
            now=now,
            skew_s=issuer.oidc.clock_skew_s,
        )
    except IdTokenError as exc:
        refused: dict[str, object] = {"decision": "invalid_token", "status": 401}
        refused["reason"] = exc.reason if exc.claim is None else f"{exc.reason} ({exc.claim})"
        return refused
    read = read_by_profile(read, issuer.profile, issuer.levels)
    session = session_of(read, "explain", now, provider=issuer.name)
    try:
        decision = _at_once(
            decide_request(
                dataclasses.replace(facts, session=session, by_token=True),
                rules,
                config.assurance,
                now,
                risk=None,
                claim_once=_unspent,
                log_unknown=False,
            )
        )
    except BadRequest as refusal:
        return {"decision": "refused", "status": 400, "reason": refusal.reason}
    if isinstance(decision, Deny) and decision.reason == TOKEN_NOT_ACCEPTED:
        return {"decision": "invalid_token", "status": 401, "reason": TOKEN_NOT_ACCEPTED}
    held = assurance.highest(issuer.levels, session.proofs)
    judged: dict[str, object] = {"level": held.name if held is not None else None}
    if config.providers:  # several providers: which one judged the token
        judged["provider"] = issuer.name
    if decision.rule is not explained:  # the token's session made a when hold differently
        judged["rule"] = decision.rule.name if decision.rule is not None else None
    if isinstance(decision, Allow):
        judged.update(decision="allow", status=200)
    elif isinstance(decision, Challenge):
        value, _max_age_s = challenges.step_up(api, decision, scheme)
        judged.update(
            decision="challenge",
            status=401,
            reason=decision.reason,
            www_authenticate=value,
        )
    else:
        judged.update(decision="deny", status=decision.status, reason=decision.reason)
    return judged


class _ExplainReader:
    """:class:`gateway.decision.RequestReader` over what ``explain`` was given."""

    def __init__(self, fields: RequestFields, client_ip: str | None) -> None:
        self._fields = fields
        self._client_ip = client_ip

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        # As the gateway (gateway.body.certain): a field the rule reads given twice,
        # or read differently by upstreams, is refused.
        unsure = self._fields.unsure(reading)
        if unsure:
            raise ambiguous(unsure)
        return self._fields.values

    def client_ip(self) -> str | None:
        return self._client_ip


async def _no_claims(name: str, *, rule: str, sub: str) -> bool:
    raise AssertionError("explain has no session, so no proof to spend")  # pragma: no cover


async def _unspent(name: str, *, rule: str, sub: str) -> bool:
    return True  # a token's proof, judged as not used before (explain keeps no records)


def _at_once(step: Coroutine[object, None, T]) -> T:
    """The result of a coroutine that never waits (explain reads no network, no store)."""
    try:
        step.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    step.close()
    raise RuntimeError("explain's decision waited on I/O")


def _facts(
    config: Config,
    raw_query: str,
    body: bytes | None,
    content_type: str,
    client_ip: str | None,
) -> tuple[Facts, str | None, RequestFields]:
    """The facts a rule's when sees, as the gateway would build them (no session)."""
    query = raw_query
    note = None
    data = body or b""
    if len(data) > config.step_up.max_body_bytes:
        # The gateway does not read past max_body: nothing is known about the fields.
        data, content_type, query = b"", "", ""
        note = "larger than step_up.max_body: no fields are read, conditions on them count as true"
    if body is None:
        content_type = ""
    elif note is None and not readable_body(content_type, data):
        note = f"not readable as {content_type}: no fields, conditions on them count as true"
    fields = read_fields(content_type, data, query)
    facts = Facts(fields=fields.values, client_ip=client_ip, proven_ip=None, auth_age_s=None)
    return facts, note, fields


def _fields_read(rule: Rule | None) -> frozenset[str]:
    """The request fields a rule's when and bind read."""
    if rule is None:
        return frozenset()
    read = rule.when.fields() if rule.when is not None else frozenset[str]()
    return read | frozenset(rule.require.bind)


def _requirement(require: Requirement) -> dict[str, object] | str:
    if require.level is None:
        return "none"
    result: dict[str, object] = {
        "level": require.level,
        "max_age": require.max_age_s,
        "once": require.once,
    }
    if require.bind:
        result["bind"] = list(require.bind)
    return result


def _risk(risk: RiskConfig) -> dict[str, object]:
    return {
        "url": risk.url,
        "timeout": risk.timeout_s,
        "on_error": risk.on_error,
        "cache": risk.cache_s,
    }
