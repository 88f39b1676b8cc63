"""The ``stepup-gateway`` command line: ``run``, ``check``, ``explain`` and ``demo``.

Exit status: 0 success, 1 invalid configuration (or, for ``demo``, the demo is not
installed or cannot start), 2 usage error (or, for ``explain``, a request the gateway
would refuse before any rule is consulted).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TextIO, TypeVar, cast
from urllib.parse import urlsplit

from gateway import __version__, assurance
from gateway.cel import old_syntax_rewrites, rewrite_notice
from gateway.conditions import Facts
from gateway.config import load_config
from gateway.decision import (
    SITE_PATH_METHODS,
    TOKEN_NOT_ACCEPTED,
    RequestFacts,
    decide_request,
    site_paths,
)
from gateway.errors import BadRequest, ConfigError
from gateway.fields import RequestFields, ambiguous, binding_values, read_fields, readable_body
from gateway.model import Config, Requirement, RiskConfig, Rule
from gateway.oidc import profiles
from gateway.oidc.flow import IdTokenError
from gateway.paths import canonical_host, normalize_path
from gateway.policy import Allow, Challenge, Deny
from gateway.rules import RuleSet
from gateway.tokens import challenges
from gateway.tokens.claims import check_claims, read_claims, session_of

CONFIG_ENV = "GATEWAY_CONFIG"
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_REFUSED = 2
EXIT_DEMO_UNAVAILABLE = 1  # demo: the stepup_demo package is missing or cannot start
DEMO_PACKAGE = "stepup_demo"
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stepup-gateway`` and ``python -m gateway``; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if "config" in vars(args) and args.config is None:
        print(f"error: give --config PATH or set {CONFIG_ENV}", file=sys.stderr)
        return EXIT_USAGE
    return handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepup-gateway",
        description="Authentication reverse proxy with OpenID Connect step-up.",
    )
    parser.add_argument("--version", action="version", version=f"stepup-gateway {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=os.environ.get(CONFIG_ENV),
            help=f"the YAML config file (default: ${CONFIG_ENV})",
        )
        return sub

    run = with_config("run", "Serve with the given configuration.")
    run.set_defaults(handler=_run)

    check = with_config("check", "Validate the configuration: print ok, or every problem.")
    check.set_defaults(handler=_check)

    explain = with_config("explain", "Show, as JSON, which rule a request falls under.")
    explain.add_argument("method", metavar="METHOD", help="e.g. GET or POST (case-sensitive)")
    explain.add_argument(
        "url", metavar="URL", help="https://host/path?query, or a path starting with /"
    )
    explain.add_argument(
        "--body", metavar="DATA", help="the request body, for rules with when conditions"
    )
    explain.add_argument(
        "--content-type",
        metavar="TYPE",
        default=FORM_CONTENT_TYPE,
        help=f"the body's Content-Type (default {FORM_CONTENT_TYPE})",
    )
    explain.add_argument(
        "--client-ip", metavar="ADDRESS", help="the client's address, for client_ip conditions"
    )
    explain.add_argument(
        "--token-claims",
        metavar="JSON",
        help="judge the request as carrying an access token with these claims (needs api); "
        "the signature is not checked, the claims are, against now",
    )
    explain.add_argument(
        "--dpop",
        action="store_true",
        help="with --token-claims: the token is sent with the DPoP scheme",
    )
    explain.set_defaults(handler=_explain)

    demo = commands.add_parser(
        "demo",
        help="Run a local demo: identity provider, sample app and the gateway.",
        description="Run a local demo: identity provider, sample app and the gateway.",
    )
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (default 8080)")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument(
        "--passkeys",
        metavar="PATH",
        help="keep the passkeys users create in this JSON file across runs (default: memory)",
    )
    demo.add_argument(
        "--i-know-this-is-not-production",
        action="store_true",
        help="allow binding to a non-loopback address; the demo's users and keys are public",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _load(path: str, out: TextIO) -> Config | None:
    """Load the config, or print one line per problem to ``out`` and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=out)
        return None
    except Exception as exc:  # a bug in validation must still not show a traceback
        print(
            f"{path}: internal error while validating ({type(exc).__name__}); please report it",
            file=out,
        )
        return None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    # Imported here: `check` and `explain` need neither aiohttp nor the event loop.
    # Several workers: a supervisor spawns them, each running server.run_one (workers
    # builds on server, never the other way round).
    if config.server.workers > 1:
        from gateway.workers import supervise

        return supervise(config, args.config)
    from gateway.server import run_one

    return run_one(config, args.config)


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stdout)
    if config is None:
        return EXIT_CONFIG
    for path, rewrite in old_syntax_rewrites(config.rules):
        print(rewrite_notice(path, rewrite), file=sys.stderr)
    profile = profiles.get(config.oidc.profile)
    if profile.name == "generic":
        print("ok")
    else:  # what the provider profile implies, so a surprise shows before the first sign-in
        print(f"ok (profile {profile.name}: {profiles.describe(profile)})")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    if args.client_ip is not None:
        try:
            ipaddress.ip_address(args.client_ip)
        except ValueError:
            print(f"error: --client-ip {args.client_ip!r} is not an IP address", file=sys.stderr)
            return EXIT_USAGE
    config = _load(args.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    token_claims: dict[str, object] | None = None
    if args.token_claims is not None:
        if config.api is None:
            print("error: --token-claims needs the api section in the config", file=sys.stderr)
            return EXIT_USAGE
        try:
            parsed = json.loads(args.token_claims)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            print("error: --token-claims must be a JSON object", file=sys.stderr)
            return EXIT_USAGE
        token_claims = parsed
    elif args.dpop:
        print("error: --dpop needs --token-claims", file=sys.stderr)
        return EXIT_USAGE
    body = args.body.encode("utf-8", "surrogateescape") if args.body is not None else None
    result, status = explain(
        config,
        args.method,
        args.url,
        body=body,
        content_type=args.content_type,
        client_ip=args.client_ip,
        token_claims=token_claims,
        token_scheme="DPoP" if args.dpop else "Bearer",
    )
    print(json.dumps(result, indent=2))
    return status


def _demo(args: argparse.Namespace) -> int:
    # The demo is its own package (stepup_demo), found only here and only when asked
    # for: nothing in gateway/ imports it, so the gateway runs without it (the container
    # image does not ship it), and its provider's imports (authlib, webauthn) stay out
    # of run, check and explain.
    try:
        demo = importlib.import_module(DEMO_PACKAGE)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == DEMO_PACKAGE:
            print(
                f"error: the demo is not installed (no package {DEMO_PACKAGE!r}): it comes with"
                " 'pip install .' from the source tree (or scripts/demo there); the container"
                " image leaves it out",
                file=sys.stderr,
            )
        else:  # installed, but something it needs is missing or broken
            print(f"error: the demo cannot start: {exc}", file=sys.stderr)
        return EXIT_DEMO_UNAVAILABLE
    demo_main: Callable[[argparse.Namespace], int] | None = getattr(demo, "main", None)
    if demo_main is None:
        print(f"error: {DEMO_PACKAGE} has no main(): not the demo", file=sys.stderr)
        return EXIT_DEMO_UNAVAILABLE
    return demo_main(args)


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
    authorization = _authorization(config, rule.require)
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


def _authorization(config: Config, require: Requirement) -> dict[str, str] | None:
    """The step-up parameters of the authorization request the rule's challenge sends,
    in the provider profile's dialect (the ones every request carries left out). Shown
    with a provider profile set, where they differ from plain ``acr_values``."""
    level = config.assurance.level(require.level) if require.level is not None else None
    if level is None or config.oidc.profile == "generic":
        return None
    max_age_s = 0 if require.once else require.max_age_s
    return profiles.authorization_params(
        profiles.get(config.oidc.profile),
        level.acr,
        max_age_s,
        essential_acr=config.oidc.essential_acr,
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
    the request path does (:mod:`gateway.tokens.gate`)."""
    api = config.api
    assert api is not None
    if (scheme == "DPoP" and api.dpop == "off") or (scheme == "Bearer" and api.dpop == "required"):
        reason = "dpop_disabled" if scheme == "DPoP" else "dpop_required"
        return {"decision": "invalid_token", "status": 401, "reason": reason}
    try:
        read = read_claims(claims)
        check_claims(
            read,
            issuer=config.oidc.issuer,
            audience=api.audience,
            now=now,
            skew_s=config.oidc.clock_skew_s,
        )
    except IdTokenError as exc:
        refused: dict[str, object] = {"decision": "invalid_token", "status": 401}
        refused["reason"] = exc.reason if exc.claim is None else f"{exc.reason} ({exc.claim})"
        return refused
    session = session_of(read, "explain", now)
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
    held = assurance.highest(config.assurance.levels, session.proofs)
    judged: dict[str, object] = {"level": held.name if held is not None else None}
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
