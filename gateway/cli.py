"""The ``stepup-gateway`` command line: ``run``, ``check``, ``explain`` and ``demo``.

Exit status: 0 success, 1 invalid configuration, 2 usage error (or, for ``explain``,
a request the gateway would refuse before any rule is consulted).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TextIO
from urllib.parse import urlsplit

from gateway import __version__
from gateway.config import load_config
from gateway.errors import BadRequest, ConfigError
from gateway.model import Config, Requirement
from gateway.paths import canonical_host, normalize_path
from gateway.rules import RuleSet

CONFIG_ENV = "GATEWAY_CONFIG"
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_REFUSED = 2

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
    from gateway.server import serve

    return serve(config, config_path=args.config)


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stdout)
    if config is None:
        return EXIT_CONFIG
    print("ok")
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    result, status = explain(config, args.method, args.url)
    print(json.dumps(result, indent=2))
    return status


def _demo(args: argparse.Namespace) -> int:
    # Imported here: the demo's identity provider pulls in authlib and webauthn.
    try:
        demo = importlib.import_module("gateway.demo")
        demo_main: Callable[[argparse.Namespace], int] = demo.main
    except (ImportError, AttributeError) as exc:
        print(f"error: the demo is not available: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return demo_main(args)


def explain(config: Config, method: str, url: str) -> tuple[dict[str, object], int]:
    """What the gateway would do with ``method url`` before looking at any session.

    Follows the request path in :mod:`gateway.app`: normalise the path, route the
    internal prefix, refuse unknown methods, canonicalise the host, match a rule.
    A path alone is taken as sent to ``server.public_url``'s host.
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
    # Clients never send a fragment; the query plays no part in matching.
    raw_path = target.partition("#")[0].partition("?")[0]
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
    rules = RuleSet(config.rules)
    if not rules.method_known(method):
        return {
            "rule": None,
            "error": f"method {method!r} is refused with 405: it is not a standard method "
            "in upper case and no rule names it",
            "status": 405,
        }, EXIT_REFUSED
    rule = rules.match(method, host, path)
    if rule is None:
        return {
            "rule": None,
            "decision": "deny",
            "status": 403,
            "method": method,
            "normalized_path": path,
            "host": host,
        }, EXIT_OK
    return {
        "rule": rule.name,
        "require": _requirement(rule.require),
        "upstream": rule.upstream,
        "method": method,
        "normalized_path": path,
        "host": host,
    }, EXIT_OK


def _requirement(require: Requirement) -> dict[str, object] | str:
    if require.level is None:
        return "none"
    return {"level": require.level, "max_age": require.max_age_s, "once": require.once}
