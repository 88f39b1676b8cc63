"""The ``stepup-gateway`` command line: ``run``, ``check``, ``explain`` and ``demo``.

Exit status: 0 success, 1 invalid configuration (or, for ``demo``, the demo is not
installed or cannot start), 2 usage error (or, for ``explain``, a request the gateway
would refuse before any rule is consulted).
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from gateway import __version__, tracing
from gateway.cel import old_syntax_rewrites, rewrite_notice
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.explain import EXIT_OK, FORM_CONTENT_TYPE, explain
from gateway.model import Config
from gateway.oidc import profiles

CONFIG_ENV = "GATEWAY_CONFIG"
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_DEMO_UNAVAILABLE = 1  # demo: the stepup_demo package is missing or cannot start
DEMO_PACKAGE = "stepup_demo"


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
        "the signature is not checked, the claims are, against now, by the provider "
        "their iss names (without one: the rule's)",
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
    if _tracing(config, sys.stderr) is None:
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
    tracing_on = _tracing(config, sys.stdout)
    if tracing_on is None:
        return EXIT_CONFIG
    # What each provider's profile implies, so a surprise shows before the first sign-in.
    implied = [
        (name, profiles.get(config.oidc_for(name).profile)) for name in config.provider_names
    ]
    if not config.providers:
        _name, profile = implied[0]
        print(
            "ok"
            if profile.name == "generic"
            else f"ok (profile {profile.name}: {profiles.describe(profile)})"
        )
    else:
        print("ok")
        for name, profile in implied:  # oidc.providers: one line each
            print(f"  provider {name}: profile {profile.name}: {profiles.describe(profile)}")
    if tracing_on:
        print(tracing_on)
    return EXIT_OK


def _tracing(config: Config, out: TextIO) -> str | None:
    """How tracing stands ("" when off), or None after printing why it cannot start."""
    try:
        return tracing.tracing_status(config.telemetry) or ""
    except tracing.TelemetryUnavailable as exc:
        print(f"{config.source}: {exc}", file=out)
        return None


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
