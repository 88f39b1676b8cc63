"""``stepup-gateway demo``: the gateway, a development identity provider and Demo Bank.

Everything runs in one process on loopback: the provider (:mod:`stepup_demo.idp`),
Demo Bank (:mod:`stepup_demo.bank`) and a small risk service
(:mod:`stepup_demo.risk`) on free ports, the gateway in front of the bank with
``demo.yaml``, filled in with those ports and fresh random secrets.
DEVELOPMENT ONLY: the demo users' passwords and TOTP secrets are public.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from aiohttp import web

from gateway import model
from gateway.config import load_config_text
from gateway.errors import ConfigError

# The provider and the bank (authlib, webauthn) are imported where they are used:
# importing this package stays cheap, and `python -m stepup_demo.idp` does not find
# its module imported twice.
if TYPE_CHECKING:
    from stepup_demo.bank import DemoBank
    from stepup_demo.factors import DemoUser
    from stepup_demo.idp import IdentityProvider

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
CLIENT_ID = "stepup-gateway"
CLIENT_NAME = "Demo Bank"  # the provider's pages say "Demo Bank asks for ..."
UPSTREAM_NAME = "bank"  # demo.yaml's upstream; the audience of the bank's assertions
TOTP_ISSUER_LABEL = "stepup demo"


@dataclass(frozen=True, slots=True)
class DemoStack:
    """The running provider and bank, and the gateway config that points at them."""

    gateway_url: str
    idp_url: str
    bank_url: str
    risk_url: str  # the risk service's assess endpoint
    idp: IdentityProvider
    bank: DemoBank
    config_text: str  # demo.yaml as shipped
    environ: Mapping[str, str]  # the DEMO_* values it was rendered with (holds secrets)
    config: model.Config
    runners: tuple[web.AppRunner, ...]

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


def demo_config_text() -> str:
    return resources.files("stepup_demo").joinpath("demo.yaml").read_text(encoding="utf-8")


def _bound_socket(host: str, port: int = 0) -> socket.socket:
    """A listening-ready socket: the port is ours before anyone builds a URL with it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _free_port(host: str) -> int:
    # The gateway binds its own listener from the config, so this port is only
    # reserved until then; a clash in that moment makes start-up fail loudly.
    with contextlib.closing(_bound_socket(host)) as sock:
        port: int = sock.getsockname()[1]
        return port


