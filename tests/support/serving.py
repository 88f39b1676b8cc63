"""The gateway answering on a loopback port for as long as a block runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.app import Gateway, make_server


@contextlib.asynccontextmanager
async def serving(gateway: Gateway, port: int, host: str = "127.0.0.1") -> AsyncIterator[Gateway]:
    """``gateway`` started and listening on ``host``:``port`` (the server ``run`` uses)
    until the block ends; then the listener is closed, and the gateway."""
    runner = web.ServerRunner(make_server(gateway), access_log=None)
    try:
        await gateway.start()
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        yield gateway
    finally:
        await runner.cleanup()
        await gateway.close()
