"""On loopback ports: the gateway (alone, or with the demo around it) answering for as
long as a block runs; waiting for a process to listen."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.app import Gateway, make_server
from gateway.sockets import unix_listening_socket
from stepup_demo import DemoStack, start_demo_stack


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, port: int, host: str = "127.0.0.1") -> AsyncIterator[Gateway]:
    """``gateway`` started and listening on ``host``:``port`` (and its
    ``server.unix_socket``) with the server ``run`` uses, until the block ends; then
    the listener is closed, and the gateway."""
    runner = web.ServerRunner(make_server(gateway), access_log=None)
    unix_socket = gateway.config.server.unix_socket
    try:
        await gateway.start()
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        if unix_socket is not None:  # made as `run` makes it
            mode = gateway.config.server.unix_socket_mode
            sock = unix_listening_socket(unix_socket, mode, backlog=128)
            await web.SockSite(runner, sock).start()
        yield gateway
    finally:
        await runner.cleanup()
        await gateway.close()


@contextlib.asynccontextmanager
async def serving_demo(clock: Callable[[], float]) -> AsyncIterator[tuple[DemoStack, Gateway]]:
    """The demo (provider, Demo Bank, risk service) and its gateway, on ``clock``."""
    stack = await start_demo_stack(clock=clock)
    server = stack.config.server
    try:
        gateway = Gateway(stack.config, clock=clock)
        async with serving(gateway, server.listen_port, server.listen_host):
            yield stack, gateway
    finally:
        await stack.close()


async def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Until something accepts on 127.0.0.1:``port`` (a busy machine starts slowly)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the process for port {port} exited ({proc.returncode})")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")