def _url_host(host: str) -> str:
    """The host for URLs: ``localhost`` for loopback (WebAuthn refuses IP addresses).

    Also for the wildcard addresses, which include loopback: anything else needs TLS
    in front, since OAuth (and authlib) refuse plain http off loopback (RFC 8252 7.3).
    """
    from stepup_demo.idp import is_loopback

    if is_loopback(host) or host in ("0.0.0.0", "::"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


async def _serve(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def start_demo_stack(
    *,
    host: str = DEFAULT_HOST,
    gateway_port: int = 0,
    clock: Callable[[], float] = time.time,
    users: Mapping[str, DemoUser] | None = None,
    passkey_file: Path | None = None,
) -> DemoStack:
    """Start the provider and Demo Bank on ``host`` and render the gateway's config.

    ``gateway_port`` 0 picks a free one. The gateway itself is not started: pass
    ``stack.config`` to :func:`gateway.server.run_gateway`. Raises ConfigError
    (with everything already started stopped) if demo.yaml does not load.
    """
    from stepup_demo.bank import DemoBank
    from stepup_demo.idp import IdentityProvider
    from stepup_demo.oauth_models import DemoClient
    from stepup_demo.passkeys import PasskeyStore
    from stepup_demo.risk import risk_app

    url_host = _url_host(host)
    if gateway_port:
        # A taken port (say, a demo already running) fails here, before anything starts.
        _bound_socket(host, gateway_port).close()
    else:
        gateway_port = _free_port(host)
    gateway_url = f"http://{url_host}:{gateway_port}"
    idp_sock = _bound_socket(host)
    # The bank and the risk service answer the gateway only: loopback whatever the
    # demo's host, so nobody can reach the bank around the gateway (and its checks).
    bank_sock, risk_sock = _bound_socket("127.0.0.1"), _bound_socket("127.0.0.1")
    idp_url = f"http://{url_host}:{idp_sock.getsockname()[1]}"
    bank_url = f"http://127.0.0.1:{bank_sock.getsockname()[1]}"
    risk_url = f"http://127.0.0.1:{risk_sock.getsockname()[1]}/assess"
    client = DemoClient(
        client_id=CLIENT_ID,
        client_secret=secrets.token_urlsafe(32),
        client_name=CLIENT_NAME,
        redirect_uris=(f"{gateway_url}/_gateway/callback",),
        post_logout_redirect_uris=(f"{gateway_url}/_gateway/logged-out", f"{gateway_url}/"),
        backchannel_logout_uri=f"{gateway_url}/_gateway/backchannel-logout",
    )
    idp = IdentityProvider(
        issuer=idp_url,
        clients=[client],
        users=users,
        clock=clock,
        passkeys=PasskeyStore(passkey_file),
    )
    bank = DemoBank(
        jwks_url=f"{gateway_url}/_gateway/jwks.json",
        issuer=gateway_url,
        audience=UPSTREAM_NAME,
        clock=clock,
        # A step-up redirects a form post on to the provider: let the browser follow it.
        form_targets=(idp_url,),
    )
    environ = {
        "DEMO_GATEWAY_LISTEN": f"{host if ':' not in host else f'[{host}]'}:{gateway_port}",
        "DEMO_GATEWAY_URL": gateway_url,
        "DEMO_IDP_URL": idp_url,
        "DEMO_BANK_URL": bank_url,
        "DEMO_RISK_URL": risk_url,
        "DEMO_CLIENT_ID": client.client_id,
        "DEMO_CLIENT_SECRET": client.client_secret,
        "DEMO_SESSION_SECRET": secrets.token_urlsafe(48),
    }
    text = demo_config_text()
    runners: list[web.AppRunner] = []
    try:
        config = load_config_text(text, "demo.yaml", environ)
        runners.append(await _serve(idp.app(), idp_sock))
        runners.append(await _serve(bank.app(), bank_sock))
        runners.append(await _serve(risk_app(), risk_sock))
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        for sock in (idp_sock, bank_sock, risk_sock):
            sock.close()
        raise
    return DemoStack(
        gateway_url=gateway_url,
        idp_url=idp_url,
        bank_url=bank_url,
        risk_url=risk_url,
        idp=idp,
        bank=bank,
        config_text=text,
        environ=environ,
        config=config,
        runners=tuple(runners),
    )


def print_welcome(stack: DemoStack, out: TextIO | None = None) -> None:
    from stepup_demo.idp import describe_users

    out = out or sys.stdout
    print(
        f"\nDemo Bank, behind stepup-gateway:  {stack.gateway_url}/\n"
        f"  identity provider: {stack.idp_url}   (Demo Bank itself: {stack.bank_url})\n\n"
        "Demo users (add a TOTP secret to an authenticator app, or import the otpauth URI):\n"
        f"{describe_users(stack.idp.users, TOTP_ISSUER_LABEL)}\n\n"
        "Try: a transfer (alice approves it with a passkey, created after a one-time code\n"
        "the first time; bob cannot), a standing order (a one-time code; a passkey above\n"
        "1,000, says the risk service), savings (above 1,000 Demo Bank itself asks for a\n"
        "passkey), payees (password + one-time code).\n"
        "Press Ctrl-C to stop.\n",
        file=out,
        flush=True,
    )


async def run_demo(host: str, port: int, passkey_file: Path | None = None) -> int:
    from gateway import logs, server  # the gateway proper, only when actually serving

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = await start_demo_stack(host=host, gateway_port=port, passkey_file=passkey_file)
    # stdout is for the person at the terminal (the URL, the users); the gateway's
    # JSON log lines go to stderr, so `stepup-gateway demo 2>/dev/null` reads clean.
    logs.configure(stack.config.server.log_level, stream=sys.stderr)
    try:
        await server.run_gateway(stack.config, stop, on_ready=lambda _: print_welcome(stack))
    finally:
        await stack.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """``stepup-gateway demo``; ``args`` has ``host``, ``port``, ``i_know_this_is_not_production``
    (and optionally ``passkeys``, a JSON file to keep passkeys in across runs)."""
    from stepup_demo.idp import print_dev_banner, refuse_public_bind
    from stepup_demo.passkeys import PasskeyError

    host = getattr(args, "host", None) or DEFAULT_HOST
    port = getattr(args, "port", None)
    port = DEFAULT_PORT if port is None else int(port)
    problem = refuse_public_bind(host, bool(getattr(args, "i_know_this_is_not_production", False)))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print_dev_banner()
    passkeys = getattr(args, "passkeys", None)
    try:
        return asyncio.run(run_demo(host, port, Path(passkeys) if passkeys else None))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    except ConfigError as exc:  # demo.yaml and the config loader disagree: a bug here
        print(f"the demo config does not load:\n{exc}", file=sys.stderr)
        return 1
    except (OSError, PasskeyError) as exc:
        hint = ""
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            hint = f"\n(is another demo running on port {port}? --port 0 picks a free one)"
        print(f"cannot start the demo: {exc}{hint}", file=sys.stderr)
        return 1
